"""The API-key check Envoy's ext_authz filter calls with a request's headers, before Envoy reads or buffers its body."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client.exposition import ThreadingWSGIServer

from .auth import API_KEY_HEADER, DENIED, caller
from .tenants import TenantRegistry

log = logging.getLogger(__name__)

# The headers gateway/auth.py reads, as WSGI names them; Envoy passes on only these (deploy/envoy/render.py).
KEY_HEADERS = ((API_KEY_HEADER, "HTTP_X_API_KEY"), ("authorization", "HTTP_AUTHORIZATION"))
# The same JSON as the transcoder's error for UNAUTHENTICATED, so a client sees one shape whoever refused.
DENIED_BODY = json.dumps({"code": grpc.StatusCode.UNAUTHENTICATED.value[0], "message": DENIED}).encode()


class KeyCheck:
    """A WSGI app: 200 (empty) for a request the gateway would serve, 401 with DENIED_BODY otherwise. Every
    method and path is answered alike: Envoy forwards the original ones, and the key alone decides."""

    def __init__(self, registry: TenantRegistry, on_denied: Callable[[], object] = lambda: None) -> None:
        self._registry = registry
        self._on_denied = on_denied

    def __call__(self, environ, start_response):
        metadata = [(name, environ[variable]) for name, variable in KEY_HEADERS if variable in environ]
        if caller(self._registry, metadata) is not None:
            start_response("200 OK", [("Content-Length", "0")])
            return [b""]
        self._on_denied()
        start_response("401 Unauthorized", [("Content-Type", "application/json"),
                                             ("Content-Length", str(len(DENIED_BODY)))])
        return [DENIED_BODY]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # one line per request is a flood; denials are counted
        pass


class AuthzServer:
    """KeyCheck on its own port (bound at construction), served by a thread of its own that `serve` watches:
    `serve` is a supervisor's task, so if the server ever stops, the gateway goes NOT_SERVING."""

    def __init__(self, host: str, port: int, app: KeyCheck) -> None:
        class Server(ThreadingWSGIServer):  # prometheus_client's: a thread per request, daemon threads
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            request_queue_size = 1024  # socketserver's backlog of 5 refused Envoy's bursts of checks

        self._server = make_server(host, port, app, Server, handler_class=_QuietHandler)
        self.port = int(self._server.server_port)
        self._serving = False

    async def serve(self) -> None:
        """Runs until the server stops, raising what stopped it; cancelled, it leaves the thread to `close`."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()

        def run() -> None:
            error: BaseException | None = None
            try:
                self._server.serve_forever(poll_interval=0.05)
            except BaseException as raised:  # reported to the supervisor, not lost in a thread
                error = raised
            try:
                loop.call_soon_threadsafe(_settle, ended, error)
            except RuntimeError:  # the loop has closed: nobody is left to tell
                pass

        self._serving = True
        threading.Thread(target=run, daemon=True, name="authz-http").start()
        log.info("key check listening", extra={"port": self.port})
        await ended

    def close(self) -> None:
        if self._serving:  # shutdown() waits for serve_forever, which must have started
            self._server.shutdown()
        self._server.server_close()


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # cancelled: the gateway is stopping
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
