"""The gateway end to end against real in-process model services (generated models, real FFmpeg)."""

import asyncio
import contextlib
import tempfile

import cv2
import grpc
import numpy as np
import pytest
from superwav2lip.gateway.v1 import gateway_pb2

from gateway.metrics import GatewayMetrics
from gateway.options import JobOptions
from gateway.compositing import crop_face
from gateway.pipeline import LipSyncJob

from tests.support.paths import SHARED_MEDIA, shared_file
from tests.support.stack import MODULE_LOOP, model_clients, running_stack, shared_stack
from tests.support.media_factory import decode_all, encode_png, encode_video, marker_frames, scene, speech_wav, stream_durations, with_marker
from tests.support.waiting import eventually_async

pytestmark = MODULE_LOOP
stack = shared_stack()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


async def test_identity_model_changes_only_the_face_box(identity_models_dir):
    """Before encoding: pixels outside each box are untouched; inside, only the 96x96 round trip remains."""
    face = encode_video(marker_frames(20))
    async with running_stack(identity_models_dir) as stack:
        clients = model_clients(stack)
        clients.open()
        job = LipSyncJob(clients, JobOptions(crop_mode="box"), GatewayMetrics(), chunk_frames=16)
        plan = await job.plan(face, speech_wav(1.5))
        outputs = [(frame, box) async for frame, box in job.frames(plan)]
        await clients.close()
    decoded, _ = decode_all(face)
    assert len(outputs) == plan.frames == round(plan.speech.seconds * 25)
    assert plan.source_frames == 20 and all(t is not None for t in plan.targets)
    for index, (output, target) in enumerate(outputs):
        source = decoded[[*range(20), *range(18, 0, -1)][index % 38]]  # ping-pong
        box = target.box
        x1, y1, x2, y2 = box
        outside = np.ones(output.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(output[outside], source[outside]), f"frame {index}: pixels outside the box changed"
        round_trip = cv2.resize(crop_face(source, box), (x2 - x1, y2 - y1))
        assert psnr(output[y1:y2, x1:x2], round_trip) > 40, f"frame {index}: face region is not the round trip"
        assert not np.array_equal(output[y1:y2, x1:x2], source[y1:y2, x1:x2])  # the face really was replaced


async def test_still_image_gives_an_mp4_as_long_as_the_speech(stack):
    still = with_marker(scene(321, 241), 120, 90)  # odd size: rounded down to even
    audio = speech_wav(2.3)
    mp4, info, progress = await stack.generate(encode_png(still), audio)
    frames, rate = decode_all(mp4)
    durations = stream_durations(mp4)
    assert (info.width, info.height) == (320, 240) and frames[0].shape[:2] == (240, 320)
    assert rate == 25 and len(frames) == info.frames == round(2.3 * 25)
    assert abs(durations["video"] - 2.3) <= 1 / 25 and abs(durations["audio"] - 2.3) <= 1 / 25
    assert mp4[4:8] == b"ftyp" and mp4.index(b"moov") < mp4.index(b"mdat")  # faststart
    stages = [p.stage for p in progress]
    assert stages[0] == "decode" and "detect" in stages and "lipsync" in stages and stages[-1] == "encode"
    assert progress[-1].done == progress[-1].total == info.frames


@pytest.mark.parametrize("fps", [25, 30])
async def test_video_shorter_than_speech_keeps_its_size_and_rate(stack, fps):
    from fractions import Fraction

    face = encode_video(marker_frames(12, 256, 192), fps=Fraction(fps))
    mp4, info, _ = await stack.generate(face, speech_wav(1.7))
    frames, rate = decode_all(mp4)
    durations = stream_durations(mp4)
    assert rate == fps and (info.width, info.height) == (256, 192)
    assert len(frames) == round(1.7 * fps)
    assert abs(durations["video"] - 1.7) <= 1 / fps and abs(durations["audio"] - 1.7) <= 1 / fps


async def test_real_photo_and_speech_with_the_real_detector(dev_models_dir, tmp_path):
    """The acceptance run on real media: durations equal the audio within one frame, size kept."""
    import os
    import shutil

    from tests.support.paths import SHARED_MODELS
    scrfd = shared_file(SHARED_MODELS, "scrfd_2.5g_bnkps.onnx")
    shutil.copy(dev_models_dir / "manifest.json", tmp_path / "manifest.json")
    os.symlink(dev_models_dir / "dev", tmp_path / "dev")
    os.symlink(scrfd, tmp_path / scrfd.name)
    photo = shared_file(SHARED_MEDIA, "face_people_0.png").read_bytes()
    speech = shared_file(SHARED_MEDIA, "speech_en_9s_48k_stereo.mp3").read_bytes()
    async with running_stack(tmp_path) as stack:
        mp4, info, _ = await stack.generate(photo, speech)
    durations = stream_durations(mp4)
    assert (info.width, info.height) == (474, 474) and info.fps == 25
    assert abs(durations["video"] - info.audio_seconds) <= 1 / 25
    assert abs(durations["audio"] - info.audio_seconds) <= 1 / 25


async def expect_error(call, code, *fragments):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() == code, error.value.details()
    for fragment in fragments:
        assert fragment in error.value.details()


async def test_bad_inputs_get_their_status_codes(stack):
    good_face = encode_png(with_marker(scene(), 100, 80))
    audio = speech_wav(1.0)
    no_face_video = encode_video(marker_frames(6, missing={3, 4}))
    await expect_error(stack.generate(b"not media at all" * 10, audio), grpc.StatusCode.INVALID_ARGUMENT, "face")
    await expect_error(stack.generate(good_face, b"\x01\x02" * 300), grpc.StatusCode.INVALID_ARGUMENT, "audio")
    await expect_error(stack.generate(good_face, speech_wav(0.005)), grpc.StatusCode.INVALID_ARGUMENT,
                       "shorter than one Wav2Lip window")
    # Every frame detected: with detect_every k > 1 a face missing only between two detections is interpolated.
    await expect_error(stack.generate(no_face_video, audio, detect_every=1), grpc.StatusCode.FAILED_PRECONDITION,
                       "frame 3")
    refused = await stack.status_of([gateway_pb2.GenerateChunk(options=gateway_pb2.GenerateOptions(crf=99)),
                                     gateway_pb2.GenerateChunk(face_chunk=good_face),
                                     gateway_pb2.GenerateChunk(audio_chunk=audio)])
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "crf" in refused.details()
    # With the keep policy the same clip works, and the frames without a face pass through.
    mp4, info, _ = await stack.generate(no_face_video, audio, no_face_policy=gateway_pb2.NO_FACE_POLICY_KEEP_FRAME)
    assert info.frames == 25
    # The service keeps serving after all of that.
    mp4, info, _ = await stack.generate(good_face, audio)
    assert info.frames == 25


async def test_a_service_that_is_down_is_named(dev_models_dir):
    async with running_stack(dev_models_dir, down="lipsync") as stack:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stack.generate(encode_png(with_marker(scene(), 100, 80)), speech_wav(1.0))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "lipsync service" in error.value.details()
    assert "127.0.0.1" not in error.value.details() and ":1" not in error.value.details()  # by role, not address


async def test_client_deadline_stops_the_work(dev_models_dir):
    face = encode_video(marker_frames(40))
    async with running_stack(dev_models_dir, chunk_frames=8, rpc_batch_items=4, max_inflight_rpcs=1) as stack:
        await expect_error(stack.generate(face, speech_wav(60.0), timeout=1.5), grpc.StatusCode.DEADLINE_EXCEEDED)

        def lipsync_calls(text):
            lines = [l for l in text.splitlines() if l.startswith("swl_grpc_requests_total") and "Generate" in l]
            return sum(float(l.split()[-1]) for l in lines)

        async def settled() -> tuple[float] | None:  # the calls in flight at the deadline end and are counted
            first = lipsync_calls(await stack.metrics_text("lipsync"))
            await asyncio.sleep(1.5)
            return (first,) if lipsync_calls(await stack.metrics_text("lipsync")) == first else None

        (before,) = await eventually_async(settled, seconds=20, what="the lip-sync call count settled")
        await asyncio.sleep(1.5)
        after = lipsync_calls(await stack.metrics_text("lipsync"))
        # 60 s of speech is 1500 frames: far from done, yet no more lip-sync calls arrive.
        assert before < 1500 / 4 and after == before


async def test_second_request_reloads_no_model_and_leaves_no_temp_files(dev_models_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    face = encode_png(with_marker(scene(), 100, 80))
    async with running_stack(dev_models_dir) as stack:
        for _ in range(2):
            await stack.generate(face, speech_wav(0.8))
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stack.generate(b"corrupt" * 20, speech_wav(0.8))
        for name in ("detector", "lipsync", "enhancer"):
            loads = [l for l in (await stack.metrics_text(name)).splitlines()
                     if l.startswith("swl_model_loads_total{")]
            assert loads and all(l.endswith(" 1.0") for l in loads), loads
        gateway_metrics = await stack.metrics_text("gateway")
    assert 'swl_gateway_jobs_total{code="OK"} 2.0' in gateway_metrics
    assert 'swl_gateway_jobs_total{code="INVALID_ARGUMENT"} 1.0' in gateway_metrics
    assert list(tmp_path.iterdir()) == []


async def test_http_style_unary_call_returns_video_mp4(stack):
    body = await stack.generate_video(encode_png(with_marker(scene(), 100, 80)), speech_wav(1.0))
    assert body.content_type == "video/mp4"
    assert abs(stream_durations(body.data)["video"] - 1.0) <= 1 / 25


async def test_memory_stays_flat_as_the_clip_grows(dev_models_dir):
    """Peak Python-tracked memory of planning and synthesising a 4x longer clip stays about the same."""
    import tracemalloc

    async def peak(frames):
        face = encode_video(marker_frames(frames, 320, 240))
        audio = speech_wav(frames / 25)
        async with running_stack(dev_models_dir) as stack:
            clients = model_clients(stack)
            clients.open()
            job = LipSyncJob(clients, JobOptions(), GatewayMetrics(), chunk_frames=16)
            tracemalloc.start()
            plan = await job.plan(face, audio)
            count = sum([1 async for _ in job.frames(plan)])
            _, top = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            plan.source.close()
            await clients.close()
        assert count == frames
        return top

    short, long = await peak(50), await peak(200)
    frame_bytes = 320 * 240 * 3
    assert long < short + 20 * frame_bytes, (short, long)  # holding every frame would add 150 frames


async def test_an_overloaded_model_service_is_named_after_retries(dev_models_dir):
    """Every lip-sync call is larger than the lip-sync queue: retries cannot help, the client is told why."""
    async with running_stack(dev_models_dir, overrides={"lipsync": {"max_queue_size": 4}}) as stack:
        await expect_error(stack.generate(encode_png(with_marker(scene(), 100, 80)), speech_wav(1.0)),
                           grpc.StatusCode.RESOURCE_EXHAUSTED, "the lipsync service")
        lipsync_metrics = await stack.metrics_text("lipsync")
    rejected = [l for l in lipsync_metrics.splitlines() if l.startswith("swl_queue_rejections_total{")]
    assert rejected and float(rejected[0].split()[-1]) >= 4 * 16  # the first call and its 3 retries


async def test_a_failing_part_cancels_its_sibling_model_calls():
    """One RPC-sized part fails: the part still waiting on its model call is cancelled, not left running."""
    from gateway.clients import run_in_parts
    from service_runtime.errors import FailedPrecondition

    cancelled = asyncio.Event()

    async def run(part):
        if part[0] == 0:
            try:
                await asyncio.sleep(60)  # a slow model call
            except asyncio.CancelledError:
                cancelled.set()
                raise
        raise FailedPrecondition("the detector service refused an item")

    with pytest.raises(FailedPrecondition, match="refused"):
        await run_in_parts(list(range(8)), 4, run)
    assert cancelled.is_set()


def top_level_boxes(data: bytes) -> list[tuple[str, int, int]]:
    """(type, offset, size) of each top-level ISO-BMFF box."""
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        boxes.append((data[offset + 4 : offset + 8].decode("latin-1"), offset, size))
        offset += size
    return boxes


async def test_streamed_output_is_a_fragmented_mp4_with_both_tracks_in_each_fragment(stack):
    face = encode_video(marker_frames(30))
    chunks = [gateway_pb2.GenerateChunk(options=gateway_pb2.GenerateOptions()),
              gateway_pb2.GenerateChunk(face_chunk=face), gateway_pb2.GenerateChunk(audio_chunk=speech_wav(5.0))]
    events = [e async for e in stack.stub.Generate(iter(chunks), timeout=120)]
    unary = await stack.generate_video(face, speech_wav(5.0))
    kinds = [e.WhichOneof("event") for e in events]
    lipsync_done = [i for i, e in enumerate(events) if kinds[i] == "progress" and e.progress.stage == "lipsync"]
    assert kinds.index("video_chunk") < lipsync_done[-1] and kinds[-1] == "result"
    mp4 = b"".join(e.video_chunk for e, kind in zip(events, kinds) if kind == "video_chunk")
    boxes = top_level_boxes(mp4)
    assert [b[0] for b in boxes[:2]] == ["ftyp", "moov"] and sum(b[2] for b in boxes) == len(mp4)
    fragments = [b for b in boxes if b[0] == "moof"]
    assert len(fragments) >= 3  # a fragment every 2 s of video
    for _, offset, size in fragments[:-1]:
        assert mp4[offset : offset + size].count(b"traf") == 2  # video and audio, interleaved
    frames, rate = decode_all(mp4)
    assert len(frames) == events[-1].result.frames == 125 and events[-1].result.size_bytes == len(mp4)
    durations = stream_durations(mp4)
    assert abs(durations["video"] - 5.0) <= 0.04 and abs(durations["audio"] - 5.0) <= 0.04
    faststart_boxes = [b[0] for b in top_level_boxes(unary.data)]
    assert faststart_boxes.index("moov") < faststart_boxes.index("mdat") and "moof" not in faststart_boxes  # one file
