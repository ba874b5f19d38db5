"""The benchmarks' code paths on tiny generated models, so that they cannot silently rot: every row present and
every ratio computed from the measured numbers."""

import re
import statistics
from pathlib import Path

import numpy as np

from bench import detection

from tests.support.media_factory import encode_video, marker_frames


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


def test_stand_ins_cost_what_the_real_models_cost(tmp_path):
    """The benchmark models' parameters and multiply-accumulates, counted from the graphs themselves."""
    import onnx

    from bench import full_size_models
    from service_runtime.manifest import load_manifest

    manifest = load_manifest("models")
    targets = {"wav2lip_gan": (36e6, 4e9), "gfpgan_v1.4": (84e6, 198e9), "arcface_seed": (43.6e6, 6.3e9)}
    for name, (params_target, macs_target) in targets.items():
        model, params = full_size_models.build_full_size(Path("models"), name)  # in memory: the same graph a
        onnx.checker.check_model(model)  # file would hold, without writing and reading back ~650 MB
        stored = sum(int(np.prod(w.dims)) for w in model.graph.initializer)
        macs = full_size_models.count_macs(model)
        assert abs(params / params_target - 1) < 0.05, (name, params)
        assert abs(macs / macs_target - 1) < 0.05, (name, macs)
        assert abs(stored / params - 1) < 0.05  # the count is of weights really in the file
        assert [i.name for i in model.graph.input] == [t.name for t in manifest.get(name).inputs]
    path, params = full_size_models.write_full_size(Path("models"), tmp_path, "wav2lip_gan")  # the writer, once
    assert onnx.load(str(path)).graph.input[0].name == manifest.get("wav2lip_gan").inputs[0].name and params > 36e6


def test_count_macs_matches_hand_counts_for_conv_transpose_and_gemm():
    from onnx import TensorProto, helper, numpy_helper

    from bench.full_size_models import count_macs

    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["y", "wt"], ["z"], strides=[2, 2]),
             helper.make_node("Flatten", ["z"], ["f"]), helper.make_node("Gemm", ["f", "g"], ["out"])]
    weights = [numpy_helper.from_array(np.zeros(shape, np.float32), name) for name, shape in
               (("w", (8, 3, 3, 3)), ("wt", (8, 4, 2, 2)), ("g", (4 * 32 * 32, 10)))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, 32, 32])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    conv = 16 * 16 * 8 * 3 * 3 * 3  # output pixels x output channels x (input channels x kernel)
    transpose = 8 * 16 * 16 * 4 * 2 * 2  # input elements x output channels x kernel
    gemm = 4096 * 10
    assert count_macs(model) == conv + transpose + gemm
    assert count_macs(model, {"B": 3}) == 3 * (conv + transpose + gemm)


def test_seed_comparison_runs_both_ways_and_derives_its_ratio(tmp_path):
    """A fresh process per request and the resident stack on generated models, one short clip each way."""
    from bench import seed
    from bench.throughput import prepare_models

    prepare_models(tmp_path, full_size=())
    row = seed.measure(tmp_path, seconds=0.6, enhance=True, repeats=2, process_repeats=1, work=tmp_path)
    (process,) = row.process
    assert 0 < process["startup"] < process["total"] and 0 < process["request"] < process["total"]
    assert process["startup"] + process["request"] <= process["total"]  # the rest is the process's exit
    assert len(row.resident_steady) == 2 and row.resident_first > 0 and row.resident_startup > 0
    assert row.ratio == process["total"] / statistics.median(row.resident_steady)
    line = seed.table([row], 2, 1).splitlines()[2]
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[:2] == ["GFPGAN v1.4", "0.6 s"]
    assert cells[2] == f"{process['total']:.2f}" and cells[7] == f"{row.ratio:.2f}"
    assert cells[6] == f"{0.6 / row.steady_median:.2f}"


