"""The one place where domain errors become gRPC status codes, with request ids, logs and request metrics."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from .errors import InvalidArgument, ServiceError
from .logs import new_request_id, request_id_var
from .metrics import ServiceMetrics

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
STATUS_DETAILS_TRAILER = "grpc-status-details-bin"  # the standard trailer for google.rpc.Status details
REQUEST_ID_PATTERN = re.compile(r"[\x20-\x7e]{1,128}")  # printable ASCII: safe in metadata and log lines
Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


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


@contextlib.asynccontextmanager
async def _handled(metrics: ServiceMetrics, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Request id in, ServiceError -> its status code, crashes -> INTERNAL, and one count per RPC."""
    token = request_id_var.set(new_request_id())
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        request_id_var.set(request_id_from(context))
        yield
    except ServiceError as error:
        code = error.code
        log.warning("request failed", extra={"method": method, "code": code.name, "error": error.message})
        await context.abort(code, error.message, trailing_metadata=status_details(error))
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
        raise
    except Exception:
        code = grpc.StatusCode.INTERNAL
        log.exception("request crashed", extra={"method": method})
        await context.abort(code, f"internal error (request id {request_id_var.get()}); see the service log")
    finally:
        metrics.requests.labels(method, code.name).inc()
        metrics.request_seconds.labels(method).observe(time.perf_counter() - started)
        request_id_var.reset(token)


def grpc_method(metrics_attr: str = "metrics") -> Callable[[Handler], Handler]:
    """Wraps a unary servicer method with `_handled` (the servicer holds its metrics in `metrics_attr`)."""

    def decorate(func: Handler) -> Handler:
        @functools.wraps(func)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _handled(getattr(self, metrics_attr), func.__name__, context):
                return await func(self, request, context)

        return wrapper  # type: ignore[return-value]

    return decorate


def grpc_stream_method(metrics_attr: str = "metrics") -> Callable[[Handler], Handler]:
    """Like `grpc_method`, for handlers that are async generators (server-streaming RPCs)."""

    def decorate(func: Handler) -> Handler:
        @functools.wraps(func)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _handled(getattr(self, metrics_attr), func.__name__, context):
                async for message in func(self, request, context):  # type: ignore[attr-defined]  # an async generator
                    yield message

        return wrapper  # type: ignore[return-value]

    return decorate
