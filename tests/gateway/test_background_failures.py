"""No silent failure in background work: each fake below raises where a real volume, Redis or bug could, and the
loop either recovers (the job ends with a state and a message, the loop goes on) or the process goes NOT_SERVING.
The job runner's generation is a fake (it stands for the model pipeline, which other tests run for real); the
store is the in-process one, or a subclass that fails where Redis would."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import pathlib
import time
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from superwav2lip.detector.v1 import detector_pb2, detector_pb2_grpc
from superwav2lip.gateway.v1 import gateway_pb2

from gateway.admission import JobSlots
from gateway.job_store import TERMINAL, MemoryJobStore
from gateway.job_runner import JobRunner
from gateway.jobs import JobFiles, JobLedger, Jobs
from gateway.metrics import GatewayMetrics
from gateway.service import GatewaySettings
from gateway.tenants import TenantRegistry
from gateway.webhooks import TenantWebhooks, WebhookSender
from service_runtime.batching import BatchingQueue
from service_runtime.errors import Unavailable
from service_runtime.images import encode_image
from service_runtime.metrics import ServiceMetrics
from service_runtime.supervision import Supervisor
from services.detector.service import DetectorService, DetectorSettings

from tests.support.inprocess import local_settings, started
from tests.support.media_factory import scene
from tests.support.waiting import eventually_async

PLAN = SimpleNamespace(face=SimpleNamespace(size=(64, 48)), fps=25.0, frames=10, speech=SimpleNamespace(seconds=0.4))


TENANT = "acme"


class FakeGeneration:
    """Stands for the gateway's generation layer: `failures` are raised by the next runs, in order."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.runs = 0

    async def check(self, tenant, options) -> None:
        return None

    async def generate(self, tenant, options, face: bytes, audio: bytes, deadline, progress):
        self.runs += 1
        await progress("lipsync", 1, 2)
        if self.failures:
            raise self.failures.pop(0)
        return PLAN, b"mp4 bytes"


class JobsUnderTest:
    """The job API and its runner as the gateway composes them (gateway/service.py), on one store."""

    def __init__(self, tmp_path: pathlib.Path, generation: FakeGeneration, store=None, **settings) -> None:
        s = GatewaySettings.from_env({}, **{"data_dir": str(tmp_path), "job_workers": 1, "job_lease_s": 1.0,
                                            "job_result_ttl_s": 60.0, **settings})
        metrics = GatewayMetrics()
        self.store = store or MemoryJobStore(10, s.job_result_ttl_s)
        self.files = JobFiles(tmp_path)
        ledger = JobLedger(self.store, self.files, s, metrics, WebhookSender(s, metrics, TenantWebhooks(TenantRegistry(), s)))
        self.api = Jobs(self.store, self.files, ledger, s, metrics, check=generation.check)
        self.supervisor = Supervisor()
        self.runner = JobRunner(self.store, self.files, ledger, generation, s, metrics, JobSlots(4), self.supervisor)

    async def submit(self, request):
        return await self.api.submit(TENANT, request)

    async def get(self, job_id: str):
        return await self.api.get(TENANT, job_id)

    def start(self) -> None:
        self.runner.start()

    async def stop(self) -> None:
        await self.runner.stop()
        assert self.supervisor.dead == []  # no loop ended by itself


def make_jobs(tmp_path: pathlib.Path, generation: FakeGeneration, store=None, **settings) -> JobsUnderTest:
    return JobsUnderTest(tmp_path, generation, store, **settings)


def request(request_id: str = "") -> gateway_pb2.SubmitJobRequest:
    return gateway_pb2.SubmitJobRequest(face=b"face", audio=b"audio",
                                        options=gateway_pb2.GenerateOptions(request_id=request_id))


async def ended(jobs: JobsUnderTest, job_id: str, seconds: float = 10.0):
    """The job's record once it is in a terminal state; fails naming the state it is stuck in."""
    states = []

    async def terminal():
        record, _ = await jobs.get(job_id)
        states.append(record.state)
        return record if record.state in TERMINAL else None

    try:
        return await eventually_async(terminal, seconds=seconds, what=f"job {job_id} ending")
    except AssertionError:
        raise AssertionError(f"job {job_id} stayed {states[-1]} for {seconds} s") from None


