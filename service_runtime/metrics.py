"""Prometheus metrics shared by the model services, declared once against an injected registry."""

from __future__ import annotations

import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServiceMetrics:
    """The metric families every model service exports, prefixed `swl_`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.inference_seconds = Histogram(
            "swl_inference_seconds", "Time of one model call on a batch.", ["model"], registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            "swl_batch_size", "Items per model call taken from the batching queue.", ["model"], registry=r,
            buckets=BATCH_BUCKETS,
        )
        self.queue_depth = Gauge("swl_queue_depth", "Items waiting in the batching queue.", ["model"], registry=r)
        self.queue_rejections = Counter(
            "swl_queue_rejections_total", "Items refused because the queue was full.", ["model"], registry=r
        )
        self.batches = Counter("swl_model_batches_total", "Batches run by the model.", ["model"], registry=r)
        self.items = Counter("swl_model_items_total", "Items run by the model, by outcome.", ["model", "outcome"],
                             registry=r)
        self.requests = Counter(
            "swl_grpc_requests_total", "RPCs answered, by method and status code.", ["method", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "swl_grpc_request_seconds", "RPC duration.", ["method"], registry=r, buckets=LATENCY_BUCKETS
        )
        self.model_loads = Counter("swl_model_loads_total", "Model sessions created.", ["model"], registry=r)
        self.model_providers = Gauge("swl_model_provider_info", "1 for each provider a model's session really runs on "
                                     "(rank 0 is the one used first).", ["model", "provider", "rank"], registry=r)
        self.model_load_seconds = Gauge(
            "swl_model_load_seconds", "Seconds the last model load took.", ["model"], registry=r
        )
        self.warmup_seconds = Gauge(
            "swl_model_warmup_seconds", "Seconds the last warm-up took.", ["model"], registry=r
        )

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Starts the `/metrics` HTTP endpoint in a daemon thread; returns the bound port."""
        self._http_server = metrics_http_server(host, port, self.registry)
        return int(self._http_server.server_port)

    def close(self) -> None:
        server = getattr(self, "_http_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # scrapes are not events worth a log line
        pass


def metrics_http_server(host: str, port: int, registry: CollectorRegistry) -> ThreadingWSGIServer:
    """prometheus_client's WSGI app and server class, served by our own thread: its `start_http_server` polls for
    shutdown every 0.5 s, which made each service's stop (and each test stack's teardown) wait that long."""

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = make_server(host, port, make_wsgi_app(registry), Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                     name="metrics-http").start()
    return server
