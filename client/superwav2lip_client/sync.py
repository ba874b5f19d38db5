"""The synchronous client: `with Client("localhost:50051") as client: client.generate("face.mp4", "speech.wav")`."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from superwav2lip.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from superwav2lip.live.v1 import live_pb2, live_pb2_grpc

from .core import (CHANNEL_OPTIONS, EventDecoder, RetryPolicy, call_metadata, control_request, generate_request,
                   live_item, live_open_request, new_request_id, not_ready, options_proto, read_media, sdk_error,
                   speech_requests)
from .types import (Event, FrameFormat, LiveItem, LiveReady, Media, Options, Progress, Result,
                    SuperWav2LipError)

T = TypeVar("T")


class Client:
    """One channel to the gateway (or to Envoy, which speaks native gRPC on the same port).

    api_key: sent as `x-api-key`; default: the SUPERWAV2LIP_API_KEY environment variable.
    timeout: seconds per call unless a method is given its own.
    retry: the RetryPolicy for UNAVAILABLE and RESOURCE_EXHAUSTED (NO_RETRY turns retries off).
    metadata: extra (key, value) pairs sent with every call.
    credentials: grpc.ssl_channel_credentials(...) for TLS; plaintext without.
    """

    def __init__(self, address: str = "localhost:50051", *, api_key: str | None = None, timeout: float = 900,
                 retry: RetryPolicy = RetryPolicy(), metadata: Sequence[tuple[str, str]] = (),
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address, self.timeout, self.retry = address, timeout, retry
        self._api_key, self._metadata = api_key, tuple(metadata)
        self._channel = (grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS) if credentials
                         else grpc.insecure_channel(address, options=CHANNEL_OPTIONS))
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._live = live_pb2_grpc.LiveStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # ---- generation

    def generate_events(self, face: Media | None = None, audio: Media = b"", *, avatar: str | None = None,
                        timeout: float | None = None, metadata: Sequence[tuple[str, str]] = (),
                        **options: Unpack[Options]) -> Iterator[Event]:
        """Progress events in order, then the Result. Retried (per the policy) only until the first event."""
        request_id = new_request_id()
        request = generate_request(face, audio, avatar, options, request_id)
        for attempt in range(self.retry.max_attempts):
            decoder, started = EventDecoder(request_id), False
            try:
                stream = self._stub.GenerateEvents(request, timeout=timeout or self.timeout,
                                                   metadata=self._call_metadata(request_id, metadata))
                for event in stream:
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
            time.sleep(self.retry.delay(attempt))

    def generate(self, face: Media | None = None, audio: Media = b"", *, avatar: str | None = None,
                 output: str | os.PathLike | None = None, on_progress: Callable[[Progress], None] | None = None,
                 timeout: float | None = None, metadata: Sequence[tuple[str, str]] = (),
                 **options: Unpack[Options]) -> Result:
        """Lip-syncs `face` (video or photo; or `avatar=<id>`) to `audio`; returns the Result and, with
        `output`, writes the mp4 there too."""
        for event in self.generate_events(face, audio, avatar=avatar, timeout=timeout, metadata=metadata, **options):
            if isinstance(event, Result):
                if output is not None:
                    event.save(output)
                return event
            if on_progress is not None:
                on_progress(event)
        raise AssertionError("generate_events ends with a Result")  # pragma: no cover

    # ---- avatars

    def create_avatar(self, face: Media, *, name: str = "", timeout: float | None = None,
                      **planning: Unpack[Options]) -> gateway_pb2.Avatar:
        """Plans the face media once on the server and keeps it; use the returned `avatar_id` with `avatar=`."""
        request_id = new_request_id()
        request = gateway_pb2.CreateAvatarRequest(options=gateway_pb2.AvatarOptions(
            name=name, planning=options_proto(planning), request_id=request_id), face=read_media(face, "face"))
        return self._unary(self._stub.CreateAvatarFromJson, request, timeout, request_id)

    def get_avatar(self, avatar_id: str, *, timeout: float | None = None) -> gateway_pb2.Avatar:
        return self._unary(self._stub.GetAvatar, gateway_pb2.GetAvatarRequest(avatar_id=avatar_id), timeout)

    def list_avatars(self, *, timeout: float | None = None) -> list[gateway_pb2.Avatar]:
        """Every avatar, newest first (all pages)."""
        avatars: list[gateway_pb2.Avatar] = []
        token = ""
        while True:
            page = self._unary(self._stub.ListAvatars, gateway_pb2.ListAvatarsRequest(page_token=token), timeout)
            avatars.extend(page.avatars)
            if not (token := page.next_page_token):
                return avatars

    def delete_avatar(self, avatar_id: str, *, timeout: float | None = None) -> None:
        self._unary(self._stub.DeleteAvatar, gateway_pb2.DeleteAvatarRequest(avatar_id=avatar_id), timeout)

    # ---- asynchronous jobs

    def submit_job(self, face: Media | None = None, audio: Media = b"", *, avatar: str | None = None,
                   webhook_url: str = "", timeout: float | None = None, **options: Unpack[Options]) -> gateway_pb2.Job:
        """Queues a job and returns it (QUEUED); follow it with `wait_job` or `get_job`."""
        request_id = new_request_id()
        generate = generate_request(face, audio, avatar, options, request_id)
        request = gateway_pb2.SubmitJobRequest(options=generate.options, face=generate.face, audio=generate.audio,
                                               webhook_url=webhook_url)
        return self._unary(self._stub.SubmitJob, request, timeout, request_id)

    def get_job(self, job_id: str, *, timeout: float | None = None) -> gateway_pb2.Job:
        return self._unary(self._stub.GetJob, gateway_pb2.JobRequest(job_id=job_id), timeout)

    def watch_job(self, job_id: str, *, timeout: float | None = None) -> Iterator[gateway_pb2.Job]:
        """The job each time it changes, until it ends."""
        request_id = new_request_id()
        try:
            yield from self._stub.WatchJob(gateway_pb2.JobRequest(job_id=job_id), timeout=timeout or self.timeout,
                                           metadata=self._call_metadata(request_id, ()))
        except grpc.RpcError as error:
            raise sdk_error(error, request_id) from None

    def wait_job(self, job_id: str, *, timeout: float | None = None) -> gateway_pb2.Job:
        """Blocks until the job ends; returns its last state."""
        last = None
        for last in self.watch_job(job_id, timeout=timeout):
            pass
        return last if last is not None else self.get_job(job_id)

    def job_video(self, job_id: str, *, output: str | os.PathLike | None = None,
                  timeout: float | None = None) -> bytes:
        data = self._unary(self._stub.GetJobVideo, gateway_pb2.JobRequest(job_id=job_id), timeout).data
        if output is not None:
            with open(output, "wb") as handle:
                handle.write(data)
        return data

    def cancel_job(self, job_id: str, *, timeout: float | None = None) -> gateway_pb2.Job:
        """Cancels a queued or running job, or removes a finished one."""
        return self._unary(self._stub.DeleteJob, gateway_pb2.JobRequest(job_id=job_id), timeout)

    def list_jobs(self, *, timeout: float | None = None) -> list[gateway_pb2.Job]:
        return list(self._unary(self._stub.ListJobs, gateway_pb2.ListJobsRequest(), timeout).jobs)

    # ---- live sessions

    def live(self, avatar_id: str, *, width: int = 0, height: int = 0, format: FrameFormat | str = FrameFormat.JPEG,
             fps: float = 0.0, sample_rate: int = 16000, return_audio: bool = False, quality: int = 0,
             timeout: float | None = None, open_timeout: float = 30,
             metadata: Sequence[tuple[str, str]] = ()) -> LiveSession:
        """A live session with the avatar, opened by `with` (or `.open()`): send PCM16 mono speech at
        `sample_rate`, iterate over frames and events. 0 for width/height/fps keeps the avatar's. `timeout`
        bounds the whole session (default none: the gateway's SWL_GATEWAY_LIVE_MAX_SESSION_S does)."""
        request = live_open_request(avatar_id, width=width, height=height, format=format, fps=fps,
                                    sample_rate=sample_rate, return_audio=return_audio, quality=quality)
        return LiveSession(self, request, timeout, open_timeout, metadata)

    # ---- health

    def health(self, service: str = "", *, timeout: float = 5) -> str:
        """The gateway's health status name: SERVING, NOT_SERVING, or the error code when unreachable."""
        try:
            reply = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                metadata=self._call_metadata(new_request_id(), ()))
        except grpc.RpcError as error:
            return error.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    # ---- plumbing

    def _call_metadata(self, request_id: str, extra: Sequence[tuple[str, str]]) -> tuple:
        return call_metadata(self._api_key, request_id, (*self._metadata, *extra))

    def _unary(self, method: Callable[..., T], request, timeout: float | None, request_id: str = "") -> T:
        request_id = request_id or new_request_id()
        retry = self.retry
        for attempt in range(retry.max_attempts):
            try:
                return method(request, timeout=timeout or self.timeout,
                              metadata=self._call_metadata(request_id, ()))
            except grpc.RpcError as rpc_error:
                error = sdk_error(rpc_error, request_id)
            if not retry.should_retry(error, attempt):
                raise error
            time.sleep(retry.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover


SEND_QUEUE = 8  # speech chunks waiting for gRPC: past it send() blocks (the gateway's flow control reaches the caller)
RECEIVE_QUEUE = 100  # items not yet iterated: past it the reader waits, and the gateway drops frames for this client
_END = object()  # the call ended without an error


class LiveSession:
    """A live session from `Client.live`: `send` speech, `end_utterance`, `clear`, `close`; iterate for LiveFrame
    and LiveEvent items. Safe across threads: one may send while another iterates. Leaving the `with` block ends
    the session at once unless it has ended; to play out what was sent, `close()` and iterate to the end."""

    def __init__(self, client: Client, open_request: live_pb2.LiveRequest, timeout: float | None,
                 open_timeout: float, metadata: Sequence[tuple[str, str]]) -> None:
        self._client, self._open_request = client, open_request
        self._timeout, self._open_timeout, self._metadata = timeout, open_timeout, tuple(metadata)
        self.sample_rate: int = open_request.open.sample_rate
        self.request_id = new_request_id()
        self._ready: LiveReady | None = None
        self.sent_at: list[float] = []  # time.monotonic() when chunk n + 1 went to gRPC (LiveFrame.speech_chunk)
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._requests: queue.Queue = queue.Queue(SEND_QUEUE)
        self._items: queue.Queue = queue.Queue(RECEIVE_QUEUE)
        self._ended = threading.Event()
        self._closed = self._cancelled = self._finished = False
        self._error: SuperWav2LipError | None = None
        self._call: Any = None
        self._reader: threading.Thread | None = None
        self._chunks = 0
        self.sent_at.clear()

    @property
    def ready(self) -> LiveReady:
        if self._ready is None:
            raise ValueError("the live session is not open: use it in a `with` block or call open()")
        return self._ready

    def __enter__(self) -> LiveSession:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._ended.is_set():
            self.cancel()
        if self._reader is not None:
            self._reader.join(timeout=5)

    def open(self) -> LiveReady:
        """Opens the session and waits for its terms; refusals before that are retried per the client's policy."""
        retry = self._client.retry
        for attempt in range(retry.max_attempts):
            try:
                return self._open_once()
            except SuperWav2LipError as error:
                if not retry.should_retry(error, attempt):
                    raise
            time.sleep(retry.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _open_once(self) -> LiveReady:
        self._reset()
        requests, items = self._requests, self._items
        self._call = self._client._live.Session(
            self._request_stream(requests), timeout=self._timeout,
            metadata=self._client._call_metadata(self.request_id, self._metadata))
        self._reader = threading.Thread(target=self._read, args=(self._call, requests, items), daemon=True,
                                        name=f"live-reader-{self.request_id[:8]}")
        self._reader.start()
        try:
            first = items.get(timeout=self._open_timeout)
        except queue.Empty:
            self.cancel()
            raise SuperWav2LipError(grpc.StatusCode.DEADLINE_EXCEEDED, f"the gateway did not answer the live "
                                    f"session's open within {self._open_timeout:g} s", self.request_id) from None
        if isinstance(first, SuperWav2LipError):
            raise first
        if not isinstance(first, LiveReady):
            self.cancel()
            raise not_ready(first, self.request_id)
        self._ready = first
        return first

    # ---- sending

    def send(self, pcm: Any) -> range:
        """Sends PCM16 mono speech (bytes or an int16 array) in chunks of at most 200 ms; returns the chunks'
        numbers (as LiveFrame.speech_chunk counts them). Blocks while the gateway holds its most speech."""
        chunks = speech_requests(pcm, self.sample_rate)
        with self._lock:
            first = self._chunks + 1
            for message in chunks:
                self._put(message)
                self._chunks += 1
        return range(first, first + len(chunks))

    def end_utterance(self) -> None:
        """The speech sent so far is the whole utterance: play it to its end, then idle."""
        with self._lock:
            self._put(control_request("end_utterance"))

    def clear(self) -> None:
        """Barge-in: drop every frame and sample not yet shown and return to idle at once."""
        with self._lock:
            self._put(control_request("clear"))

    def close(self) -> None:
        """Ends the session after what was sent has played; keep iterating to receive it."""
        with self._lock:
            if self._closed or self._ended.is_set():
                self._closed = True
                return
            self._put(control_request("close"))
            self._put(None)
            self._closed = True

    def cancel(self) -> None:
        """Ends the session now, dropping whatever has not been received."""
        self._cancelled = self._closed = True
        if self._call is not None:
            self._call.cancel()
        _replace_all(self._requests, None)

    def _put(self, message: live_pb2.LiveRequest | None) -> None:
        if self._closed:
            raise ValueError("the live session is closed: open another to send more")
        while True:
            if self._ended.is_set():
                raise self._error or ValueError("the live session has ended")
            try:
                self._requests.put(message, timeout=0.1)
                return
            except queue.Full:
                continue

    def _request_stream(self, requests: queue.Queue) -> Iterator[live_pb2.LiveRequest]:
        yield self._open_request
        while (message := requests.get()) is not None:
            if message.WhichOneof("kind") == "speech":
                self.sent_at.append(time.monotonic())
            yield message

    # ---- receiving

    def __iter__(self) -> Iterator[LiveItem]:
        return self

    def __next__(self) -> LiveItem:
        if self._ready is None:
            raise ValueError("the live session is not open: use it in a `with` block or call open()")
        while not self._finished:
            try:
                item = self._items.get(timeout=0.2)
            except queue.Empty:
                if self._cancelled and self._ended.is_set():
                    break
                continue
            if isinstance(item, SuperWav2LipError):
                self._finished = True
                raise item
            if item is _END:
                self._finished = True
                break
            return item
        raise StopIteration

    def _read(self, call: Any, requests: queue.Queue, items: queue.Queue) -> None:
        """The reader thread: the gateway's messages, typed, into `items`; then how the call ended."""
        outcome: object = _END
        try:
            for response in call:
                item = live_item(response, time.monotonic())
                if item is not None and not self._offer(items, item):
                    return
        except grpc.RpcError as error:
            if not self._cancelled:
                outcome = self._error = sdk_error(error, self.request_id)
        finally:
            self._ended.set()
            _replace_all(requests, None)  # wakes gRPC's request thread, which would wait for ever
            self._offer(items, outcome)

    def _offer(self, items: queue.Queue, item: object) -> bool:
        """Queues an item unless the session is cancelled while the queue is full."""
        while not self._cancelled:
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


def _replace_all(requests: queue.Queue, last: None) -> None:
    """Empties the queue and puts `last` (None: the end of the request stream) without blocking."""
    while True:
        try:
            requests.put_nowait(last)
            return
        except queue.Full:
            try:
                requests.get_nowait()
            except queue.Empty:
                pass
