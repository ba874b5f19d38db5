"""Per-tenant quotas: past one, the caller gets RESOURCE_EXHAUSTED naming the quota and its value, with a retry
hint; one tenant's flood leaves another's calls admitted; with Redis, two replicas count together (issue #25)."""

import asyncio
import contextlib
import os

import grpc
import pytest
import pytest_asyncio
from google.api import httpbody_pb2
from google.rpc import error_details_pb2, status_pb2
from superwav2lip.gateway.v1 import gateway_pb2

import redis.asyncio
from gateway.quotas import TenantQuotas, check_stored
from gateway.tenants import ANONYMOUS, DEFAULT_TENANT, Quotas, Tenant, TenantRegistry
from service_runtime.errors import ResourceExhausted

from tests.support.gateway_processes import RedisServer
from tests.support.media_factory import encode_png, encode_video, marker_frames, scene, speech_wav, with_marker
from tests.support.tenants import tenants_file
from tests.support.stack import MODULE_LOOP, running_stack
from tests.support.waiting import clear_of_a_minute_boundary, eventually_async

pytestmark = MODULE_LOOP

FLOODER, NEIGHBOUR, CHATTY, SMALL = "flooder-key-0001", "neighbour-key-0002", "chatty-key-0003", "small-key-0004"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(dev_models_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("quotas")
    path = tenants_file(folder, flooder={"key": FLOODER, "quotas": {"running_generations": 1, "queued_jobs": 1}},
                        neighbour={"key": NEIGHBOUR}, chatty={"key": CHATTY, "quotas": {"requests_per_minute": 3}},
                        small={"key": SMALL, "quotas": {"stored_bytes": 600_000}})
    async with running_stack(dev_models_dir, tenants_file=str(path), allow_anonymous=False,
                             data_dir=str(folder / "data"), job_workers=0) as stack:
        yield stack


def as_(key: str, timeout: float = 60) -> dict:
    return {"metadata": (("x-api-key", key),), "timeout": timeout}


def retry_delay_s(error: grpc.aio.AioRpcError) -> float:
    details = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    info = error_details_pb2.RetryInfo()
    status_pb2.Status.FromString(details).details[0].Unpack(info)
    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9


async def test_past_requests_per_minute_a_tenant_is_refused_with_a_retry_hint_and_others_are_not(stack):
    await clear_of_a_minute_boundary()
    for _ in range(3):
        await stack.stub.ListJobs(gateway_pb2.ListJobsRequest(), **as_(CHATTY))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.stub.ListJobs(gateway_pb2.ListJobsRequest(), **as_(CHATTY))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "requests_per_minute quota of 3" in error.value.details()
    assert 0 < retry_delay_s(error.value) <= 60
    await stack.stub.ListJobs(gateway_pb2.ListJobsRequest(), **as_(NEIGHBOUR))  # not counted against chatty


async def test_a_tenants_flood_is_refused_past_its_running_quota_while_its_neighbour_is_served(stack):
    """The flooder holds its one running generation (options sent, upload never finished); its next calls are
    refused at once, and the neighbour's generation runs to the end meanwhile."""
    held = asyncio.Event()

    async def options_then_wait():
        yield gateway_pb2.GenerateChunk(options=gateway_pb2.GenerateOptions())
        await held.wait()

    holder = stack.stub.Generate(options_then_wait(), **as_(FLOODER))
    consumer = asyncio.ensure_future(holder.read())
    try:
        slots = stack.servers["gateway"].service.slots
        await eventually_async(lambda: slots.running == 1, what="the flooder's first generation to be admitted")
        refusals = []
        for _ in range(5):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stack.stub.GenerateVideo(gateway_pb2.GenerateVideoRequest(
                    face=encode_png(with_marker(scene(), 100, 80)), audio=speech_wav(0.4)), **as_(FLOODER))
            refusals.append(error.value)
        assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refusals)
        assert all("running_generations quota of 1" in e.details() for e in refusals), refusals[0].details()
        video = await stack.stub.GenerateVideo(gateway_pb2.GenerateVideoRequest(
            face=encode_png(with_marker(scene(), 100, 80)), audio=speech_wav(0.4)), **as_(NEIGHBOUR))
        assert video.data
    finally:
        holder.cancel()
        consumer.cancel()


