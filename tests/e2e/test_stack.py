"""`make run`'s stack runner and the `superwav2lip` CLI, as separate processes on real ports."""

import signal
import subprocess
import sys
import time
import urllib.request

import redis

from tests.support.paths import ROOT
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


def test_run_stack_serves_the_cli_and_stops_cleanly(dev_models_dir, tmp_path):
    base, metrics, http = free_port_block(5), free_port_block(4), free_port_block(3)
    runner = subprocess.Popen(
        [sys.executable, "-m", "tools.run_stack", "--base-port", str(base), "--metrics-base-port",
         str(metrics), "--models-dir", str(dev_models_dir), "--logs", str(tmp_path / "logs"),
         "--extra-model-dirs", "", "--http-port", str(http), "--envoy-admin-port", str(http + 1),
         "--ui-port", str(http + 2)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )
    output = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = runner.stdout.readline()
            output.append(line)
            if line.startswith("READY") or not line:
                break
        assert any(l.startswith("READY") for l in output), "".join(output)
        assert any("generated demo weights" in l for l in output)
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

        # The HTTP examples of README.md and docs/http-api.md, as written but for the port.
        assert any(f"http http://127.0.0.1:{http}" in l for l in output)
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
