"""Faults injected into the stack as `make run` starts it (real processes, real Redis): a model service killed,
frozen or one of two replicas lost, Redis stopped and restarted, the gateway drained by SIGTERM, and load
beyond the gateway's job limit. Each test checks the statuses and messages, then the stack's health and that
nothing was left behind."""

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from superwav2lip.gateway.v1 import gateway_pb2
from superwav2lip_client import Client, RetryPolicy, SuperWav2LipError

from tests.support.media_factory import encode_png, encode_video, marker_frames, scene, speech_wav, stream_durations, with_marker
from tests.support.processes import free_port
from tests.support.process_stack import ProcessStack, run_stack
from tests.support.waiting import eventually

NO_RETRY = RetryPolicy(max_attempts=1)


def face(x: int = 100) -> bytes:
    """A still with the generated detector's marker; a different x is a new face (no plan cache hit)."""
    return encode_png(with_marker(scene(), x, 80))


class Call:
    """One generation in a thread, with its progress events, outcome and duration."""

    def __init__(self, stack: ProcessStack, face_bytes: bytes, seconds: float = 1.2, timeout: float = 60) -> None:
        self.events: list = []
        self.seconds = seconds
        self.outcome = None
        self.elapsed = 0.0
        self.thread = threading.Thread(target=self._run, args=(stack.address(), face_bytes, timeout))
        self.thread.start()

    def _run(self, address: str, face_bytes: bytes, timeout: float) -> None:
        started = time.monotonic()
        try:
            with Client(address, retry=NO_RETRY, timeout=timeout) as client:
                self.outcome = client.generate(face_bytes, speech_wav(self.seconds), on_progress=self.events.append)
        except SuperWav2LipError as error:
            self.outcome = error
        self.elapsed = time.monotonic() - started

    def planned(self) -> bool:
        """Detection is over: the job now waits on the lip-sync service."""
        return any(e.stage == "detect" and e.done == e.total for e in self.events)

    def result(self, timeout: float = 90):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the call never ended"
        return self.outcome

    def assert_ok(self) -> None:
        outcome = self.result()
        assert not isinstance(outcome, SuperWav2LipError), outcome
        assert abs(stream_durations(outcome.mp4)["video"] - self.seconds) <= 0.04


def assert_nothing_left(stack: ProcessStack, tmp: Path) -> None:
    """Every process SERVING, no partial file in the data directory, and nothing in the processes' temp folder
    beyond what start-up put there (onnxruntime's one telemetry session file, `.ses`, written at import)."""
    for name in run_stack.SERVICES:
        assert stack.health(name) == "SERVING", name
    partial = [p for p in stack.config.data_dir.rglob("*") if p.name.endswith(".partial")]
    assert partial == []
    assert leftovers(tmp) == []


def leftovers(tmp: Path) -> list[Path]:
    return [p for p in tmp.iterdir() if p.name != ".ses"]


