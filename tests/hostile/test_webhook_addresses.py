"""Webhooks aimed inward, against a real gateway process and a real redis-server: a name resolving to loopback is
refused at submission and, written into the record in Redis afterwards, again at delivery; a dripping receiver
is cut at the attempt's timeout (issue #26)."""

from __future__ import annotations

import contextlib
import json
import urllib.request

import grpc
import pytest
import redis
from superwav2lip.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from tests.support.gateway_processes import RedisServer, gateway_process, wait_serving
from tests.support.media_factory import encode_png, scene, speech_wav
from tests.support.metrics import metric
from tests.support.processes import free_port
from tests.support.waiting import eventually_async
from tests.support.webhook_receiver import dripping_receiver, webhook_receiver

SECRET = "webhook secret"


class NoModelServices:
    """Model-service addresses where nothing listens: the jobs here are cancelled while queued (a terminal state,
    so their webhook is sent) and never reach a model."""

    def address(self, name: str) -> str:
        return "127.0.0.1:1"


@contextlib.asynccontextmanager
async def gateway(tmp_path, **settings: str):
    """A gateway process on a real Redis that runs no jobs (they stay QUEUED until cancelled); yields its stub, a
    Redis client to tamper with, a function reading its metrics, and its log's path."""
    redis_server = RedisServer(tmp_path / "redis")
    metrics_port, log_path = free_port(), tmp_path / "gateway.log"
    env = {"SWL_GATEWAY_JOB_WORKERS": "0", "SWL_GATEWAY_METRICS_PORT": str(metrics_port),
           "SWL_GATEWAY_WEBHOOK_SECRET": SECRET, **settings}
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        with open(log_path, "w") as log, gateway_process(NoModelServices(), redis_server.url, tmp_path / "data", log,
                                                         env) as (address, process):
            await wait_serving(log_path, process)
            async with grpc.aio.insecure_channel(address) as channel:
                def metrics() -> str:
                    return urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
                yield gateway_pb2_grpc.GatewayStub(channel), client, metrics, log_path
    finally:
        client.close()
        redis_server.stop()


def job_request(webhook_url: str = "") -> gateway_pb2.SubmitJobRequest:
    return gateway_pb2.SubmitJobRequest(face=encode_png(scene()), audio=speech_wav(0.4), webhook_url=webhook_url)


def attempts(text: str, outcome: str) -> float:
    return metric(text, "swl_gateway_webhook_attempts_total", outcome=outcome)


async def test_a_name_resolving_to_loopback_is_refused_at_submission_and_again_at_delivery(tmp_path):
    with webhook_receiver() as (url, received):
        port = url.split(":")[2].split("/")[0]
        inward = f"http://localhost:{port}/hook"  # on the allow-list, but localhost is 127.0.0.1 (or ::1)
        async with gateway(tmp_path, SWL_GATEWAY_WEBHOOK_ALLOWED_HOSTS=f"localhost:{port},internal-secret.example",
                           SWL_GATEWAY_WEBHOOK_ALLOW_PRIVATE_ADDRESSES="false") as (stub, store, metrics, log_path):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.SubmitJob(job_request(inward), timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a public address" in error.value.details()
            assert "internal-secret" not in error.value.details() and "127.0.0.1" not in error.value.details()

            # An intruder with Redis access points a queued job's record at the same URL; the job then ends.
            job = await stub.SubmitJob(job_request(), timeout=30)
            key = f"swl:job:{job.job_id}"
            store.set(key, json.dumps({**json.loads(store.get(key)), "webhook_url": inward}), keepttl=True)
            cancelled = await stub.DeleteJob(gateway_pb2.JobRequest(job_id=job.job_id), timeout=30)
            assert cancelled.state == gateway_pb2.Job.CANCELLED
            await eventually_async(lambda: attempts(metrics(), "refused") == 1, seconds=30,
                                   what="the altered record's webhook refused at delivery")
            assert attempts(metrics(), "delivered") == attempts(metrics(), "failed") == 0
            assert "not a public address" in log_path.read_text()
    assert received == []


async def test_a_receiver_that_drips_its_answer_holds_the_attempt_only_until_the_timeout(tmp_path):
    """The receiver sends a byte of a header every 0.2 s for ever, so no read timeout fires; the attempt's total
    timeout (1 s here) ends it, and the gateway hangs up."""
    with dripping_receiver(every_s=0.2) as (url, posts, hung_up):
        port = url.split(":")[2].split("/")[0]
        async with gateway(tmp_path, SWL_GATEWAY_WEBHOOK_ALLOWED_HOSTS=f"127.0.0.1:{port}",
                           SWL_GATEWAY_WEBHOOK_ALLOW_PRIVATE_ADDRESSES="true", SWL_GATEWAY_WEBHOOK_TIMEOUT_S="1",
                           SWL_GATEWAY_WEBHOOK_MAX_ATTEMPTS="1") as (stub, _, metrics, log_path):
            job = await stub.SubmitJob(job_request(url), timeout=30)
            await stub.DeleteJob(gateway_pb2.JobRequest(job_id=job.job_id), timeout=30)
            await eventually_async(lambda: attempts(metrics(), "failed") == 1, seconds=30,
                                   what="the dripping attempt ended as failed")
            await eventually_async(hung_up.is_set, seconds=10, what="the gateway hanging up on the receiver")
            assert len(posts) == 1 and attempts(metrics(), "delivered") == 0
            assert "TimeoutError" in log_path.read_text()
