"""The one place where domain errors become gRPC status codes, with request ids, logs and request metrics: the
RpcInterceptor every service's server runs every RPC through."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from .errors import InvalidArgument, ServiceError
from .logs import new_request_id, request_id_var
from .handlers import behaviour_of, same_shape
from .metrics import ServiceMetrics

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
STATUS_DETAILS_TRAILER = "grpc-status-details-bin"  # the standard trailer for google.rpc.Status details
REQUEST_ID_PATTERN = re.compile(r"[\x20-\x7e]{1,128}")  # printable ASCII: safe in metadata and log lines


def checked_request_id(value: str, where: str) -> str:
    """A client-chosen request id, refused unless it is 1-128 printable ASCII characters."""
    if not REQUEST_ID_PATTERN.fullmatch(value):
        unprintable = " including unprintable or non-ASCII ones" if not value.isascii() or not value.isprintable() else ""
        raise InvalidArgument(f"{where} must be 1 to 128 printable ASCII characters; got {len(value)} characters"
                              f"{unprintable}")
    return value


def request_id_from(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and value:
            return checked_request_id(str(value), f"the {REQUEST_ID_HEADER} header")
    return new_request_id()


def call_deadline(context: grpc.aio.ServicerContext) -> float:
    """The caller's deadline on the time.monotonic() clock (inf when it set none): the batching queues' order."""
    remaining = context.time_remaining()
    return math.inf if remaining is None else time.monotonic() + remaining


def status_details(error: ServiceError) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata with a google.rpc.Status carrying RetryInfo when the error has a retry hint."""
    if error.retry_after_s is None:
        return ()
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(error.retry_after_s),
                                        nanos=int(error.retry_after_s % 1 * 1e9)))
    detail = any_pb2.Any()
    detail.Pack(retry)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=[detail])
    return ((STATUS_DETAILS_TRAILER, status.SerializeToString()),)


def item_status(error: BaseException) -> status_pb2.Status:
    """A per-item google.rpc.Status for one failed item in a batch."""
    if isinstance(error, ServiceError):
        return status_pb2.Status(code=error.code.value[0], message=error.message)
    return status_pb2.Status(code=code_pb2.INTERNAL, message=f"{type(error).__name__}: {error}")


# Infrastructure services every process serves: answered as they come, neither wrapped nor counted.
UNCOUNTED_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class RpcInterceptor(grpc.aio.ServerInterceptor):
    """What every RPC of every service gets, in one place (ServiceServer installs it outermost, ahead of the
    service's own interceptors): the request id from `x-request-id` (checked) or a new one, ServiceError -> its
    status code (with RetryInfo when it has a retry hint), any other exception -> INTERNAL naming the request id,
    and one count (`swl_grpc_requests_total{method,code}`) and one duration (`swl_grpc_request_seconds{method}`)
    per RPC, `method` being the RPC's short name. Errors raised mid-stream are mapped too. A call an inner
    interceptor refuses with `context.abort` (the gateway's UNAUTHENTICATED) is counted under the code it got."""

    def __init__(self, metrics: ServiceMetrics, uncounted: tuple[str, ...] = UNCOUNTED_SERVICES) -> None:
        self._metrics = metrics
        self._uncounted = uncounted

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._uncounted):  # None: grpc answers UNIMPLEMENTED
            return handler
        return self._wrapped(handler, details.method.rsplit("/", 1)[-1])

    def _wrapped(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        behaviour = behaviour_of(handler)
        metrics = self._metrics

        async def answer(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = request_id_var.set(new_request_id())  # reset below: this runs in the call's own task
            try:
                async with _Rpc(metrics, method, context).handled():
                    return await behaviour(request, context)
            finally:
                request_id_var.reset(token)

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            # Not reset here: a stream abandoned by its consumer is closed by the loop's finaliser in another
            # context, where a reset fails; the call's task, whose context this is, ends with the call anyway.
            request_id_var.set(new_request_id())
            async with _Rpc(metrics, method, context).handled():
                async with contextlib.aclosing(behaviour(request, context)) as responses:  # its finally runs now
                    async for response in responses:
                        yield response

        if inspect.isasyncgenfunction(behaviour):
            wrapper: Callable[..., Any] = stream
        elif inspect.iscoroutinefunction(behaviour):  # unary responses, and the reader/writer streaming form
            wrapper = answer
        else:
            # grpc.aio runs a plain function in its thread pool, in another context: none of ours is one, and one
            # is refused loudly here rather than served without its request id, metrics and error mapping.
            raise TypeError(f"RpcInterceptor wraps grpc.aio handlers (coroutines, async generators) only, not "
                            f"{behaviour!r} ({method})")
        return same_shape(handler, wrapper)


class _Rpc:
    """One call's outcome: its status code, how long it took, and the answer for an error."""

    def __init__(self, metrics: ServiceMetrics, method: str, context: grpc.aio.ServicerContext) -> None:
        self.metrics, self.method, self.context = metrics, method, context
        self.code = grpc.StatusCode.OK
        self.started = time.perf_counter()
        self.recorded = False

    @contextlib.asynccontextmanager
    async def handled(self) -> AsyncIterator[None]:
        """The call's request id read, its errors answered with their status, and its outcome counted."""
        try:
            request_id_var.set(request_id_from(self.context))  # a bad header: InvalidArgument, answered by fail()
            yield
        except Exception as error:
            await self.fail(error)
        except BaseException as error:
            self.ended_by(error)
            raise
        finally:
            self.record()

    async def fail(self, error: Exception) -> NoReturn:
        """Ends the call with `error`'s status (raises what grpc.aio expects of an aborted handler)."""
        if isinstance(error, grpc.aio.AbortError):  # answered already: an inner interceptor's refusal
            self.code = _aborted_code(self.context)
            raise error
        if isinstance(error, ServiceError):
            log.warning("request failed", extra={"method": self.method, "code": error.code.name,
                                                 "error": error.message})
            await self.abort(error.code, error.message, status_details(error))
        log.error("request crashed", extra={"method": self.method}, exc_info=error)
        await self.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id_var.get()}); see the "
                                                   "service log")

    async def abort(self, code: grpc.StatusCode, message: str, trailers: Any = ()) -> NoReturn:
        # Counted before the status leaves: a client that reads the metrics once it has its answer sees its call.
        self.code = code
        self.record()
        await self.context.abort(code, message, trailing_metadata=trailers)
        raise AssertionError("context.abort returned")  # it always raises

    def ended_by(self, error: BaseException) -> None:
        """A cancellation (the client went away or its deadline passed) or a stream closed before its end."""
        cancelled = isinstance(error, (asyncio.CancelledError, GeneratorExit))
        self.code = grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN

    def record(self) -> None:
        if self.recorded:
            return
        self.recorded = True
        self.metrics.requests.labels(self.method, self.code.name).inc()
        self.metrics.request_seconds.labels(self.method).observe(time.perf_counter() - self.started)


def _aborted_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status an aborted call was given (UNKNOWN when this grpc does not say)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
