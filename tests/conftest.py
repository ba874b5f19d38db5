"""Shared fixtures: generated models, real-model paths, and in-process services on free ports."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from service_runtime.manifest import load_manifest
from service_runtime.dev_models import write_dev_model
from service_runtime.server import ServiceServer
from tools import system_deps

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SHARED_MODELS = SHARED / "models"
SHARED_MEDIA = SHARED / "media"


def shared_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        pytest.skip(f"{path} not present (real models and media are optional)")
    return path


@pytest.fixture(scope="session")
def dev_models_dir(tmp_path_factory) -> Path:
    """A models folder with the project manifest and generated random-weight models in dev/."""
    folder = tmp_path_factory.mktemp("models")
    shutil.copy(ROOT / "models" / "manifest.json", folder / "manifest.json")
    manifest = load_manifest(folder)
    for spec in manifest.models.values():
        write_dev_model(spec, folder / "dev")
    return folder


@pytest.fixture(scope="session")
def identity_models_dir(tmp_path_factory) -> Path:
    """Like dev_models_dir, but the lip-sync and enhancer models copy their (unmasked) input."""
    folder = tmp_path_factory.mktemp("identity_models")
    shutil.copy(ROOT / "models" / "manifest.json", folder / "manifest.json")
    for spec in load_manifest(folder).models.values():
        write_dev_model(spec, folder / "dev", identity=spec.role in {"lipsync", "enhancer"})
    return folder


def system_binary(name: str) -> str:
    """The path of a system program a test starts for real; `tools/system_deps.py` lists them all and `make deps`
    (a step of `make test`) installs them, so a missing one fails the test with the fix."""
    try:
        return system_deps.require(name)
    except RuntimeError as error:
        pytest.fail(str(error))


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


def local_settings(settings_cls, models_dir: Path, **overrides):
    """Settings for an in-process test service: loopback, free ports, dev models allowed."""
    defaults = dict(host="127.0.0.1", port=0, metrics_port=0, models_dir=str(models_dir), allow_dev_models=True,
                    warmup_batch_sizes=(1,), grace_period_s=1.0)
    return settings_cls.from_env({}, **{**defaults, **overrides})


@contextlib.asynccontextmanager
async def started(service, warm: bool = True):
    """Starts the service's gRPC server in-process; yields (server, channel)."""
    server = ServiceServer(service)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        if warm:
            await server.warm_up()
        yield server, channel
    finally:
        await channel.close()
        await server.stop(0)
