"""The gateway's resource caps (crf, preset, pixels x frames, output bytes, avatar deadlines), the decoder allow-list,
the faststart rewrite's copies, and a job's inputs deleted when it ends."""

import io
import struct
import time
import tracemalloc
from fractions import Fraction

import av
import grpc
import numpy as np
import pytest
from superwav2lip.gateway.v1 import gateway_pb2

from gateway.audio import Speech, decode_speech
from gateway.deadline import JobDeadline
from gateway.face_source import FaceSource
from gateway.limits import MediaLimits
from gateway.metrics import GatewayMetrics
from gateway.mp4_boxes import faststart
from gateway.mp4_writer import Mp4Writer
from gateway.options import JobOptions
from gateway.pipeline import plan_avatar
from gateway.planning import Planner
from gateway.service import GatewaySettings
from service_runtime.errors import InvalidArgument, ResourceExhausted
from service_runtime.settings import SettingsError

from tests.support.media_factory import encode_png, encode_video, marker_frames, scene, speech_wav, with_marker
from tests.support.stack import model_clients, running_stack
from tests.support.waiting import eventually_async

FACE = encode_png(with_marker(scene(), 100, 80))


def chunks(face: bytes, **options) -> list[gateway_pb2.GenerateChunk]:
    return [gateway_pb2.GenerateChunk(options=gateway_pb2.GenerateOptions(**options)),
            gateway_pb2.GenerateChunk(face_chunk=face), gateway_pb2.GenerateChunk(audio_chunk=speech_wav(2.0))]


def test_crf_and_preset_are_capped_by_settings_and_a_bad_preset_setting_stops_start_up():
    limits = MediaLimits.from_settings(GatewaySettings.from_env({}, min_crf=20, slowest_preset="fast"))
    message = gateway_pb2.GenerateOptions(crf=20, preset="fast")
    assert JobOptions.from_proto(message, limits).crf == 20
    for options, setting in (({"crf": 19}, "SWL_GATEWAY_MIN_CRF"), ({"preset": "medium"}, "SWL_GATEWAY_SLOWEST_PRESET")):
        with pytest.raises(InvalidArgument, match=setting):
            JobOptions.from_proto(gateway_pb2.GenerateOptions(**options), limits)
    with pytest.raises(SettingsError, match="SWL_GATEWAY_SLOWEST_PRESET='glacial' is not an x264 preset"):
        MediaLimits.from_settings(GatewaySettings.from_env({"SWL_GATEWAY_SLOWEST_PRESET": "glacial"}))


async def test_crf_preset_and_pixels_times_frames_are_refused_before_the_work(dev_models_dir):
    # 2 s at 25 fps of 320x240 is 3.84 M pixels x frames: under 4 M; the same at 640x480 is over.
    async with running_stack(dev_models_dir, max_output_pixel_frames=4_000_000) as stack:
        for options, fragment in (({"crf": 0}, "crf 0 is below this gateway's lowest of 18 (SWL_GATEWAY_MIN_CRF)"),
                                  ({"preset": "veryslow"}, "(SWL_GATEWAY_SLOWEST_PRESET)")):
            refused = await stack.status_of(chunks(FACE, **options))
            assert refused is not None and refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
            assert fragment in refused.details()
        large = encode_png(with_marker(scene(640, 480), 200, 160))
        refused = await stack.status_of(chunks(large))
        assert refused is not None and refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
        assert "50 frames of 640x480" in refused.details() and "SWL_GATEWAY_MAX_OUTPUT_PIXEL_FRAMES" in refused.details()
        assert await stack.status_of(chunks(FACE, crf=18, preset="medium")) is None


@pytest.mark.parametrize("fragmented", [False, True])
async def test_the_output_is_cut_at_max_output_bytes_while_encoding(fragmented):
    rng = np.random.default_rng(0)
    speech = Speech(np.zeros(32000, np.float32), speech_wav(2.0))
    writer = Mp4Writer(320, 240, Fraction(25), 18, "ultrafast", speech, fragmented=fragmented,
                       limits=MediaLimits(max_output_bytes=1 << 20))
    written = 0
    with pytest.raises(ResourceExhausted, match=r"passed 1 MiB while encoding.*\(SWL_GATEWAY_MAX_OUTPUT_MB\)"):
        for _ in range(50):  # noise at crf 18: about 100 KB a frame, 5 MB in all
            await writer.write([rng.integers(0, 256, (240, 320, 3), np.uint8) for _ in range(5)])
            written += 5
    await writer.abort()
    assert written < 50