@pytest.fixture
def tmp_dir(tmp_path):
    """The processes' TMPDIR: anything a job leaves in the system temp folder shows up here."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    return folder


def test_lipsync_killed_mid_generation_fails_the_running_jobs_alike_and_the_next_succeeds(dev_models_dir, tmp_path,
                                                                                           tmp_dir):
    with ProcessStack(tmp_path, dev_models_dir, {"TMPDIR": str(tmp_dir)}) as stack:
        gateway = stack.pid("gateway")
        stack.signal("lipsync", signal.SIGSTOP)  # so that both jobs are surely inside the lip-sync stage
        calls = [Call(stack, face(60)), Call(stack, face(140))]
        eventually(lambda: all(c.planned() for c in calls), what="every call planned")
        time.sleep(0.3)
        stack.kill("lipsync")
        killed = time.monotonic()
        stack.restart("lipsync")
        outcomes = [c.result() for c in calls]
        # Each job either failed as a lost service does, or its calls were retried onto the restarted one in
        # time (the gateway's channel retries UNAVAILABLE for about 1.5 s): no job fared worse than that.
        for outcome, call in zip(outcomes, calls):
            if isinstance(outcome, SuperWav2LipError):
                assert outcome.code == grpc.StatusCode.UNAVAILABLE, outcome
                assert "the lipsync service is unavailable" in outcome.message and outcome.request_id
                assert call.elapsed < 60
            else:
                call.assert_ok()
        assert time.monotonic() - killed < 60
        after = Call(stack, face(100))
        after.assert_ok()  # the gateway reconnected by itself
        assert stack.pid("gateway") == gateway and stack.processes["gateway"].poll() is None
        assert_nothing_left(stack, tmp_dir)


def test_a_frozen_detector_ends_jobs_at_their_deadline_and_serves_after_sigcont(dev_models_dir, tmp_path, tmp_dir):
    env = {"TMPDIR": str(tmp_dir), "SWL_GATEWAY_JOB_DEADLINE_S": "3", "SWL_GATEWAY_JOB_DEADLINE_PER_AUDIO_SECOND_S": "0"}
    with ProcessStack(tmp_path, dev_models_dir, env) as stack:
        Call(stack, face(60)).assert_ok()
        stack.signal("detector", signal.SIGSTOP)
        frozen = Call(stack, face(140))  # a new face: it must be detected
        outcome = frozen.result()
        assert isinstance(outcome, SuperWav2LipError) and outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED, outcome
        assert "deadline of 3 s" in outcome.message and "SWL_GATEWAY_JOB_DEADLINE_S" in outcome.message
        assert frozen.elapsed < 3 + 10  # the job's deadline, far before the client's 60 s
        stack.signal("detector", signal.SIGCONT)
        Call(stack, face(140)).assert_ok()
        assert_nothing_left(stack, tmp_dir)


def test_redis_stopped_and_restarted_during_jobs_avatars_and_job_calls(dev_models_dir, tmp_path, tmp_dir):
    with ProcessStack(tmp_path, dev_models_dir, {"TMPDIR": str(tmp_dir), "SWL_GATEWAY_REDIS_TIMEOUT_S": "0.3"}) as stack, \
            Client(stack.address(), retry=NO_RETRY, timeout=60) as client:
        finished = client.submit_job(face(60), speech_wav(1.0))
        assert client.wait_job(finished.job_id).state == gateway_pb2.Job.SUCCEEDED
        avatar = client.create_avatar(encode_video(marker_frames(10)))

        stack.signal("lipsync", signal.SIGSTOP)
        running = Call(stack, face(80))
        eventually(running.planned, what="the running job planned")
        stack.stop_redis()  # during a generation
        stack.signal("lipsync", signal.SIGCONT)
        running.assert_ok()  # the plan cache is bypassed, the job is not failed

        with pytest.raises(SuperWav2LipError) as refused:  # job records live in Redis: refused, and said why
            client.submit_job(face(90), speech_wav(1.0))
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "(Redis) is unavailable" in refused.value.message
        with pytest.raises(SuperWav2LipError) as unknown:
            client.get_job(finished.job_id)
        assert unknown.value.code == grpc.StatusCode.UNAVAILABLE
        Call(stack, face(120)).assert_ok()  # generation goes on without Redis
        try:
            client.generate(None, speech_wav(1.0), avatar=avatar.avatar_id)
        except SuperWav2LipError as error:  # the avatar index is in Redis
            assert error.code == grpc.StatusCode.UNAVAILABLE and "Redis" in error.message, error

        stack.start_redis()  # its append-only file brings the state back
        assert client.get_job(finished.job_id).state == gateway_pb2.Job.SUCCEEDED
        again = client.submit_job(face(90), speech_wav(1.0))
        assert client.wait_job(again.job_id).state == gateway_pb2.Job.SUCCEEDED  # the workers recovered
        made = client.generate(None, speech_wav(1.0), avatar=avatar.avatar_id)
        assert abs(stream_durations(made.mp4)["video"] - 1.0) <= 0.04
        assert_nothing_left(stack, tmp_dir)


def test_sigterm_drains_the_gateway_finishing_its_job_and_refusing_new_calls(dev_models_dir, tmp_path, tmp_dir):
    with ProcessStack(tmp_path, dev_models_dir, {"TMPDIR": str(tmp_dir)}) as stack:
        stack.signal("lipsync", signal.SIGSTOP)
        running = Call(stack, face(60))
        eventually(running.planned, what="the running job planned")
        stack.signal("gateway", signal.SIGTERM)
        eventually(lambda: stack.health("gateway") != "SERVING", seconds=10, what="the gateway not SERVING")
        late = Call(stack, face(140))
        refused = late.result()
        assert isinstance(refused, SuperWav2LipError) and refused.code == grpc.StatusCode.UNAVAILABLE, refused
        assert late.elapsed < 5
        stack.signal("lipsync", signal.SIGCONT)
        running.assert_ok()  # the job in flight finished within the grace period
        assert stack.processes["gateway"].wait(timeout=15) == 0
        log = stack.log("gateway")
        assert '"event": "signal received; draining"' in log and '"event": "stopped"' in log
        assert leftovers(tmp_dir) == []


def test_jobs_move_to_the_surviving_replica_when_one_is_killed(dev_models_dir, tmp_path, tmp_dir):
    spare_port = free_port()
    stack = ProcessStack(tmp_path, dev_models_dir, {"TMPDIR": str(tmp_dir)})
    first = stack.address("lipsync")
    stack.env["SWL_GATEWAY_LIPSYNC_ADDRESS"] = f"ipv4:{first},127.0.0.1:{spare_port}"
    spare = run_stack.start_service("lipsync", stack.config, {**stack.env, "SWL_LIPSYNC_PORT": str(spare_port),
                                                              "SWL_LIPSYNC_METRICS_PORT": "-1"})
    try:
        with stack:
            assert run_stack.wait_serving({"spare": spare}, {"spare": f"127.0.0.1:{spare_port}"}, 60) is None
            Call(stack, face(60)).assert_ok()  # both replicas serve
            spare.send_signal(signal.SIGSTOP)  # calls sent to it now hang ...
            running = Call(stack, face(140), seconds=2.0)
            eventually(running.planned, what="the running job planned")
            time.sleep(0.3)
            spare.kill()  # ... until it dies: they are retried on the survivor
            running.assert_ok()
            Call(stack, face(100)).assert_ok()
            assert_nothing_left(stack, tmp_dir)
    finally:
        spare.kill()
        spare.wait()


def test_calls_beyond_the_job_limit_are_refused_at_once_and_admitted_jobs_complete(dev_models_dir, tmp_path,
                                                                                  tmp_dir):
    with ProcessStack(tmp_path, dev_models_dir, {"TMPDIR": str(tmp_dir), "SWL_GATEWAY_MAX_CONCURRENT_JOBS": "2"}) \
            as stack:
        stack.signal("lipsync", signal.SIGSTOP)  # the admitted jobs hold their slots
        admitted = [Call(stack, face(60)), Call(stack, face(140))]
        eventually(lambda: all(c.planned() for c in admitted), what="every admitted call planned")
        with ThreadPoolExecutor(6) as pool:  # 8 calls in all: four times the limit
            extra = [Call(stack, face(80 + 10 * i)) for i in range(6)]
            rejected = list(pool.map(lambda c: c.result(), extra))
        time.sleep(1.0)
        stack.signal("lipsync", signal.SIGCONT)
        for call in admitted:
            call.assert_ok()
        for outcome in rejected:
            assert isinstance(outcome, SuperWav2LipError) and outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of 2 jobs" in outcome.message and "SWL_GATEWAY_MAX_CONCURRENT_JOBS" in outcome.message
        # Refusals do not queue behind the running jobs: every one came back while lip-sync was stopped, which
        # no admitted job could; the bound only says "at once" for a loaded machine, far below the calls' 60 s.
        assert max(c.elapsed for c in extra) < 10
        assert_nothing_left(stack, tmp_dir)
