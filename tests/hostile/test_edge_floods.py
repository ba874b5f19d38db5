"""Key-less floods through the real Envoy edge, in front of `make run`'s stack as real processes with an API key set.

Issue #26's acceptance: 1,200 key-less Health/Watch streams do not stop a keyed generation through Envoy while
/healthz tells the truth, and a key-less 600 MiB JSON body is refused before Envoy buffers it."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.envoy import envoy_process, post_streamed
from tests.support.media_factory import encode_png, scene, speech_wav, with_marker
from tests.support.process_stack import ProcessStack
from tests.support.processes import PeakRss, free_port

KEY = "hostile-edge-key-0123456789"
MiB = 1 << 20
FLOOD_STREAMS = 1200
STREAMS_PER_CONNECTION = 100  # the edge's HTTP/2 max_concurrent_streams: more channels, not more streams each
BIG_BODY = 600 * MiB
RSS_GROWTH_LIMIT = 64 * MiB


@pytest.fixture(scope="module")
def edge(tmp_path_factory, dev_models_dir) -> Iterator[tuple[str, psutil.Process]]:
    folder = tmp_path_factory.mktemp("edge_floods")
    authz_port = free_port()
    env = {"SWL_GATEWAY_API_KEYS": KEY, "SWL_GATEWAY_AUTHZ_PORT": str(authz_port)}
    with ProcessStack(folder, dev_models_dir, env) as stack, \
            envoy_process(folder, stack.config.port("gateway"), authz_port) as (base, envoy):
        yield base, envoy


def json_pieces(size: int) -> Iterator[bytes]:
    """A `size`-byte JSON body, made 1 MiB at a time as it is sent."""
    head, tail, chunk = b'{"face": "', b'"}', b"A" * MiB
    yield head
    middle = size - len(head) - len(tail)
    for _ in range(middle // MiB):
        yield chunk
    yield b"A" * (middle % MiB) + tail


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/uploads"])
def test_a_keyless_600_mib_body_is_refused_before_envoy_buffers_it(edge, path):
    base, envoy = edge
    with PeakRss(envoy) as rss:
        status, body, sent = post_streamed(base, path, BIG_BODY, json_pieces(BIG_BODY),
                                           {"content-type": "application/json"})
    print(f"{path}: {status} after {sent / MiB:.1f} MiB sent; Envoy RSS {rss.before / MiB:.1f} MiB, "
          f"peak +{rss.growth / MiB:.1f} MiB")
    assert status in (401, 413), body
    if status == 401:
        assert "x-api-key" in json.loads(body)["message"], body  # a person can act on it
    assert rss.growth < RSS_GROWTH_LIMIT, f"Envoy grew by {rss.growth / MiB:.0f} MiB on a key-less body"


def healthz(base: str) -> int:
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def generate_through_edge(base: str) -> tuple[int, bytes]:
    face = encode_png(with_marker(scene(), 100, 80))
    body = json.dumps({"face": base64.b64encode(face).decode(),
                       "audio": base64.b64encode(speech_wav(0.4)).decode()}).encode()
    request = urllib.request.Request(f"{base}/v1/generate", data=body, method="POST",
                                     headers={"x-api-key": KEY, "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def watch_wave(address: str) -> list[grpc.StatusCode]:
    """FLOOD_STREAMS key-less Health/Watch streams at once, over as many connections as the edge's stream limit
    needs; each one's end (a stream still open after 30 s counts as OK: it was held)."""
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(FLOOD_STREAMS // STREAMS_PER_CONNECTION)]

    async def watch(channel) -> grpc.StatusCode:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        try:
            await call.read()
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as error:
            return error.code()

    try:
        return await asyncio.gather(*(watch(channels[i % len(channels)]) for i in range(FLOOD_STREAMS)))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


async def test_1200_keyless_watch_streams_do_not_stop_a_keyed_generation_through_envoy(edge):
    base, _ = edge
    health: list[int] = []
    stop = threading.Event()

    def probe() -> None:  # /healthz as a load balancer asks it, all along
        while not stop.wait(0.2):
            health.append(healthz(base))

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    generation = asyncio.create_task(asyncio.to_thread(generate_through_edge, base))
    ends: list[grpc.StatusCode] = []
    started = time.monotonic()
    try:
        while not generation.done() or not ends:
            ends += await watch_wave(base.removeprefix("http://"))
        status, video = await generation
    finally:
        stop.set()
        prober.join()
    print(f"{len(ends)} Watch streams in {time.monotonic() - started:.1f} s: "
          f"{ {code.name: ends.count(code) for code in set(ends)} }; /healthz {len(health)} probes")
    assert status == 200 and video[4:8] == b"ftyp", video[:300]
    # None of them got a stream held open: refused at the edge without a key (or not routed at all).
    assert set(ends) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED}, set(ends)
    assert health and set(health) == {200}, health