async def test_a_pipeline_bug_fails_the_job_with_internal_and_the_worker_goes_on(tmp_path, caplog):
    generation = FakeGeneration(KeyError("frame 7"))
    jobs = make_jobs(tmp_path, generation)
    jobs.start()
    try:
        with caplog.at_level(logging.ERROR):
            broken = await jobs.submit(request("req-broken-1"))
            record = await ended(jobs, broken.job_id)
        assert (record.state, record.error_status, record.error_code) == ("FAILED", "INTERNAL", 13)
        assert broken.job_id in record.error_message and "req-broken-1" in record.error_message
        assert not (tmp_path / "jobs" / broken.job_id).exists()  # its inputs are removed with it
        logged = [r for r in caplog.records if getattr(r, "job_id", None) == broken.job_id]
        assert logged and logged[0].exc_info is not None  # the traceback is in the log, under the job's id
        healthy = await jobs.submit(request())
        assert (await ended(jobs, healthy.job_id)).state == "SUCCEEDED"  # the same single worker ran it
    finally:
        await jobs.stop()


async def test_a_result_that_cannot_be_written_fails_the_job(tmp_path, monkeypatch):
    real_write = pathlib.Path.write_bytes

    def full_volume(path: pathlib.Path, data: bytes) -> int:
        if path.name == "result.mp4":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full_volume)
    jobs = make_jobs(tmp_path, FakeGeneration())
    jobs.start()
    try:
        job = await jobs.submit(request())
        record = await ended(jobs, job.job_id)
        assert (record.state, record.error_status) == ("FAILED", "INTERNAL")
        assert "No space left on device" in record.error_message
        assert not (tmp_path / "jobs" / job.job_id).exists()
    finally:
        await jobs.stop()


async def test_a_job_whose_folder_is_removed_under_it_ends_at_once(tmp_path):
    """The case first seen: a full volume or another replica's sweep removed a running job's folder; the job stayed
    RUNNING for a minute and the replica lost a worker. Now it ends FAILED when the result cannot be written."""
    import shutil

    generation = FakeGeneration()
    jobs = make_jobs(tmp_path, generation)
    real_generate = generation.generate

    async def generate_while_the_folder_goes(*args):
        shutil.rmtree(jobs.files.root)
        return await real_generate(*args)

    generation.generate = generate_while_the_folder_goes
    jobs.start()
    try:
        job = await jobs.submit(request())
        record = await ended(jobs, job.job_id, seconds=5)
        assert (record.state, record.error_status) == ("FAILED", "INTERNAL")
        assert "FileNotFoundError" in record.error_message
        generation.generate = real_generate
        assert (await ended(jobs, (await jobs.submit(request())).job_id)).state == "SUCCEEDED"
    finally:
        await jobs.stop()


class FlakyFinalSave(MemoryJobStore):
    """The store fails like Redis would, on the first `failures` writes of a finished record."""

    def __init__(self, failures: int) -> None:
        super().__init__(10, 60.0)
        self.failures = failures

    async def save(self, record) -> None:
        if record.state in TERMINAL and self.failures > 0:
            self.failures -= 1
            raise Unavailable("the job store (Redis) is unavailable (ConnectionError); retry shortly")
        await super().save(record)


async def test_a_store_error_on_the_final_save_does_not_strand_the_job(tmp_path):
    store = FlakyFinalSave(failures=2)
    jobs = make_jobs(tmp_path, FakeGeneration(), store)
    jobs.start()
    try:
        job = await jobs.submit(request())
        record = await ended(jobs, job.job_id)
        assert record.state == "SUCCEEDED" and store.failures == 0
        assert (tmp_path / "jobs" / job.job_id / "result.mp4").read_bytes() == b"mp4 bytes"
        assert job.job_id not in store._leases  # no lease outlives the job
    finally:
        await jobs.stop()


async def test_the_sweep_survives_a_folder_removed_under_it(tmp_path, monkeypatch):
    jobs = make_jobs(tmp_path, FakeGeneration())
    orphan = jobs.files.root / "job_000000000000000000000001"
    orphan.mkdir(parents=True)
    ghost = jobs.files.root / "job_000000000000000000000002"
    real_iterdir = pathlib.Path.iterdir
    old = time.time() - 60
    os.utime(orphan, (old, old))
    # another replica removes the ghost between iterdir and stat
    monkeypatch.setattr(pathlib.Path, "iterdir", lambda p: [ghost, *real_iterdir(p)] if p == jobs.files.root
                        else real_iterdir(p))
    await jobs.runner._sweep()
    assert not orphan.exists()


