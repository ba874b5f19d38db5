"""Tenant isolation at every edge a customer uses (issue #25): HTTP through a real Envoy, the SDK and the CLI.

Tenant A makes an upload, an avatar and a finished job; tenant B then tries every job, avatar and upload call on
them and gets what a well-formed id that names nothing gets: NOT_FOUND (HTTP 404, the SDK's error, the CLI's exit
code 3), in the same words once the id is replaced; B's lists hold only his own objects. Afterwards A finds each
object intact. The SDK and the CLI speak native gRPC to Envoy's port; neither has an upload call, so B tries A's
upload over HTTP only. tests/gateway/test_tenant_isolation.py checks the same on the gateway's gRPC API."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from superwav2lip.gateway.v1 import gateway_pb2
from superwav2lip_client import Client, SuperWav2LipError

from tests.support.envoy import envoy_in_front
from tests.support.media_factory import encode_png, encode_video, marker_frames, scene, speech_wav, with_marker
from tests.support.paths import ROOT
from tests.support.processes import cli, project_env
from tests.support.stack import MODULE_LOOP, running_stack
from tests.support.tenants import tenants_file

pytestmark = MODULE_LOOP

A_KEY, B_KEY = "tenant-a-key-0123456789", "tenant-b-key-9876543210"
FACE = encode_png(with_marker(scene(), 100, 80))
SPEECH = speech_wav(0.4)
NOT_FOUND_EXIT = 3  # client/README.md: NOT_FOUND is "the server refused the input"
# Headers whose values differ from one answer to the next whoever asks (the caller's own rate-limit bucket goes
# down with each call).
VARYING_HEADERS = {"date", "x-envoy-upstream-service-time", "x-request-id", "x-ratelimit-remaining",
                   "x-ratelimit-reset"}


@dataclass
class World:
    edge: str  # http://127.0.0.1:PORT, Envoy
    address: str  # the same port, for the SDK and the CLI (native gRPC through Envoy)
    folder: Path
    upload: str  # A's
    avatar: gateway_pb2.Avatar  # A's, as GetAvatar answered it before B tried anything (with its preview)
    job: str  # A's, SUCCEEDED
    video: bytes  # A's job's result, read before B tried anything
    b_avatar: str  # B's own, so that B's lists are seen to work
    b_job: str

    @property
    def as_ids(self) -> dict[str, str]:
        """A's id of each kind."""
        return {"upload": self.upload, "avatar": self.avatar.avatar_id, "job": self.job}

    @property
    def missing(self) -> dict[str, str]:
        """A well-formed id of each kind that names nothing."""
        return {"upload": "b" * len(self.upload), "avatar": "av_" + "0" * 24, "job": "job_" + "0" * 24}


