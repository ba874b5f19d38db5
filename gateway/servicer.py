"""The public Gateway servicer: converts messages and streams, calls the generation layer, the job API, the avatar
and upload stores, and converts back; errors are mapped to gRPC statuses by service_runtime.rpc."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from google.api import httpbody_pb2
from google.protobuf import empty_pb2
from superwav2lip.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from service_runtime.errors import DeadlineExceeded, InvalidArgument, ServiceError

from .admission import JobSlots
from .avatars import AvatarStore
from .deadline import JobDeadline
from .generation import Generation
from .job_store import TERMINAL
from .jobs import Jobs
from .limits import setting_name
from .metrics import GatewayMetrics
from .options import Progress
from .tenants import tenant_of_call
from .pipeline import LipSyncJob
from .quotas import TenantQuotas, check_stored
from .uploads import UploadStore

log = logging.getLogger(__name__)

WARNING_TRAILER = "x-swl-warning"
# Events (progress, mp4 fragments) waiting for a streaming client: a client that reads slowly holds back its own
# job rather than making the gateway keep the whole video for it.
EVENTS_QUEUED = 8


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, generation: Generation, jobs: Jobs, avatars: AvatarStore, uploads: UploadStore,
                 slots: JobSlots, quotas: TenantQuotas, metrics: GatewayMetrics, settings) -> None:
        self.generation, self.jobs, self.avatars, self.uploads = generation, jobs, avatars, uploads
        self.slots, self.quotas, self.metrics, self.settings = slots, quotas, metrics, settings
        self.limits = generation.limits

    @contextlib.asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        """One of this gateway's job slots and one of the caller's running_generations, both taken before any
        upload is read, both refused at once when none is free."""
        with self.slots.slot():
            async with self.quotas.generation(tenant_of_call()):
                yield

    def _deadline(self, context) -> JobDeadline:
        return JobDeadline(self.settings.job_deadline_s, self.settings.job_deadline_per_audio_second_s,
                           context.time_remaining())

    async def _receive(self, requests: AsyncIterator[gateway_pb2.GenerateChunk], deadline: JobDeadline,
                       progress) -> tuple[LipSyncJob, bytes, bytes]:
        """Options first, checked with the reference photo before any media is read; then the media."""
        first = await self._first(requests, "Generate")
        job = await self.generation.checked_job(caller(), first.options, deadline, progress)
        parts = await self._upload(requests, len(first.options.reference_face))
        return job, parts["face_chunk"], parts["audio_chunk"]

    async def _next(self, requests: AsyncIterator, started: float):
        """The stream's next message (None at its end), within the upload's idle and total read deadlines."""
        s = self.settings
        left = s.upload_timeout_s - (time.monotonic() - started)
        wait, setting = ((s.upload_idle_timeout_s, "upload_idle_timeout_s") if s.upload_idle_timeout_s < left
                         else (max(0.0, left), "upload_timeout_s"))
        try:
            return await asyncio.wait_for(anext(requests, None), wait)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the upload stalled: {'no message for' if setting == 'upload_idle_timeout_s' else 'not done after'} "
                f"{getattr(s, setting):g} s ({setting_name(setting)}); send the media faster, or in one message"
            ) from None

    async def _first(self, requests: AsyncIterator, rpc: str):
        first = await self._next(requests, time.monotonic())
        if first is None:
            raise InvalidArgument("the request stream was empty: send the options, then the media bytes")
        if first.WhichOneof("payload") != "options":
            raise InvalidArgument(f"the first message of {rpc} must carry the options")
        return first

    async def _upload(self, requests: AsyncIterator, received: int) -> dict[str, bytes]:
        """The media chunks of a stream, joined by kind (`face_chunk`, `audio_chunk`)."""
        parts: dict[str, list[bytes]] = {"face_chunk": [], "audio_chunk": []}
        number, started = 1, time.monotonic()
        while (chunk := await self._next(requests, started)) is not None:
            number += 1
            kind = chunk.WhichOneof("payload")
            if kind == "options":
                raise InvalidArgument("options may be sent only once, in the first message")
            if kind is None:
                raise InvalidArgument(f"message {number} carries no payload: send media bytes")
            data = getattr(chunk, kind)
            parts[kind].append(data)
            received += len(data)
            self.limits.check_upload(received)
        self.metrics.received_bytes.inc(received)
        return await asyncio.to_thread(lambda: {kind: b"".join(chunks) for kind, chunks in parts.items()})

    async def _prepared(self, options: gateway_pb2.GenerateOptions, context, progress, *media: bytes) -> LipSyncJob:
        """A job for media that arrived in one message: options and reference photo checked, upload counted."""
        job = await self.generation.checked_job(caller(), options, self._deadline(context), progress)
        received = sum(map(len, media)) + len(options.reference_face)
        self.limits.check_upload(received)
        self.metrics.received_bytes.inc(received)
        return job

    async def _events(self, job: LipSyncJob, face: bytes, audio: bytes,
                      events: asyncio.Queue) -> AsyncIterator[gateway_pb2.GenerateEvent]:
        """Progress events while the job runs, interleaved with the mp4 (fragmented) as it is encoded, then the
        result: the first video bytes leave before the last frame is made."""
        task = asyncio.create_task(self.generation.run(job, face, audio, on_video=events.put))
        sent, step = 0, self.settings.chunk_bytes
        async for update in while_running(task, events):
            if isinstance(update, bytes):
                for offset in range(0, len(update), step):
                    yield gateway_pb2.GenerateEvent(video_chunk=update[offset : offset + step])
                sent += len(update)
            else:
                yield gateway_pb2.GenerateEvent(progress=update)
        plan, _ = task.result()
        width, height = plan.face.size
        yield gateway_pb2.GenerateEvent(result=gateway_pb2.ResultInfo(
            width=width, height=height, fps=float(plan.fps), frames=plan.frames,
            audio_seconds=plan.speech.seconds, size_bytes=sent))

    async def _unary(self, options: gateway_pb2.GenerateOptions, face: bytes, audio: bytes,
                     context) -> httpbody_pb2.HttpBody:
        async with self._admitted():
            warnings: list[str] = []

            async def progress(stage: str, done: int, total: int, message: str = "") -> None:
                if message:
                    warnings.append(message)

            job = await self._prepared(options, context, progress, face, audio)
            _, mp4 = await self.generation.run(job, face, audio)
        if warnings:  # no progress stream here: warnings travel as trailers (HTTP headers through Envoy)
            context.set_trailing_metadata(tuple((WARNING_TRAILER, w) for w in warnings))
        return httpbody_pb2.HttpBody(content_type="video/mp4", data=mp4)

    async def Generate(self, request_iterator, context):
        async with self._admitted():  # before a byte of the upload is read
            events, progress = progress_queue()
            job, face, audio = await self._receive(request_iterator, self._deadline(context), progress)
            async for event in self._events(job, face, audio, events):
                yield event

    async def GenerateEvents(self, request: gateway_pb2.GenerateVideoRequest, context):
        try:
            async with self._admitted():
                events, progress = progress_queue()
                # Read once: each read of a bytes field is a fresh copy, which a whole job would hold twice.
                face, audio = request.face, request.audio
                job = await self._prepared(request.options, context, progress, face, audio)
                async for event in self._events(job, face, audio, events):
                    yield event
        except ServiceError as error:  # the HTTP status is long sent: the failure travels in-band, last
            log.warning("job failed", extra={"code": error.code.name, "error": error.message})
            yield gateway_pb2.GenerateEvent(error=gateway_pb2.Failure(
                code=error.code.value[0], status=error.code.name, message=error.message))

    async def GenerateVideo(self, request: gateway_pb2.GenerateVideoRequest, context) -> httpbody_pb2.HttpBody:
        return await self._unary(request.options, request.face, request.audio, context)

    async def UploadMedia(self, request: gateway_pb2.UploadMediaRequest, context) -> gateway_pb2.UploadMediaResponse:
        data = request.media.data
        self.limits.check_upload(len(data))
        await check_stored(self.quotas, tenant_of_call(), len(data))
        upload_id = await self.uploads.add(caller(), data)
        self.metrics.uploads_bytes.set(self.uploads.held_bytes)
        return gateway_pb2.UploadMediaResponse(upload_id=upload_id, size_bytes=len(data),
                                               expires_in_seconds=int(self.uploads.ttl_s))

    async def GenerateFromUpload(self, request: gateway_pb2.GenerateFromUploadRequest,
                                 context) -> httpbody_pb2.HttpBody:
        face = await self.uploads.get(caller(), request.face_upload_id)
        return await self._unary(request.options, face, request.audio.data, context)

    # --- Avatars ---------------------------------------------------------------------------------------------

    async def CreateAvatar(self, request_iterator, context):
        async with self._admitted():
            first = await self._first(request_iterator, "CreateAvatar")
            self.generation.options(first.options.planning)  # refused before the media is read
            parts = await self._upload(request_iterator, len(first.options.planning.reference_face))
            await check_stored(self.quotas, tenant_of_call(), len(parts["face_chunk"]))
            events, progress = progress_queue()
            task = asyncio.create_task(self.generation.create_avatar(caller(), first.options, parts["face_chunk"],
                                                                      self._deadline(context), progress))
            async for update in while_running(task, events):
                yield gateway_pb2.CreateAvatarEvent(progress=update)
            yield gateway_pb2.CreateAvatarEvent(avatar=task.result().message())

    async def CreateAvatarFromJson(self, request: gateway_pb2.CreateAvatarRequest, context) -> gateway_pb2.Avatar:
        async with self._admitted():
            self.limits.check_upload(len(request.face) + len(request.options.planning.reference_face))
            await check_stored(self.quotas, tenant_of_call(), len(request.face))
            record = await self.generation.create_avatar(caller(), request.options, request.face,
                                                         self._deadline(context), None)
        return record.message()

    async def GetAvatar(self, request: gateway_pb2.GetAvatarRequest, context) -> gateway_pb2.Avatar:
        record = await self.avatars.get(caller(), request.avatar_id)
        return record.message(await self.avatars.preview(caller(), request.avatar_id))

    async def ListAvatars(self, request: gateway_pb2.ListAvatarsRequest, context) -> gateway_pb2.ListAvatarsResponse:
        if request.page_size < 0:
            raise InvalidArgument("page_size must be positive (at most 500)")
        records, token = await self.avatars.list(caller(), request.page_size, request.page_token)
        return gateway_pb2.ListAvatarsResponse(avatars=[r.message() for r in records], next_page_token=token)

    async def DeleteAvatar(self, request: gateway_pb2.DeleteAvatarRequest, context) -> empty_pb2.Empty:
        await self.avatars.delete(caller(), request.avatar_id)
        with contextlib.suppress(ServiceError):
            self.metrics.avatars.set(await self.avatars.count())
        return empty_pb2.Empty()

    async def GenerateFromAvatar(self, request: gateway_pb2.GenerateFromAvatarRequest,
                                 context) -> httpbody_pb2.HttpBody:
        options = gateway_pb2.GenerateOptions()
        options.CopyFrom(request.options)
        options.avatar_id = request.avatar_id
        return await self._unary(options, b"", request.audio.data, context)

    # --- Asynchronous jobs -----------------------------------------------------------------------------------

    async def SubmitJob(self, request: gateway_pb2.SubmitJobRequest, context) -> gateway_pb2.Job:
        tenant = tenant_of_call()
        self.quotas.check_queued(tenant, await self.jobs.store.queued(tenant.name))
        await check_stored(self.quotas, tenant, len(request.face) + len(request.audio))
        record = await self.jobs.submit(tenant.name, request)
        return record.message(await self.jobs.store.position(record.job_id))

    async def GetJob(self, request: gateway_pb2.JobRequest, context) -> gateway_pb2.Job:
        record, position = await self.jobs.get(caller(), request.job_id)
        return record.message(position)

    async def GetJobVideo(self, request: gateway_pb2.JobRequest, context) -> httpbody_pb2.HttpBody:
        return httpbody_pb2.HttpBody(content_type="video/mp4", data=await self.jobs.video(caller(), request.job_id))

    async def DeleteJob(self, request: gateway_pb2.JobRequest, context) -> gateway_pb2.Job:
        return (await self.jobs.delete(caller(), request.job_id)).message()

    async def ListJobs(self, request: gateway_pb2.ListJobsRequest, context) -> gateway_pb2.ListJobsResponse:
        records, token = await self.jobs.recent(caller(), max(0, request.page_size), request.page_token)
        return gateway_pb2.ListJobsResponse(jobs=[r.message() for r in records], next_page_token=token)

    async def WatchJob(self, request: gateway_pb2.JobRequest, context):
        last, tenant = None, caller()
        while True:
            record, position = await self.jobs.get(tenant, request.job_id)
            message = record.message(position)
            if message != last:
                yield message
                last = message
            if record.state in TERMINAL:
                return
            await asyncio.sleep(0.25)


def caller() -> str:
    """The calling tenant's name (the tenant interceptor in gateway/auth.py sets it for every call)."""
    return tenant_of_call().name


def progress_queue() -> tuple[asyncio.Queue, Progress]:
    """A queue of progress messages and the callback a job puts them in with."""
    events: asyncio.Queue = asyncio.Queue(EVENTS_QUEUED)

    async def progress(stage: str, done: int, total: int, message: str = "") -> None:
        await events.put(gateway_pb2.Progress(stage=stage, done=done, total=total, message=message))

    return events, progress


async def while_running(task: asyncio.Task, events: asyncio.Queue) -> AsyncIterator[gateway_pb2.Progress | bytes]:
    """The progress messages (and video bytes) a task reports, until it ends (cancelled if the caller goes away)."""
    try:
        while not task.done() or not events.empty():
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
    finally:
        if not task.done():
            task.cancel()
