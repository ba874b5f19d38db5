"""Asynchronous jobs: shared by gateway processes through a real redis-server, surviving a killed replica,
bounded, cancellable, expiring, and announced by signed webhooks to a real HTTP receiver."""

import json
import signal
import time

import grpc
import pytest
from superwav2lip.gateway.v1 import gateway_pb2

from gateway.webhooks import sign

from tests.support.media_factory import encode_png, encode_video, marker_frames, scene, speech_wav, stream_durations, with_marker
from tests.support.webhook_receiver import webhook_receiver
from tests.support.stack import running_stack
from tests.support.gateway_processes import RedisServer, gateway_process, wait_serving
from tests.support.waiting import eventually_async

FACE = encode_png(with_marker(scene(), 100, 80))
State = gateway_pb2.Job.State


async def wait_for(stub, job_id: str, states: set, seconds: float = 60) -> gateway_pb2.Job:
    """The job once it is in one of `states`; fails naming the state it stayed in."""
    seen = []

    async def reached() -> gateway_pb2.Job | None:
        job = await stub.GetJob(gateway_pb2.JobRequest(job_id=job_id), timeout=10)
        seen.append(State.Name(job.state))
        return job if seen[-1] in states else None

    try:
        return await eventually_async(reached, seconds=seconds, every=0.1, what=f"job {job_id} in {sorted(states)}")
    except AssertionError:
        raise AssertionError(f"job {job_id} stayed {seen[-1]}, not {' or '.join(sorted(states))}, "
                             f"for {seconds:g} s") from None


def submit_request(face=FACE, seconds: float = 0.8, **fields) -> gateway_pb2.SubmitJobRequest:
    return gateway_pb2.SubmitJobRequest(face=face, audio=speech_wav(seconds), **fields)


async def test_any_replica_answers_for_a_job_and_a_cancel_stops_it(dev_models_dir, tmp_path):
    """Gateway A (in-process) only answers the API; gateway B (its own process) runs the jobs."""
    server, data = RedisServer(tmp_path), tmp_path / "data"
    try:
        async with running_stack(dev_models_dir, redis_url=server.url, data_dir=str(data), job_workers=0) as stack:
            log_path = tmp_path / "b.log"
            with open(log_path, "w") as log, gateway_process(stack, server.url, data, log) as (_, b):
                await wait_serving(log_path, b)
                job = await stack.stub.SubmitJob(submit_request(), timeout=30)
                assert State.Name(job.state) == "QUEUED" and job.queue_position >= 1
                done = await wait_for(stack.stub, job.job_id, {"SUCCEEDED", "FAILED"})
                assert State.Name(done.state) == "SUCCEEDED", done.error_message
                assert done.video_path == f"/v1/jobs/{job.job_id}/video" and done.result.frames == 20
                video = await stack.stub.GetJobVideo(gateway_pb2.JobRequest(job_id=job.job_id), timeout=30)
                assert video.content_type == "video/mp4" and abs(stream_durations(video.data)["video"] - 0.8) < 0.04
                listed = await stack.stub.ListJobs(gateway_pb2.ListJobsRequest(), timeout=10)
                assert [j.job_id for j in listed.jobs] == [job.job_id]

                long_job = await stack.stub.SubmitJob(submit_request(encode_video(marker_frames(30)), 60.0),
                                                      timeout=30)
                await wait_for(stack.stub, long_job.job_id, {"RUNNING"})
                asked = time.monotonic()
                await stack.stub.DeleteJob(gateway_pb2.JobRequest(job_id=long_job.job_id), timeout=10)
                cancelled = await wait_for(stack.stub, long_job.job_id, {"CANCELLED", "SUCCEEDED", "FAILED"}, 10)
                # Within a few heartbeats (0.5 s each) of the ask, with room for a loaded machine.
                assert State.Name(cancelled.state) == "CANCELLED" and time.monotonic() - asked < 5.0
                assert not (data / "jobs" / long_job.job_id).exists()
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await stack.stub.GetJobVideo(gateway_pb2.JobRequest(job_id=long_job.job_id), timeout=10)
                assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        server.stop()