async def test_housekeeping_goes_on_after_an_unexpected_error(tmp_path, caplog):
    """A bug in one pass of the requeue must not end the loop: a later dead replica's job is still requeued."""
    store = MemoryJobStore(10, 60.0)
    calls = {"n": 0}
    real_expired = store.expired_leases

    async def expired_once_broken():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("unexpected reply")
        return await real_expired()

    store.expired_leases = expired_once_broken
    jobs = make_jobs(tmp_path, FakeGeneration(), store, job_workers=0, job_lease_s=0.5)
    jobs.start()
    try:
        with caplog.at_level(logging.ERROR):
            job = await jobs.submit(request())
            # a replica that claimed it and died: RUNNING, with a lease nobody renews
            assert await store.claim("dead-replica", 0.1) == job.job_id
            record = await store.load(job.job_id)
            record.state, record.owner = "RUNNING", "dead-replica"
            await store.save(record)
            async def requeued():
                return (await store.load(job.job_id)).state == "QUEUED"

            await eventually_async(requeued, seconds=10, what="the orphan requeued (housekeeping alive)")
        assert calls["n"] >= 2
        assert any("unexpected reply" in r.getMessage() or r.exc_info for r in caplog.records)
    finally:
        await jobs.stop()


async def test_a_worker_survives_a_store_that_raises_something_unexpected(tmp_path):
    store = MemoryJobStore(10, 60.0)
    real_claim = store.claim
    calls = {"n": 0}

    async def claim_once_broken(owner, lease_s):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionResetError("reset by peer")  # not a ServiceError: a bug in the store's mapping
        return await real_claim(owner, lease_s)

    store.claim = claim_once_broken
    jobs = make_jobs(tmp_path, FakeGeneration(), store)
    jobs.start()
    try:
        job = await jobs.submit(request())
        assert (await ended(jobs, job.job_id)).state == "SUCCEEDED"
    finally:
        await jobs.stop()


async def test_a_crashed_batching_worker_fails_its_items_and_refuses_new_ones():
    deaths = []
    queue = BatchingQueue("toy", lambda items: items, max_batch_size=4, max_delay_s=0.0, max_queue_size=8,
                          metrics=ServiceMetrics())
    queue.start(on_death=lambda name, error: deaths.append((name, error)))

    def broken_take(belongs):
        raise RuntimeError("deque corrupted")

    queue._take = broken_take
    try:
        results = await asyncio.wait_for(queue.run([1, 2]), 5)
        assert all(isinstance(r, Unavailable) and "toy" in r.message and "deque corrupted" in r.message
                   for r in results), results
        with pytest.raises(Unavailable, match="batching worker stopped .deque corrupted."):
            queue.submit_many([3])
        assert [(name, str(error)) for name, error in deaths] == [("toy", "deque corrupted")]
    finally:
        await queue.stop()


async def test_a_model_service_whose_batching_worker_died_reports_not_serving(dev_models_dir):
    service = DetectorService(local_settings(DetectorSettings, dev_models_dir))
    async with started(service) as (_, channel):
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
        queue = next(iter(service.queues.values()))

        def broken_take(belongs):
            raise RuntimeError("deque corrupted")

        queue._take = broken_take
        stub = detector_pb2_grpc.DetectorStub(channel)
        reply = await stub.Detect(detector_pb2.DetectRequest(frames=[encode_image(scene())]), timeout=10)
        assert reply.frames[0].error.code == grpc.StatusCode.UNAVAILABLE.value[0]  # at once, not at the deadline
        async def not_serving():
            reply = await health.Check(health_pb2.HealthCheckRequest())
            return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

        await eventually_async(not_serving, seconds=5, what="NOT_SERVING with a dead batching worker")


async def test_redis_saves_a_finished_record_and_drops_its_lease_together(tmp_path):
    """RedisJobStore.finish against a real redis-server: one MULTI/EXEC, so after it no lease and no RUNNING
    membership remain, and the record carries the result TTL."""
    import redis.asyncio

    from gateway.job_store import RUNNING, JobRecord, RedisJobStore

    from tests.support.gateway_processes import RedisServer

    server = RedisServer(tmp_path)
    client = redis.asyncio.Redis.from_url(server.url)
    try:
        store = RedisJobStore(client, 10, 60.0, 0.5)
        record = JobRecord("job_" + "ab" * 12)
        await store.enqueue(record)
        assert await store.claim("replica-a", 30.0) == record.job_id
        assert await client.sismember(RUNNING, record.job_id)
        record.state, record.finished = "SUCCEEDED", time.time()
        await store.finish(record)
        assert not await client.sismember(RUNNING, record.job_id)
        assert not await client.exists(f"swl:job:{record.job_id}:lease")
        assert (await store.load(record.job_id)).state == "SUCCEEDED"
        assert 0 < await client.pttl(f"swl:job:{record.job_id}") <= 60_000
        assert await store.expired_leases() == []  # nothing for housekeeping to requeue
    finally:
        await client.aclose()
        server.stop()


