"""The client SDK against an in-process stack with generated models, as its users call it."""

import asyncio
import os
import re
import subprocess
import sys

import grpc
import pytest
from superwav2lip.gateway.v1 import gateway_pb2

from superwav2lip_client import (NO_RETRY, AsyncClient, Client, CropMode, Progress, Result, RetryPolicy,
                                 SuperWav2LipError)
from superwav2lip_client.core import options_proto

from tests.support.paths import ROOT
from tests.support.processes import cli, free_port, project_env
from tests.support.media_factory import decode_all, encode_png, scene, speech_wav, stream_durations, with_marker
from tests.support.stack import MODULE_LOOP, running_stack, shared_stack

pytestmark = MODULE_LOOP
stack = shared_stack()

STAGE_ORDER = ["decode", "detect", "track", "lipsync", "enhance", "encode"]
EXAMPLES = ROOT / "client" / "examples"


def still() -> bytes:
    return encode_png(with_marker(scene(160, 120), 60, 45))


class CountingRetry(RetryPolicy):
    """A RetryPolicy that records the attempts it allowed (and waits no time)."""

    def __init__(self, max_attempts: int) -> None:
        super().__init__(max_attempts=max_attempts)
        object.__setattr__(self, "retried", [])

    def delay(self, attempt: int) -> float:
        self.retried.append(attempt)
        return 0.0


async def test_sync_and_async_clients_give_identical_bytes_and_ordered_progress(dev_models_dir, tmp_path):
    face, speech = still(), speech_wav(1.2)
    (tmp_path / "face.png").write_bytes(face)
    async with running_stack(dev_models_dir, encoder_threads=1) as stack:  # one encoder thread: reproducible bytes
        address = stack.address("gateway")

        def sync_run():
            with Client(address) as client:
                events = list(client.generate_events(tmp_path / "face.png", speech, crop_mode=CropMode.BOX))
                written = client.generate(open(tmp_path / "face.png", "rb"), speech, crop_mode="box",
                                          output=tmp_path / "sync.mp4")
                return events, written

        events, written = await asyncio.to_thread(sync_run)
        async with AsyncClient(address) as client:
            async_events = [e async for e in client.generate_events(face, speech, crop_mode="box")]
    result = events[-1]
    assert isinstance(result, Result) and all(isinstance(e, Progress) for e in events[:-1])
    assert result.mp4 == async_events[-1].mp4 == written.mp4 == (tmp_path / "sync.mp4").read_bytes()
    assert re.fullmatch(r"[0-9a-f]{32}", result.request_id) and result.request_id != async_events[-1].request_id
    frames, rate = decode_all(result.mp4)
    assert len(frames) == result.info.frames == 30 and rate == 25
    assert abs(stream_durations(result.mp4)["audio"] - 1.2) <= 0.04
    # Progress in order: stages never go back, counts never fall within a stage, the last one completes.
    progress = events[:-1]
    stages = [STAGE_ORDER.index(p.stage) for p in progress]
    assert stages == sorted(stages) and progress[0].stage == "decode" and progress[-1].stage == "encode"
    for a, b in zip(progress, progress[1:]):
        assert a.stage != b.stage or a.done <= b.done
    assert progress[-1].done == progress[-1].total == 30 and progress[-1].fraction == 1.0
    assert [p.stage for p in async_events[:-1]] == [p.stage for p in progress]


async def test_invalid_input_raises_the_sdk_error_with_its_code_and_request_id_without_retrying(stack):
    address = stack.address("gateway")
    retry = CountingRetry(max_attempts=4)

    def sync_call():
        with Client(address, retry=retry) as client:
            client.generate(b"this is a text file, not a face", speech_wav(0.5))

    with pytest.raises(SuperWav2LipError) as sync_error:
        await asyncio.to_thread(sync_call)
    async with AsyncClient(address, retry=retry) as client:
        with pytest.raises(SuperWav2LipError) as async_error:
            await client.generate(b"this is a text file, not a face", speech_wav(0.5))
    assert await asyncio.to_thread(lambda: Client(address).health()) == "SERVING"
    for error in (sync_error.value, async_error.value):
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "face" in error.message and re.fullmatch(r"[0-9a-f]{32}", error.request_id)
        assert error.request_id in str(error)
    assert retry.retried == []  # INVALID_ARGUMENT is never retried


