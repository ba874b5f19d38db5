"""Service lifecycle: bind, report NOT_SERVING, load and warm up models, SERVING, graceful stop on SIGTERM."""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
import signal
import sys

import grpc
import threadpoolctl
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from .batching import BatchingQueue, BatchPolicy
from .errors import ModelLoadError
from .logs import configure_logging
from .metrics import ServiceMetrics
from .manifest import ModelSpec
from .onnx_session import OnnxModel, load_model
from .providers import ProviderConfig
from .rpc import RpcInterceptor
from .settings import ServerSettings, ServiceSettings
from .supervision import Supervisor

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class GrpcService(abc.ABC):
    """One gRPC process: its service names, its warm-up, its servicer registration and its clean-up."""

    name: str
    grpc_service_names: tuple[str, ...]

    def __init__(self, settings: ServerSettings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.supervisor = Supervisor()  # its loops' deaths turn the process NOT_SERVING (ServiceServer wires it)

    @abc.abstractmethod
    async def warm_up(self) -> None:
        """Everything that must happen before the process reports SERVING."""

    @abc.abstractmethod
    def register(self, server: grpc.aio.Server) -> None:
        """Adds this service's servicer to the server."""

    async def close(self) -> None:
        """Releases what warm_up started (after the server has stopped)."""

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Interceptors every RPC of this process passes through (none by default), inside the RpcInterceptor
        that ServiceServer always puts first (request ids, status codes, request metrics)."""
        return []

    @property
    def max_message_bytes(self) -> int:
        """Largest gRPC message this process sends or receives."""
        return MAX_MESSAGE_BYTES


class ModelService(GrpcService):
    """A model service: loads its ONNX models once, warms them up and serves them through batching queues."""

    settings: ServiceSettings

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics) -> None:
        super().__init__(settings, metrics)
        self.queues: dict[str, BatchingQueue] = {}
        self.models: dict[str, OnnxModel] = {}

    def new_queue(self, model_key: str, run_batch, policy: BatchPolicy | None = None) -> BatchingQueue:
        """Creates the batching queue for one model, batching by `policy` (default: the service-wide settings;
        `self.settings.batch_policy("<model>")` gives a model its own); it accepts items only once warm-up has
        finished."""
        queue: BatchingQueue = BatchingQueue.with_policy(model_key, run_batch,
                                                         policy if policy is not None else self.settings.batch_policy(),
                                                         self.metrics)
        self.queues[model_key] = queue
        return queue

    def batch_policy(self, model_key: str) -> BatchPolicy:
        """The batching of the model that `model_key` names: its queue's, else the service-wide one."""
        queue = self.queues.get(model_key)
        return queue.policy if queue is not None else self.settings.batch_policy()

    def load(self, spec: ModelSpec, warmup_dims: dict[str, int] | None = None) -> OnnxModel:
        """Loads one model with this service's provider and thread settings; the provider's batch profile
        (TensorRT's) follows the largest batch of the model's queue (the queue named like the model)."""
        s = self.settings
        config = dataclasses.replace(ProviderConfig.from_settings(s),
                                     max_batch_size=self.batch_policy(spec.name).max_batch_size)
        model = load_model(spec, s.models_dir, provider_config=config, require_gpu=s.require_gpu,
                           allow_dev=s.allow_dev_models, extra_dirs=s.extra_model_dirs, intra_op_threads=s.intra_op_threads,
                           inter_op_threads=s.inter_op_threads, spin_wait=s.spin_wait)
        if warmup_dims:
            model.spec = dataclasses.replace(spec, warmup_dims={**spec.warmup_dims, **warmup_dims})
        return model

    @abc.abstractmethod
    def load_models(self) -> dict[str, OnnxModel]:
        """Loads every model (called once, in a worker thread); keys match the queue names."""

    async def warm_up(self, run_models: bool = True) -> None:
        """Loads models, runs each once per warm-up batch size, then opens the queues. `run_models=False` only
        loads, as a process that serves one request and exits would (the seed comparison's old way)."""
        self.models = await asyncio.to_thread(self.load_models)
        for key, model in self.models.items():
            largest = self.batch_policy(key).max_batch_size
            sizes = self.settings.effective_warmup_batch_sizes(largest) if run_models else ()
            self.metrics.model_loads.labels(key).inc()
            self.metrics.model_load_seconds.labels(key).set(model.load_seconds)
            for rank, provider in enumerate(model.providers):
                self.metrics.model_providers.labels(key, provider, str(rank)).set(1)
            seconds = await asyncio.to_thread(model.warm_up, sizes) if sizes else 0.0
            self.metrics.warmup_seconds.labels(key).set(seconds)
            log.info("model warmed up", extra={"model": key, "batch_sizes": sizes, "seconds": round(seconds, 3)})
        for queue in self.queues.values():
            queue.start(on_death=self.supervisor.report)

    async def close(self) -> None:
        for queue in self.queues.values():
            await queue.stop()


class ServiceServer:
    """Runs one GrpcService: health, reflection, metrics endpoint, warm-up, graceful shutdown."""

    def __init__(self, service: GrpcService) -> None:
        self.service = service
        self.settings = service.settings
        self.health = HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self._health_update: asyncio.Task | None = None
        service.supervisor.on_death = self._task_died

    async def _set_health(self, status: int) -> None:
        for name in ("", *self.service.grpc_service_names):
            await self.health.set(name, status)

    def _task_died(self, name: str, error: BaseException | None) -> None:
        """A long-lived task ended: NOT_SERVING, so the load balancer stops sending calls and the liveness probe
        (the gRPC health check) has Kubernetes restart the process."""
        self._health_update = asyncio.get_running_loop().create_task(
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))

    async def start(self) -> int:
        """Binds and starts answering (NOT_SERVING until `warm_up`); returns the gRPC port."""
        options = [
            ("grpc.max_receive_message_length", self.service.max_message_bytes),
            ("grpc.max_send_message_length", self.service.max_message_bytes),
        ]
        if self.settings.max_connection_age_s:
            # GOAWAY after the age; calls already running get the shutdown grace to finish.
            options += [("grpc.max_connection_age_ms", int(self.settings.max_connection_age_s * 1000)),
                        ("grpc.max_connection_age_grace_ms", int(self.settings.grace_period_s * 1000))]
        # The RPC interceptor first, so it is outermost: a call the service's own interceptors refuse (the
        # gateway's API keys) still gets a request id and is counted.
        interceptors = [RpcInterceptor(self.service.metrics), *self.service.interceptors()]
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service.register(self.server)
        reflection.enable_server_reflection(
            (*self.service.grpc_service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self.server,
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self.server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {self.settings.host}:{self.settings.port}")
        await self.server.start()
        if self.settings.metrics_port >= 0:
            self.metrics_port = self.service.metrics.serve(self.settings.metrics_port, self.settings.host)
        log.info("listening", extra={"service": self.service.name, "port": self.port,
                                     "metrics_port": self.metrics_port, "health": "NOT_SERVING"})
        return self.port

    async def warm_up(self, run_models: bool = True) -> None:
        """Runs the service's warm-up, then reports SERVING."""
        await (self.service.warm_up(run_models) if isinstance(self.service, ModelService) else self.service.warm_up())
        if self.service.supervisor.dead:  # a loop died during warm-up: never claim SERVING
            raise RuntimeError(f"{', '.join(self.service.supervisor.dead)} stopped during warm-up; see the log")
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"service": self.service.name, "port": self.port})

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first (so load balancers drain), then let in-flight calls finish within the grace."""
        grace = self.settings.grace_period_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        await self.service.supervisor.stop()
        await self.service.close()
        self.service.metrics.close()
        log.info("stopped", extra={"service": self.service.name})

    async def serve_until_signal(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        warm = asyncio.create_task(self.warm_up())
        done, _ = await asyncio.wait({warm, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if warm in done and warm.exception() is not None:
            await self.stop(0)
            raise warm.exception()  # type: ignore[misc]
        await stop.wait()
        log.info("signal received; draining", extra={"service": self.service.name})
        warm.cancel()
        await self.stop()


def limit_blas_threads() -> None:
    """numpy's OpenBLAS keeps a worker per core that busy-waits between calls. A service's products are small (the
    mel filterbank, box arithmetic; the models run in onnxruntime's own pool), and live sessions make them a dozen
    times a second, which kept a worker spinning: a gateway burnt 0.6 of two cores beside a live session, and 12
    mel windows a second cost 1.0 core instead of 0.02 (tests/services/test_blas_threads.py). One thread: the
    caller's own."""
    threadpoolctl.threadpool_limits(1, user_api="blas")


def run_service(service: GrpcService) -> None:
    """Process entry point shared by every service's `__main__`."""
    limit_blas_threads()
    configure_logging(service.settings.log_level)
    try:
        asyncio.run(ServiceServer(service).serve_until_signal())
    except ModelLoadError as error:
        log.error("cannot start: %s", error, extra={"service": service.name})
        sys.exit(2)
