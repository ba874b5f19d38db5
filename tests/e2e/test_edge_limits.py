"""The edge's own limits (issue #26), through a real Envoy in front of a tiny gRPC upstream that stands in for the
gateway: it answers health checks and ListAvatars and records what reached it. No models, no media: cheap."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from superwav2lip.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from deploy.envoy import local
from deploy.envoy.render import EdgeConfig, render

from tests.support.processes import free_port


class RecordingGateway(gateway_pb2_grpc.GatewayServicer):
    """Records the metadata of every call that reaches it."""

    def __init__(self):
        self.calls: list[dict[str, str]] = []

    async def ListAvatars(self, request, context):
        self.calls.append(dict(context.invocation_metadata()))
        return gateway_pb2.ListAvatarsResponse()


@contextlib.asynccontextmanager
async def upstream():
    server = grpc.aio.server()
    gateway = RecordingGateway()
    gateway.server = server
    health = HealthServicer()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    gateway_pb2_grpc.add_GatewayServicer_to_server(gateway, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, gateway
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def edge(folder, gateway_port: int, dead_hosts: int = 0, wait: bool = True, **settings):
    """Envoy in front of the upstream, plus `dead_hosts` gateway endpoints where nothing listens."""
    config = EdgeConfig(listen_host="127.0.0.1", listen_port=free_port(), admin_port=free_port(),
                        gateway_port=gateway_port, **settings)
    rendered = render(config)
    endpoints = rendered["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    for _ in range(dead_hosts):
        endpoints.append({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                      "port_value": free_port()}}}})
    path = folder / "envoy.json"
    path.write_text(json.dumps(rendered))
    with open(folder / "envoy.log", "w") as log:
        process = subprocess.Popen([str(local.envoy_binary()), "-c", str(path), "--disable-hot-restart",
                                    "--log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{config.listen_port}"
        if wait:
            await asyncio.to_thread(local.wait_healthy, base, process, 60)
        yield base, config
    finally:
        process.terminate()
        process.wait(timeout=30)


def healthz(base: str) -> int:
    return healthz_reply(base)[0]


def healthz_reply(base: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, ConnectionError):
        return 0, b""  # not listening yet


async def test_only_health_check_reaches_the_gateway_and_watch_is_refused(tmp_path):
    async with upstream() as (port, gateway), edge(tmp_path, port) as (base, _):
        async with grpc.aio.insecure_channel(base.removeprefix("http://")) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await watch.read()
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED  # Envoy's 404: no route
            # Nor any other service of the gateway's server (reflection, say).
            reflection = channel.unary_unary("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await reflection(b"", timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # The gateway's own service still is routed.
            await gateway_pb2_grpc.GatewayStub(channel).ListAvatars(gateway_pb2.ListAvatarsRequest(), timeout=10)
        assert len(gateway.calls) == 1


async def test_healthz_is_healthy_while_any_gateway_host_is(tmp_path):
    async with upstream() as (port, gateway), edge(tmp_path, port, dead_hosts=2) as (base, _):
        assert await asyncio.to_thread(healthz, base) == 200  # one of three hosts is enough
        await gateway.server.stop(0)  # and none is not
        deadline = asyncio.get_running_loop().time() + 20
        while await asyncio.to_thread(healthz, base) != 503:
            assert asyncio.get_running_loop().time() < deadline, "/healthz still 200 with no gateway host up"
            await asyncio.sleep(0.2)


async def test_a_callers_request_id_and_forwarded_for_are_not_trusted(tmp_path):
    async with upstream() as (port, gateway), edge(tmp_path, port) as (base, _):
        async with grpc.aio.insecure_channel(base.removeprefix("http://")) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            for _ in range(2):
                await stub.ListAvatars(gateway_pb2.ListAvatarsRequest(), timeout=10, metadata=(
                    ("x-request-id", "chosen-by-the-caller"), ("x-forwarded-for", "203.0.113.7")))
    first, second = gateway.calls
    assert first["x-request-id"] != "chosen-by-the-caller" and len(first["x-request-id"]) == 36  # a UUID
    assert first["x-request-id"] != second["x-request-id"]
    # The address Envoy saw is the one it vouches for (for a loopback peer Envoy names the host's own
    # interface instead); what the caller wrote stays an untrusted prefix.
    *claimed, seen = [part.strip() for part in first["x-forwarded-for"].split(",")]
    assert claimed == ["203.0.113.7"] and seen != "203.0.113.7"
    assert first["x-envoy-external-address"] == "127.0.0.1"  # the peer's address, the one a log may trust


def test_edge_limits_are_explicit_and_envoy_accepts_them(tmp_path):
    config = EdgeConfig(xff_num_trusted_hops=1, stream_idle_timeout_s=120)
    rendered = render(config)
    manager = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["use_remote_address"] is True and manager["xff_num_trusted_hops"] == 1
    assert manager["preserve_external_request_id"] is False
    assert manager["request_headers_timeout"] == "10s" and manager["stream_idle_timeout"] == "120s"
    assert manager["common_http_protocol_options"]["idle_timeout"] == "300s"
    assert manager["common_http_protocol_options"]["max_stream_duration"] == "3600s"
    assert manager["http2_protocol_options"] == {"max_concurrent_streams": 100, "initial_stream_window_size": 65536,
                                                 "initial_connection_window_size": 1048576}
    thresholds = rendered["static_resources"]["clusters"][0]["circuit_breakers"]["thresholds"]
    assert [{k: t[k] for k in ("max_connections", "max_pending_requests", "max_requests", "max_retries")}
            for t in thresholds] == [{"max_connections": 256, "max_pending_requests": 128, "max_requests": 1024,
                                      "max_retries": 3}]
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(rendered))
    done = local.validate(path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_overload_manager_is_sized_to_the_memory_limit_and_envoy_accepts_it(tmp_path):
    manager = render(EdgeConfig())["overload_manager"]
    assert manager["resource_monitors"][0]["typed_config"]["max_heap_size_bytes"] == 1 << 30  # 1 GiB by default
    assert {a["name"]: a["triggers"][0]["threshold"]["value"] for a in manager["actions"]} == {
        "envoy.overload_actions.shrink_heap": 0.95, "envoy.overload_actions.stop_accepting_requests": 0.98}
    assert render(EdgeConfig(memory_limit_mib=256))["overload_manager"]["resource_monitors"][0]["typed_config"][
        "max_heap_size_bytes"] == 256 << 20
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(render(EdgeConfig(memory_limit_mib=256))))
    done = local.validate(path)
    assert done.returncode == 0, done.stdout + done.stderr


async def test_an_edge_over_its_memory_limit_refuses_new_requests(tmp_path):
    """1 MiB is less than Envoy's own heap at rest: every request is refused before it is routed."""
    async with upstream() as (port, gateway), edge(tmp_path, port, wait=False, memory_limit_mib=1) as (base, _):
        deadline = asyncio.get_running_loop().time() + 30
        while (reply := await asyncio.to_thread(healthz_reply, base))[0] != 503 or b"overload" not in reply[1]:
            assert asyncio.get_running_loop().time() < deadline, reply
            await asyncio.sleep(0.2)
        async with grpc.aio.insecure_channel(base.removeprefix("http://")) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await gateway_pb2_grpc.GatewayStub(channel).ListAvatars(gateway_pb2.ListAvatarsRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert gateway.calls == []
