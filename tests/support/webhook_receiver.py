"""A real HTTP server on loopback that records the webhooks posted to it."""

from __future__ import annotations

import contextlib
import http.server
import threading


@contextlib.contextmanager
def webhook_receiver(fail_first: int):
    """A real HTTP server on loopback: answers 500 to the first `fail_first` posts, then 200."""
    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append((dict(self.headers), body))
            self.send_response(500 if len(received) <= fail_first else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
