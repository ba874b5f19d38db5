"""API keys: when any are configured, every gateway RPC but the health check needs one of them.

The key travels as `x-api-key` (or `authorization: Bearer KEY`) metadata; through Envoy, HTTP headers of the
same names become that metadata, so HTTP and native gRPC callers are checked in one place. Several keys may
be valid at once (rotation). Keys are compared in constant time against digests held in memory, and are
never logged or counted by value."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

import grpc

API_KEY_HEADER = "x-api-key"
OPEN_METHODS = ("/grpc.health.v1.Health/",)  # probes and Envoy's health checks carry no key
DENIED = ("missing or wrong API key: send it in the x-api-key header (or as Authorization: Bearer KEY)")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(key) for key in keys if key]

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def accepts(self, given: str | None) -> bool:
        """Whether `given` is one of the keys; every key is compared, in constant time, whatever matches."""
        digest = _digest(given or "")
        matched = False
        for expected in self._digests:
            matched |= hmac.compare_digest(digest, expected)
        return matched and given is not None


def key_from(metadata) -> str | None:
    for name, value in metadata or ():
        if name == API_KEY_HEADER:
            return str(value)
        if name == "authorization" and str(value).startswith("Bearer "):
            return str(value)[len("Bearer "):]
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED before the handler runs (before any upload is read) when the key is wrong."""

    def __init__(self, keys: ApiKeys, on_denied=lambda: None) -> None:
        self._keys = keys
        self._on_denied = on_denied

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if (handler is None or not self._keys.required or details.method.startswith(OPEN_METHODS)
                or self._keys.accepts(key_from(details.invocation_metadata))):
            return handler
        self._on_denied()
        return _denying(handler)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses the call."""
    codec = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)

    async def refuse_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)
        yield  # an async generator, as streaming handlers are

    if handler.response_streaming:
        factory = (grpc.stream_stream_rpc_method_handler if handler.request_streaming
                   else grpc.unary_stream_rpc_method_handler)
        return factory(refuse_stream, **codec)
    factory = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
    return factory(refuse, **codec)
