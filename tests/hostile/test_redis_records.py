"""Redis as an untrusted neighbour: records altered to name paths, and a Redis out of memory, against a real
gateway process and a real redis-server (issue #26)."""

from __future__ import annotations

import contextlib
import json
import time

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from superwav2lip.gateway.v1 import gateway_pb2, gateway_pb2_grpc


from tests.support.gateway_processes import gateway_process, redis_server, wait_serving
from tests.support.media_factory import encode_png, scene, speech_wav
from tests.support.processes import free_port
from tests.support.waiting import eventually_async

State = gateway_pb2.Job.State


class NoModelServices:
    """Model-service addresses where nothing listens: these tests are about the gateway's records, so a job that
    runs fails at its first model call, as it would with the services down (no fake stands in for them)."""

    def __init__(self) -> None:
        self.ports = {name: free_port() for name in ("detector", "lipsync", "enhancer")}

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"


@contextlib.asynccontextmanager
async def serving_gateway(url: str, data, log_path, **settings: str):
    """A gateway process once SERVING, with a stub and a channel on it."""
    with gateway(url, data, log_path, **settings) as (address, process):
        await wait_serving(log_path, process)
        async with grpc.aio.insecure_channel(address) as channel:
            yield gateway_pb2_grpc.GatewayStub(channel), channel


@contextlib.contextmanager
def gateway(url: str, data, log_path, **settings: str):
    with open(log_path, "w") as log, gateway_process(NoModelServices(), url, data, log, settings) as (address, process):
        yield address, process


def submit_request() -> gateway_pb2.SubmitJobRequest:
    return gateway_pb2.SubmitJobRequest(face=encode_png(scene()), audio=speech_wav(0.4))


def alter(client: redis.Redis, key_id: str, **fields) -> None:
    """Rewrites a job's stored record as an intruder with access to Redis would, keeping its TTL (none if none)."""
    key = f"swl:job:{key_id}"
    record = json.loads(client.get(key))
    ttl = client.pttl(key)
    client.set(key, json.dumps({**record, **fields}), px=ttl if ttl > 0 else None)


