"""`make run`'s stack as separate real processes (Redis, the three model services, the gateway), started by the
same functions `tools/run_stack.py` uses, with each process reachable for faults: kill, restart, freeze."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil

from superwav2lip_client.services import health

from tools import run_stack

from tests.support.processes import free_port_block
from tests.support.waiting import eventually


def proc_status(pid: int) -> dict[str, int]:
    """Resident memory now and at its peak (KiB), threads and open file descriptors of a process. psutil has no
    peak resident memory on Linux, so that one is VmHWM from /proc."""
    process = psutil.Process(pid)
    peak_kb = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmHWM:"))
    return {"rss_kb": process.memory_info().rss // 1024, "peak_kb": peak_kb, "threads": process.num_threads(),
            "fds": process.num_fds()}


class ProcessStack:
    """Redis and the four services as in `make run` (no Envoy, no UI); `env` adds settings to every process.
    `config` is the launcher's StackConfig they are started with (its redis_url set once Redis is up)."""

    def __init__(self, folder: Path, models_dir: Path, env: dict[str, str] | None = None) -> None:
        # five ports from the base: the four services, then Redis (the config's default redis_port)
        self.config = run_stack.StackConfig(
            base_port=free_port_block(len(run_stack.SERVICES) + 1),
            metrics_base_port=free_port_block(len(run_stack.SERVICES)), models_dir=models_dir, logs=folder / "logs",
            extra_model_dirs=(), http_port=0, ui_port=0)
        self.config.logs.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "SWL_GATEWAY_GRACE_PERIOD_S": "10", "SWL_GATEWAY_ALLOW_ANONYMOUS": "true", **(env or {})}
        self.processes: dict[str, subprocess.Popen] = {}
        self.redis: subprocess.Popen | None = None

    def __enter__(self) -> "ProcessStack":
        self.start_redis()
        for name in run_stack.SERVICES:
            self.processes[name] = run_stack.start_service(name, self.config, self.env)
        self.wait_serving(*run_stack.SERVICES)
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
        run_stack.stop_all(self.processes, self.redis, grace=20)

    def address(self, name: str = "gateway") -> str:
        return self.config.address(name)

    def metrics_url(self, name: str) -> str:
        return f"http://{self.config.host}:{self.config.metrics_port(name)}/metrics"

    def wait_serving(self, *names: str, timeout: float = 120) -> None:
        failed = run_stack.wait_serving({n: self.processes[n] for n in names},
                                        {n: self.address(n) for n in names}, timeout)
        assert failed is None, f"{failed} did not become SERVING: {self.log(failed)[-3000:]}"

    def log(self, name: str) -> str:
        return (self.config.logs / f"{name}.log").read_text()

    def pid(self, name: str) -> int:
        return self.processes[name].pid

    def signal(self, name: str, sig: int) -> None:
        self.processes[name].send_signal(sig)

    def kill(self, name: str) -> None:
        self.processes[name].kill()
        self.processes[name].wait()

    def restart(self, name: str) -> None:
        """Starts the service again on its port (after a kill) and waits until it is SERVING."""
        self.processes[name] = run_stack.start_service(name, self.config, self.env)
        self.wait_serving(name)

    def start_redis(self) -> None:
        """Redis with an append-only file (as the Kubernetes component runs it), so a restart keeps the state."""
        self.redis, self.config = run_stack.start_redis(self.config, persist=True)
        assert self.redis is not None, "redis-server is not installed: make deps (or apt-get install redis-server)"

    def stop_redis(self) -> None:
        self.redis.kill()
        self.redis.wait()

    def status(self, name: str) -> dict[str, int]:
        return proc_status(self.pid(name))

    def health(self, name: str = "gateway") -> str:
        return health(self.address(name), timeout=2.0)

    def wait_health(self, name: str, wanted: str, timeout: float = 30) -> None:
        seen = []

        def reached() -> bool:
            seen.append(self.health(name))
            return seen[-1] == wanted

        try:
            eventually(reached, seconds=timeout, every=0.1, what=f"{name} {wanted}")
        except AssertionError:
            raise AssertionError(f"{name} stayed {seen[-1]}, not {wanted}, for {timeout:g} s") from None
