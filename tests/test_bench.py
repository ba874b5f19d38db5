"""The benchmarks' code paths on tiny generated models, so that they cannot silently rot: every row present and
every ratio computed from the measured numbers."""

import re

from bench import detection

from .media_factory import encode_video, marker_frames


def test_detection_bench_measures_every_size_and_derives_its_ratios(dev_models_dir, tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(encode_video(marker_frames(12, 640, 360)))
    rows = detection.measure(dev_models_dir, (), [clip], frames_per_clip=6, allow_dev=True)
    assert [r["input"] for r in rows] == [label for label, _, _ in detection.SIZES]
    assert all(r["ms"] > 0 and r["frames"] == 6 and r["missed"] == 0 for r in rows)
    assert rows[0]["mean_iou"] == rows[0]["worst_iou"] == 1.0  # the reference against itself
    assert [r["shape"] for r in rows[:2]] == ["640x640", "640x384"]
    lines = detection.table(rows).splitlines()[2:]
    for row, line in zip(rows, lines):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert float(cells[5]) == round(row["ms"] / rows[0]["ms"], 2)  # the ratio comes from the two timings
        assert cells[4] == f"{row['ms']:.1f}" and cells[8] == f"{row['missed']}/6"
    assert re.fullmatch(r"aspect \d+", detection.recommend(rows))


def test_detect_every_sweep_replays_the_gateway_drift_check_against_every_frame(dev_models_dir, tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(encode_video(marker_frames(24, 320, 240)))
    rows = detection.every_sweep(dev_models_dir, (), [clip], 320, 24, allow_dev=True)
    assert [r["every"] for r in rows] == list(detection.EVERY)
    assert rows[0]["detected"] == 1.0 and rows[0]["mean_iou"] == rows[0]["worst_iou"] == 1.0
    for row in rows[1:]:  # fewer detections than every frame, never fewer than the picks themselves
        assert 1 / row["every"] <= row["detected"] <= 1.0 and 0 < row["worst_iou"] <= row["mean_iou"] <= 1.0
    assert detection.recommend_every(rows) in detection.EVERY
    table = detection.every_table(rows).splitlines()[2:]
    assert [line.split("|")[3].strip() for line in table] == [f"{r['detected']:.0%}" for r in rows]


def test_stage_breakdown_is_the_difference_of_two_metric_snapshots():
    from prometheus_client import generate_latest

    from bench import stages
    from gateway.metrics import GatewayMetrics
    from service_runtime.metrics import ServiceMetrics

    gateway, lipsync = GatewayMetrics(), ServiceMetrics()
    gateway.stage_seconds.labels("lipsync").observe(1.0)  # an earlier job, before the snapshot
    lipsync.inference_seconds.labels("wav2lip_gan").observe(0.8)
    empty = stages.sums(generate_latest(ServiceMetrics().registry).decode())
    before = {"gateway": stages.sums(generate_latest(gateway.registry).decode()),
              "lipsync": stages.sums(generate_latest(lipsync.registry).decode()), "detector": empty, "enhancer": empty}
    for stage, seconds in (("detect", 0.5), ("lipsync", 2.0), ("lipsync", 1.5), ("encode", 0.7)):
        gateway.stage_seconds.labels(stage).observe(seconds)
    lipsync.inference_seconds.labels("wav2lip_gan").observe(3.0)
    after = {**before, "gateway": stages.sums(generate_latest(gateway.registry).decode()),
             "lipsync": stages.sums(generate_latest(lipsync.registry).decode())}
    rows = {name: seconds for name, seconds, _ in stages.breakdown(before, after, wall=5.0)}
    assert rows["gateway: lipsync"] == 3.5 and rows["gateway: detect"] == 0.5 and rows["gateway: encode"] == 0.7
    assert rows["lipsync: wav2lip_gan inference"] == 3.0
    assert rows["lip-sync transfer and queueing"] == 0.5  # the round trip minus the model, both measured
    assert rows["gateway: paste"] == 0.0 and rows["end to end (wall)"] == 5.0
    line = next(l for l in stages.table(stages.breakdown(before, after, 5.0), 5.0).splitlines()
                if l.startswith("| gateway: lipsync"))
    assert "| 3.50 | 70% |" in line