def fake_mp4(media_bytes: int) -> bytes:
    """ftyp, an mdat of `media_bytes` and a moov whose one chunk offset points into it (faststart moves moov)."""
    def box(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I4s", 8 + len(body), kind) + body

    ftyp = box(b"ftyp", b"isom\0\0\0\0isom")
    stco = box(b"stco", b"\0\0\0\0" + struct.pack(">II", 1, len(ftyp) + 8))
    moov = box(b"moov", box(b"trak", box(b"mdia", box(b"minf", box(b"stbl", stco)))))
    return ftyp + box(b"mdat", b"\x07" * media_bytes) + moov


def test_the_faststart_rewrite_of_the_muxers_buffer_copies_the_video_once():
    buffer = io.BytesIO(fake_mp4(16 << 20))
    tracemalloc.start()
    try:
        with buffer.getbuffer() as view:
            moved = faststart(view)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert moved[12 + 8 + 4 : 12 + 8 + 8] == b"moov"  # right after ftyp
    mdat = moved.index(b"mdat") - 4
    stco = moved.index(b"stco")
    assert struct.unpack_from(">I", moved, stco + 12)[0] == mdat + 8  # the chunk offset follows its data
    assert peak < (16 << 20) * 1.1, f"{peak / (16 << 20):.2f} copies of the video held at once"


def video_in(codec: str, container_format: str) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height = 320, 240
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for frame in marker_frames(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def audio_in(codec: str, container_format: str, rate: int = 48000) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        samples = (0.3 * np.sin(np.arange(rate) / rate * 2 * np.pi * 220)).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate = rate
        for resampled in av.AudioResampler(format=stream.codec_context.format.name, layout="mono",
                                           rate=rate).resample(frame):
            container.mux(stream.encode(resampled))
        container.mux(stream.encode(None))
    return buffer.getvalue()


@pytest.mark.parametrize("codec,container_format", [("libx264", "mp4"), ("mpeg4", "avi"), ("libvpx-vp9", "webm"),
                                                    ("mjpeg", "avi")])
def test_allowed_video_decoders_open(codec, container_format):
    source = FaceSource(video_in(codec, container_format), 25.0)
    assert source.size == (320, 240)
    source.close()


@pytest.mark.parametrize("codec,container_format,name", [("ffv1", "matroska", "ffv1"),
                                                         ("mpeg2video", "mpegts", "mpeg2video")])
def test_a_video_codec_off_the_allow_list_is_refused_by_name(codec, container_format, name):
    with pytest.raises(InvalidArgument, match=f"face: the '{name}' video codec is not accepted here; send H.264"):
        FaceSource(video_in(codec, container_format), 25.0)


@pytest.mark.parametrize("codec,container_format", [("pcm_s16le", "wav"), ("flac", "flac"), ("aac", "mp4"),
                                                    ("libmp3lame", "mp3"), ("libopus", "ogg")])
def test_allowed_audio_decoders_open(codec, container_format):
    assert abs(decode_speech(audio_in(codec, container_format)).seconds - 1.0) < 0.1


@pytest.mark.parametrize("codec,container_format,name", [("mp2", "matroska", "mp2"), ("ac3", "matroska", "ac3")])
def test_an_audio_codec_off_the_allow_list_is_refused_by_name(codec, container_format, name):
    with pytest.raises(InvalidArgument, match=f"audio: the '{name}' audio codec is not accepted here; send WAV"):
        decode_speech(audio_in(codec, container_format))


def test_an_avatar_deadline_stops_at_its_cap_and_says_so():
    deadline = JobDeadline(60, 30)
    deadline.scale_to_speech(3600, at_most=(90, "SWL_GATEWAY_MAX_AVATAR_DEADLINE_S"))
    assert deadline.at - time.monotonic() <= 90
    assert "longest deadline of 90 s" in deadline.exceeded().message
    assert "SWL_GATEWAY_MAX_AVATAR_DEADLINE_S" in deadline.exceeded().message


async def test_planning_an_avatar_uses_the_capped_deadline(dev_models_dir):
    """An 8 s clip would get 60 + 30 x 8 = 300 s; the cap is 100 s."""
    async with running_stack(dev_models_dir) as stack:
        clients = model_clients(stack)
        clients.open()
        try:
            limits = MediaLimits(max_avatar_deadline_s=100)
            deadline = JobDeadline(60, 30)
            planner = Planner(clients, JobOptions(), GatewayMetrics(), chunk_frames=16, limits=limits,
                              deadline=deadline)
            started = time.monotonic()
            await plan_avatar(planner, encode_video(marker_frames(200)), deadline)
            assert deadline.at - started <= 100
        finally:
            await clients.close()


async def job_folder_after(stack, data_dir, job_id: str, states: set[str]) -> list[str]:
    async def ended():
        job = await stack.stub.GetJob(gateway_pb2.JobRequest(job_id=job_id), timeout=10)
        return job if gateway_pb2.Job.State.Name(job.state) in states else None

    await eventually_async(ended, seconds=60, every=0.1, what=f"job {job_id} in {states}")
    folder = data_dir / "jobs" / job_id
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


async def test_a_jobs_inputs_are_deleted_when_it_ends(dev_models_dir, tmp_path):
    async with running_stack(dev_models_dir, data_dir=str(tmp_path)) as stack:
        done = await stack.stub.SubmitJob(gateway_pb2.SubmitJobRequest(face=FACE, audio=speech_wav(0.8)), timeout=30)
        await job_folder_after(stack, tmp_path, done.job_id, {"SUCCEEDED"})
        folder = tmp_path / "jobs" / done.job_id  # SUCCEEDED is saved first, then the inputs are removed
        await eventually_async(lambda: sorted(p.name for p in folder.iterdir()) == ["result.mp4"], seconds=10,
                               what="only the result left in the succeeded job's folder")
        no_face = encode_png(scene())
        failed = await stack.stub.SubmitJob(gateway_pb2.SubmitJobRequest(face=no_face, audio=speech_wav(0.8)),
                                            timeout=30)
        assert await job_folder_after(stack, tmp_path, failed.job_id, {"FAILED"}) == []
    async with running_stack(dev_models_dir, data_dir=str(tmp_path), job_workers=0) as stack:
        queued = await stack.stub.SubmitJob(gateway_pb2.SubmitJobRequest(face=FACE, audio=speech_wav(0.8)), timeout=30)
        assert (tmp_path / "jobs" / queued.job_id / "face").exists()
        await stack.stub.DeleteJob(gateway_pb2.JobRequest(job_id=queued.job_id), timeout=10)
        assert await job_folder_after(stack, tmp_path, queued.job_id, {"CANCELLED"}) == []
