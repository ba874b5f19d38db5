"""API keys: when any tenant is configured, every gateway RPC but the health check needs one of its keys.

The key travels as `x-api-key` (or `authorization: Bearer KEY`) metadata; through Envoy, HTTP headers of the
same names become that metadata, so HTTP and native gRPC callers are checked in one place. A tenant may hold
several keys at once (rotation). Keys are compared in constant time against digests held in memory
(gateway/tenants.py), and are never logged or counted by value. The caller's tenant is `current_tenant` for the
whole call; without any tenant configured every call runs as ANONYMOUS."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable

import grpc

from service_runtime.handlers import behaviour_of, same_shape

from .tenants import ANONYMOUS, Tenant, TenantRegistry, current_tenant

API_KEY_HEADER = "x-api-key"
OPEN_METHODS = ("/grpc.health.v1.Health/",)  # probes and Envoy's health checks carry no key
DENIED = ("missing or wrong API key: send it in the x-api-key header (or as Authorization: Bearer KEY)")


def key_from(metadata) -> str | None:
    for name, value in metadata or ():
        if name == API_KEY_HEADER:
            return str(value)
        if name == "authorization" and str(value).startswith("Bearer "):
            return str(value)[len("Bearer "):]
    return None


def caller(registry: TenantRegistry, metadata) -> Tenant | None:
    """Who a call carrying `metadata` runs as: ANONYMOUS when no tenant is configured, else the tenant whose key
    it carries, or None (refused). The one key check, for gRPC calls here and Envoy's ext_authz (gateway/authz.py)."""
    if not registry.required:
        return ANONYMOUS
    return registry.identify(key_from(metadata))


class TenantInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED before the handler runs (before any upload is read) when the key is wrong, and
    runs an accepted call with `current_tenant` set to the key's tenant."""

    def __init__(self, registry: TenantRegistry, on_denied: Callable[[], object] = lambda: None,
                 admit: Callable[[Tenant], Awaitable[None]] | None = None) -> None:
        self._registry = registry
        self._on_denied = on_denied
        self._admit = admit  # per-call admission for the tenant (its requests_per_minute), inside the call

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        tenant = caller(self._registry, details.invocation_metadata)
        if tenant is None:
            self._on_denied()
            return _denying(handler)
        return with_tenant(handler, tenant, self._admit)


def with_tenant(handler: grpc.RpcMethodHandler, tenant: Tenant,
                admit: Callable[[Tenant], Awaitable[None]] | None = None) -> grpc.RpcMethodHandler:
    """`handler` with `current_tenant` set to `tenant` while its behaviour runs. Set in intercept_service, the
    variable reaches the handler only because grpc.aio (1.85) runs both in one task, which it does not promise
    (tests/gateway/test_tenants.py records it); set here, it holds for the call and every task the call starts."""
    behaviour = behaviour_of(handler)
    if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
        # grpc.aio runs a plain function in its thread pool with another context object: not wrapped here, as
        # the gateway serves none, and refused loudly rather than run wrongly.
        raise TypeError(f"TenantInterceptor wraps grpc.aio handlers (coroutines, async generators) only, not "
                        f"{behaviour!r}")

    async def unary_response(request, context):
        token = current_tenant.set(tenant)
        try:
            if admit is not None:
                await admit(tenant)
            return await behaviour(request, context)
        finally:
            current_tenant.reset(token)

    async def stream_response(request, context):
        # Set inside the generator, whose body runs in the task serving the call. Not reset: that task ends with
        # the call, and a generator closed by the loop's finaliser runs in another context, where reset fails.
        current_tenant.set(tenant)
        if admit is not None:
            await admit(tenant)
        if not inspect.isasyncgenfunction(behaviour):
            await behaviour(request, context)  # the reader/writer form: it writes with context.write
            return
        async with contextlib.aclosing(behaviour(request, context)) as responses:  # its finally blocks run now
            async for response in responses:
                yield response

    return same_shape(handler, stream_response if handler.response_streaming else unary_response)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses the call."""

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)

    async def refuse_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)
        yield  # an async generator, as streaming handlers are

    return same_shape(handler, refuse_stream if handler.response_streaming else refuse)

