"""Every service's RPCs pass through one interceptor (service_runtime.rpc), installed by ServiceServer ahead of the
service's own: the request id from `x-request-id` (or a new one; a bad one refused), ServiceError -> its status
code with RetryInfo, any other exception -> INTERNAL naming the request id, and one count and one duration per
RPC by method and code. Tested on a toy service whose handlers are plain generic handlers of all four shapes."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service_runtime.errors import InvalidArgument, ResourceExhausted
from service_runtime.logs import request_id_var
from service_runtime.metrics import ServiceMetrics
from service_runtime.server import GrpcService, ServiceServer
from service_runtime.settings import ServerSettings

from tests.support.waiting import eventually_async

SERVICE = "test.toy.v1.Toy"
RETRY_AFTER_S = 1.25
TRAILER = "x-swl-warning"


def outcome(command: bytes) -> bytes:
    """What a handler does for one request: answers with the request id it sees, or fails as told."""
    if command == b"busy":
        raise ResourceExhausted("the toy queue is full", retry_after_s=RETRY_AFTER_S)
    if command == b"bad":
        raise InvalidArgument("the toy item is bad")
    if command == b"crash":
        raise RuntimeError("the toy broke")
    return request_id_var.get().encode()


async def unary(request: bytes, context) -> bytes:
    if request == b"warn":  # what the gateway does with its warnings: a trailer on a successful call
        context.set_trailing_metadata(((TRAILER, "careful"),))
    await asyncio.sleep(0)
    return outcome(request)


async def server_stream(request: bytes, context):
    yield b"first"  # errors come mid-stream, after a message has left
    await asyncio.sleep(0)
    yield outcome(request)


async def client_stream(requests, context) -> bytes:
    return outcome(b"".join([request async for request in requests]))


async def bidi_stream(requests, context):
    async for request in requests:
        yield outcome(request)


async def writer_stream(request: bytes, context) -> None:
    """The reader/writer form of a server-streaming handler: a coroutine that writes."""
    await context.write(b"first")
    await context.write(outcome(request))


async def hangs(request: bytes, context):
    yield b"first"
    await asyncio.sleep(60)
    yield b"never"


HANDLERS = {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
    "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
    "BidiStream": grpc.stream_stream_rpc_method_handler(bidi_stream),
    "WriterStream": grpc.unary_stream_rpc_method_handler(writer_stream),
}
METHODS = list(HANDLERS)
HANDLERS["Hangs"] = grpc.unary_stream_rpc_method_handler(hangs)


class Refusing(grpc.aio.ServerInterceptor):
    """Like the gateway's API-key interceptor: refuses a call without a key before its handler runs, and notes the
    request id the call's handler runs under (the outer interceptor has set it by then)."""

    def __init__(self) -> None:
        self.seen_ids: list[str] = []

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE}/"):
            return handler
        if ("x-api-key", "key") not in tuple(details.invocation_metadata or ()):
            async def refuse(request, context):
                self.seen_ids.append(request_id_var.get())
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no key")

            return grpc.unary_unary_rpc_method_handler(refuse)
        return handler


class ToyService(GrpcService):
    name = "toy"
    grpc_service_names = (SERVICE,)

    def __init__(self, inner: tuple[grpc.aio.ServerInterceptor, ...] = ()) -> None:
        super().__init__(ServerSettings.from_env({}, host="127.0.0.1", port=0, metrics_port=-1, grace_period_s=0.5),
                         ServiceMetrics())
        self.inner = inner

    async def warm_up(self) -> None:
        pass

    def register(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, HANDLERS),))

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return list(self.inner)

    def count(self, method: str, code: str) -> float:
        value = self.metrics.registry.get_sample_value("swl_grpc_requests_total", {"method": method, "code": code})
        return value or 0.0

    def timed(self, method: str) -> float:
        return self.metrics.registry.get_sample_value("swl_grpc_request_seconds_count", {"method": method}) or 0.0


@pytest.fixture
async def toy():
    service = ToyService()
    server = ServiceServer(service)
    await server.start()
    await server.warm_up()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield service, channel
    finally:
        await channel.close()
        await server.stop(0)


async def call(channel: grpc.aio.Channel, method: str, command: bytes, metadata=()) -> list[bytes]:
    """Calls one toy method in its own shape; returns every message it answered."""
    path = f"/{SERVICE}/{method}"
    if method == "Unary":
        return [await channel.unary_unary(path)(command, metadata=metadata, timeout=10)]
    if method in ("ServerStream", "WriterStream"):
        return [m async for m in channel.unary_stream(path)(command, metadata=metadata, timeout=10)]
    if method == "ClientStream":
        return [await channel.stream_unary(path)(iter([command]), metadata=metadata, timeout=10)]
    return [m async for m in channel.stream_stream(path)(iter([command]), metadata=metadata, timeout=10)]


async def failure(channel, method: str, command: bytes, metadata=()) -> tuple[grpc.aio.AioRpcError, list[bytes]]:
    """The error a call ends with, and the messages that arrived before it."""
    received: list[bytes] = []
    path = f"/{SERVICE}/{method}"
    with pytest.raises(grpc.aio.AioRpcError) as error:
        if method in ("ServerStream", "WriterStream"):
            async for message in channel.unary_stream(path)(command, metadata=metadata, timeout=10):
                received.append(message)
        elif method == "BidiStream":
            async for message in channel.stream_stream(path)(iter([command]), metadata=metadata, timeout=10):
                received.append(message)
        else:
            await call(channel, method, command, metadata)
    return error.value, received


