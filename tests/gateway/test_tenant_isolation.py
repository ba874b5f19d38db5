"""Tenants see only their own: another tenant's avatar, upload or job is NOT_FOUND exactly as a missing one, lists
hold only the caller's objects, the plan cache is per tenant, and a gateway with no tenant configured refuses to
start unless told to serve anonymously (issue #25)."""

import json
import logging
import subprocess
import sys

import grpc
import pytest
import pytest_asyncio
from google.api import httpbody_pb2
from superwav2lip.gateway.v1 import gateway_pb2

from gateway.service import GatewayService, GatewaySettings
from gateway.webhooks import sign
from service_runtime.logs import JsonFormatter
from service_runtime.settings import SettingsError

from tests.support.media_factory import encode_video, marker_frames, speech_wav
from tests.support.metrics import metric
from tests.support.paths import ROOT
from tests.support.processes import free_port, project_env
from tests.support.tenants import tenants_file
from tests.support.stack import MODULE_LOOP, running_stack
from tests.support.waiting import eventually_async
from tests.support.webhook_receiver import webhook_receiver

pytestmark = MODULE_LOOP

ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"
ALICE_WEBHOOK_SECRET, BOB_WEBHOOK_SECRET = "alice's webhook secret", "bob's webhook secret"
State = gateway_pb2.Job.State


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(dev_models_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tenants")
    hook = f"127.0.0.1:{free_port()}"  # where alice's webhook receiver will listen (on loopback: allowed below)
    path = tenants_file(folder, alice={"key": ALICE, "webhook_secret": ALICE_WEBHOOK_SECRET,
                                       "webhook_hosts": [hook]}, bob={"key": BOB, "webhook_secret": BOB_WEBHOOK_SECRET})
    async with running_stack(dev_models_dir, tenants_file=str(path), allow_anonymous=False,
                             data_dir=str(folder / "data"), webhook_secret="the gateway's own secret",
                             webhook_allowed_hosts=(hook,), webhook_allow_private_addresses=True) as stack:
        stack.webhook_port = int(hook.split(":")[1])
        yield stack


def as_(key: str) -> dict:
    return {"metadata": (("x-api-key", key),), "timeout": 60}


async def refusal(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    return error.value


async def assert_hidden(call_with_id, real_id: str, missing_id: str) -> None:
    """The other tenant's object gets the answer a missing one gets: NOT_FOUND, the same words."""
    theirs, missing = await refusal(lambda: call_with_id(real_id)), await refusal(lambda: call_with_id(missing_id))
    assert theirs.code() == missing.code() == grpc.StatusCode.NOT_FOUND, (theirs.details(), missing.details())
    assert theirs.details().replace(real_id, "ID") == missing.details().replace(missing_id, "ID")


def missing_like(object_id: str) -> str:
    """A well-formed id of the same kind (av_..., job_...) that names nothing."""
    kind, _, number = object_id.rpartition("_")
    return f"{kind}_{'0' * len(number)}"


async def test_another_tenants_avatar_is_not_found_listed_or_deleted(stack):
    avatar = await stack.stub.CreateAvatarFromJson(gateway_pb2.CreateAvatarRequest(
        face=encode_video(marker_frames(6)), options=gateway_pb2.AvatarOptions(name="alice's presenter")), **as_(ALICE))
    missing = missing_like(avatar.avatar_id)
    stub = stack.stub
    await assert_hidden(lambda i: stub.GetAvatar(gateway_pb2.GetAvatarRequest(avatar_id=i), **as_(BOB)),
                        avatar.avatar_id, missing)
    await assert_hidden(lambda i: stub.DeleteAvatar(gateway_pb2.DeleteAvatarRequest(avatar_id=i), **as_(BOB)),
                        avatar.avatar_id, missing)
    await assert_hidden(lambda i: stub.GenerateFromAvatar(gateway_pb2.GenerateFromAvatarRequest(
        avatar_id=i, audio=httpbody_pb2.HttpBody(data=speech_wav(0.4))), **as_(BOB)), avatar.avatar_id, missing)
    await assert_hidden(lambda i: stub.SubmitJob(gateway_pb2.SubmitJobRequest(
        options=gateway_pb2.GenerateOptions(avatar_id=i), audio=speech_wav(0.4)), **as_(BOB)),
        avatar.avatar_id, missing)
    bobs = await stub.ListAvatars(gateway_pb2.ListAvatarsRequest(), **as_(BOB))
    alices = await stub.ListAvatars(gateway_pb2.ListAvatarsRequest(), **as_(ALICE))
    assert avatar.avatar_id not in [a.avatar_id for a in bobs.avatars]
    assert avatar.avatar_id in [a.avatar_id for a in alices.avatars]
    kept = await stub.GetAvatar(gateway_pb2.GetAvatarRequest(avatar_id=avatar.avatar_id), **as_(ALICE))
    assert kept.name == "alice's presenter"  # bob's delete did nothing
    video = await stub.GenerateFromAvatar(gateway_pb2.GenerateFromAvatarRequest(
        avatar_id=avatar.avatar_id, audio=httpbody_pb2.HttpBody(data=speech_wav(0.4))), **as_(ALICE))
    assert video.content_type == "video/mp4" and video.data


async def test_another_tenants_upload_is_not_found(stack):
    upload = await stack.stub.UploadMedia(gateway_pb2.UploadMediaRequest(
        media=httpbody_pb2.HttpBody(data=encode_video(marker_frames(6)))), **as_(ALICE))
    audio = httpbody_pb2.HttpBody(data=speech_wav(0.4))
    await assert_hidden(lambda i: stack.stub.GenerateFromUpload(gateway_pb2.GenerateFromUploadRequest(
        face_upload_id=i, audio=audio), **as_(BOB)), upload.upload_id, "b" * len(upload.upload_id))
    video = await stack.stub.GenerateFromUpload(gateway_pb2.GenerateFromUploadRequest(
        face_upload_id=upload.upload_id, audio=audio), **as_(ALICE))
    assert video.data


async def test_another_tenants_job_is_not_found_listed_or_cancelled(stack):
    job = await stack.stub.SubmitJob(gateway_pb2.SubmitJobRequest(face=encode_video(marker_frames(6)),
                                                                  audio=speech_wav(0.4)), **as_(ALICE))
    stub, missing = stack.stub, missing_like(job.job_id)

    async def finished() -> bool:
        record = await stub.GetJob(gateway_pb2.JobRequest(job_id=job.job_id), **as_(ALICE))
        assert State.Name(record.state) not in {"FAILED", "CANCELLED"}, record.error_message
        return State.Name(record.state) == "SUCCEEDED"

    await eventually_async(finished, seconds=60, what="alice's job to succeed")
    for rpc in (stub.GetJob, stub.GetJobVideo, stub.DeleteJob, stub.WatchJob):
        await assert_hidden(lambda i, rpc=rpc: rpc(gateway_pb2.JobRequest(job_id=i), **as_(BOB)), job.job_id, missing)
    bobs = await stub.ListJobs(gateway_pb2.ListJobsRequest(), **as_(BOB))
    alices = await stub.ListJobs(gateway_pb2.ListJobsRequest(), **as_(ALICE))
    assert job.job_id not in [j.job_id for j in bobs.jobs] and job.job_id in [j.job_id for j in alices.jobs]
    video = await stub.GetJobVideo(gateway_pb2.JobRequest(job_id=job.job_id), **as_(ALICE))
    assert video.data  # bob's DeleteJob removed nothing


async def test_webhooks_go_only_to_the_tenants_hosts_signed_with_its_own_secret(stack):
    """Bob has a secret but no hosts of his own, and the gateway's shared secret and hosts are not his to use;
    Alice's webhooks are signed with her secret: they verify with it, and not with Bob's or the gateway's."""
    with webhook_receiver(fail_first=0, port=stack.webhook_port) as (url, received):
        for bobs_url in (url, "http://hooks.bob.example/hook"):
            error = await refusal(lambda bobs_url=bobs_url: stack.stub.SubmitJob(gateway_pb2.SubmitJobRequest(
                face=encode_video(marker_frames(6)), audio=speech_wav(0.4), webhook_url=bobs_url), **as_(BOB)))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "allow-list" in error.details()
        assert "127.0.0.1" not in error.details()  # the refusal does not list the hosts others may use
        job = await stack.stub.SubmitJob(gateway_pb2.SubmitJobRequest(
            face=encode_video(marker_frames(6)), audio=speech_wav(0.4), webhook_url=url), **as_(ALICE))
        await eventually_async(lambda: received, seconds=60, what="alice's webhook")
    headers, body = received[0]
    lowered = {k.lower(): v for k, v in headers.items()}
    assert json.loads(body)["job_id"] == job.job_id
    assert lowered["x-swl-signature"] == sign(ALICE_WEBHOOK_SECRET, lowered["x-swl-timestamp"], body)
    for other in (BOB_WEBHOOK_SECRET, "the gateway's own secret"):
        assert lowered["x-swl-signature"] != sign(other, lowered["x-swl-timestamp"], body)


async def test_the_plan_cache_is_per_tenant(stack):
    """Bob sending the face Alice sent is planned afresh: a hit would tell him someone had sent it."""
    face, audio = encode_video(marker_frames(9)), speech_wav(0.4)

    async def lookups(result: str) -> float:
        return metric(await stack.metrics_text("gateway"), "swl_gateway_plan_cache_lookups_total", result=result)

    request = gateway_pb2.GenerateVideoRequest(face=face, audio=audio)
    await stack.stub.GenerateVideo(request, **as_(ALICE))
    hits = await lookups("hit")
    await stack.stub.GenerateVideo(request, **as_(BOB))
    assert await lookups("hit") == hits, "bob's request hit the plan alice's request made"
    await stack.stub.GenerateVideo(request, **as_(ALICE))
    assert await lookups("hit") == hits + 1


async def test_keys_are_required_and_each_names_its_tenant(stack):
    error = await refusal(lambda: stack.stub.ListJobs(gateway_pb2.ListJobsRequest(), timeout=10))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_gateway_with_no_tenant_refuses_to_start_unless_told_to_serve_anonymously(tmp_path):
    with pytest.raises(SettingsError, match="SWL_GATEWAY_ALLOW_ANONYMOUS"):
        GatewayService(GatewaySettings.from_env({}, data_dir=str(tmp_path)))
    GatewayService(GatewaySettings.from_env({}, data_dir=str(tmp_path), allow_anonymous=True))
    GatewayService(GatewaySettings.from_env({}, data_dir=str(tmp_path), api_keys=("k",)))


def test_the_gateway_process_exits_with_the_reason(tmp_path):
    (tmp_path / "tenants.json").write_text('{"tenants": {"acme": {"keys_sha256": ["abc"]}}}')
    for env, words in (({}, "SWL_GATEWAY_TENANTS_FILE (or SWL_GATEWAY_API_KEYS), or SWL_GATEWAY_ALLOW_ANONYMOUS"),
                       ({"SWL_GATEWAY_TENANTS_FILE": str(tmp_path / "tenants.json")}, "keys_sha256[0]")):
        done = subprocess.run([sys.executable, "-m", "gateway"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env=project_env(SWL_GATEWAY_DATA_DIR=str(tmp_path / "data"), **env))
        assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, done.stderr


async def test_a_changed_tenants_file_rotates_keys_without_a_restart_and_a_bad_one_keeps_the_old(dev_models_dir,
                                                                                                 tmp_path, caplog):
    path = tenants_file(tmp_path, alice={"key": ALICE})
    async with running_stack(dev_models_dir, tenants_file=str(path), allow_anonymous=False, tenants_poll_s=0.1,
                             data_dir=str(tmp_path / "data")) as stack:
        async def accepted(key: str) -> bool:
            try:
                await stack.stub.ListJobs(gateway_pb2.ListJobsRequest(), **as_(key))
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
                return False
            return True

        assert await accepted(ALICE) and not await accepted("alice-new-key")
        tenants_file(tmp_path, alice={"key": "alice-new-key"})  # the old key removed, the new one added
        await eventually_async(lambda: accepted("alice-new-key"), what="the new key to be accepted")
        assert not await accepted(ALICE)
        caplog.set_level(logging.WARNING, logger="gateway.tenants")
        path.write_text('{"tenants": {"alice": {"keys_sha256": ["not hex"]}}}')  # a broken edit
        await eventually_async(lambda: [r for r in caplog.records if r.getMessage() == "tenants file not reloaded"],
                               what="the broken file to be seen and refused")
        assert await accepted("alice-new-key")


async def test_the_audit_log_has_a_line_per_change_and_download_with_tenant_object_and_outcome_and_no_key(
        stack, caplog):
    caplog.set_level(logging.INFO, logger="gateway.audit")
    traced = {"metadata": (("x-api-key", ALICE), ("x-request-id", "audit-req-1")), "timeout": 60}
    upload = await stack.stub.UploadMedia(gateway_pb2.UploadMediaRequest(
        media=httpbody_pb2.HttpBody(data=encode_video(marker_frames(6)))), **traced)
    avatar = await stack.stub.CreateAvatarFromJson(gateway_pb2.CreateAvatarRequest(
        face=encode_video(marker_frames(6))), **as_(ALICE))
    await refusal(lambda: stack.stub.DeleteAvatar(gateway_pb2.DeleteAvatarRequest(avatar_id=avatar.avatar_id),
                                                  **as_(BOB)))
    await stack.stub.ListAvatars(gateway_pb2.ListAvatarsRequest(), **as_(ALICE))  # reads only: no line
    lines = [(r.tenant, r.method, r.action, r.object_id, r.outcome, r.request_id)
             for r in caplog.records if r.name == "gateway.audit"]
    assert lines[0] == ("alice", "UploadMedia", "create", upload.upload_id, "OK", "audit-req-1")
    assert lines[1][:5] == ("alice", "CreateAvatarFromJson", "create", avatar.avatar_id, "OK")
    assert lines[2][:5] == ("bob", "DeleteAvatar", "delete", avatar.avatar_id, "NOT_FOUND")
    assert len(lines) == 3
    formatted = "".join(JsonFormatter().format(r) for r in caplog.records)
    assert ALICE not in formatted and BOB not in formatted