def victims(tmp_path):
    """A folder outside the data directory that must survive, and the hostile ids that name it or its parents."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("another tenant's video")
    # data/jobs/<id>: "../../victim" is tmp_path/victim; ".." is data/, "../.." is tmp_path itself
    return victim, [str(victim), "../../victim", "..", "../..", "/data", "/", str(tmp_path)]


async def health(channel) -> str:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def serving_and_taking_jobs(channel) -> None:
    """The gateway still answers its health check and still takes and shows a job."""
    assert await health(channel) == "SERVING"
    stub = gateway_pb2_grpc.GatewayStub(channel)
    job = await stub.SubmitJob(submit_request(), timeout=30)
    shown = await stub.GetJob(gateway_pb2.JobRequest(job_id=job.job_id), timeout=10)
    assert shown.job_id == job.job_id


def intact(victim, tmp_path) -> None:
    assert (victim / "keep").read_text() == "another tenant's video"
    assert (tmp_path / "data").is_dir()


async def test_records_altered_to_name_paths_delete_nothing_when_cancelled_run_or_cleaned_up(tmp_path):
    """Each job's record is rewritten in Redis to claim `"job_id"` of an absolute path, `..` or a parent; the queue,
    the running set and the index get such members too. Gateway A (no workers) cancels some of them and deletes
    finished ones; gateway B then runs, requeues and sweeps the rest with a one-second result TTL. Nothing outside
    the jobs folder is removed, and both keep serving."""
    victim, hostile = victims(tmp_path)
    data = tmp_path / "data"
    with redis_server(tmp_path) as (url, client):
        async with serving_gateway(url, data, tmp_path / "a.log", SWL_GATEWAY_JOB_WORKERS="0") as (stub, channel):
            codes = {}
            for claimed in hostile:
                for state in ("QUEUED", "FAILED"):
                    job = await stub.SubmitJob(submit_request(), timeout=30)
                    alter(client, job.job_id, job_id=claimed, state=state)
                    try:
                        await stub.DeleteJob(gateway_pb2.JobRequest(job_id=job.job_id), timeout=10)
                        codes[claimed, state] = "OK"
                    except grpc.aio.AioRpcError as error:
                        codes[claimed, state] = f"{error.code().name}: {error.details()}"
                    intact(victim, tmp_path)
            print("DeleteJob on altered records:", json.dumps({f"{k[0]} {k[1]}": v for k, v in codes.items()},
                                                              indent=1))
            assert not any(code.startswith("INTERNAL") for code in codes.values()), codes
            queued = []
            for claimed in hostile:  # left queued for gateway B's workers, beside hostile queue entries
                job = await stub.SubmitJob(submit_request(), timeout=30)
                alter(client, job.job_id, job_id=claimed)
                queued.append(job.job_id)
                client.rpush("swl:jobs:queue", claimed)
                client.sadd("swl:jobs:running", claimed)  # "running" with no lease: housekeeping takes it
                client.zadd("swl:jobs", {claimed: time.time()})
                client.set(f"swl:job:{claimed}", json.dumps({**json.loads(client.get(f"swl:job:{job.job_id}")),
                                                              "state": "RUNNING"}))
            await serving_and_taking_jobs(channel)
        b_log = tmp_path / "b.log"
        async with serving_gateway(url, data, b_log, SWL_GATEWAY_JOB_LEASE_S="0.5", SWL_GATEWAY_JOB_RESULT_TTL_S="1",
                                   SWL_GATEWAY_JOB_MAX_ATTEMPTS="1") as (stub, channel):
            for job_id in queued:  # each runs as itself and fails at its first model call, then expires
                await eventually_async(lambda: gone(stub, job_id), seconds=120, what=f"{job_id} run and expired")
            await eventually_async(lambda: not client.smembers("swl:jobs:running") and
                                   not client.llen("swl:jobs:queue"), seconds=30, what="queue and running set empty")
            intact(victim, tmp_path)
            await serving_and_taking_jobs(channel)
        intact(victim, tmp_path)
        unexpected = [line for line in b_log.read_text().splitlines() if "unexpected error" in line]
        assert unexpected == [], f"{len(unexpected)} unexpected errors, the first: {unexpected[:1]}"


async def gone(stub, job_id: str) -> bool:
    """Whether the job ended and its record expired (its result TTL of 1 s passed: two sweeps at least)."""
    try:
        await stub.GetJob(gateway_pb2.JobRequest(job_id=job_id), timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code() == grpc.StatusCode.NOT_FOUND
    return False


async def test_a_redis_out_of_memory_refuses_a_submission_with_a_status_a_person_can_act_on(tmp_path):
    """redis-server started with a tiny maxmemory and filled: writes get Redis's OOM error. A submission gets
    RESOURCE_EXHAUSTED saying Redis is out of memory, with a retry hint (never INTERNAL, and not UNAVAILABLE: Redis
    answers, it is full), its input files are removed,
    the gateway keeps serving, and once memory is freed the next submission is taken."""
    data = tmp_path / "data"
    with redis_server(tmp_path, "--maxmemory", "4mb", "--maxmemory-policy", "noeviction") as (url, client):
        with gateway(url, data, tmp_path / "gw.log", SWL_GATEWAY_JOB_WORKERS="0") as (address, process):
            await wait_serving(tmp_path / "gw.log", process)
            filled = 0
            with contextlib.suppress(redis.exceptions.OutOfMemoryError):
                while True:
                    client.set(f"ballast:{filled}", b"x" * 65536)
                    filled += 1
            async with grpc.aio.insecure_channel(address) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.SubmitJob(submit_request(), timeout=30)
                print("submission with Redis full:", refused.value.code().name, refused.value.details())
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "out of memory" in refused.value.details() and "Redis" in refused.value.details()
                assert "grpc-status-details-bin" in dict(refused.value.trailing_metadata())  # RetryInfo
                assert not (data / "jobs").exists() or not any((data / "jobs").iterdir())  # its inputs removed
                assert await health(channel) == "SERVING"
                client.delete(*[f"ballast:{n}" for n in range(filled)])
                job = await stub.SubmitJob(submit_request(), timeout=30)
                assert State.Name(job.state) == "QUEUED"


UNREADABLE = {  # how each job's stored record is rewritten: raw bytes, or its fields changed (None: removed)
    "not JSON": "{not json",
    "a list": "[]",
    "an unknown state": {"state": "HACKED"},
    "a field of the wrong type": {"attempts": "many"},
    "no job_id": {"job_id": None},
    "a number beyond int64": {"attempts": 10**20},
    "a string that cannot be encoded": {"error_message": "\ud800"},
}


async def test_unreadable_records_and_hostile_index_entries_give_no_internal_and_stop_no_worker(tmp_path):
    """Job records rewritten in Redis into bytes that are no record (UNREADABLE), one given a field this version
    does not know (as a newer replica's would be), and the tenant's index and the queue given members naming
    paths. Gateway A (no workers) shows each unreadable job as not found, never INTERNAL, and gives its record the
    result TTL; the job with the extra field is shown as itself; the tenant's listing and next submission (which
    measures its stored bytes over its index and reads the queue's records) still work. Gateway B's workers then
    take the queue: the unreadable jobs are dropped, the queue empties, and no step of housekeeping fails."""
    data = tmp_path / "data"
    with redis_server(tmp_path) as (url, client):
        async with serving_gateway(url, data, tmp_path / "a.log", SWL_GATEWAY_JOB_WORKERS="0") as (stub, channel):
            altered = {}
            for kind, change in UNREADABLE.items():
                job = await stub.SubmitJob(submit_request(), timeout=30)
                key = f"swl:job:{job.job_id}"
                if isinstance(change, str):
                    client.set(key, change)
                else:  # None removes the field
                    changed = {**json.loads(client.get(key)), **change}
                    client.set(key, json.dumps({name: value for name, value in changed.items() if value is not None}))
                altered[kind] = job.job_id
            newer = await stub.SubmitJob(submit_request(), timeout=30)
            alter(client, newer.job_id, added_by_a_newer_version={"any": "thing"})
            client.rpush("swl:jobs:queue", "/data")
            (index,) = client.keys("swl:jobs:by-tenant:*")
            client.zadd(index, {"/data": time.time(), "../..": time.time()})
            codes = {}
            for kind, job_id in altered.items():
                try:
                    await stub.GetJob(gateway_pb2.JobRequest(job_id=job_id), timeout=10)
                    codes[kind] = "OK"
                except grpc.aio.AioRpcError as error:
                    codes[kind] = error.code().name
            assert codes == {kind: "NOT_FOUND" for kind in UNREADABLE}, codes
            assert all(0 < client.ttl(f"swl:job:{job_id}") for job_id in altered.values())  # swept in time
            shown = await stub.GetJob(gateway_pb2.JobRequest(job_id=newer.job_id), timeout=10)
            assert shown.job_id == newer.job_id and State.Name(shown.state) == "QUEUED"
            listed = await stub.ListJobs(gateway_pb2.ListJobsRequest(page_size=50), timeout=10)
            assert not {j.job_id for j in listed.jobs} & set(altered.values())
            await serving_and_taking_jobs(channel)  # the submission measures the tenant's stored bytes
        b_log = tmp_path / "b.log"
        with gateway(url, data, b_log, SWL_GATEWAY_JOB_LEASE_S="0.5") as (address, process):
            await wait_serving(b_log, process)
            await eventually_async(lambda: not client.smembers("swl:jobs:running") and
                                   not client.llen("swl:jobs:queue"), seconds=60, what="queue and running set empty")
            async with grpc.aio.insecure_channel(address) as channel:
                await serving_and_taking_jobs(channel)
        log_text = b_log.read_text()
        unexpected = [line for line in log_text.splitlines() if "unexpected error" in line or "Traceback" in line]
        assert unexpected == [], f"{len(unexpected)} unexpected errors, the first: {unexpected[:1]}"
        assert log_text.count("unreadable job record") >= len(UNREADABLE)