async def test_a_stopped_gateway_raises_unavailable_after_the_configured_attempts():
    address = f"127.0.0.1:{free_port()}"  # nothing listens: a stopped gateway
    sync_retry, async_retry = CountingRetry(max_attempts=3), CountingRetry(max_attempts=3)

    def sync_call():
        with Client(address, retry=sync_retry, timeout=10) as client:
            client.generate(still(), speech_wav(0.5))

    with pytest.raises(SuperWav2LipError) as sync_error:
        await asyncio.to_thread(sync_call)
    async with AsyncClient(address, retry=async_retry, timeout=10) as client:
        with pytest.raises(SuperWav2LipError) as async_error:
            await client.list_avatars()
    assert sync_error.value.code == async_error.value.code == grpc.StatusCode.UNAVAILABLE
    assert sync_retry.retried == async_retry.retried == [0, 1]  # 3 attempts: two waits between them
    with pytest.raises(SuperWav2LipError):
        await asyncio.to_thread(lambda: Client(address, retry=NO_RETRY, timeout=5).get_job("job_x"))


def test_jittered_backoff_stays_within_its_exponential_cap():
    policy = RetryPolicy(max_attempts=6, initial_backoff_s=0.5, max_backoff_s=3)
    for attempt, cap in enumerate([0.5, 1.0, 2.0, 3.0, 3.0]):
        delays = [policy.delay(attempt) for _ in range(200)]
        assert 0 <= min(delays) and max(delays) <= cap and max(delays) > cap / 2  # spread over the range
    busy = SuperWav2LipError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
    assert policy.should_retry(busy, 0) and not policy.should_retry(busy, 5)
    assert not policy.should_retry(SuperWav2LipError(grpc.StatusCode.DEADLINE_EXCEEDED, "late"), 0)


def test_keyword_options_become_the_gateway_protobuf_and_mistakes_are_named(tmp_path):
    (tmp_path / "ref.jpg").write_bytes(b"\xff\xd8 a photo")
    message = options_proto({"crop_mode": "box", "no_face_policy": "keep_frame", "loop_mode": "loop",
                             "target_rule": "center", "enhance_region": "mouth", "enhance": True,
                             "padding": (1, 2, 3, 4), "detect_every": 3, "crf": 23,
                             "reference_face": tmp_path / "ref.jpg"}, avatar="av_1", request_id="r1")
    assert message.crop_mode == gateway_pb2.CROP_MODE_BOX
    assert message.no_face_policy == gateway_pb2.NO_FACE_POLICY_KEEP_FRAME
    assert message.loop_mode == gateway_pb2.LOOP_MODE_LOOP and message.target_rule == gateway_pb2.TARGET_RULE_CENTER
    assert message.enhance_region == gateway_pb2.ENHANCE_REGION_MOUTH and message.enhance
    assert (message.padding.top, message.padding.right) == (1, 4) and message.HasField("padding")
    assert message.detect_every == 3 and message.crf == 23 and not message.HasField("smoothing_window")
    assert message.reference_face == b"\xff\xd8 a photo" and message.avatar_id == "av_1"
    with pytest.raises(TypeError, match="unknown option.*crop"):
        options_proto({"crop": "box"})
    with pytest.raises(ValueError, match="crop_mode='square' is not one of: aligned, box"):
        options_proto({"crop_mode": "square"})
    with pytest.raises(ValueError, match="cannot read the face file"):
        Client("localhost:1").generate(tmp_path / "missing.mp4", b"")


async def test_the_api_key_comes_from_the_argument_or_the_environment(dev_models_dir, monkeypatch):
    async with running_stack(dev_models_dir, api_keys=("k-123",)) as stack:
        address = stack.address("gateway")

        def calls():
            outcomes = []
            for key in (None, "wrong", "k-123"):
                try:
                    Client(address, api_key=key, retry=NO_RETRY).list_jobs()
                    outcomes.append("ok")
                except SuperWav2LipError as error:
                    outcomes.append(error.code.name)
            monkeypatch.setenv("SUPERWAV2LIP_API_KEY", "k-123")
            outcomes.append(len(Client(address).list_avatars()))
            return outcomes

        assert await asyncio.to_thread(calls) == ["UNAUTHENTICATED", "UNAUTHENTICATED", "ok", 0]


