"""The public Gateway servicer: streaming and one-shot generation over the pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from google.api import httpbody_pb2
from superwav2lip.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from service_runtime.errors import InvalidArgument, ResourceExhausted, ServiceError
from service_runtime.logs import request_id_var
from service_runtime.rpc import grpc_method, grpc_stream_method

from .clients import ModelClients
from .metrics import GatewayMetrics
from .options import JobOptions
from .pipeline import LipSyncJob

log = logging.getLogger(__name__)

WARNING_TRAILER = "x-swl-warning"


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, clients: ModelClients, metrics: GatewayMetrics, settings) -> None:
        self.clients, self.metrics, self.settings = clients, metrics, settings
        self._serial = asyncio.Lock() if settings.serial_jobs else contextlib.nullcontext()

    def _job(self, options: JobOptions, context, progress=None) -> LipSyncJob:
        return LipSyncJob(self.clients, options, self.metrics, chunk_frames=self.settings.chunk_frames,
                          max_seconds=self.settings.max_audio_seconds, progress=progress,
                          timeout=context.time_remaining)

    async def _upload(self, chunks: AsyncIterator[gateway_pb2.GenerateChunk]) -> tuple[JobOptions, bytes, bytes]:
        limit = self.settings.max_upload_mb << 20
        options, face, audio = None, bytearray(), bytearray()
        async for chunk in chunks:
            kind = chunk.WhichOneof("payload")
            if options is None:
                if kind != "options":
                    raise InvalidArgument("the first message of Generate must carry the options")
                options = chunk.options
                if options.request_id:
                    request_id_var.set(options.request_id)
                continue
            if kind == "options":
                raise InvalidArgument("options may be sent only once, in the first message")
            (face if kind == "face_chunk" else audio).extend(getattr(chunk, kind))
            if len(face) + len(audio) > limit:
                raise ResourceExhausted(f"the upload exceeds {self.settings.max_upload_mb} MB; send shorter media")
        if options is None:
            raise InvalidArgument("the request stream was empty: send the options, then the face and audio bytes")
        self.metrics.received_bytes.inc(len(face) + len(audio))
        return JobOptions.from_proto(options), bytes(face), bytes(audio)

    async def _run(self, job: LipSyncJob, face: bytes, audio: bytes):
        self.metrics.inflight.inc()
        code = "OK"
        started = time.perf_counter()
        log.info("job started", extra={"face_bytes": len(face), "audio_bytes": len(audio),
                                       "crop_mode": job.options.crop_mode, "enhance": job.options.enhance})
        try:
            async with self._serial:
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

    @grpc_stream_method()
    async def Generate(self, request_iterator, context):
        options, face, audio = await self._upload(request_iterator)
        events: asyncio.Queue = asyncio.Queue()

        async def progress(stage: str, done: int, total: int, message: str = "") -> None:
            await events.put(gateway_pb2.GenerateEvent(
                progress=gateway_pb2.Progress(stage=stage, done=done, total=total, message=message)))

        job = self._job(options, context, progress)
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

    @grpc_method()
    async def GenerateVideo(self, request: gateway_pb2.GenerateVideoRequest, context) -> httpbody_pb2.HttpBody:
        if request.options.request_id:
            request_id_var.set(request.options.request_id)
        self.metrics.received_bytes.inc(len(request.face) + len(request.audio))
        warnings: list[str] = []

        async def progress(stage: str, done: int, total: int, message: str = "") -> None:
            if message:
                warnings.append(message)

        job = self._job(JobOptions.from_proto(request.options), context, progress)
        _, mp4 = await self._run(job, request.face, request.audio)
        if warnings:  # no progress stream here: warnings travel as trailers (HTTP headers through Envoy)
            context.set_trailing_metadata(tuple((WARNING_TRAILER, w) for w in warnings))
        return httpbody_pb2.HttpBody(content_type="video/mp4", data=mp4)
