"""Real HTTP servers on loopback for webhooks: one that records what is posted, one that answers a byte at a time."""

from __future__ import annotations

import contextlib
import http.server
import ssl
import threading


@contextlib.contextmanager
def webhook_receiver(fail_first: int = 0, *, host: str = "127.0.0.1", port: int = 0,
                     tls: ssl.SSLContext | None = None):
    """A real HTTP server on `host` (`port` 0: a free one), over TLS with a server context `tls`: answers 500 to
    the first `fail_first` posts, then 200."""
    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append((dict(self.headers), body))
            self.send_response(500 if len(received) <= fail_first else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    with _serving(Handler, host, port, tls) as address:
        yield f"{'https' if tls else 'http'}://{address}/hook", received


@contextlib.contextmanager
def dripping_receiver(every_s: float):
    """A real HTTP server on loopback that reads a post, then sends its answer's headers one byte every `every_s`
    seconds, never ending them; `hung_up` is set once the sender has closed the connection on it."""
    posts: list[bytes] = []
    hung_up, stopping = threading.Event(), threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            posts.append(self.rfile.read(int(self.headers["content-length"])))
            try:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nx-drip: ")
                while not stopping.wait(every_s):  # a byte at a time: no read timeout fires, no header limit trips
                    self.wfile.write(b"a")
                    self.wfile.flush()
            except OSError:  # the sender closed the connection (a broken pipe or a reset)
                hung_up.set()

        def log_message(self, *args):
            pass

    with _serving(Handler, "127.0.0.1", 0, None) as address:
        try:
            yield f"http://{address}/hook", posts, hung_up
        finally:
            stopping.set()  # before the server stops: a dripping handler ends within one step


@contextlib.contextmanager
def _serving(handler, host: str, port: int, tls: ssl.SSLContext | None = None):
    server = http.server.ThreadingHTTPServer((host, port), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
