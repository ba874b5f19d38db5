"""Redis and extra gateway replicas as real processes, beside an in-process stack."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path

import redis

from deploy.redis import local as local_redis

from .paths import ROOT, system_binary
from .processes import free_port, project_env
from .waiting import eventually_async


class RedisServer:
    """A real redis-server on a free loopback port, with nothing persisted (`deploy/redis/local.py`)."""

    def __init__(self, folder) -> None:
        system_binary("redis-server")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = local_redis.start(self.port, Path(folder))
        local_redis.wait_ready(self.port, self.process)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


async def wait_serving(log_path, process, seconds: float = 60) -> None:
    """Until a gateway started by `gateway_process` logs that it is SERVING; fails at once if it exits. Either
    failure carries its log."""
    def serving() -> bool:
        assert process.poll() is None, f"the gateway exited with {process.returncode} before serving"
        return '"event": "serving"' in log_path.read_text()

    try:
        await eventually_async(serving, seconds=seconds, every=0.1, what=f"the gateway serving ({log_path.name})")
    except AssertionError as error:
        raise AssertionError(f"{error}; its log:\n{log_path.read_text()}") from None


@contextlib.contextmanager
def gateway_process(stack, redis_url: str, data_dir, log, extra: dict | None = None):
    """A second gateway as its own process, on the same model services, Redis and data directory; `extra` adds
    settings or overrides these (a metrics port instead of none)."""
    port = free_port()
    env = project_env(**{"SWL_GATEWAY_HOST": "127.0.0.1", "SWL_GATEWAY_PORT": str(port),
                         "SWL_GATEWAY_METRICS_PORT": "-1", "SWL_GATEWAY_REDIS_URL": redis_url,
                         "SWL_GATEWAY_ALLOW_ANONYMOUS": "true", "SWL_GATEWAY_DATA_DIR": str(data_dir),
                         "SWL_GATEWAY_DETECTOR_ADDRESS": stack.address("detector"),
                         "SWL_GATEWAY_LIPSYNC_ADDRESS": stack.address("lipsync"),
                         "SWL_GATEWAY_ENHANCER_ADDRESS": stack.address("enhancer"), **(extra or {})})
    process = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=ROOT, env=env, stderr=log, stdout=log)
    try:
        yield f"127.0.0.1:{port}", process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


@contextlib.contextmanager
def redis_server(folder, *extra: str):
    """A real redis-server on a free port with the given options; yields its URL and a client to tamper with."""
    system_binary("redis-server")
    port = free_port()
    process = local_redis.start(port, folder / "redis", extra=extra)
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        local_redis.wait_ready(port, process)
        yield f"redis://127.0.0.1:{port}/0", client
    finally:
        client.close()
        process.kill()
        process.wait()
