"""`make run`'s stack runner and the `superwav2lip` CLI, as separate processes on real ports."""

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest
import redis

from superwav2lip_client.services import health
from tools import run_stack

from tests.support.paths import ROOT
from tests.support.tenants import tenants_file
from tests.support.processes import cli, free_port_block
from tests.support.media_factory import encode_png, encode_video, marker_frames, scene, speech_wav, stream_durations, with_marker


HTTP_EXAMPLE_DOCS = ("README.md", "docs/http-api.md")


def readme_http_examples() -> str:
    """Every HTTP example block of the README and docs/http-api.md (each ```sh block after an
    `<!-- http-examples` comment), as written, in order, joined into one script."""
    blocks = []
    for doc in HTTP_EXAMPLE_DOCS:
        for marked in (ROOT / doc).read_text().split("<!-- http-examples")[1:]:
            blocks.append(marked.split("```sh\n", 1)[1].split("```", 1)[0])
    assert len(blocks) >= 2, f"no HTTP example blocks found in {HTTP_EXAMPLE_DOCS}"
    return "\n".join(blocks)


KEY_SETTINGS = ("SWL_GATEWAY_TENANTS_FILE", "SWL_GATEWAY_API_KEYS", "SWL_GATEWAY_ALLOW_ANONYMOUS")


def launcher_env(**settings: str) -> dict[str, str]:
    """This environment without any gateway key setting it may carry, plus `settings`."""
    env = {name: value for name, value in os.environ.items() if name not in KEY_SETTINGS}
    return {**env, **settings}


