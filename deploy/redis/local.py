"""A local redis-server for `make run` and the tests: Debian's binary, loopback only, nothing persisted."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO


def redis_binary() -> str | None:
    return shutil.which("redis-server")


def start(port: int, folder: Path, log: IO[str] | int = subprocess.DEVNULL, persist: bool = False,
          extra: Sequence[str] = ()) -> subprocess.Popen:
    """Starts redis-server on 127.0.0.1:`port`. By default with no snapshot and no append-only file (the local
    stack's state is disposable); `persist` keeps an append-only file in `folder`, fsynced on every write, as the
    Kubernetes component does, so a restart finds the state again. `extra` is more options (`--maxmemory`, ...)."""
    binary = redis_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed: make deps (or apt-get install redis-server)")
    folder.mkdir(parents=True, exist_ok=True)
    durability = ["--appendonly", "yes", "--appendfsync", "always"] if persist else ["--appendonly", "no"]
    return subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *durability,
                             "--dir", str(folder), *extra], stdout=log, stderr=subprocess.STDOUT)


def wait_ready(port: int, process: subprocess.Popen, seconds: float = 20) -> None:
    """Waits until PING answers."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    deadline = time.monotonic() + seconds
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {process.returncode}")
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server on port {port} did not answer within {seconds:.0f} s") from None
                time.sleep(0.05)
    finally:
        client.close()
