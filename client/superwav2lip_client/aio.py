"""The asyncio client, with the synchronous client's method names: `async with AsyncClient() as client: ...`."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from superwav2lip.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from superwav2lip.live.v1 import live_pb2, live_pb2_grpc

from .core import (CHANNEL_OPTIONS, EventDecoder, RetryPolicy, call_metadata, control_request, generate_request,
                   live_item, live_open_request, new_request_id, not_ready, options_proto, read_media, sdk_error,
                   speech_requests)
from .types import Event, FrameFormat, LiveItem, LiveReady, Media, Options, Progress, Result, SuperWav2LipError

T = TypeVar("T")


class AsyncClient:
    """The asyncio twin of `Client` (same arguments, same methods, each awaitable or an async iterator).
    Create it inside the event loop that uses it."""

    def __init__(self, address: str = "localhost:50051", *, api_key: str | None = None, timeout: float = 900,
                 retry: RetryPolicy = RetryPolicy(), metadata: Sequence[tuple[str, str]] = (),
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address, self.timeout, self.retry = address, timeout, retry
        self._api_key, self._metadata = api_key, tuple(metadata)
        self._channel = (grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS) if credentials
                         else grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._live = live_pb2_grpc.LiveStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate_events(self, face: Media | None = None, audio: Media = b"", *, avatar: str | None = None,
                              timeout: float | None = None, metadata: Sequence[tuple[str, str]] = (),
                              **options: Unpack[Options]) -> AsyncIterator[Event]:
        """Progress events in order, then the Result. Retried (per the policy) only until the first event."""
        request_id = new_request_id()
        request = generate_request(face, audio, avatar, options, request_id)
        for attempt in range(self.retry.max_attempts):
            decoder, started = EventDecoder(request_id), False
            try:
                stream = self._stub.GenerateEvents(request, timeout=timeout or self.timeout,
                                                   metadata=self._call_metadata(request_id, metadata))
                async for event in stream:
                    for item in decoder.feed(event):
                        started = True
                        yield item
                yield decoder.result()
                return
            except grpc.RpcError as rpc_error:
                error = sdk_error(rpc_error, request_id)
            except SuperWav2LipError as in_band:
                error = in_band
            if started or not self.retry.should_retry(error, attempt):
                raise error
            await asyncio.sleep(self.retry.delay(attempt))

    async def generate(self, face: Media | None = None, audio: Media = b"", *, avatar: str | None = None,
                       output: str | os.PathLike | None = None, on_progress: Callable[[Progress], None] | None = None,
                       timeout: float | None = None, metadata: Sequence[tuple[str, str]] = (),
                       **options: Unpack[Options]) -> Result:
        """As `Client.generate`."""
        async for event in self.generate_events(face, audio, avatar=avatar, timeout=timeout, metadata=metadata,
                                                **options):
            if isinstance(event, Result):
                if output is not None:
                    event.save(output)
                return event
            if on_progress is not None:
                on_progress(event)
        raise AssertionError("generate_events ends with a Result")  # pragma: no cover

    async def create_avatar(self, face: Media, *, name: str = "", timeout: float | None = None,
                            **planning: Unpack[Options]) -> gateway_pb2.Avatar:
        request_id = new_request_id()
        request = gateway_pb2.CreateAvatarRequest(options=gateway_pb2.AvatarOptions(
            name=name, planning=options_proto(planning), request_id=request_id), face=read_media(face, "face"))
        return await self._unary(self._stub.CreateAvatarFromJson, request, timeout, request_id)

    async def get_avatar(self, avatar_id: str, *, timeout: float | None = None) -> gateway_pb2.Avatar:
        return await self._unary(self._stub.GetAvatar, gateway_pb2.GetAvatarRequest(avatar_id=avatar_id), timeout)

    async def list_avatars(self, *, timeout: float | None = None) -> list[gateway_pb2.Avatar]:
        avatars: list[gateway_pb2.Avatar] = []
        token = ""
        while True:
            page = await self._unary(self._stub.ListAvatars, gateway_pb2.ListAvatarsRequest(page_token=token),
                                     timeout)
            avatars.extend(page.avatars)
            if not (token := page.next_page_token):
                return avatars

    async def delete_avatar(self, avatar_id: str, *, timeout: float | None = None) -> None:
        await self._unary(self._stub.DeleteAvatar, gateway_pb2.DeleteAvatarRequest(avatar_id=avatar_id), timeout)

    async def submit_job(self, face: Media | None = None, audio: Media = b"", *, avatar: str | None = None,
                         webhook_url: str = "", timeout: float | None = None,
                         **options: Unpack[Options]) -> gateway_pb2.Job:
        request_id = new_request_id()
        generate = generate_request(face, audio, avatar, options, request_id)
        request = gateway_pb2.SubmitJobRequest(options=generate.options, face=generate.face, audio=generate.audio,
                                               webhook_url=webhook_url)
        return await self._unary(self._stub.SubmitJob, request, timeout, request_id)

    async def get_job(self, job_id: str, *, timeout: float | None = None) -> gateway_pb2.Job:
        return await self._unary(self._stub.GetJob, gateway_pb2.JobRequest(job_id=job_id), timeout)

    async def watch_job(self, job_id: str, *, timeout: float | None = None) -> AsyncIterator[gateway_pb2.Job]:
        request_id = new_request_id()
        try:
            async for job in self._stub.WatchJob(gateway_pb2.JobRequest(job_id=job_id),
                                                 timeout=timeout or self.timeout,
                                                 metadata=self._call_metadata(request_id, ())):
                yield job
        except grpc.RpcError as error:
            raise sdk_error(error, request_id) from None

    async def wait_job(self, job_id: str, *, timeout: float | None = None) -> gateway_pb2.Job:
        last = None
        async for last in self.watch_job(job_id, timeout=timeout):
            pass
        return last if last is not None else await self.get_job(job_id)

    async def job_video(self, job_id: str, *, output: str | os.PathLike | None = None,
                        timeout: float | None = None) -> bytes:
        data = (await self._unary(self._stub.GetJobVideo, gateway_pb2.JobRequest(job_id=job_id), timeout)).data
        if output is not None:
            await asyncio.to_thread(lambda: open(output, "wb").write(data))
        return data

    async def cancel_job(self, job_id: str, *, timeout: float | None = None) -> gateway_pb2.Job:
        return await self._unary(self._stub.DeleteJob, gateway_pb2.JobRequest(job_id=job_id), timeout)

    async def list_jobs(self, *, timeout: float | None = None) -> list[gateway_pb2.Job]:
        return list((await self._unary(self._stub.ListJobs, gateway_pb2.ListJobsRequest(), timeout)).jobs)

    def live(self, avatar_id: str, *, width: int = 0, height: int = 0, format: FrameFormat | str = FrameFormat.JPEG,
             fps: float = 0.0, sample_rate: int = 16000, return_audio: bool = False, quality: int = 0,
             timeout: float | None = None, open_timeout: float = 30,
             metadata: Sequence[tuple[str, str]] = ()) -> AsyncLiveSession:
        """As `Client.live`, opened by `async with` (or `await .open()`)."""
        request = live_open_request(avatar_id, width=width, height=height, format=format, fps=fps,
                                    sample_rate=sample_rate, return_audio=return_audio, quality=quality)
        return AsyncLiveSession(self, request, timeout, open_timeout, metadata)

    async def health(self, service: str = "", *, timeout: float = 5) -> str:
        try:
            reply = await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                metadata=self._call_metadata(new_request_id(), ()))
        except grpc.RpcError as error:
            return error.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def _call_metadata(self, request_id: str, extra: Sequence[tuple[str, str]]) -> tuple:
        return call_metadata(self._api_key, request_id, (*self._metadata, *extra))

    async def _unary(self, method: Callable[..., Awaitable[T]], request, timeout: float | None,
                     request_id: str = "") -> T:
        request_id = request_id or new_request_id()
        for attempt in range(self.retry.max_attempts):
            try:
                return await method(request, timeout=timeout or self.timeout,
                                    metadata=self._call_metadata(request_id, ()))
            except grpc.RpcError as rpc_error:
                error = sdk_error(rpc_error, request_id)
            if not self.retry.should_retry(error, attempt):
                raise error
            await asyncio.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover


class AsyncLiveSession:
    """The asyncio twin of `LiveSession`: `await send(...)`, `end_utterance()`, `clear()`, `close()`, and
    `async for item in session`. Send from one task while another iterates. Leaving the `async with` block ends
    the session at once unless it has ended; to play out what was sent, `close()` and iterate to the end."""

    def __init__(self, client: AsyncClient, open_request: live_pb2.LiveRequest, timeout: float | None,
                 open_timeout: float, metadata: Sequence[tuple[str, str]]) -> None:
        self._client, self._open_request = client, open_request
        self._timeout, self._open_timeout, self._metadata = timeout, open_timeout, tuple(metadata)
        self.sample_rate: int = open_request.open.sample_rate
        self.request_id = new_request_id()
        self._ready: LiveReady | None = None
        self.sent_at: list[float] = []  # time.monotonic() when chunk n + 1 went to gRPC (LiveFrame.speech_chunk)
        self._write_lock = asyncio.Lock()  # grpc.aio takes one write at a time
        self._call: Any = None
        self._closed = self._cancelled = self._finished = False

    @property
    def ready(self) -> LiveReady:
        if self._ready is None:
            raise ValueError("the live session is not open: use it in an `async with` block or await open()")
        return self._ready

    async def __aenter__(self) -> AsyncLiveSession:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._call is not None and not self._call.done():
            self.cancel()

    async def open(self) -> LiveReady:
        """Opens the session and waits for its terms; refusals before that are retried per the client's policy."""
        retry = self._client.retry
        for attempt in range(retry.max_attempts):
            try:
                return await self._open_once()
            except SuperWav2LipError as error:
                if not retry.should_retry(error, attempt):
                    raise
            await asyncio.sleep(retry.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _open_once(self) -> LiveReady:
        self._call = self._client._live.Session(
            timeout=self._timeout, metadata=self._client._call_metadata(self.request_id, self._metadata))
        self._closed = self._cancelled = self._finished = False
        self.sent_at, self._chunks = [], 0
        try:
            async with asyncio.timeout(self._open_timeout):
                await self._call.write(self._open_request)
                first = await self._call.read()
        except TimeoutError:
            self.cancel()
            raise SuperWav2LipError(grpc.StatusCode.DEADLINE_EXCEEDED, f"the gateway did not answer the live "
                                    f"session's open within {self._open_timeout:g} s", self.request_id) from None
        except (grpc.RpcError, asyncio.InvalidStateError):
            raise await self._ended_error() from None
        item = None if first is grpc.aio.EOF else live_item(first, time.monotonic())
        if not isinstance(item, LiveReady):
            self.cancel()
            raise not_ready(item, self.request_id)
        self._ready = item
        return item

    # ---- sending

    async def send(self, pcm: Any) -> range:
        """As `LiveSession.send`: waits while the gateway holds its most speech (HTTP/2 flow control)."""
        chunks = speech_requests(pcm, self.sample_rate)
        async with self._write_lock:
            first = self._chunks + 1
            for message in chunks:
                self.sent_at.append(time.monotonic())
                await self._write(message)
                self._chunks += 1
        return range(first, first + len(chunks))

    async def end_utterance(self) -> None:
        async with self._write_lock:
            await self._write(control_request("end_utterance"))

    async def clear(self) -> None:
        async with self._write_lock:
            await self._write(control_request("clear"))

    async def close(self) -> None:
        """Ends the session after what was sent has played; keep iterating to receive it."""
        async with self._write_lock:
            if self._closed or self._call.done():
                self._closed = True
                return
            await self._write(control_request("close"))
            await self._call.done_writing()
            self._closed = True

    def cancel(self) -> None:
        """Ends the session now, dropping whatever has not been received."""
        self._cancelled = self._closed = True
        if self._call is not None:
            self._call.cancel()

    async def _write(self, message: live_pb2.LiveRequest) -> None:
        if self._closed:
            raise ValueError("the live session is closed: open another to send more")
        if self._call is None:
            raise ValueError("the live session is not open: use it in an `async with` block or await open()")
        try:
            await self._call.write(message)
        except (grpc.RpcError, asyncio.InvalidStateError):
            raise await self._ended_error() from None

    async def _ended_error(self) -> Exception:
        """The call's status once it has ended, as the SDK's error (the server's, not grpc's own)."""
        code = await self._call.code()
        if code == grpc.StatusCode.OK:
            return ValueError("the live session has ended")
        return SuperWav2LipError(code, await self._call.details() or "", self.request_id)

    # ---- receiving

    def __aiter__(self) -> AsyncIterator[LiveItem]:
        return self

    async def __anext__(self) -> LiveItem:
        if self._ready is None:
            raise ValueError("the live session is not open: use it in an `async with` block or await open()")
        while not self._finished:
            try:
                response = await self._call.read()
            except asyncio.CancelledError:
                if not self._cancelled:
                    raise
                break
            except grpc.RpcError as error:
                self._finished = True
                if self._cancelled:
                    break
                raise sdk_error(error, self.request_id) from None
            if response is grpc.aio.EOF:
                break
            item = live_item(response, time.monotonic())
            if item is not None and not isinstance(item, LiveReady):
                return item
        self._finished = True
        raise StopAsyncIteration
