"""Key-less floods through the real Envoy edge, in front of `make run`'s stack as real processes with an API key set.

Issue #26's acceptance: 1,200 key-less Health/Watch streams do not stop a keyed generation through Envoy while
/healthz tells the truth, and a key-less 600 MiB JSON body is refused before Envoy buffers it. Beyond it: a flood of
key-less calls from one address is answered by Envoy's per-client rate limit, not by the gateway's key check.

Envoy trusts one hop's X-Forwarded-For here, as behind a cloud load balancer, so that the attacker and the honest
caller, both on 127.0.0.1, are the two client addresses they would be in production."""

from __future__ import annotations

import asyncio
import base64
import http.client
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
ATTACKER, CALLER = "203.0.113.9", "198.51.100.7"  # documentation addresses (RFC 5737)
PER_CLIENT_RPS, PER_CLIENT_BURST = 100, 200  # the edge's defaults, spelled out
FLOOD_STREAMS = 1200
STREAMS_PER_CONNECTION = 100  # the edge's HTTP/2 max_concurrent_streams: more channels, not more streams each
BIG_BODY = 600 * MiB
RSS_GROWTH_LIMIT = 64 * MiB


@pytest.fixture(scope="module")
def stack_and_edge(tmp_path_factory, dev_models_dir) -> Iterator[tuple[ProcessStack, str, psutil.Process]]:
    folder = tmp_path_factory.mktemp("edge_floods")
    authz_port = free_port()
    env = {"SWL_GATEWAY_API_KEYS": KEY, "SWL_GATEWAY_AUTHZ_PORT": str(authz_port)}
    with ProcessStack(folder, dev_models_dir, env) as stack, \
            envoy_process(folder, stack.config.port("gateway"), authz_port, xff_num_trusted_hops=1,
                          per_client_requests_per_s=PER_CLIENT_RPS, per_client_burst=PER_CLIENT_BURST) as (base, envoy):
        yield stack, base, envoy


@pytest.fixture
def edge(stack_and_edge) -> tuple[str, psutil.Process]:
    _, base, envoy = stack_and_edge
    return base, envoy


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
                                     headers={"x-api-key": KEY, "content-type": "application/json",
                                              "x-forwarded-for": CALLER})
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def watch_wave(address: str, wave: int) -> list[grpc.StatusCode]:
    """FLOOD_STREAMS key-less Health/Watch streams at once, over as many connections as the edge's stream limit
    needs, each connection from an address of its own (fresh in each wave: a flood from many addresses, which the
    per-client rate limit does not stop, so every stream reaches the routing and the key check); each one's end
    (a stream still open after 30 s counts as OK: it was held)."""
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(FLOOD_STREAMS // STREAMS_PER_CONNECTION)]

    async def watch(channel, origin: str) -> grpc.StatusCode:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30,
                                                         metadata=(("x-forwarded-for", origin),))
        try:
            await call.read()
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as error:
            return error.code()

    try:
        # 198.18.0.0/15 is set aside for benchmarks (RFC 2544): an address per wave and connection.
        return await asyncio.gather(*(watch(channels[i % len(channels)],
                                            f"198.{18 + wave // 256 % 2}.{wave % 256}.{i % len(channels) + 1}")
                                      for i in range(FLOOD_STREAMS)))
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
            ends += await watch_wave(base.removeprefix("http://"), wave=len(ends) // FLOOD_STREAMS)
        status, video = await generation
    finally:
        stop.set()
        prober.join()
    print(f"{len(ends)} Watch streams in {time.monotonic() - started:.1f} s: "
          f"{ {code.name: ends.count(code) for code in set(ends)} }; /healthz {len(health)} probes")
    assert status == 200 and video[4:8] == b"ftyp", video[:300]
    # None of them got a stream held open: refused at the edge without a key, or not routed at all (each address
    # stayed within its rate, so none was refused for that).
    assert set(ends) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED}, set(ends)
    assert health and set(health) == {200}, health


def keyless_flood(base: str, seconds: float, threads: int = 16) -> list[tuple[int, dict[str, str]]]:
    """Key-less GET /v1/jobs from the attacker's address, as fast as `threads` kept-alive connections go, for
    `seconds`; each answer's status and headers."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    answers: list[tuple[int, dict[str, str]]] = []
    deadline = time.monotonic() + seconds

    def flood() -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            while time.monotonic() < deadline:
                connection.request("GET", "/v1/jobs", headers={"x-forwarded-for": ATTACKER})
                reply = connection.getresponse()
                reply.read()
                answers.append((reply.status, {k.lower(): v for k, v in reply.getheaders()}))
        finally:
            connection.close()

    workers = [threading.Thread(target=flood) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return answers


def unauthenticated_total(stack: ProcessStack) -> float:
    """Key checks the gateway refused (its swl_gateway_unauthenticated_total)."""
    with urllib.request.urlopen(stack.metrics_url("gateway"), timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("swl_gateway_unauthenticated_total"))


async def test_a_keyless_flood_from_one_address_is_answered_by_envoy_while_another_caller_generates(stack_and_edge):
    """Four seconds of key-less calls from one address, as fast as 16 connections go: past its burst they get 429
    from Envoy's per-client bucket, so the gateway's key check sees at most the burst and the refill, and a keyed
    generation from another address completes meanwhile."""
    stack, base, _ = stack_and_edge
    await asyncio.sleep(PER_CLIENT_BURST / PER_CLIENT_RPS)  # the attacker's bucket full again after earlier tests
    checked_before = unauthenticated_total(stack)
    generation = asyncio.create_task(asyncio.to_thread(generate_through_edge, base))
    started = time.monotonic()
    answers = await asyncio.to_thread(keyless_flood, base, 4.0)
    elapsed = time.monotonic() - started
    status, video = await generation
    statuses = [status for status, _ in answers]
    counts = {code: statuses.count(code) for code in set(statuses)}
    checked = unauthenticated_total(stack) - checked_before
    allowed = PER_CLIENT_BURST + PER_CLIENT_RPS * (elapsed + 1)
    print(f"{len(answers)} key-less calls in {elapsed:.1f} s: {counts}; the gateway's key check refused "
          f"{checked:.0f} (at most {allowed:.0f} allowed through)")
    assert status == 200 and video[4:8] == b"ftyp", video[:300]
    assert set(counts) <= {401, 429}, counts
    assert len(answers) > 2 * allowed, counts  # the flood outran its allowance (else this shows nothing)
    # Past the allowance Envoy answered alone: the gateway's key check saw no more than the bucket let through.
    assert counts.get(429, 0) >= len(answers) - allowed and checked <= allowed, (counts, checked)
    limited = next(headers for status, headers in answers if status == 429)
    assert limited["x-ratelimit-limit"] == str(PER_CLIENT_BURST), limited  # says why, and how much