def start_launcher(*args: str, env: dict[str, str]) -> tuple[subprocess.Popen, list[str]]:
    """`make run`'s launcher with `args`; returns it and its output up to its READY line."""
    runner = subprocess.Popen([sys.executable, "-m", "tools.run_stack", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    output = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = runner.stdout.readline()
        output.append(line)
        if line.startswith("READY") or not line:
            break
    return runner, output


def child_environ(runner: subprocess.Popen, module: str) -> dict[str, str]:
    """The environment of the launcher's child started as `python -m <module>`."""
    child = next(p for p in psutil.Process(runner.pid).children() if p.cmdline()[1:3] == ["-m", module])
    return child.environ()


def test_run_stack_serves_the_cli_and_stops_cleanly(dev_models_dir, tmp_path, monkeypatch):
    """`SWL_GATEWAY_TENANTS_FILE=t.json make run`: the whole stack with a tenant's key, which the CLI and the
    documents' HTTP examples send (SUPERWAV2LIP_API_KEY)."""
    key = "acme-key-1"
    tenants = tenants_file(tmp_path, acme={"key": key})
    monkeypatch.setenv("SUPERWAV2LIP_API_KEY", key)
    base, metrics, http = free_port_block(5), free_port_block(4), free_port_block(3)
    runner, output = start_launcher(
        "--base-port", str(base), "--metrics-base-port", str(metrics), "--models-dir", str(dev_models_dir),
        "--logs", str(tmp_path / "logs"), "--extra-model-dirs", "", "--http-port", str(http),
        "--envoy-admin-port", str(http + 1), "--ui-port", str(http + 2),
        env=launcher_env(SWL_WEBUI_API_KEY="one-key-for-every-visitor", SWL_GATEWAY_TENANTS_FILE=str(tenants)))
    try:
        assert any(l.startswith("READY") for l in output), "".join(output)
        assert any("generated demo weights" in l for l in output)
        # The tenants file is passed on, and no anonymous opt-in with it.
        assert not any("without a key" in l for l in output), "".join(output)
        environ = child_environ(runner, "gateway")
        assert environ["SWL_GATEWAY_TENANTS_FILE"] == str(tenants) and "SWL_GATEWAY_ALLOW_ANONYMOUS" not in environ
        # The web UI signs each visitor in with their own key: no shared key from this environment reaches it.
        assert "SWL_WEBUI_API_KEY" not in child_environ(runner, "webui")
        assert any(l.startswith("NOTE: SWL_WEBUI_API_KEY is not passed") for l in output)
        ui = f"http://127.0.0.1:{http + 2}/"
        assert any(l.startswith("READY") and l.rstrip().endswith(f" ui {ui}") for l in output)  # the UI address
        assert b"Super Wav2Lip" in urllib.request.urlopen(ui, timeout=10).read()
        servers = [f"--{n}=127.0.0.1:{base + i}" for i, n in enumerate(("server", "detector", "lipsync", "enhancer"))]
        health = cli("health", *servers)
        assert health.returncode == 0 and health.stdout.count("SERVING") == 4, health.stdout

        (tmp_path / "face.png").write_bytes(encode_png(with_marker(scene(), 100, 80)))
        (tmp_path / "speech.wav").write_bytes(speech_wav(1.2))
        out = tmp_path / "out.mp4"
        made = cli("generate", "--face", str(tmp_path / "face.png"), "--audio", str(tmp_path / "speech.wav"),
                   "-o", str(out), "--server", f"127.0.0.1:{base}")
        assert made.returncode == 0, made.stderr
        assert "lipsync" in made.stderr and "wrote" in made.stdout  # progress bar, then the summary
        durations = stream_durations(out.read_bytes())
        assert abs(durations["video"] - 1.2) <= 0.04 and abs(durations["audio"] - 1.2) <= 0.04

        refused = cli("generate", "--face", str(tmp_path / "speech.wav"), "--audio", str(tmp_path / "speech.wav"),
                      "-o", str(tmp_path / "bad.mp4"), "--server", f"127.0.0.1:{base}")
        assert refused.returncode == 3 and "INVALID_ARGUMENT" in refused.stderr  # the input was refused

        # The HTTP examples of README.md and docs/http-api.md, as written but for the port, with the tenant's key.
        assert any(f"http http://127.0.0.1:{http}" in l for l in output)
        wrong_key = urllib.request.Request(f"http://127.0.0.1:{http}/v1/avatars", headers={"x-api-key": "wrong"})
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(wrong_key, timeout=10)
        assert denied.value.code == 401
        script = readme_http_examples().replace("localhost:8080", f"127.0.0.1:{http}")
        (tmp_path / "face.png").write_bytes(encode_png(with_marker(scene(), 100, 80)))
        shell = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                               text=True, timeout=180)
        assert shell.returncode == 0, shell.stderr
        for name in ("out.mp4", "out-raw.mp4", "out-job.mp4"):
            durations = stream_durations((tmp_path / name).read_bytes())
            assert abs(durations["video"] - 1.2) <= 0.04, name
        assert '"stage":"encode"' in shell.stdout  # the server-sent progress reached the end
        assert '"code":3' in shell.stdout.replace(" ", "") and "INVALID_ARGUMENT" not in shell.stderr

        # The avatar verbs, as docs/http-api.md shows them.
        server = f"--server=127.0.0.1:{base}"
        video = tmp_path / "presenter.mp4"
        video.write_bytes(encode_video(marker_frames(10)))
        created = cli("avatar", "create", "--face", str(video), server)
        assert created.returncode == 0, created.stderr
        avatar_id = created.stdout.strip()
        assert avatar_id.startswith("av_") and "10 frames" in created.stderr
        listed = cli("avatar", "list", server)
        assert listed.returncode == 0 and avatar_id in listed.stdout and "presenter.mp4" in listed.stdout
        made = cli("generate", "--avatar", avatar_id, "--audio", str(tmp_path / "speech.wav"), "-o",
                   str(tmp_path / "avatar.mp4"), server)
        assert made.returncode == 0, made.stderr
        assert abs(stream_durations((tmp_path / "avatar.mp4").read_bytes())["video"] - 1.2) <= 0.04
        deleted = cli("avatar", "delete", avatar_id, server)
        assert deleted.returncode == 0 and avatar_id not in cli("avatar", "list", server).stdout

        # The jobs verbs, as docs/http-api.md shows them.
        submitted = cli("jobs", "submit", "--face", str(tmp_path / "face.png"), "--audio", str(tmp_path / "speech.wav"),
                        server)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        waited = cli("jobs", "wait", job_id, server)
        assert waited.returncode == 0 and "SUCCEEDED" in waited.stdout, waited.stdout + waited.stderr
        assert cli("jobs", "download", job_id, "-o", str(tmp_path / "job.mp4"), server).returncode == 0
        assert abs(stream_durations((tmp_path / "job.mp4").read_bytes())["video"] - 1.2) <= 0.04
        assert job_id in cli("jobs", "list", server).stdout
        # make run's Redis holds the shared state: the job's record is there, not in the gateway process.
        assert any(l.strip() == f"redis     on redis://127.0.0.1:{base + 4}/0" for l in output)
        store = redis.Redis(port=base + 4)
        assert any(job_id.encode() in key for key in store.keys("*")), store.keys("*")
        store.close()
        assert cli("jobs", "cancel", job_id, server).returncode == 0  # a finished job: removed
        status = cli("jobs", "status", job_id, server)
        assert status.returncode == 3 and "NOT_FOUND" in status.stderr
    finally:
        runner.send_signal(signal.SIGTERM)
        rest, _ = runner.communicate(timeout=60)
    assert runner.returncode == 0, "".join(output) + rest
    assert "stopped" in rest
    down = cli("health", *servers)
    assert down.returncode == 4 and "SERVING" not in down.stdout.replace("NOT_SERVING", "")


def test_run_stack_without_keys_serves_anonymously_and_says_so(dev_models_dir, tmp_path, monkeypatch):
    """Plain `make run`: no tenants file or keys, so the launcher opts the gateway into calls without a key, on
    purpose, and says so once. The gateway alone is enough to show it."""
    monkeypatch.delenv("SUPERWAV2LIP_API_KEY", raising=False)
    base, metrics = free_port_block(5), free_port_block(4)
    runner, output = start_launcher(
        "--services", "gateway", "--base-port", str(base), "--metrics-base-port", str(metrics), "--models-dir",
        str(dev_models_dir), "--logs", str(tmp_path / "logs"), "--extra-model-dirs", "", env=launcher_env())
    server = f"--server=127.0.0.1:{base}"
    try:
        assert any(l.startswith("READY") for l in output), "".join(output) + (tmp_path / "logs/gateway.log").read_text()
        assert [l.strip() for l in output if "without a key" in l] == [run_stack.ANONYMOUS_NOTE]
        assert child_environ(runner, "gateway")["SWL_GATEWAY_ALLOW_ANONYMOUS"] == "true"
        assert health(f"127.0.0.1:{base}", timeout=5) == "SERVING"
        listed = cli("avatar", "list", server)  # no key: served
        assert listed.returncode == 0, listed.stdout + listed.stderr
    finally:
        runner.send_signal(signal.SIGTERM)
        rest, _ = runner.communicate(timeout=60)
    assert runner.returncode == 0, "".join(output) + rest


def test_the_launcher_opts_a_gateway_without_keys_into_anonymous_calls_and_nothing_else(tmp_path):
    """Every caller of run_stack's functions (make run, the process stack of the tests, the benchmarks) gets the
    opt-in for a gateway given no key setting; a tenants file or API keys pass through instead, and a value set
    by hand stays."""
    config = run_stack.StackConfig(base_port=40000, metrics_base_port=41000, logs=tmp_path / "logs",
                                   models_dir=tmp_path / "models", extra_model_dirs=())

    def gateway(**given: str) -> dict[str, str]:
        return run_stack.service_env("gateway", config, given)

    assert gateway()["SWL_GATEWAY_ALLOW_ANONYMOUS"] == "true" and run_stack.gateway_needs_no_key(gateway())
    assert gateway(SWL_GATEWAY_TENANTS_FILE="")["SWL_GATEWAY_ALLOW_ANONYMOUS"] == "true"  # empty = not set
    for given in ({"SWL_GATEWAY_TENANTS_FILE": "/etc/t.json"}, {"SWL_GATEWAY_API_KEYS": "k1,k2"}):
        env = gateway(**given)
        assert "SWL_GATEWAY_ALLOW_ANONYMOUS" not in env and env.items() >= given.items()
        assert not run_stack.gateway_needs_no_key(env)
    assert gateway(SWL_GATEWAY_ALLOW_ANONYMOUS="false")["SWL_GATEWAY_ALLOW_ANONYMOUS"] == "false"
    assert not run_stack.gateway_needs_no_key(gateway(SWL_GATEWAY_ALLOW_ANONYMOUS="false"))
    for name in run_stack.SERVICES[1:]:
        assert "SWL_GATEWAY_ALLOW_ANONYMOUS" not in run_stack.service_env(name, config, {})


def test_the_stack_config_checks_its_values_and_names_the_option():
    """make run, the process stack of the tests and the benchmarks all start from one StackConfig: a value it
    cannot take fails at once, naming the field and its flag; derived values are filled in at construction."""
    for wrong, words in (({"base_port": 70000}, "base_port (--base-port) = 70000 is out of range: 1 to"),
                         ({"http_port": -1}, "http_port (--http-port) = -1 is out of range: 0 to 65535"),
                         ({"redis_port": 65536}, "redis_port (--redis-port) = 65536 is out of range"),
                         ({"ui_port": "7860"}, "ui_port (--ui-port) = '7860' is not an integer"),
                         ({"ready_timeout": 0}, "ready_timeout (--ready-timeout) = 0 is out of range"),
                         ({"services": ("gateway", "lipsinc")}, "services (--services): lipsinc; known: gateway,"),
                         ({"services": ()}, "services (--services): none given"),
                         ({"tls_cert": "cert.pem"}, "go together: give both or neither")):
        with pytest.raises(run_stack.StackConfigError) as error:
            run_stack.StackConfig(**wrong)
        assert words in str(error.value), (wrong, str(error.value))

    config = run_stack.StackConfig(base_port=40000, services=("lipsync", "gateway"))
    assert config.services == ("gateway", "lipsync") and config.redis_port == 40000 + len(run_stack.SERVICES)
    assert config.address("detector") == "127.0.0.1:40001" and config.metrics_port("lipsync") == 9101 + 2
    alone = run_stack.StackConfig(services=("lipsync",))  # without the gateway: no Redis, edge or UI
    assert (alone.redis_port, alone.http_port, alone.ui_port) == (0, 0, 0)


def test_the_command_line_is_the_stack_config_and_back(tmp_path, capsys):
    config = run_stack.StackConfig(base_port=40000, metrics_base_port=41000, models_dir=tmp_path / "models",
                                   logs=tmp_path / "logs", extra_model_dirs=(), http_port=0, ui_port=0,
                                   redis_port=0, tls_cert="c.pem", tls_key="k.pem")
    assert run_stack.StackConfig.from_argv(config.argv()) == config
    assert run_stack.StackConfig.from_argv([]) == run_stack.StackConfig()  # the defaults are the dataclass's
    given = run_stack.StackConfig.from_argv(["--services", "detector", "--extra-model-dirs", ""])
    assert given.services == ("detector",) and given.extra_model_dirs == () and given.http_port == 0
    with pytest.raises(SystemExit) as exit_:
        run_stack.StackConfig.from_argv(["--metrics-base-port", "0"])
    assert exit_.value.code == 2
    assert "metrics_base_port (--metrics-base-port) = 0 is out of range" in capsys.readouterr().err
