"""An in-process stack (detector, lipsync, enhancer, gateway) for end-to-end tests."""

import asyncio
import contextlib
import tempfile
import urllib.request

import grpc
import pytest
import pytest_asyncio

from superwav2lip.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from gateway.clients import ModelClients
from gateway.metrics import GatewayMetrics
from gateway.service import GatewayService, GatewaySettings
from services.detector.service import DetectorService, DetectorSettings
from services.enhancer.service import EnhancerService, EnhancerSettings
from services.lipsync.service import LipSyncService, LipSyncSettings

from tests.support.inprocess import local_settings, started


class Stack:
    def __init__(self, servers, channel):
        self.servers, self.channel = servers, channel
        self.stub = gateway_pb2_grpc.GatewayStub(channel)

    def address(self, name):
        return f"127.0.0.1:{self.servers[name].port}"

    async def generate(self, face: bytes, audio: bytes, timeout=120, **options):
        chunks = [gateway_pb2.GenerateChunk(options=gateway_pb2.GenerateOptions(**options))]
        chunks += [gateway_pb2.GenerateChunk(face_chunk=face[i : i + 65536]) for i in range(0, len(face), 65536)]
        chunks += [gateway_pb2.GenerateChunk(audio_chunk=audio)]
        events = [e async for e in self.stub.Generate(iter(chunks), timeout=timeout)]
        mp4 = b"".join(e.video_chunk for e in events if e.WhichOneof("event") == "video_chunk")
        info = next(e.result for e in events if e.WhichOneof("event") == "result")
        return mp4, info, [e.progress for e in events if e.WhichOneof("event") == "progress"]

    async def generate_video(self, face: bytes, audio: bytes, timeout=120, **options):
        return await self.stub.GenerateVideo(gateway_pb2.GenerateVideoRequest(
            options=gateway_pb2.GenerateOptions(**options), face=face, audio=audio), timeout=timeout)

    async def status_of(self, chunks, timeout: float = 30) -> grpc.RpcError | None:
        """How a Generate call ends (None: success), called through the synchronous API as the SDK calls it.

        The gateway refuses bad options and full queues before reading the upload; grpc's asyncio client
        then reports its own INTERNAL instead of the server's status when it was still writing
        (grpc/grpc#36066), so tests of early refusals use the sync client, whose status is the server's."""

        def call():
            with grpc.insecure_channel(self.address("gateway")) as channel:
                try:
                    for _ in gateway_pb2_grpc.GatewayStub(channel).Generate(iter(chunks), timeout=timeout):
                        pass
                except grpc.RpcError as error:
                    return error
            return None

        return await asyncio.to_thread(call)

    async def metrics_text(self, name):
        url = f"http://127.0.0.1:{self.servers[name].metrics_port}/metrics"
        return (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()


@contextlib.asynccontextmanager
async def running_stack(models_dir, down: str | None = None, overrides=None, external=None, **gateway_overrides):
    """Detector, lipsync, enhancer and gateway in-process; `down` names a service left unstarted,
    `overrides` maps a service name to settings for it, `external` a service name to the address of one
    started elsewhere (a separate process)."""
    async with contextlib.AsyncExitStack() as stack:
        servers = {}
        addresses = {}
        for name, service_cls, settings_cls in (("detector", DetectorService, DetectorSettings),
                                                ("lipsync", LipSyncService, LipSyncSettings),
                                                ("enhancer", EnhancerService, EnhancerSettings)):
            if name == down:
                addresses[name] = "127.0.0.1:1"  # nothing listens there
                continue
            if name in (external or {}):
                addresses[name] = external[name]
                continue
            settings = local_settings(settings_cls, models_dir, **(overrides or {}).get(name, {}))
            server, _ = await stack.enter_async_context(started(service_cls(settings)))
            servers[name] = server
            addresses[name] = f"127.0.0.1:{server.port}"
        data_dir = gateway_overrides.pop("data_dir", None) or stack.enter_context(tempfile.TemporaryDirectory())
        gateway_overrides.setdefault("allow_anonymous", True)  # the tests that need keys pass api_keys or tenants_file
        settings = GatewaySettings.from_env({}, host="127.0.0.1", port=0, metrics_port=0, grace_period_s=1.0,
                                            data_dir=data_dir,
                                            detector_address=addresses["detector"],
                                            lipsync_address=addresses["lipsync"],
                                            enhancer_address=addresses["enhancer"], **gateway_overrides)
        server, channel = await stack.enter_async_context(started(GatewayService(settings)))
        servers["gateway"] = server
        yield Stack(servers, channel)



def model_clients(stack: Stack) -> ModelClients:
    """Clients of the stack's model services for driving a LipSyncJob directly (caller opens and closes)."""
    return ModelClients(stack.address("detector"), stack.address("lipsync"), stack.address("enhancer"),
                        batch_items=8, max_inflight=4, metrics=GatewayMetrics())


def shared_stack(models: str = "dev_models_dir", **gateway_overrides):
    """A fixture `stack`: one in-process stack for a whole module, for tests that do not disturb it (each leaves it
    serving). The module runs its tests on the module's event loop: `pytestmark = MODULE_LOOP`."""

    @pytest_asyncio.fixture(name="stack", scope="module", loop_scope="module")
    async def stack_fixture(request):
        async with running_stack(request.getfixturevalue(models), **gateway_overrides) as stack:
            yield stack

    return stack_fixture


MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
