"""Slow clients against a real gateway process (issue #26): idle upload streams and a 1 KiB/s SSE reader."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import io
import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from fractions import Fraction

import av
import grpc
import numpy as np
import pytest
from superwav2lip.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from tests.support.envoy import envoy_process
from tests.support.media_factory import (decode_all, encode_png, encode_video, marker_frames, scene, speech_wav,
                                         stream_durations, with_marker)
from tests.support.metrics import metric
from tests.support.process_stack import ProcessStack
from tests.support.processes import PeakRss, free_port
from tests.support.waiting import eventually_async

MiB = 1 << 20
IDLE_TIMEOUT_S = 5.0  # room for 11 calls to be admitted on a loaded 2-core machine before any is cut
SLOTS = 11  # one wave of 10 idle streams and a real job fill it; 20 idle streams in all would not fit
WAVE = 10
IDLE_SETTING = "SWL_GATEWAY_UPLOAD_IDLE_TIMEOUT_S"
RSS_GROWTH_LIMIT = 64 * MiB
READ_RATE = 1024  # bytes a second, the slow SSE reader's pace


@pytest.fixture
def idle_stack(tmp_path, dev_models_dir) -> Iterator[ProcessStack]:
    env = {"SWL_GATEWAY_UPLOAD_IDLE_TIMEOUT_S": f"{IDLE_TIMEOUT_S:g}", "SWL_GATEWAY_MAX_CONCURRENT_JOBS": str(SLOTS)}
    with ProcessStack(tmp_path, dev_models_dir, env) as stack:
        yield stack


async def idle_stream(stub: gateway_pb2_grpc.GatewayStub, kind: str) -> tuple[grpc.StatusCode, str, float]:
    """A stream that sends its options and then nothing, waiting on the answer: how it ended, and how long after
    its first message was sent."""
    if kind == "generate":
        call = stub.Generate(timeout=10 * IDLE_TIMEOUT_S)
        await call.write(gateway_pb2.GenerateChunk(options=gateway_pb2.GenerateOptions()))
    else:
        call = stub.CreateAvatar(timeout=10 * IDLE_TIMEOUT_S)
        await call.write(gateway_pb2.CreateAvatarChunk(options=gateway_pb2.AvatarOptions()))
    sent = time.monotonic()
    while True:
        try:
            if await call.read() == grpc.aio.EOF:
                return grpc.StatusCode.OK, "", time.monotonic() - sent
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or "", time.monotonic() - sent


async def probe(stub: gateway_pb2_grpc.GatewayStub) -> grpc.StatusCode:
    """A call with no media: RESOURCE_EXHAUSTED when no job slot is free, else admitted and refused for its media."""
    try:
        await stub.GenerateVideo(gateway_pb2.GenerateVideoRequest(), timeout=30)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def slots_full(stub: gateway_pb2_grpc.GatewayStub) -> None:
    """Waits a second first: a probe admitted while the streams are still opening would take a slot from one."""
    await asyncio.sleep(1.0)
    await eventually_async(lambda: _is_exhausted(stub), seconds=IDLE_TIMEOUT_S - 2, every=0.2,
                           what="every job slot taken")


async def _is_exhausted(stub) -> bool:
    return await probe(stub) == grpc.StatusCode.RESOURCE_EXHAUSTED


async def real_job_held_open(stub, face: bytes, audio: bytes, admitted: asyncio.Event) -> bytes:
    """A real Generate whose upload is sent in pieces half a second apart (well within the idle deadline) until
    `admitted` is set, then finished: returns the mp4 it got."""
    call = stub.Generate(timeout=180)
    await call.write(gateway_pb2.GenerateChunk(options=gateway_pb2.GenerateOptions()))
    pieces = [face[i : i + 512] for i in range(0, len(face), 512)]
    while len(pieces) > 1 and not admitted.is_set():
        await call.write(gateway_pb2.GenerateChunk(face_chunk=pieces.pop(0)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(admitted.wait(), 0.5)
    await call.write(gateway_pb2.GenerateChunk(face_chunk=b"".join(pieces)))
    await call.write(gateway_pb2.GenerateChunk(audio_chunk=audio))
    await call.done_writing()
    chunks = []
    while (event := await call.read()) != grpc.aio.EOF:
        chunks.append(event.video_chunk)
    return b"".join(chunks)


async def test_idle_upload_streams_are_cut_at_the_read_deadline_and_free_their_slots(idle_stack):
    """20 streams that send their options and then nothing, in two waves of 10 under an 11-slot limit: each
    wave holds its slots (with the real job, every slot is taken), each stream ends with DEADLINE_EXCEEDED naming
    the idle setting after the deadline, and the second wave is admitted only because the first wave's slots were
    freed. A real job admitted beside the first wave completes with a valid mp4."""
    face, seconds = encode_video(marker_frames(20)), 0.8
    kinds = ["generate", "avatar"] * (WAVE // 2)
    async with grpc.aio.insecure_channel(idle_stack.address()) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        first = [asyncio.create_task(idle_stream(stub, kind)) for kind in kinds]
        admitted = asyncio.Event()
        job = asyncio.create_task(real_job_held_open(stub, face, speech_wav(seconds), admitted))
        await slots_full(stub)  # 10 idle streams and the real job hold all 11 slots
        admitted.set()
        ended = await asyncio.gather(*first)
        mp4 = await job

        second = [asyncio.create_task(idle_stream(stub, kind)) for kind in kinds]
        ended += await asyncio.gather(*second)
        assert await probe(stub) == grpc.StatusCode.INVALID_ARGUMENT  # every slot free again

    assert len(ended) == 2 * WAVE
    for code, details, elapsed in ended:
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and IDLE_SETTING in details, (code, details)
        assert elapsed >= IDLE_TIMEOUT_S - 0.1, elapsed
    frames, _ = decode_all(mp4)
    assert len(frames) == round(seconds * 25), len(frames)
    assert abs(stream_durations(mp4)["audio"] - seconds) <= 1 / 25


# The 1 KiB/s reader's job: 24 s of 640x480 noise (every frame new), asked for losslessly (crf 0): over 80 MiB
# of mp4, so a gateway holding it for the reader would pass the bound. The face is 6 s of noise sent at crf 42
# (1.6 MiB), played ping-pong: a 24 s clip (6.3 MiB, held as the request, its bytes and the decoder's input)
# put the job's own working set near the bound. (At crf 43 the noise is flattened and the output is ten times
# smaller.)
CLIP_FRAMES, OUTPUT_FRAMES, CLIP_SIZE, CLIP_CRF = 150, 600, (640, 480), 42


@pytest.fixture
def sse_edge(tmp_path, dev_models_dir) -> Iterator[tuple[str, ProcessStack]]:
    authz_port = free_port()
    # 2-frame chunks (16 by default) and one encoder thread (x264's frame threads each hold frames of their own)
    # keep the job's own frames in flight small beside what the bound is about: the video held for its reader.
    env = {"SWL_GATEWAY_MIN_CRF": "0", "SWL_GATEWAY_AUTHZ_PORT": str(authz_port), "SWL_GATEWAY_CHUNK_FRAMES": "2",
           "SWL_GATEWAY_ENCODER_THREADS": "1"}
    with ProcessStack(tmp_path, dev_models_dir, env) as stack, \
            envoy_process(tmp_path, stack.config.port("gateway"), authz_port) as (base, _):
        yield base, stack


def noise_clip(frames: int, size: tuple[int, int], crf: int) -> bytes:
    """A clip of fresh noise in every frame around a marker face, encoded as it is made (never all in memory)."""
    width, height = size
    rng, buffer = np.random.default_rng(7), io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "ultrafast"}
        for index in range(frames):
            noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            frame = with_marker(noise, width // 3 + index % 40, height // 3, size=height // 4)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def sse_request(face: bytes, audio: bytes, **options) -> bytes:
    body = {"face": base64.b64encode(face).decode(), "audio": base64.b64encode(audio).decode(), "options": options}
    return json.dumps(body).encode()


def read_sse_video(base: str, body: bytes) -> tuple[bytes, dict]:
    """POSTs to /v1/generate:stream and reads it at full speed: the mp4 and the last event."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=300)
    connection.request("POST", "/v1/generate:stream", body=body, headers={"content-type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 200 and reply.getheader("content-type").startswith("text/event-stream")
    video, last = bytearray(), {}
    for line in reply:
        if line.startswith(b"data:"):
            last = json.loads(line[5:])
            video += base64.b64decode(last.get("video_chunk", ""))
    connection.close()
    return bytes(video), last


def frame_count(mp4: bytes) -> int:
    with av.open(io.BytesIO(mp4)) as container:
        return sum(1 for _ in container.decode(video=0))


def slow_sse_read(base: str, body: bytes, seconds: float) -> bytes:
    """POSTs to /v1/generate:stream and reads the answer at READ_RATE for `seconds`, through a small socket buffer
    (so the kernel does not read ahead for it), then hangs up: what it read."""
    host, port = base.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(f"POST /v1/generate:stream HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        read, started = bytearray(), time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            if len(read) < READ_RATE * elapsed:
                read += sock.recv(READ_RATE)
            time.sleep(0.1)
    return bytes(read)


def inflight_jobs(stack: ProcessStack) -> float:
    with urllib.request.urlopen(stack.metrics_url("gateway"), timeout=5) as reply:
        return metric(reply.read().decode(), "swl_gateway_jobs_inflight")


async def test_a_1_kib_per_second_sse_reader_leaves_the_gateways_memory_flat(sse_edge):
    """The same lossless job twice through Envoy's SSE route: read at full speed first (its mp4 checked, its
    size over the bound, its time taken; the gateway's allocator is warm after it), then by a reader taking
    1 KiB a second for twice that time and more. Meanwhile the gateway serves another generation, and its
    resident memory stays within 64 MiB of its level before the slow call; when the reader hangs up, its job
    ends."""
    base, stack = sse_edge
    body = sse_request(noise_clip(CLIP_FRAMES, CLIP_SIZE, CLIP_CRF), speech_wav(OUTPUT_FRAMES / 25), crf=0,
                       preset="ultrafast")
    started = time.monotonic()
    mp4, last = await asyncio.to_thread(read_sse_video, base, body)
    full_speed_s = time.monotonic() - started
    assert int(last["result"]["size_bytes"]) == len(mp4) > RSS_GROWTH_LIMIT, len(mp4)
    assert await asyncio.to_thread(frame_count, mp4) == OUTPUT_FRAMES
    del mp4

    other = sse_request(encode_png(with_marker(scene(), 100, 80)), speech_wav(0.8))
    with PeakRss(stack.pid("gateway")) as rss:
        before = rss.peak
        slow = asyncio.create_task(asyncio.to_thread(slow_sse_read, base, body, 2 * full_speed_s + 10))
        await asyncio.sleep(min(5.0, full_speed_s))  # the slow call's job under way
        meanwhile, meanwhile_last = await asyncio.to_thread(read_sse_video, base, other)
        read = await slow
    assert frame_count(meanwhile) == 20 and "result" in meanwhile_last, meanwhile_last
    head = read.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("HTTP/1.1 200") and "text/event-stream" in head, head
    assert READ_RATE * full_speed_s <= len(read) <= READ_RATE * (2 * full_speed_s + 11), len(read)
    growth = rss.peak - before
    print(f"full-speed read {full_speed_s:.1f} s of {int(last['result']['size_bytes']) / MiB:.0f} MiB; "
          f"slow reader took {len(read)} bytes; gateway RSS {before / MiB:.0f} MiB, peak +{growth / MiB:.1f} MiB")
    assert growth < RSS_GROWTH_LIMIT, f"the gateway grew by {growth / MiB:.0f} MiB for a slow reader"
    await eventually_async(lambda: inflight_jobs(stack) == 0, seconds=30, what="the slow reader's job ended")
