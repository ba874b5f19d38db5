"""Hostile and broken input through the public API: FFmpeg follows no reference, every bad input gets its
documented code, admission refuses before the upload, cancelled jobs leave the gateway serving, and a wedged
model service ends the job at its deadline."""

import asyncio
import contextlib
import errno
import http.server
import io
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from fractions import Fraction

import av
import cv2
import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from superwav2lip.gateway.v1 import gateway_pb2

from gateway.mp4_boxes import faststart

from tests.support.paths import ROOT
from tests.support.processes import service_env, free_port
from tests.support.media_factory import encode_png, encode_video, marker_frames, scene, speech_wav, with_marker
from tests.support.metrics import metric
from tests.support.stack import MODULE_LOOP, running_stack, shared_stack
from tests.support.waiting import eventually_async

pytestmark = MODULE_LOOP
stack = shared_stack()

GOOD_FACE = encode_png(with_marker(scene(), 100, 80))


def good_audio() -> bytes:
    return speech_wav(0.4)


def chunks_of(face: bytes, audio: bytes, options: gateway_pb2.GenerateOptions, *extra: gateway_pb2.GenerateChunk):
    return [gateway_pb2.GenerateChunk(options=options), gateway_pb2.GenerateChunk(face_chunk=face),
            *extra, gateway_pb2.GenerateChunk(audio_chunk=audio)]


async def call_status(stack, chunks, timeout: float = 30) -> grpc.RpcError | None:
    return await stack.status_of(chunks, timeout)