def cells_of(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_throughput_bench_measures_both_modes_at_every_client_count(tmp_path):
    """Four real stacks on generated models (batched, the seed's lock, and one fresh stack per clip length)."""
    from bench import throughput

    throughput.prepare_models(tmp_path, full_size=())
    result = throughput.measure(tmp_path, seconds=0.6, counts=[1, 2], long_seconds=1.2, work=tmp_path)
    assert set(result.wall) == {"batched", "seed lock"}
    assert all(set(walls) == {1, 2} and min(walls.values()) > 0 for walls in result.wall.values())
    assert result.wire["detector"] > 0 and result.wire["lipsync"] > 0 and result.wire["enhancer"] == 0
    assert set(result.peak_rss_mb) == {0.6, 1.2} and min(result.peak_rss_mb.values()) > 50
    assert result.plan_cache_hits == 0  # every request is new content, so each one detects and plans
    text = throughput.tables(result)
    rows = [cells_of(line) for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [row[0] for row in rows] == ["1", "2"]
    for row in rows:
        clients = int(row[0])
        fast, slow = result.wall["batched"][clients], result.wall["seed lock"][clients]
        assert row[1] == f"{clients / fast:.3f}" and row[3] == f"{clients / slow:.3f}"
        assert row[5] == f"{slow / fast:.2f}" == f"{result.ratio(clients):.2f}"
    memory = cells_of(next(line for line in text.splitlines() if line.startswith("| MiB")))
    assert memory[3] == f"{result.peak_rss_mb[1.2] / result.peak_rss_mb[0.6]:.2f}"
    wire = cells_of(next(line for line in text.splitlines() if line.startswith("| gateway ->")))
    assert wire[4] == f"{sum(result.wire.values()):.0f}"


def test_avatar_bench_times_every_kind_of_request_and_derives_its_ratios(tmp_path):
    from bench import avatar
    from bench.throughput import prepare_models

    prepare_models(tmp_path, full_size=())
    times = avatar.measure(tmp_path, seconds=0.6, repeats=2, work=tmp_path)
    assert all(len(kind) == 2 and min(kind) > 0 for kind in (times.fresh, times.cached, times.from_avatar))
    assert times.create > 0
    rows = [cells_of(line) for line in avatar.table(times, 0.6).splitlines()[2:5]]
    fresh = statistics.median(times.fresh)
    for row, kind in zip(rows, (times.fresh, times.cached, times.from_avatar)):
        spent = statistics.median(kind)
        assert row[1:] == [f"{spent:.2f}", f"{0.6 / spent:.2f}", f"{fresh / spent:.2f}"]


def test_int8_bench_quantizes_runs_both_and_measures_the_difference(dev_models_dir, tmp_path):
    import shutil

    from bench import int8

    shutil.copy(dev_models_dir / "manifest.json", tmp_path / "manifest.json")
    spec_file = "wav2lip_gan.onnx"
    shutil.copy(dev_models_dir / "dev" / spec_file, tmp_path / spec_file)
    rng = np.random.default_rng(0)
    items = [(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8).tobytes(),
              rng.standard_normal((80, 16)).astype("<f4").tobytes()) for _ in range(40)]
    result = int8.measure(tmp_path, items)
    assert result.items == 40 and result.fp32_ms > 0 and result.int8_ms > 0 and result.quantize_seconds > 0
    assert 0 < result.mean_error <= result.max_error <= 255 and result.psnr > 0  # int8 moves the numbers
    row = cells_of(int8.table(result).splitlines()[3])
    assert row[1:5] == [f"{result.int8_ms:.1f}", f"{result.fp32_ms / result.int8_ms:.2f}",
                        f"{result.mean_error:.2f}", str(result.max_error)]


def test_live_bench_latency_is_each_chunk_to_the_first_shown_frame_that_uses_it():
    """analyse() on a session made up here: chunks sent every 100 ms, frames at 25 fps, one of them dropped."""
    from superwav2lip.live.v1 import live_pb2

    from bench import live
    from tests.support.live import Received

    Event = live_pb2.LiveEvent
    received = Received(ready=live_pb2.LiveReady(fps=25.0))
    sent_at = [10.0, 10.1, 10.2]
    for index in range(10):  # frames 2-8 speak; frame k uses chunk (k - 2) // 3 + 1; frame 5 was late
        speaking = 2 <= index <= 8
        data = b"" if index == 5 else b"jpeg"
        frame = live_pb2.LiveFrame(index=index, data=data, speaking=speaking and bool(data),
                                   speech_chunk=(index - 2) // 3 + 1 if speaking and data else 0)
        received.frames.append((10.3 + index * 0.04, frame))
    received.events += [(10.3, Event(kind=Event.KIND_SPEAKING_STARTED, frame_index=2)),
                        (10.5, Event(kind=Event.KIND_FRAMES_DROPPED, frame_index=5, count=1, reason="late")),
                        (10.7, Event(kind=Event.KIND_PLAYBACK_FINISHED, frame_index=8))]
    row = live.analyse(live.SessionResult((512, 512), 1, "on", 25.0, fps=25.0), received, sent_at)
    assert row.expected == 7 and row.shown == 6 and row.drops == {"late": 1}
    assert abs(row.dropped - 1 / 7) < 1e-9 and abs(row.sustained_fps - 6 / (7 / 25)) < 1e-9
    # chunk 1: frame 2 at 10.38; chunk 2: frame 5 was dropped, so frame 6 at 10.54; chunk 3: frame 8 at 10.62
    assert np.allclose(row.latencies_ms, [(10.38 - 10.0 - 0.2) * 1000, (10.54 - 10.1 - 0.2) * 1000,
                                          (10.62 - 10.2 - 0.2) * 1000])
    assert abs(row.first_frame_ms - 380) < 1e-6 and row.unshown_chunks == 0
    late = live.analyse(live.SessionResult((512, 512), 1, "on", 25.0, fps=25.0), received, [*sent_at, 10.3])
    assert late.unshown_chunks == 1 and len(late.latencies_ms) == 3  # no shown frame used chunk 4


def test_live_bench_quick_runs_a_real_session_and_writes_its_table(tmp_path, monkeypatch):
    """One 2 s session on a real stack (processes, generated models); the table goes into a RESULTS.md of its own."""
    from bench import live, results

    monkeypatch.setattr(results, "RESULTS", tmp_path / "RESULTS.md")
    bench = live.main(["--quick"])
    (row,) = bench.rows
    # The rate admission grants depends on how loaded this machine is: 25 fps when idle, else a lower rate it
    # says why it gave.
    assert not row.refused and (row.fps == 25.0 or 0 < row.fps < 25.0 and row.reduced_because)
    assert set(bench.alone) == {live.LIVE_BATCH}
    assert abs(row.expected - 2.0 * row.fps) <= 2  # the speech's frames, from speaking started to finished
    assert len(row.latencies_ms) + row.unshown_chunks == 20 and row.first_frame_ms > 0
    text = (tmp_path / "RESULTS.md").read_text()
    section = text[text.index("<!-- bench:live-quick -->"):text.index("<!-- /bench:live-quick -->")]
    line = next(line for line in section.splitlines() if line.startswith("| on | 512x512 |"))
    cells = cells_of(line)
    assert cells[:5] == ["on", "512x512", "1", "1", f"{row.fps:g}"]
    assert cells[5] == f"{row.sustained_fps:.1f}" and cells[6] == f"{row.sustained_fps / bench.reference:.2f}"
    assert cells[7] == f"{row.dropped:.1%}" and cells[9] == f"{row.percentile(95):.0f}"
    assert all(float(x) >= 0 for x in cells[11].split(" / "))  # every process's CPU was found
    assert sum(line.startswith(("- met:", "- MISSED:")) for line in section.splitlines()) == 3