async def test_every_example_runs_against_the_stack(stack, tmp_path):
    (tmp_path / "face.png").write_bytes(still())
    (tmp_path / "speech.wav").write_bytes(speech_wav(0.8))
    (tmp_path / "notes.txt").write_text("not a face")
    face, speech = str(tmp_path / "face.png"), str(tmp_path / "speech.wav")
    arguments = {"generate.py": [face, speech, "out.mp4"], "generate_async.py": [face, speech, "pair"],
                 "progress_events.py": [face, speech, "events.mp4"], "avatars.py": [face, speech, "avatar.mp4"],
                 "jobs.py": [face, speech, "job.mp4"], "errors_and_retries.py": [str(tmp_path / "notes.txt"), speech]}
    run_elsewhere = {"live_tts.py"}  # tests/client/test_sdk_live.py runs it against a live session
    assert set(arguments) | run_elsewhere == {path.name for path in EXAMPLES.glob("*.py")}
    env = dict(os.environ, SUPERWAV2LIP_ADDRESS=stack.address("gateway"),
               PYTHONPATH=os.pathsep.join([str(ROOT / "client")]))
    for script, args in arguments.items():
        run = await asyncio.to_thread(subprocess.run, [sys.executable, str(EXAMPLES / script), *args],
                                      capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        assert run.returncode == 0, f"{script}: {run.stderr}"
        if script != "errors_and_retries.py":
            assert "Traceback" not in run.stderr
    for name in ("out.mp4", "pair-1.mp4", "pair-2.mp4", "events.mp4", "avatar.mp4", "job.mp4"):
        assert abs(stream_durations((tmp_path / name).read_bytes())["video"] - 0.8) <= 0.04, name
    assert "refused: INVALID_ARGUMENT" in run.stdout and "request id" in run.stdout


def test_the_client_installs_on_its_own_with_its_stubs_and_types(tmp_path):
    target = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", "--target", str(target), str(ROOT / "client")],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    installed = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert {"superwav2lip_client/py.typed", "superwav2lip/py.typed",
            "superwav2lip/gateway/v1/gateway_pb2.pyi", "superwav2lip_client/cli.py"} <= installed
    assert not any(p.startswith(("gateway/", "service_runtime/", "services/")) for p in installed)
    metadata = next(target.glob("superwav2lip_client-*.dist-info")) / "METADATA"
    requires = {re.match(r"Requires-Dist: ([A-Za-z0-9_.-]+)", line).group(1) for line in metadata.read_text().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert requires == {"grpcio", "grpcio-health-checking", "protobuf", "googleapis-common-protos"}
    probe = ("import sys, superwav2lip_client as sdk; "
             "assert sdk.__file__.startswith(sys.argv[1]), sdk.__file__; "
             "assert not [m for m in sys.modules if m.split('.')[0] in ('gateway', 'service_runtime', 'services')]")
    run = subprocess.run([sys.executable, "-c", probe, str(target)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(target)), cwd=tmp_path, timeout=60)
    assert run.returncode == 0, run.stderr


async def test_cli_exit_codes_json_output_and_models(stack, tmp_path):
    import json

    (tmp_path / "face.png").write_bytes(still())
    (tmp_path / "speech.wav").write_bytes(speech_wav(0.6))
    server = f"--server={stack.address('gateway')}"
    addresses = [server] + [f"--{n}={stack.address(n)}" for n in ("detector", "lipsync", "enhancer")]
    run = lambda *args: asyncio.to_thread(cli, *args)  # noqa: E731
    made = await run("generate", "--face", str(tmp_path / "face.png"), "--audio", str(tmp_path / "speech.wav"),
                     "-o", str(tmp_path / "out.mp4"), "--json", server)
    refused = await run("generate", "--face", str(tmp_path / "speech.wav"), "--audio",
                        str(tmp_path / "speech.wav"), "-o", str(tmp_path / "x.mp4"), "--json", server)
    missing = await run("generate", "--face", str(tmp_path / "nope.png"), "--audio", str(tmp_path / "speech.wav"),
                        "-o", str(tmp_path / "x.mp4"), server)
    bad_flag = await run("generate", "--face", "a", "--audio", "b", "-o", "c", "--crop-mode", "square")
    models = await run("models", "--json", *addresses)
    unreachable = await run("jobs", "list", f"--server=127.0.0.1:{free_port()}", "--retries", "0")
    assert made.returncode == 0, made.stderr
    summary = json.loads(made.stdout)
    assert summary["frames"] == 15 and summary["output"].endswith("out.mp4") and made.stderr == ""  # no bar
    # the stack runs on generated weights: the one line a newcomer needs, with the command that fixes it
    assert [w for w in summary["warnings"] if "generated demo weights" in w and "`make models`" in w]
    assert refused.returncode == 3
    error = json.loads(refused.stdout)["error"]
    assert error["code"] == "INVALID_ARGUMENT" and re.fullmatch(r"[0-9a-f]{32}", error["request_id"])
    assert missing.returncode == 2 and "cannot read the face file" in missing.stderr
    assert bad_flag.returncode == 2 and "invalid choice: 'square'" in bad_flag.stderr
    assert unreachable.returncode == 4 and "UNAVAILABLE" in unreachable.stderr
    described = json.loads(models.stdout)
    assert models.returncode == 0
    assert described["lipsync"]["model"] == "wav2lip_gan" and described["lipsync"]["generated_weights"] is True
    assert described["detector"]["detection_model"] and "CPUExecutionProvider" in described["enhancer"]["providers"]


def test_the_web_ui_is_a_client_of_the_sdk_only():
    probe = ("import sys, webui.app; "
             "assert not [m for m in sys.modules if m.split('.')[0] in ('gateway', 'services')], 'imports the server'")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=project_env())
    assert run.returncode == 0, run.stderr
