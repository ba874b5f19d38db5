"""Processes started from this checkout as a user starts them: free ports, their environment, the CLI."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading

import psutil

from .paths import ROOT


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_port_block(count: int) -> int:
    """The first of `count` consecutive loopback ports nothing listens on now."""
    for _ in range(50):
        base = random.randint(20000, 40000)
        sockets = []
        try:
            for offset in range(count):
                s = socket.socket()
                s.bind(("127.0.0.1", base + offset))
                sockets.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port block")


def project_env(**extra: str) -> dict[str, str]:
    """The environment of a process started from this checkout: the project and its stubs importable."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "client")]), **extra)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The `superwav2lip` command, run as a user runs it."""
    return subprocess.run([sys.executable, "-m", "superwav2lip_client.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=project_env())


def service_env(models_dir, prefix: str, **extra) -> dict[str, str]:
    """Environment for a model service started as its own process: loopback, dev models' folder, no metrics."""
    env = project_env()
    env.update({f"{prefix}MODELS_DIR": str(models_dir), f"{prefix}PORT": "0", f"{prefix}METRICS_PORT": "-1",
                f"{prefix}HOST": "127.0.0.1", f"{prefix}WARMUP_BATCH_SIZES": "1"})
    env.update({f"{prefix}{k}": str(v) for k, v in extra.items()})
    return env


class PeakRss:
    """Samples a process's resident memory every 20 ms in a thread, keeping the highest."""

    def __init__(self, process: psutil.Process | int) -> None:
        self.process = process if isinstance(process, psutil.Process) else psutil.Process(process)
        self.before = self.process.memory_info().rss
        self.peak, self._done = self.before, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.before