def http(method: str, url: str, key: str, body: bytes | None = None,
         content_type: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-cased names) and body of one request; an error status is an answer."""
    headers = {"x-api-key": key, **({"content-type": content_type} if content_type else {})}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, {k.lower(): v for k, v in reply.headers.items()}, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def job_json(audio: bytes, avatar_id: str) -> bytes:
    return json.dumps({"audio": base64.b64encode(audio).decode(), "options": {"avatar_id": avatar_id}}).encode()


def make_objects(edge: str, folder: Path) -> World:
    address = edge.removeprefix("http://")
    with Client(address, api_key=A_KEY, timeout=120) as a:
        avatar = a.get_avatar(a.create_avatar(encode_video(marker_frames(6)), name="a's presenter").avatar_id)
        job = a.submit_job(FACE, SPEECH).job_id
        ended = a.wait_job(job)
        assert gateway_pb2.Job.State.Name(ended.state) == "SUCCEEDED", ended
        video = a.job_video(job)
    status, _, body = http("POST", f"{edge}/v1/uploads", A_KEY, FACE, "image/png")
    assert status == 200, body
    upload = json.loads(body)["upload_id"]
    with Client(address, api_key=B_KEY, timeout=120) as b:
        b_avatar = b.create_avatar(encode_video(marker_frames(6)), name="b's presenter").avatar_id
        b_job = b.submit_job(FACE, SPEECH).job_id
        b.cancel_job(b_job)  # a cancelled job stays listed, which is all B's list needs; no second generation
    return World(edge, address, folder, upload, avatar, job, video, b_avatar, b_job)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(dev_models_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tenants_edge")
    path = tenants_file(folder, a={"key": A_KEY}, b={"key": B_KEY})
    async with running_stack(dev_models_dir, tenants_file=str(path), allow_anonymous=False,
                             data_dir=str(folder / "data")) as stack, envoy_in_front(stack, folder) as edge:
        # Every synchronous call runs in a thread: the stack serves on this event loop.
        yield await asyncio.to_thread(make_objects, edge, folder)


# ---- HTTP through Envoy ---------------------------------------------------------------------------------------


def same_answer(reply: tuple[int, dict, bytes], object_id: str) -> tuple[int, dict, bytes]:
    status, headers, body = reply
    return (status, {k: v.replace(object_id, "ID") for k, v in headers.items() if k not in VARYING_HEADERS},
            body.replace(object_id.encode(), b"ID"))


def http_cases(w: World) -> list[tuple[str, str, str, bytes | None, str | None]]:
    """(kind of A's object, method, path with {id}, body, content type): every call that names one."""
    return [
        ("job", "GET", "/v1/jobs/{id}", None, None),
        ("job", "GET", "/v1/jobs/{id}/video", None, None),
        ("job", "DELETE", "/v1/jobs/{id}", None, None),
        ("avatar", "GET", "/v1/avatars/{id}", None, None),
        ("avatar", "DELETE", "/v1/avatars/{id}", None, None),
        ("avatar", "POST", "/v1/avatars/{id}:generate", SPEECH, "audio/wav"),
        ("avatar", "POST", "/v1/generate", "json", "application/json"),
        ("avatar", "POST", "/v1/jobs", "json", "application/json"),
        ("upload", "POST", "/v1/uploads/{id}:generate", SPEECH, "audio/wav"),
    ]


def b_over_http(w: World, kind: str, method: str, path: str, body, content_type, object_id: str):
    if body == "json":
        body = job_json(SPEECH, object_id)
    return http(method, w.edge + path.format(id=object_id), B_KEY, body, content_type)


async def test_b_gets_404_over_http_for_each_of_as_objects_as_for_a_missing_one(world):
    def check() -> None:
        for kind, method, path, body, content_type in http_cases(world):
            real, missing = world.as_ids[kind], world.missing[kind]
            theirs = b_over_http(world, kind, method, path, body, content_type, real)
            absent = b_over_http(world, kind, method, path, body, content_type, missing)
            what = f"{method} {path} on A's {kind}"
            assert theirs[0] == 404, (what, theirs)
            assert json.loads(theirs[2])["code"] == grpc.StatusCode.NOT_FOUND.value[0], (what, theirs[2])
            assert missing.encode() in absent[2], (what, absent)  # the words name the id: the replacement is real
            assert same_answer(theirs, real) == same_answer(absent, missing), what

    await asyncio.to_thread(check)


def sse_events(body: bytes) -> list[dict]:
    events, data = [], []
    for line in body.decode().splitlines():
        if line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            events.append(json.loads("\n".join(data)))
            data = []
    return events + ([json.loads("\n".join(data))] if data else [])


async def test_b_streaming_from_as_avatar_over_http_ends_as_for_a_missing_one(world):
    """/v1/generate:stream sends its status line before the job runs (docs/http-api.md), so the refusal is the
    stream's one event, the same as for an avatar that does not exist."""
    def check() -> None:
        answers = {}
        for object_id in (world.avatar.avatar_id, world.missing["avatar"]):
            answers[object_id] = http("POST", f"{world.edge}/v1/generate:stream", B_KEY,
                                      job_json(SPEECH, object_id), "application/json")
        theirs, absent = answers[world.avatar.avatar_id], answers[world.missing["avatar"]]
        events = sse_events(theirs[2])
        assert [e["error"]["status"] for e in events] == ["NOT_FOUND"], theirs
        assert same_answer(theirs, world.avatar.avatar_id) == same_answer(absent, world.missing["avatar"])

    await asyncio.to_thread(check)


async def test_b_lists_over_http_hold_his_objects_and_none_of_as(world):
    def check() -> None:
        status, _, body = http("GET", f"{world.edge}/v1/jobs", B_KEY)
        jobs = [j["job_id"] for j in json.loads(body).get("jobs", [])]
        assert status == 200 and world.b_job in jobs and world.job not in jobs, body
        status, _, body = http("GET", f"{world.edge}/v1/avatars", B_KEY)
        avatars = [a["avatar_id"] for a in json.loads(body).get("avatars", [])]
        assert status == 200 and world.b_avatar in avatars and world.avatar.avatar_id not in avatars, body

    await asyncio.to_thread(check)


# ---- the SDK --------------------------------------------------------------------------------------------------


def sdk_refusal(call, object_id: str) -> SuperWav2LipError:
    with pytest.raises(SuperWav2LipError) as error:
        call(object_id)
    return error.value


async def test_b_gets_not_found_from_the_sdk_for_each_of_as_objects_as_for_a_missing_one(world):
    def check() -> None:
        with Client(world.address, api_key=B_KEY, timeout=120) as b:
            cases = {
                "get_job": ("job", b.get_job),
                "job_video": ("job", b.job_video),
                "cancel_job": ("job", b.cancel_job),
                "watch_job": ("job", lambda i: list(b.watch_job(i))),
                "wait_job": ("job", b.wait_job),
                "get_avatar": ("avatar", b.get_avatar),
                "delete_avatar": ("avatar", b.delete_avatar),
                "generate(avatar=)": ("avatar", lambda i: b.generate(audio=SPEECH, avatar=i)),
                "generate_events(avatar=)": ("avatar", lambda i: list(b.generate_events(audio=SPEECH, avatar=i))),
                "submit_job(avatar=)": ("avatar", lambda i: b.submit_job(audio=SPEECH, avatar=i)),
            }
            for what, (kind, call) in cases.items():
                real, missing = world.as_ids[kind], world.missing[kind]
                theirs, absent = sdk_refusal(call, real), sdk_refusal(call, missing)
                assert theirs.code == absent.code == grpc.StatusCode.NOT_FOUND, (what, theirs, absent)
                assert missing in absent.message, (what, absent)
                assert theirs.message.replace(real, "ID") == absent.message.replace(missing, "ID"), what
            jobs, avatars = [j.job_id for j in b.list_jobs()], [a.avatar_id for a in b.list_avatars()]
        assert world.b_job in jobs and world.job not in jobs, jobs
        assert world.b_avatar in avatars and world.avatar.avatar_id not in avatars, avatars

    await asyncio.to_thread(check)


# ---- the CLI --------------------------------------------------------------------------------------------------


def cli_cases(w: World) -> dict[str, tuple[str, list[str]]]:
    """Every `superwav2lip` command that names a job or an avatar, with {id} for it."""
    audio, out = str(w.folder / "speech.wav"), str(w.folder / "b-out.mp4")
    return {
        "jobs status": ("job", ["jobs", "status", "{id}"]),
        "jobs wait": ("job", ["jobs", "wait", "{id}"]),
        "jobs download": ("job", ["jobs", "download", "{id}", "-o", out]),
        "jobs cancel": ("job", ["jobs", "cancel", "{id}"]),
        "avatar delete": ("avatar", ["avatar", "delete", "{id}"]),
        "generate --avatar": ("avatar", ["generate", "--avatar", "{id}", "--audio", audio, "-o", out]),
        "jobs submit --avatar": ("avatar", ["jobs", "submit", "--avatar", "{id}", "--audio", audio]),
    }


def b_cli(w: World, args: list[str], object_id: str = "") -> subprocess.CompletedProcess:
    return cli(*[a.replace("{id}", object_id) for a in args], "--server", w.address, "--api-key", B_KEY, "--json")


def cli_error(done: subprocess.CompletedProcess, what: str) -> dict:
    assert done.returncode == NOT_FOUND_EXIT, (what, done.returncode, done.stdout, done.stderr)
    return json.loads(done.stdout)["error"]


async def test_b_gets_the_not_found_exit_code_from_the_cli_for_each_of_as_objects(world):
    (world.folder / "speech.wav").write_bytes(SPEECH)

    def check() -> None:
        cases = [(what, args, world.as_ids[kind], world.missing[kind]) for what, (kind, args) in cli_cases(world).items()]
        with ThreadPoolExecutor(4) as pool:  # a process per command: four at a time
            done = list(pool.map(lambda case: (b_cli(world, case[1], case[2]), b_cli(world, case[1], case[3])), cases))
        for (what, _, real, missing), (theirs, absent) in zip(cases, done, strict=True):
            theirs, absent = cli_error(theirs, what), cli_error(absent, what)
            assert theirs["code"] == absent["code"] == "NOT_FOUND", (what, theirs)
            assert missing in absent["message"], (what, absent)
            assert theirs["message"].replace(real, "ID") == absent["message"].replace(missing, "ID"), what
        assert not (world.folder / "b-out.mp4").exists()  # nothing of A's was written out for B
        listed = b_cli(world, ["jobs", "list"])
        jobs = [j["job_id"] for j in json.loads(listed.stdout)["jobs"]]
        assert listed.returncode == 0 and world.b_job in jobs and world.job not in jobs, listed.stdout
        listed = b_cli(world, ["avatar", "list"])
        avatars = [a["avatar_id"] for a in json.loads(listed.stdout)["avatars"]]
        assert listed.returncode == 0 and world.b_avatar in avatars and world.avatar.avatar_id not in avatars

    await asyncio.to_thread(check)


async def test_the_cli_takes_bs_key_from_the_environment_too(world):
    def superwav2lip(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "superwav2lip_client.cli", *args, "--server", world.address,
                               "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env=project_env(SUPERWAV2LIP_API_KEY=B_KEY))

    def check() -> None:
        listed = superwav2lip("avatar", "list")  # B's key, from the environment: B's own avatar
        assert listed.returncode == 0 and world.b_avatar in listed.stdout, listed.stdout + listed.stderr
        assert world.avatar.avatar_id not in listed.stdout
        refused = superwav2lip("jobs", "status", world.job)
        assert cli_error(refused, "jobs status, key from the environment")["code"] == "NOT_FOUND"

    await asyncio.to_thread(check)


# ---- A's objects afterwards -----------------------------------------------------------------------------------


async def test_as_objects_are_intact_after_everything_b_tried(world):
    """Runs last in the module (file order): B's deletes, cancels and downloads above changed nothing of A's."""
    def check() -> None:
        with Client(world.address, api_key=A_KEY, timeout=120) as a:
            job = a.get_job(world.job)
            assert gateway_pb2.Job.State.Name(job.state) == "SUCCEEDED", job
            assert a.job_video(world.job) == world.video
            assert world.job in [j.job_id for j in a.list_jobs()]
            assert a.get_avatar(world.avatar.avatar_id) == world.avatar  # name, size, frames, preview: all as made
            assert world.avatar.name == "a's presenter" and world.avatar.preview_jpeg[:2] == b"\xff\xd8"
            listed = [x.avatar_id for x in a.list_avatars()]
            assert world.avatar.avatar_id in listed and world.b_avatar not in listed
            made = a.generate(audio=SPEECH, avatar=world.avatar.avatar_id)  # its media and plan are all there
            assert made.mp4 and made.info.frames > 0
        status, headers, mp4 = http("POST", f"{world.edge}/v1/uploads/{world.upload}:generate", A_KEY, SPEECH,
                                    "audio/wav")
        assert status == 200 and headers["content-type"] == "video/mp4" and mp4, mp4[:300]

    await asyncio.to_thread(check)