STREAMED_FIRST = {"ServerStream", "WriterStream"}  # these send b"first" before they fail


@pytest.mark.parametrize("method", METHODS)
async def test_the_request_id_comes_from_the_header_or_is_new(toy, method):
    _, channel = toy
    answered = await call(channel, method, b"ok", metadata=(("x-request-id", "job-7 from the client"),))
    assert answered[-1] == b"job-7 from the client"
    first, second = (await call(channel, method, b"ok"))[-1], (await call(channel, method, b"ok"))[-1]
    assert re.fullmatch(rb"[0-9a-f]{16}", first) and first != second


@pytest.mark.parametrize("method", METHODS)
async def test_a_bad_request_id_header_is_refused(toy, method):
    service, channel = toy
    error, received = await failure(channel, method, b"ok", metadata=(("x-request-id", "y" * 200),))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-request-id" in error.details() and "200 characters" in error.details()
    assert received == [] and service.count(method, "INVALID_ARGUMENT") == 1  # counted before the status left


async def counted(service: "ToyService", expected: dict) -> None:
    """Waits for each (method, code) count: a refusal by an inner interceptor is counted as the call ends on the
    server, which may be just after the client has its status."""
    def counts() -> dict:
        return {key: service.count(*key) for key in expected}
    await eventually_async(lambda: counts() == expected, seconds=5, what=f"the counts {expected}")


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    trailers = dict(error.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry)
    return retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9


@pytest.mark.parametrize("method", METHODS)
async def test_a_service_error_gets_its_code_and_retry_info_even_mid_stream(toy, method):
    service, channel = toy
    error, received = await failure(channel, method, b"busy")
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error.details() == "the toy queue is full"
    assert retry_delay(error) == RETRY_AFTER_S
    assert received == ([b"first"] if method in STREAMED_FIRST else [])
    error, _ = await failure(channel, method, b"bad")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details() == "the toy item is bad"
    assert "grpc-status-details-bin" not in dict(error.trailing_metadata() or ())  # no retry hint, no details
    assert (service.count(method, "RESOURCE_EXHAUSTED"), service.count(method, "INVALID_ARGUMENT")) == (1, 1)


@pytest.mark.parametrize("method", METHODS)
async def test_a_crash_is_internal_and_names_the_request_id(toy, method, caplog):
    service, channel = toy
    error, received = await failure(channel, method, b"crash", metadata=(("x-request-id", "crash-42"),))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "crash-42" in error.details() and "the toy broke" not in error.details()  # the details stay in the log
    assert received == ([b"first"] if method in STREAMED_FIRST else [])
    assert any(r.message == "request crashed" and r.exc_info and "the toy broke" in str(r.exc_info[1])
               for r in caplog.records)
    assert service.count(method, "INTERNAL") == 1


async def test_every_rpc_is_counted_and_timed_by_method_and_code(toy):
    service, channel = toy
    for _ in range(3):
        await call(channel, "Unary", b"ok")
    await call(channel, "BidiStream", b"ok")
    await failure(channel, "Unary", b"busy")
    await failure(channel, "ServerStream", b"crash")
    counts = {(method, code): service.count(method, code) for method in METHODS
              for code in ("OK", "RESOURCE_EXHAUSTED", "INTERNAL")}
    assert {key: value for key, value in counts.items() if value} == {
        ("Unary", "OK"): 3, ("Unary", "RESOURCE_EXHAUSTED"): 1, ("BidiStream", "OK"): 1,
        ("ServerStream", "INTERNAL"): 1}
    assert (service.timed("Unary"), service.timed("BidiStream"), service.timed("ServerStream")) == (4, 1, 1)


async def test_a_cancelled_stream_is_counted_as_cancelled(toy):
    service, channel = toy
    responses = channel.unary_stream(f"/{SERVICE}/Hangs")(b"ok", timeout=10)
    assert await anext(aiter(responses)) == b"first"
    responses.cancel()
    await eventually_async(lambda: service.count("Hangs", "CANCELLED") == 1, seconds=10,
                           what="the cancelled stream counted")


async def test_a_trailer_the_handler_sets_still_reaches_the_client(toy):
    _, channel = toy
    reply = channel.unary_unary(f"/{SERVICE}/Unary")(b"warn", timeout=10)
    await reply
    assert (TRAILER, "careful") in tuple(await reply.trailing_metadata())


async def test_health_checks_and_reflection_are_not_counted(toy):
    service, channel = toy
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for answer in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request])):
        assert SERVICE in [s.name for s in answer.list_services_response.service]
    counted = [sample for family in service.metrics.registry.collect() if family.name == "swl_grpc_requests"
               for sample in family.samples if sample.value]
    assert counted == []


async def test_it_runs_outside_the_services_own_interceptors_and_counts_their_refusals():
    refusing = Refusing()
    service = ToyService(inner=(refusing,))
    server = ServiceServer(service)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            error, _ = await failure(channel, "Unary", b"ok", metadata=(("x-request-id", "no-key-1"),))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED and error.details() == "no key"
            assert await call(channel, "Unary", b"ok", metadata=(("x-api-key", "key"), ("x-request-id", "k-2"))) \
                == [b"k-2"]
        # The inner interceptor's handler ran under the request id the outer one set from the header.
        assert refusing.seen_ids == ["no-key-1"]
        await counted(service, {("Unary", "UNAUTHENTICATED"): 1, ("Unary", "OK"): 1})
    finally:
        await server.stop(0)