async def test_a_job_whose_replica_is_killed_is_run_by_the_survivor(dev_models_dir, tmp_path):
    server, data = RedisServer(tmp_path), tmp_path / "data"
    try:
        async with running_stack(dev_models_dir, redis_url=server.url, data_dir=str(data), job_workers=0) as stack:
            extra = {"SWL_GATEWAY_JOB_LEASE_S": "3"}  # short, yet six heartbeats long: a loaded replica keeps it
            first_log, second_log = tmp_path / "b1.log", tmp_path / "b2.log"
            with open(first_log, "w") as log, gateway_process(stack, server.url, data, log, extra) as (_, first):
                await wait_serving(first_log, first)
                job = await stack.stub.SubmitJob(submit_request(encode_video(marker_frames(30)), 6.0), timeout=30)
                running = await wait_for(stack.stub, job.job_id, {"RUNNING"})
                assert running.attempts == 1
                first.send_signal(signal.SIGKILL)  # no drain, no goodbye
                first.wait()
                with open(second_log, "w") as log2, gateway_process(stack, server.url, data, log2, extra) as (_, second):
                    await wait_serving(second_log, second)
                    done = await wait_for(stack.stub, job.job_id, {"SUCCEEDED", "FAILED"}, 120)
                    assert State.Name(done.state) == "SUCCEEDED", done.error_message
                    assert done.attempts == 2  # run again from the start by the survivor
    finally:
        server.stop()


async def test_a_full_queue_refuses_at_once(dev_models_dir, tmp_path):
    async with running_stack(dev_models_dir, data_dir=str(tmp_path), job_workers=0, job_queue_size=1) as stack:
        first = await stack.stub.SubmitJob(submit_request(), timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stack.stub.SubmitJob(submit_request(), timeout=30)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "SWL_GATEWAY_JOB_QUEUE_SIZE" in error.value.details()
        queued = await stack.stub.GetJob(gateway_pb2.JobRequest(job_id=first.job_id), timeout=10)
        assert State.Name(queued.state) == "QUEUED" and queued.queue_position == 1
        cancelled = await stack.stub.DeleteJob(gateway_pb2.JobRequest(job_id=first.job_id), timeout=10)
        assert State.Name(cancelled.state) == "CANCELLED"


async def test_results_past_their_ttl_are_gone_with_their_files(dev_models_dir, tmp_path):
    """The job's finish is moved an hour back in the store instead of waiting out a short TTL, which a loaded
    machine could pass before the test had seen the job succeed."""
    async with running_stack(dev_models_dir, data_dir=str(tmp_path), job_result_ttl_s=60.0) as stack:
        job = await stack.stub.SubmitJob(submit_request(), timeout=30)
        await wait_for(stack.stub, job.job_id, {"SUCCEEDED"})
        assert (tmp_path / "jobs" / job.job_id / "result.mp4").is_file()
        stack.servers["gateway"].service.jobs.store._records[job.job_id].finished -= 3600
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stack.stub.GetJob(gateway_pb2.JobRequest(job_id=job.job_id), timeout=10)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND and "SWL_GATEWAY_JOB_RESULT_TTL_S" in error.value.details()
        await eventually_async(lambda: not (tmp_path / "jobs" / job.job_id).exists(), seconds=15, every=0.2,
                               what="the expired job's files deleted")


async def test_webhooks_are_signed_retried_and_restricted_to_the_allow_list(dev_models_dir, tmp_path):
    secret = "webhook-secret"
    with webhook_receiver(fail_first=1) as (url, received):
        async with running_stack(dev_models_dir, data_dir=str(tmp_path), webhook_secret=secret,
                                 webhook_allowed_hosts=(url.split("/")[2],), webhook_allow_private_addresses=True,
                                 webhook_backoff_s=0.1) as stack:  # the receiver is on loopback
            for refused in ("http://10.0.0.7/hook", "ftp://127.0.0.1/hook", "http://user@127.0.0.1/hook"):
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await stack.stub.SubmitJob(submit_request(webhook_url=refused), timeout=30)
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
            job = await stack.stub.SubmitJob(submit_request(webhook_url=url), timeout=30)
            await wait_for(stack.stub, job.job_id, {"SUCCEEDED"})
            await eventually_async(lambda: len(received) >= 2, seconds=10,
                                   what="the webhook retried after a 500 (a second delivery)")

            async def counted_delivered() -> str | None:  # the receiver has the body before the sender its 200
                text = await stack.metrics_text("gateway")
                return text if 'swl_gateway_webhook_attempts_total{outcome="delivered"}' in text else None

            gateway = await eventually_async(counted_delivered, seconds=10, what="the delivery counted")
    for headers, body in received:
        lowered = {k.lower(): v for k, v in headers.items()}
        assert lowered["x-swl-signature"] == sign(secret, lowered["x-swl-timestamp"], body)
        assert lowered["x-swl-signature"] != sign("another secret", lowered["x-swl-timestamp"], body)
    payload = json.loads(received[-1][1])
    assert payload["job_id"] == job.job_id and payload["state"] == "SUCCEEDED"
    assert payload["video_path"] == f"/v1/jobs/{job.job_id}/video"
    assert 'swl_gateway_webhook_attempts_total{outcome="failed"} 1.0' in gateway
    assert 'swl_gateway_webhook_attempts_total{outcome="delivered"} 1.0' in gateway
