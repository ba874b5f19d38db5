"""The synchronous client: `with Client("localhost:50051") as client: client.generate("face.mp4", "speech.wav")`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from superwav2lip.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from .core import (CHANNEL_OPTIONS, EventDecoder, RetryPolicy, call_metadata, generate_request,
                   new_request_id, options_proto, read_media, sdk_error)
from .types import Event, Media, Options, Progress, Result, SuperWav2LipError

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
