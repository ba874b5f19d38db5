"""Plans in a Redis of their own that evicts, jobs in one that never does: two real redis-servers (issue #26)."""

from __future__ import annotations


import redis
from superwav2lip.gateway.v1 import gateway_pb2


from tests.support.gateway_processes import redis_server
from tests.support.media_factory import encode_video, marker_frames, speech_wav
from tests.support.metrics import metric
from tests.support.stack import running_stack
from tests.support.waiting import eventually

PLANS = "*swl:plan:*"  # a plan's key, behind its tenant's prefix


def fill_with_old_plans(client: redis.Redis) -> int:
    """Writes 1 KiB values under plan keys until Redis first evicts, so that it is full to within about 1 KiB
    (a plan here is about 3 KiB); then zeroes the eviction count. Returns how many were written."""
    written = 0
    while evicted(client) == 0:
        client.set(f"earlier-tenant:swl:plan:{written:064x}", b"p" * 1024)
        written += 1
    client.config_resetstat()
    return written


def evicted(client: redis.Redis) -> int:
    return int(client.info("stats")["evicted_keys"])


async def test_plans_go_to_their_own_evicting_redis_and_jobs_stay_in_the_one_that_never_evicts(dev_models_dir,
                                                                                              tmp_path):
    """redis_url names a noeviction Redis, plan_cache_redis_url an allkeys-lru one with a 2 MB maxmemory, already
    full of earlier plans. Each generation's plan lands in the plan Redis only, evicting old ones, and the latest
    plan is read back (a hit, no detection); the jobs submitted in between are all kept in the job Redis, which
    holds no plan and evicts nothing. On shutdown the gateway closes its connections to both."""
    with redis_server(tmp_path / "jobs", "--maxmemory", "64mb", "--maxmemory-policy", "noeviction") as (
            jobs_url, jobs), redis_server(tmp_path / "plans", "--maxmemory", "2mb",
                                          "--maxmemory-policy", "allkeys-lru") as (plans_url, plans):
        old = fill_with_old_plans(plans)
        submitted, sizes = [], []
        async with running_stack(dev_models_dir, redis_url=jobs_url, plan_cache_redis_url=plans_url,
                                 redis_timeout_s=5.0, job_workers=0, data_dir=str(tmp_path / "data")) as stack:
            faces = [encode_video(marker_frames(12 + n)) for n in range(3)]
            for face in faces:
                before, evictions = set(plans.scan_iter(PLANS)), evicted(plans)
                await stack.generate(face, speech_wav(0.4))
                new = set(plans.scan_iter(PLANS)) - before
                assert [key.split(b":")[0] for key in new] == [b"anonymous"], new  # this generation's plan
                assert evicted(plans) > evictions  # it took older plans' room
                sizes.append(plans.memory_usage(new.pop()))
                job = await stack.stub.SubmitJob(gateway_pb2.SubmitJobRequest(face=face, audio=speech_wav(0.4)),
                                                 timeout=30)
                submitted.append(job.job_id)
            print(f"plan Redis: {old} plans of 1 KiB filled it; {len(faces)} new plans of {sizes} bytes evicted "
                  f"{evicted(plans)} keys; {len(list(plans.scan_iter(PLANS)))} plan keys left, used_memory "
                  f"{plans.info('memory')['used_memory']} of {plans.config_get('maxmemory')['maxmemory']}")
            await stack.generate(faces[-1], speech_wav(0.4))  # the latest plan survived the eviction: a hit
            gateway = await stack.metrics_text("gateway")
            assert metric(gateway, "swl_gateway_plan_cache_lookups_total", backend="redis", result="hit") == 1
            assert metric(gateway, "swl_gateway_plan_cache_lookups_total", backend="redis", result="miss") == 3
            assert metric(gateway, "swl_gateway_plan_cache_errors_total", backend="redis") == 0
            for job_id in submitted:
                shown = await stack.stub.GetJob(gateway_pb2.JobRequest(job_id=job_id), timeout=10)
                assert gateway_pb2.Job.State.Name(shown.state) == "QUEUED"
            assert all(jobs.exists(f"swl:job:{job_id}") for job_id in submitted)
            assert list(jobs.scan_iter(PLANS)) == [] and evicted(jobs) == 0
            assert list(plans.scan_iter("swl:job*")) == []
        for server in (jobs, plans):  # the gateway's clients are closed: only this test's own is connected
            eventually(lambda: server.info("clients")["connected_clients"] == 1, seconds=10,
                       what="the gateway's connections closed")