async def gateway_is_serving(stack) -> bool:
    reply = await health_pb2_grpc.HealthStub(stack.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


# --- FFmpeg follows no reference inside an upload ----------------------------------------------------------------

def nobody_opened(fifo) -> bool:
    """A reader that opened the FIFO would still be blocked there (nobody writes): a non-blocking open for
    writing succeeds exactly when some reader has it open."""
    try:
        descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as error:
        return error.errno == errno.ENXIO
    os.close(descriptor)
    return False


@contextlib.contextmanager
def counting_http_server():
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the standard library's name
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()


def playlist(kind: str, fifo, url: str) -> bytes:
    entries = {
        "ffconcat-relative": "ffconcat version 1.0\nfile secret.wav\n",
        "ffconcat-absolute": f"ffconcat version 1.0\nfile '{fifo}'\n",
        "ffconcat-subfile": f"ffconcat version 1.0\nfile 'subfile,,start,0,end,0,,:{fifo}'\n",
        "m3u8-file": f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{fifo}\n#EXT-X-ENDLIST\n",
        "m3u8-file-url": f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\nfile://{fifo}\n#EXT-X-ENDLIST\n",
        "m3u8-http": f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{url}/segment.ts\n#EXT-X-ENDLIST\n",
    }
    return entries[kind].encode()


@pytest.mark.parametrize("role", ["face", "audio"])
@pytest.mark.parametrize("kind", ["ffconcat-relative", "ffconcat-absolute", "ffconcat-subfile", "m3u8-file",
                                  "m3u8-file-url", "m3u8-http"])
async def test_playlists_naming_files_or_urls_are_refused_unread(stack, tmp_path, monkeypatch, role, kind):
    fifo = tmp_path / "secret.wav"
    os.mkfifo(fifo)
    monkeypatch.chdir(tmp_path)  # where a relative name inside the upload would point
    with counting_http_server() as (url, hits):
        upload = playlist(kind, fifo, url)
        face, audio = (upload, good_audio()) if role == "face" else (GOOD_FACE, upload)
        error = await call_status(stack, chunks_of(face, audio, gateway_pb2.GenerateOptions()), timeout=20)
        assert await gateway_is_serving(stack)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.details().startswith(f"{role}: ") and "refused" in error.details()
    assert nobody_opened(fifo), "FFmpeg opened the file named inside the upload"
    assert hits == [], "FFmpeg fetched the URL named inside the upload"


# --- Every bad input gets its documented code ---------------------------------------------------------------------

def wav_header(seconds_claimed: float, samples: np.ndarray, rate: int = 16000) -> bytes:
    """A 16-bit mono WAV whose header claims `seconds_claimed` of sound, followed by `samples`."""
    data_size = int(seconds_claimed * rate) * 2
    header = b"RIFF" + struct.pack("<I", 36 + data_size) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    return header + b"data" + struct.pack("<I", data_size) + samples.astype("<i2").tobytes()


def audio_only_mp4() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def header_only_mp4() -> bytes:
    """moov first, then the mdat box header with none of its samples."""
    mp4 = faststart(encode_video(marker_frames(5)))
    return mp4[: mp4.index(b"mdat") + 4]


def long_silent_flac(seconds: float) -> bytes:
    """Silence compresses to almost nothing: about 190 bytes of FLAC per second of sound. The STREAMINFO
    total-sample count is zeroed ("unknown", as a streaming encoder writes it), so no header tells the length
    and only decoding can: the gateway must stop once the speech passes its limit."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=8000, layout="mono")
        block = np.zeros((1, 8000 * 10), np.int16)
        for index in range(int(seconds // 10)):
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout="mono")
            frame.sample_rate, frame.pts = 8000, index * block.shape[1]
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    flac = bytearray(buffer.getvalue())
    fields = int.from_bytes(flac[18:26], "big") & ~((1 << 36) - 1)  # rate, channels, bits; 36-bit count = 0
    flac[18:26] = fields.to_bytes(8, "big")
    return bytes(flac)


def huge_still() -> bytes:
    return cv2.imencode(".png", np.zeros((10000, 10000), np.uint8))[1].tobytes()


def damaged_png() -> bytes:
    png = encode_png(scene())
    return png[:200] + bytes(len(png) - 200)


Options = gateway_pb2.GenerateOptions
BAD_INPUTS = {
    # name: (face, audio, options, extra message, code, fragments of the message)
    "zero bytes": (lambda: b"", good_audio, Options(), None, "INVALID_ARGUMENT", ["face: no bytes"]),
    "truncated mp4": (lambda: encode_video(marker_frames(10))[:3000], good_audio, Options(), None,
                      "INVALID_ARGUMENT", ["face: "]),
    "header-only mp4": (header_only_mp4, good_audio, Options(), None, "INVALID_ARGUMENT", ["face: ", "no decodable"]),
    "audio-only mp4": (audio_only_mp4, good_audio, Options(), None, "INVALID_ARGUMENT", ["face: ", "no video stream"]),
    "2x2 video": (lambda: encode_video([np.zeros((2, 2, 3), np.uint8)] * 5), good_audio, Options(), None,
                  "INVALID_ARGUMENT", ["face: ", "2x2", "too small"]),
    "10000x10000 still": (huge_still, good_audio, Options(), None, "INVALID_ARGUMENT",
                          ["face: ", "10000x10000", "SWL_GATEWAY_MAX_FRAME_PIXELS"]),
    "damaged png": (damaged_png, good_audio, Options(), None, "INVALID_ARGUMENT", ["face: ", "damaged"]),
    "1000 fps header": (lambda: encode_video(marker_frames(12), fps=Fraction(1000)), good_audio, Options(), None,
                        "INVALID_ARGUMENT", ["face: ", "1000 frames per second", "SWL_GATEWAY_MAX_FPS"]),
    "text named .mp4": (lambda: b"this is a text file, renamed to clip.mp4\n" * 20, good_audio, Options(), None,
                        "INVALID_ARGUMENT", ["face: "]),
    "wav claiming 10 hours": (lambda: GOOD_FACE, lambda: wav_header(36000, np.zeros(16000)), Options(), None,
                              "INVALID_ARGUMENT", ["audio: ", "claims 36000", "SWL_GATEWAY_MAX_AUDIO_SECONDS"]),
    "wav cut short": (lambda: GOOD_FACE, lambda: wav_header(5, np.zeros(16000)), Options(), None,
                      "INVALID_ARGUMENT", ["audio: ", "claims 5.0 s", "holds 1.0 s"]),
    "11 minutes of silence, length unstated": (lambda: GOOD_FACE, lambda: long_silent_flac(660), Options(), None,
                                       "INVALID_ARGUMENT", ["audio: ", "has more than 600", "MAX_AUDIO_SECONDS"]),
    "zero samples": (lambda: GOOD_FACE, lambda: wav_header(0, np.zeros(0)), Options(), None, "INVALID_ARGUMENT",
                     ["audio: ", "0 ms"]),
    "10 ms of speech": (lambda: GOOD_FACE, lambda: speech_wav(0.01), Options(), None, "INVALID_ARGUMENT",
                        ["audio: ", "shorter than one Wav2Lip window"]),
    "empty chunk": (lambda: GOOD_FACE, good_audio, Options(), gateway_pb2.GenerateChunk(), "INVALID_ARGUMENT",
                    ["message 3", "no payload"]),
    "request id with a newline": (lambda: GOOD_FACE, good_audio, Options(request_id="job\n7"), None,
                                  "INVALID_ARGUMENT", ["options.request_id", "printable ASCII"]),
    "20 kB request id": (lambda: GOOD_FACE, good_audio, Options(request_id="x" * 20000), None, "INVALID_ARGUMENT",
                         ["options.request_id", "20000 characters"]),
    "crf out of range": (lambda: GOOD_FACE, good_audio, Options(crf=99), None, "INVALID_ARGUMENT", ["crf 99"]),
    "detect_every 0": (lambda: GOOD_FACE, good_audio, Options(detect_every=0), None, "INVALID_ARGUMENT",
                       ["detect_every 0"]),
    "corrupt reference photo": (lambda: GOOD_FACE, good_audio,
                                Options(reference_face=b"\x89PNG\r\n\x1a\n" + b"\x00" * 64), None,
                                "INVALID_ARGUMENT", ["reference_face: "]),
    "reference photo with no face": (lambda: GOOD_FACE, good_audio, Options(reference_face=encode_png(scene())),
                                     None, "INVALID_ARGUMENT", ["reference_face: ", "no face found"]),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
async def test_bad_input_gets_its_documented_code_and_the_gateway_keeps_serving(stack, name):
    face, audio, options, extra, code, fragments = BAD_INPUTS[name]
    chunks = chunks_of(face(), audio(), options, *([extra] if extra else []))
    error = await call_status(stack, chunks)
    assert error is not None, f"{name} was accepted"
    assert error.code() == getattr(grpc.StatusCode, code), (name, error.code(), error.details())
    for fragment in fragments:
        assert fragment in error.details(), (name, error.details())
    assert await gateway_is_serving(stack)
    assert await call_status(stack, chunks_of(GOOD_FACE, good_audio(), Options())) is None


async def test_options_and_reference_photo_are_checked_before_any_media_is_sent(stack):
    """The client sends its options and then nothing: the answer must not wait for media."""
    never = asyncio.Event()

    async def options_then_silence(options):
        yield gateway_pb2.GenerateChunk(options=options)
        await never.wait()

    for options, fragment in ((Options(crf=99), "crf"), (Options(request_id="a\tb"), "request_id"),
                              (Options(reference_face=encode_png(scene())), "no face found")):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in stack.stub.Generate(options_then_silence(options), timeout=20):
                pass
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in error.value.details()


async def test_a_bad_request_id_header_is_refused(stack):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.stub.GenerateVideo(gateway_pb2.GenerateVideoRequest(face=GOOD_FACE, audio=good_audio()),
                                       metadata=(("x-request-id", "y" * 200),), timeout=20)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-request-id" in error.value.details()


# --- Admission ----------------------------------------------------------------------------------------------------

def received_bytes(metrics_text: str) -> float:
    return metric(metrics_text, "swl_gateway_received_bytes_total")


async def test_past_the_job_limit_callers_get_resource_exhausted_with_a_retry_hint(dev_models_dir):
    never = asyncio.Event()

    async def options_then_wait():
        yield gateway_pb2.GenerateChunk(options=Options())
        await never.wait()

    async with running_stack(dev_models_dir, max_concurrent_jobs=1) as stack:
        slots = stack.servers["gateway"].service.servicer.slots
        holder = stack.stub.Generate(options_then_wait(), timeout=60)
        reader = asyncio.ensure_future(holder.read())
        await eventually_async(lambda: slots.running == 1, seconds=20, every=0.01, what="one job slot taken")
        before = received_bytes(await stack.metrics_text("gateway"))
        error = await call_status(stack, chunks_of(GOOD_FACE, good_audio(), Options()))
        assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "SWL_GATEWAY_MAX_CONCURRENT_JOBS" in error.details()
        trailers = dict(error.trailing_metadata())
        status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
        retry = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(retry) and retry.retry_delay.seconds == 2
        assert received_bytes(await stack.metrics_text("gateway")) == before  # its upload was never read
        holder.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await reader
        await eventually_async(lambda: slots.running == 0, seconds=20, every=0.01, what="every job slot free")
        assert await call_status(stack, chunks_of(GOOD_FACE, good_audio(), Options())) is None


# --- Cancellation and deadlines ------------------------------------------------------------------------------------

async def test_jobs_cancelled_at_random_points_leave_the_gateway_serving(dev_models_dir):
    rng = random.Random(8)
    face, audio = encode_video(marker_frames(24)), speech_wav(1.2)
    completed = 0
    async with running_stack(dev_models_dir, chunk_frames=8) as stack:
        slots = stack.servers["gateway"].service.servicer.slots
        for _ in range(60):
            call = stack.stub.Generate(iter(chunks_of(face, audio, Options(enhance=rng.random() < 0.3))), timeout=60)

            async def drain(call=call):
                async for _ in call:
                    pass

            task = asyncio.ensure_future(drain())
            await asyncio.sleep(rng.uniform(0, 0.5))
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task
                completed += 1
        await eventually_async(lambda: slots.running == 0, seconds=20, every=0.01, what="every job slot free")

        async def settled() -> str | None:  # a cancelled run's task counts itself once its encoder has stopped
            text = await stack.metrics_text("gateway")
            return text if "swl_gateway_jobs_inflight 0.0" in text else None

        metrics = await eventually_async(settled, seconds=20, what="no job in flight in the gateway's metrics")
        assert 'swl_gateway_jobs_total{code="CANCELLED"}' in metrics
        assert await gateway_is_serving(stack)
        assert await call_status(stack, chunks_of(face, audio, Options())) is None
    assert completed < 60  # most jobs really were cut off mid-way



async def test_a_model_service_that_never_answers_ends_in_deadline_exceeded(dev_models_dir, tmp_path):
    """The lip-sync service runs as its own process and is frozen with SIGSTOP: a really wedged service."""
    port, log = free_port(), tmp_path / "lipsync.log"
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", "services.lipsync"], cwd=ROOT, stderr=output,
                                   env=service_env(dev_models_dir, "SWL_LIPSYNC_", PORT=port, ALLOW_DEV_MODELS=1))
    try:
        await eventually_async(lambda: '"event": "serving"' in log.read_text(), seconds=60, what="the gateway serving")
        async with running_stack(dev_models_dir, external={"lipsync": f"127.0.0.1:{port}"}, job_deadline_s=3,
                                 job_deadline_per_audio_second_s=0) as stack:
            chunks = chunks_of(GOOD_FACE, good_audio(), Options())
            assert await call_status(stack, chunks) is None  # the channel to it is up
            process.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            error = await call_status(stack, chunks, timeout=60)
            elapsed = time.monotonic() - started
            assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
            assert "deadline of 3 s" in error.details() and "SWL_GATEWAY_JOB_DEADLINE_S" in error.details()
            assert elapsed < 3 + 10, elapsed  # the gateway's deadline, far before the client's 60 s
            process.send_signal(signal.SIGCONT)
            assert await call_status(stack, chunks) is None
    finally:
        process.kill()
        process.wait()


async def test_a_client_that_drips_its_upload_loses_its_slot_at_the_read_deadline(dev_models_dir):
    """A job slot is taken before the upload is read; a stream that then sends nothing (or too slowly) is ended
    with DEADLINE_EXCEEDED naming the setting, and its slot is free again for the next caller."""
    async with running_stack(dev_models_dir, max_concurrent_jobs=1, upload_idle_timeout_s=1.5,
                             upload_timeout_s=4.0) as stack:
        never = asyncio.Event()

        async def options_then_drip(pause: float):
            yield gateway_pb2.GenerateChunk(options=gateway_pb2.GenerateOptions())
            while True:
                await asyncio.sleep(pause)
                yield gateway_pb2.GenerateChunk(face_chunk=b"\0")
                if never.is_set():
                    return

        for pause, setting in ((5.0, "UPLOAD_IDLE_TIMEOUT_S"), (0.1, "UPLOAD_TIMEOUT_S")):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                async for _ in stack.stub.Generate(options_then_drip(pause), timeout=30):
                    pass
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.value.details()
            assert setting in error.value.details()
        assert await call_status(stack, chunks_of(GOOD_FACE, good_audio(), Options())) is None  # the slot is free
