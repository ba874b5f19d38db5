"""Services started inside the test's own event loop, on free ports."""

from __future__ import annotations

import contextlib
from pathlib import Path

import grpc

from service_runtime.server import ServiceServer


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