async def test_the_supervisor_reports_a_loop_that_ends_but_not_one_that_is_stopped():
    deaths = []
    supervisor = Supervisor()
    supervisor.on_death = lambda name, error: deaths.append((name, type(error).__name__ if error else None))

    async def broken():
        raise ValueError("bug")

    async def returns():
        return None

    async def forever():
        await asyncio.Event().wait()

    supervisor.spawn(broken(), "broken-loop")
    supervisor.spawn(returns(), "loop-that-returned")
    forever_task = supervisor.spawn(forever(), "forever")
    await asyncio.sleep(0.05)
    forever_task.cancel()
    await asyncio.sleep(0.05)
    assert sorted(deaths) == [("broken-loop", "ValueError"), ("loop-that-returned", None)]
    assert sorted(supervisor.dead) == ["broken-loop", "loop-that-returned"]
    await supervisor.stop()


async def test_shutdown_is_not_held_up_by_a_task_that_ignores_its_cancel(caplog):
    """What hung a test stack's teardown under load: a job worker cancelled inside a Redis command, which
    redis-py's clean-up then held. The supervisor waits a bounded time and says which task it left behind."""
    supervisor = Supervisor()
    release = asyncio.Event()

    async def stubborn():
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # as a library that swallows the cancel while it cleans up

    supervisor.spawn(stubborn(), "stubborn-loop")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING):
        await asyncio.wait_for(supervisor.stop(timeout_s=0.2), 5)  # unbounded, this waited forever
    assert any(getattr(r, "task", "") == "stubborn-loop" for r in caplog.records)
    assert supervisor.dead == []  # stopping is not a death
    release.set()
    await asyncio.sleep(0.01)


async def test_a_cancel_call_with_the_store_down_gets_unavailable_at_once(tmp_path):
    """The retry-until-saved of a finished job belongs to the workers, which own the job; a DeleteJob call whose
    store is down answers UNAVAILABLE at once, as any job call does, instead of waiting for its deadline."""
    store = FlakyFinalSave(failures=1000)
    jobs = make_jobs(tmp_path, FakeGeneration(), store, job_workers=0)
    job = await jobs.submit(request())
    with pytest.raises(Unavailable, match="job store"):
        await asyncio.wait_for(jobs.api.delete(TENANT, job.job_id), 5)


class CancelSwallowingGeneration(FakeGeneration):
    """A generation that loses the first cancel it gets, as asyncio.wait_for does on Python 3.11 when the call it
    waits for completes as the cancel arrives (the rewritten wait_for of 3.12 does not); then runs until cancelled
    again. `started` is set once it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.started, self.swallowed = asyncio.Event(), 0

    async def generate(self, tenant, options, face: bytes, audio: bytes, deadline, progress):
        self.started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.swallowed += 1
            asyncio.current_task().uncancel()
        await asyncio.sleep(3600)  # a long job, going on


async def test_a_cancel_lost_inside_the_pipeline_is_repeated_until_the_job_ends(tmp_path):
    """Seen once in CI: a running job went on for 10 s after its cancel, until its replica stopped."""
    generation = CancelSwallowingGeneration()
    jobs = make_jobs(tmp_path, generation, job_lease_s=0.6)  # a beat of 0.2 s
    jobs.start()
    try:
        job = await jobs.submit(request())
        await asyncio.wait_for(generation.started.wait(), 10)
        await jobs.api.delete(TENANT, job.job_id)
        record = await ended(jobs, job.job_id, seconds=5)
        assert record.state == "CANCELLED" and generation.swallowed == 1
    finally:
        await jobs.stop()


async def test_a_worker_stopped_while_it_records_a_users_cancel_stops(tmp_path, caplog):
    """A replica stopping as a user's cancel is being recorded: the worker records it and stops too, rather than
    taking its own stop for the job's and running on (it was left behind at shutdown)."""
    generation = CancelSwallowingGeneration()
    jobs = make_jobs(tmp_path, generation, job_lease_s=0.6)
    jobs.start()
    job = await jobs.submit(request())
    await asyncio.wait_for(generation.started.wait(), 10)
    await jobs.api.delete(TENANT, job.job_id)
    await eventually_async(lambda: generation.swallowed == 1, seconds=5, what="the first cancel swallowed")
    with caplog.at_level(logging.WARNING, logger="service_runtime.supervision"):
        await jobs.stop()
    assert not [r for r in caplog.records if r.getMessage() == "task did not stop when cancelled; left behind"]
    assert (await jobs.get(job.job_id))[0].state == "CANCELLED"