async def test_past_queued_jobs_a_submission_is_refused(stack):
    request = gateway_pb2.SubmitJobRequest(face=encode_png(with_marker(scene(), 100, 80)), audio=speech_wav(0.4))
    await stack.stub.SubmitJob(request, **as_(FLOODER))  # no worker runs here: it stays queued
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.stub.SubmitJob(request, **as_(FLOODER))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queued_jobs quota of 1" in error.value.details()
    await stack.stub.SubmitJob(request, **as_(NEIGHBOUR))


async def test_past_stored_bytes_uploads_avatars_and_jobs_are_refused_and_deleting_makes_room(stack):
    def upload(size: int) -> gateway_pb2.UploadMediaRequest:
        return gateway_pb2.UploadMediaRequest(media=httpbody_pb2.HttpBody(data=os.urandom(size)))

    await stack.stub.UploadMedia(upload(150_000), **as_(SMALL))
    avatar = await stack.stub.CreateAvatarFromJson(gateway_pb2.CreateAvatarRequest(
        face=encode_video(marker_frames(6))), **as_(SMALL))
    refusals = []
    for call in (lambda: stack.stub.UploadMedia(upload(250_000), **as_(SMALL)),
                 lambda: stack.stub.CreateAvatarFromJson(gateway_pb2.CreateAvatarRequest(
                     face=encode_video(marker_frames(6)) + os.urandom(150_000)), **as_(SMALL)),
                 lambda: stack.stub.SubmitJob(gateway_pb2.SubmitJobRequest(
                     face=os.urandom(250_000), audio=speech_wav(0.4)), **as_(SMALL))):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call()
        refusals.append(error.value)
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refusals)
    assert all("stored_bytes quota of 600000" in e.details() for e in refusals), refusals[0].details()
    await stack.stub.UploadMedia(upload(150_000), **as_(NEIGHBOUR))  # another tenant's room is its own
    await stack.stub.DeleteAvatar(gateway_pb2.DeleteAvatarRequest(avatar_id=avatar.avatar_id), **as_(SMALL))
    await stack.stub.UploadMedia(upload(250_000), **as_(SMALL))


# --- across replicas: two counters on one real redis-server --------------------------------------------------------

@pytest_asyncio.fixture(loop_scope="module")
async def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def replicas(redis_server):
    clients = [redis.asyncio.Redis.from_url(redis_server.url) for _ in range(2)]
    try:
        yield [TenantQuotas(client, timeout_s=2.0, slot_lease_s=2.0) for client in clients]
    finally:
        for client in clients:
            await client.aclose()


async def test_two_replicas_share_the_running_and_per_minute_counts(replicas):
    a, b = replicas
    tenant = Tenant("acme", (), quotas=Quotas(running_generations=2, requests_per_minute=4))
    await clear_of_a_minute_boundary()
    async with a.generation(tenant), b.generation(tenant):
        with pytest.raises(ResourceExhausted, match="running_generations quota of 2"):
            async with a.generation(tenant):
                pass
    async with b.generation(tenant):  # both released: free again
        pass
    for replica in (a, b, a, b):
        await replica.admit_request(tenant)
    with pytest.raises(ResourceExhausted, match="requests_per_minute quota of 4"):
        await a.admit_request(tenant)


