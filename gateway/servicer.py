"""The public Gateway servicer: streaming and one-shot generation over the pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from google.api import httpbody_pb2
from superwav2lip.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from service_runtime.errors import InvalidArgument, ServiceError
from service_runtime.logs import request_id_var
from service_runtime.rpc import checked_request_id, grpc_method, grpc_stream_method

from .admission import JobSlots
from .clients import ModelClients
from .deadline import JobDeadline
from .limits import MediaLimits
from .metrics import GatewayMetrics
from .options import JobOptions
from .pipeline import LipSyncJob, Progress
from .uploads import UploadStore

log = logging.getLogger(__name__)

WARNING_TRAILER = "x-swl-warning"


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, clients: ModelClients, metrics: GatewayMetrics, settings) -> None:
        self.clients, self.metrics, self.settings = clients, metrics, settings
        self.limits = MediaLimits.from_settings(settings)
        self.slots = JobSlots(settings.max_concurrent_jobs)
        self.uploads = UploadStore(settings.upload_store_mb << 20, settings.upload_ttl_s)
        self._serial = asyncio.Lock() if settings.serial_jobs else contextlib.nullcontext()

    def _deadline(self, context) -> JobDeadline:
        return JobDeadline(self.settings.job_deadline_s, self.settings.job_deadline_per_audio_second_s,
                           context.time_remaining())

    def _job(self, message: gateway_pb2.GenerateOptions, deadline: JobDeadline, progress=None) -> LipSyncJob:
        """Validates the options (request id first: it goes into every log line and model call)."""
        if message.request_id:
            request_id_var.set(checked_request_id(message.request_id, "options.request_id"))
        return LipSyncJob(self.clients, JobOptions.from_proto(message), self.metrics,
                          chunk_frames=self.settings.chunk_frames, limits=self.limits, deadline=deadline,
                          progress=progress)

    async def _receive(self, requests: AsyncIterator[gateway_pb2.GenerateChunk], deadline: JobDeadline,
                       progress) -> tuple[LipSyncJob, bytes, bytes]:
        """Options first, checked with the reference photo before any media is read; then the media."""
        first = await anext(requests, None)
        if first is None:
            raise InvalidArgument("the request stream was empty: send the options, then the face and audio bytes")
        if first.WhichOneof("payload") != "options":
            raise InvalidArgument("the first message of Generate must carry the options")
        job = self._job(first.options, deadline, progress)
        async with deadline.enforced():
            await job.prepare_reference()
        face, audio = await self._upload(requests, len(first.options.reference_face))
        return job, face, audio

    async def _upload(self, requests: AsyncIterator[gateway_pb2.GenerateChunk], received: int) -> tuple[bytes, bytes]:
        parts: dict[str, list[bytes]] = {"face_chunk": [], "audio_chunk": []}
        number = 1
        async for chunk in requests:
            number += 1
            kind = chunk.WhichOneof("payload")
            if kind == "options":
                raise InvalidArgument("options may be sent only once, in the first message")
            if kind is None:
                raise InvalidArgument(f"message {number} of Generate carries no payload: send face_chunk or "
                                      "audio_chunk bytes")
            data = getattr(chunk, kind)
            parts[kind].append(data)
            received += len(data)
            self.limits.check_upload(received)
        self.metrics.received_bytes.inc(received)
        return await asyncio.to_thread(lambda: (b"".join(parts["face_chunk"]), b"".join(parts["audio_chunk"])))

    async def _run(self, job: LipSyncJob, face: bytes, audio: bytes):
        self.metrics.inflight.inc()
        code = "OK"
        started = time.perf_counter()
        log.info("job started", extra={"face_bytes": len(face), "audio_bytes": len(audio),
                                       "crop_mode": job.options.crop_mode, "enhance": job.options.enhance})
        try:
            async with job.deadline.enforced(), self._serial:
                return await job.render(face, audio)
        except ServiceError as error:
            code = error.code.name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            self.metrics.inflight.dec()
            self.metrics.jobs.labels(code).inc()
            log.info("job finished", extra={"code": code, "seconds": round(time.perf_counter() - started, 3)})

    async def _prepared(self, options: gateway_pb2.GenerateOptions, context, progress, *media: bytes) -> LipSyncJob:
        """A job for media that arrived in one message: options and reference photo checked, upload counted."""
        deadline = self._deadline(context)
        job = self._job(options, deadline, progress)
        async with deadline.enforced():
            await job.prepare_reference()
        received = sum(map(len, media)) + len(options.reference_face)
        self.limits.check_upload(received)
        self.metrics.received_bytes.inc(received)
        return job

    async def _events(self, job: LipSyncJob, face: bytes, audio: bytes,
                      events: asyncio.Queue) -> AsyncIterator[gateway_pb2.GenerateEvent]:
        """Progress events while the job runs, then its result and the mp4 in chunks."""
        task = asyncio.create_task(self._run(job, face, audio))
        try:
            while not task.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            plan, mp4 = task.result()
        finally:
            task.cancel()
        width, height = plan.source.size
        yield gateway_pb2.GenerateEvent(result=gateway_pb2.ResultInfo(
            width=width, height=height, fps=float(plan.fps), frames=plan.frames,
            audio_seconds=plan.speech.seconds, size_bytes=len(mp4)))
        step = self.settings.chunk_bytes
        for offset in range(0, len(mp4), step):
            yield gateway_pb2.GenerateEvent(video_chunk=mp4[offset : offset + step])

    async def _unary(self, options: gateway_pb2.GenerateOptions, face: bytes, audio: bytes,
                     context) -> httpbody_pb2.HttpBody:
        with self.slots.slot():
            warnings: list[str] = []

            async def progress(stage: str, done: int, total: int, message: str = "") -> None:
                if message:
                    warnings.append(message)

            job = await self._prepared(options, context, progress, face, audio)
            _, mp4 = await self._run(job, face, audio)
        if warnings:  # no progress stream here: warnings travel as trailers (HTTP headers through Envoy)
            context.set_trailing_metadata(tuple((WARNING_TRAILER, w) for w in warnings))
        return httpbody_pb2.HttpBody(content_type="video/mp4", data=mp4)

    @grpc_stream_method()
    async def Generate(self, request_iterator, context):
        with self.slots.slot():  # before a byte of the upload is read
            events, progress = progress_queue()
            job, face, audio = await self._receive(request_iterator, self._deadline(context), progress)
            async for event in self._events(job, face, audio, events):
                yield event

    @grpc_stream_method()
    async def GenerateEvents(self, request: gateway_pb2.GenerateVideoRequest, context):
        try:
            with self.slots.slot():
                events, progress = progress_queue()
                job = await self._prepared(request.options, context, progress, request.face, request.audio)
                async for event in self._events(job, request.face, request.audio, events):
                    yield event
        except ServiceError as error:  # the HTTP status is long sent: the failure travels in-band, last
            log.warning("job failed", extra={"code": error.code.name, "error": error.message})
            yield gateway_pb2.GenerateEvent(error=gateway_pb2.Failure(
                code=error.code.value[0], status=error.code.name, message=error.message))

    @grpc_method()
    async def GenerateVideo(self, request: gateway_pb2.GenerateVideoRequest, context) -> httpbody_pb2.HttpBody:
        return await self._unary(request.options, request.face, request.audio, context)

    @grpc_method()
    async def UploadMedia(self, request: gateway_pb2.UploadMediaRequest, context) -> gateway_pb2.UploadMediaResponse:
        data = request.media.data
        self.limits.check_upload(len(data))
        upload_id = self.uploads.add(data)
        self.metrics.uploads_bytes.set(self.uploads.size_bytes)
        return gateway_pb2.UploadMediaResponse(upload_id=upload_id, size_bytes=len(data),
                                               expires_in_seconds=int(self.uploads.ttl_s))

    @grpc_method()
    async def GenerateFromUpload(self, request: gateway_pb2.GenerateFromUploadRequest,
                                 context) -> httpbody_pb2.HttpBody:
        face = self.uploads.get(request.face_upload_id)
        return await self._unary(request.options, face, request.audio.data, context)


def progress_queue() -> tuple[asyncio.Queue, Progress]:
    """A queue of progress events and the callback a job puts them in with."""
    events: asyncio.Queue = asyncio.Queue()

    async def progress(stage: str, done: int, total: int, message: str = "") -> None:
        await events.put(gateway_pb2.GenerateEvent(
            progress=gateway_pb2.Progress(stage=stage, done=done, total=total, message=message)))

    return events, progress
