"""A small synchronous SDK over the gateway: streaming generation and avatars."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from superwav2lip.gateway.v1 import gateway_pb2, gateway_pb2_grpc

UPLOAD_CHUNK = 1 << 20


class GenerationError(Exception):
    """The gateway refused or failed a job; `code` is the gRPC status code, `message` says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


@dataclass(frozen=True)
class GenerationResult:
    mp4: bytes
    info: gateway_pb2.ResultInfo


def _read(source: bytes | str | Path) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def _chunks(options: gateway_pb2.GenerateOptions, face: bytes, audio: bytes) -> Iterator[gateway_pb2.GenerateChunk]:
    yield gateway_pb2.GenerateChunk(options=options)
    for offset in range(0, len(face), UPLOAD_CHUNK):
        yield gateway_pb2.GenerateChunk(face_chunk=face[offset : offset + UPLOAD_CHUNK])
    for offset in range(0, len(audio), UPLOAD_CHUNK):
        yield gateway_pb2.GenerateChunk(audio_chunk=audio[offset : offset + UPLOAD_CHUNK])


class GatewayClient:
    """`with GatewayClient("localhost:50051") as client: client.generate(face, audio)`."""

    def __init__(self, address: str = "localhost:50051") -> None:
        self.address = address
        self._channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def __enter__(self) -> "GatewayClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, face: bytes | str | Path | None, audio: bytes | str | Path,
                 options: gateway_pb2.GenerateOptions | None = None, *,
                 on_progress: Callable[[gateway_pb2.Progress], None] | None = None,
                 timeout: float | None = None) -> GenerationResult:
        """Uploads in chunks, reports progress, and returns the mp4 with its description. With
        `options.avatar_id` set, pass `face=None`: the avatar's media is used."""
        face_bytes = b"" if face is None else _read(face)
        stream = self._stub.Generate(_chunks(options or gateway_pb2.GenerateOptions(), face_bytes, _read(audio)),
                                     timeout=timeout)
        info, parts = None, []
        try:
            for event in stream:
                kind = event.WhichOneof("event")
                if kind == "progress" and on_progress:
                    on_progress(event.progress)
                elif kind == "result":
                    info = event.result
                elif kind == "video_chunk":
                    parts.append(event.video_chunk)
        except grpc.RpcError as error:
            raise GenerationError(error.code(), error.details()) from None
        if info is None:
            raise GenerationError(grpc.StatusCode.INTERNAL, "the gateway closed the stream without a result")
        return GenerationResult(b"".join(parts), info)


    def create_avatar(self, face: bytes | str | Path, planning: gateway_pb2.GenerateOptions | None = None, *,
                      name: str = "", on_progress: Callable[[gateway_pb2.Progress], None] | None = None,
                      timeout: float | None = None) -> gateway_pb2.Avatar:
        """Plans the face media once on the server and keeps it; returns the avatar (its id for later jobs)."""
        data = _read(face)
        first = gateway_pb2.CreateAvatarChunk(options=gateway_pb2.AvatarOptions(
            name=name, planning=planning or gateway_pb2.GenerateOptions()))
        chunks = [first, *(gateway_pb2.CreateAvatarChunk(face_chunk=data[i : i + UPLOAD_CHUNK])
                           for i in range(0, len(data), UPLOAD_CHUNK))]
        try:
            for event in self._stub.CreateAvatar(iter(chunks), timeout=timeout):
                if event.WhichOneof("event") == "progress" and on_progress:
                    on_progress(event.progress)
                elif event.WhichOneof("event") == "avatar":
                    return event.avatar
        except grpc.RpcError as error:
            raise GenerationError(error.code(), error.details()) from None
        raise GenerationError(grpc.StatusCode.INTERNAL, "the gateway closed the stream without an avatar")

    def list_avatars(self, timeout: float | None = 30) -> list[gateway_pb2.Avatar]:
        """Every avatar, newest first (all pages)."""
        avatars, token = [], ""
        while True:
            page = self._unary(self._stub.ListAvatars, gateway_pb2.ListAvatarsRequest(page_token=token), timeout)
            avatars.extend(page.avatars)
            if not (token := page.next_page_token):
                return avatars

    def get_avatar(self, avatar_id: str, timeout: float | None = 30) -> gateway_pb2.Avatar:
        return self._unary(self._stub.GetAvatar, gateway_pb2.GetAvatarRequest(avatar_id=avatar_id), timeout)

    def delete_avatar(self, avatar_id: str, timeout: float | None = 30) -> None:
        self._unary(self._stub.DeleteAvatar, gateway_pb2.DeleteAvatarRequest(avatar_id=avatar_id), timeout)

    def submit_job(self, face: bytes | str | Path | None, audio: bytes | str | Path,
                   options: gateway_pb2.GenerateOptions | None = None, *, webhook_url: str = "",
                   timeout: float | None = 300) -> gateway_pb2.Job:
        """Queues a job (face media, or `options.avatar_id` with `face=None`); returns it, QUEUED."""
        request = gateway_pb2.SubmitJobRequest(options=options or gateway_pb2.GenerateOptions(),
                                               face=b"" if face is None else _read(face), audio=_read(audio),
                                               webhook_url=webhook_url)
        return self._unary(self._stub.SubmitJob, request, timeout)

    def get_job(self, job_id: str, timeout: float | None = 30) -> gateway_pb2.Job:
        return self._unary(self._stub.GetJob, gateway_pb2.JobRequest(job_id=job_id), timeout)

    def watch_job(self, job_id: str, timeout: float | None = None) -> Iterator[gateway_pb2.Job]:
        """The job each time it changes, until it ends."""
        try:
            yield from self._stub.WatchJob(gateway_pb2.JobRequest(job_id=job_id), timeout=timeout)
        except grpc.RpcError as error:
            raise GenerationError(error.code(), error.details()) from None

    def job_video(self, job_id: str, timeout: float | None = 300) -> bytes:
        return self._unary(self._stub.GetJobVideo, gateway_pb2.JobRequest(job_id=job_id), timeout).data

    def cancel_job(self, job_id: str, timeout: float | None = 30) -> gateway_pb2.Job:
        """Cancels a queued or running job, or removes a finished one."""
        return self._unary(self._stub.DeleteJob, gateway_pb2.JobRequest(job_id=job_id), timeout)

    def list_jobs(self, timeout: float | None = 30) -> list[gateway_pb2.Job]:
        return list(self._unary(self._stub.ListJobs, gateway_pb2.ListJobsRequest(), timeout).jobs)

    @staticmethod
    def _unary(method, request, timeout):
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as error:
            raise GenerationError(error.code(), error.details()) from None


def health(address: str, service: str = "", timeout: float = 3.0) -> str:
    """The health status name of one server (SERVING, NOT_SERVING, or UNAVAILABLE when unreachable)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