async def test_a_dead_replicas_slot_lapses_and_a_live_ones_is_renewed(replicas):
    """Leases of 2 s (the fixture's): the dead replica's slot is taken over once it lapses, and a slot held for
    longer than a lease stays held, renewed, however loaded the machine is between renewals (a third of a lease)."""
    a, b = replicas
    tenant = Tenant("acme", (), quotas=Quotas(running_generations=1))
    dead = a.generation(tenant)
    await dead.__aenter__()  # held, then its replica "dies": no release, no renewal
    next(t for t in asyncio.all_tasks() if t.get_name() == "quota-slot-acme").cancel()
    with pytest.raises(ResourceExhausted):
        async with b.generation(tenant):
            pass

    async def taken_over():
        held = b.generation(tenant)
        try:
            await held.__aenter__()
        except ResourceExhausted:
            return None
        return held

    held = await eventually_async(taken_over, seconds=10, every=0.1, what="the dead replica's slot lapsing")
    try:
        await asyncio.sleep(3.0)  # longer than a lease: renewed while held, nobody else gets it
        with pytest.raises(ResourceExhausted):
            async with a.generation(tenant):
                pass
    finally:
        await held.__aexit__(None, None, None)


async def test_a_queued_job_waits_while_its_tenant_runs_its_quota_and_others_jobs_overtake_it(dev_models_dir, tmp_path):
    """The solo tenant's one running generation is held (by a call, as a stand-in); its queued job is not run
    past the quota, while the neighbour's, submitted after it, runs; once the slot is free, it runs too."""
    path = tenants_file(tmp_path, solo={"key": FLOODER, "quotas": {"running_generations": 1}},
                        neighbour={"key": NEIGHBOUR})
    async with running_stack(dev_models_dir, tenants_file=str(path), allow_anonymous=False,
                             data_dir=str(tmp_path / "data"), job_workers=2) as stack:
        service = stack.servers["gateway"].service
        request = gateway_pb2.SubmitJobRequest(face=encode_png(with_marker(scene(), 100, 80)), audio=speech_wav(0.4))

        async def state(job, key) -> str:
            reply = await stack.stub.GetJob(gateway_pb2.JobRequest(job_id=job.job_id), **as_(key, 10))
            return gateway_pb2.Job.State.Name(reply.state)

        async with service.quotas.generation(service.tenants.tenant("solo")):
            waiting = await stack.stub.SubmitJob(request, **as_(FLOODER))
            overtaking = await stack.stub.SubmitJob(request, **as_(NEIGHBOUR))
            await eventually_async(
                lambda: _is(state(overtaking, NEIGHBOUR), "SUCCEEDED"), seconds=60, what="the neighbour's job to end")
            assert await state(waiting, FLOODER) == "QUEUED"
        await eventually_async(lambda: _is(state(waiting, FLOODER), "SUCCEEDED"), seconds=60,
                               what="solo's job to run once its slot is free")


async def _is(state, wanted: str) -> bool:
    return await state == wanted



async def test_with_redis_down_each_replica_counts_alone_and_calls_go_on(replicas, redis_server):
    a, _ = replicas
    tenant = Tenant("acme", (), quotas=Quotas(running_generations=1, requests_per_minute=2))
    a.timeout_s = 0.3
    redis_server.stop()
    await clear_of_a_minute_boundary()
    await a.admit_request(tenant)
    await a.admit_request(tenant)
    with pytest.raises(ResourceExhausted, match="requests_per_minute quota of 2"):
        await a.admit_request(tenant)
    async with a.generation(tenant):
        with pytest.raises(ResourceExhausted, match="running_generations quota of 1"):
            async with a.generation(tenant):
                pass


async def test_a_gateways_only_tenant_has_no_quotas_of_its_own():
    """Anonymous (make run, the soak) and SWL_GATEWAY_API_KEYS's tenant: nothing to keep room for, so nothing is
    counted or measured; the gateway's own limits still apply (the soak runs 8 clients at once)."""
    async def never_measured(tenant: str) -> int:
        raise AssertionError("stored bytes measured for a tenant without quotas")

    quotas = TenantQuotas(stored_bytes=never_measured)
    default = TenantRegistry.from_api_keys(["k"]).tenant(DEFAULT_TENANT)
    for tenant in (ANONYMOUS, default):
        async with contextlib.AsyncExitStack() as held:
            for _ in range(20):
                await held.enter_async_context(quotas.generation(tenant))
        for _ in range(2000):
            await quotas.admit_request(tenant)
        await check_stored(quotas, tenant, 1 << 40)
        quotas.check_queued(tenant, 10_000)
