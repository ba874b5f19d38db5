"""The transport-free generation layer that the servicer, the job runner and live sessions call: options checked (request id
first), a lip-sync job built (with an avatar's media and plan), run under its deadline, counted and logged; avatars planned."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from superwav2lip.gateway.v1 import gateway_pb2

from service_runtime.errors import InvalidArgument, ServiceError
from service_runtime.logs import request_id_var
from service_runtime.rpc import checked_request_id

from .avatars import AvatarRecord, AvatarStore
from .clients import ModelClients
from .deadline import JobDeadline
from .limits import MediaLimits
from .metrics import GatewayMetrics
from .options import JobOptions, Progress
from .pipeline import LipSyncJob, plan_avatar
from .plan_cache import PlanCache, TenantPlanCache
from .planning import Planner

log = logging.getLogger(__name__)


class Generation:
    def __init__(self, clients: ModelClients, metrics: GatewayMetrics, settings, *, plans: PlanCache | None,
                 avatars: AvatarStore) -> None:
        self.clients, self.metrics, self.settings = clients, metrics, settings
        self.plans, self.avatars = plans, avatars
        self.limits = MediaLimits.from_settings(settings)
        # The seed's behaviour for the benchmarks (SWL_GATEWAY_SERIAL_JOBS): one job at a time in this process.
        self._serial = asyncio.Lock() if settings.serial_jobs else contextlib.nullcontext()

    def options(self, message: gateway_pb2.GenerateOptions) -> JobOptions:
        """The checked options; the request id (checked first) goes into every log line and model call."""
        if message.request_id:
            request_id_var.set(checked_request_id(message.request_id, "options.request_id"))
        return JobOptions.from_proto(message, self.limits)

    async def check(self, tenant: str, message: gateway_pb2.GenerateOptions) -> None:
        """Options, request id and avatar (its metadata only) of a job that will run later."""
        self.options(message)
        if message.avatar_id:
            await self.avatars.get(tenant, message.avatar_id)

    async def job(self, tenant: str, message: gateway_pb2.GenerateOptions, deadline: JobDeadline,
                  progress: Progress | None = None) -> LipSyncJob:
        """A job for these options; with an avatar id (the tenant's own), the avatar's media, plan and planning
        options are the job's. Plans are cached per tenant: a hit must not tell one tenant what another sent."""
        options = self.options(message)
        avatar = await self.avatars.load(tenant, message.avatar_id) if message.avatar_id else None
        if avatar is not None:
            options = options.with_planning_of(JobOptions.from_proto(avatar.planning))
        plans = TenantPlanCache(self.plans, tenant) if self.plans is not None else None
        job = LipSyncJob(self.clients, options, self.metrics, chunk_frames=self.settings.chunk_frames,
                         limits=self.limits, deadline=deadline, progress=progress, plans=plans,
                         encoder_threads=self.settings.encoder_threads)
        if avatar is not None:
            job.use_avatar(avatar.face, avatar.plan)
        return job

    async def checked_job(self, tenant: str, message: gateway_pb2.GenerateOptions, deadline: JobDeadline,
                          progress: Progress | None) -> LipSyncJob:
        """A job whose reference photo is checked (decodable, a face found) before any media is used."""
        job = await self.job(tenant, message, deadline, progress)
        async with deadline.enforced():
            await job.prepare_reference()
        return job

    async def run(self, job: LipSyncJob, face: bytes, audio: bytes, on_video=None):
        """Renders the job under its deadline; returns (plan, mp4). `on_video` receives the fragmented mp4 as it
        is encoded (streaming callers)."""
        self.metrics.inflight.inc()
        code = "OK"
        started = time.perf_counter()
        log.info("job started", extra={"face_bytes": len(face), "audio_bytes": len(audio), "avatar": job.has_avatar,
                                       "crop_mode": job.options.crop_mode, "enhance": job.options.enhance})
        try:
            if job.has_avatar and face:
                raise InvalidArgument("send either face media or an avatar_id, not both")
            assert job.deadline is not None  # Generation.job gives every job one
            async with job.deadline.enforced(), self._serial:
                return await job.render(face, audio, on_video=on_video)
        except ServiceError as error:
            code = error.code.name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            self.metrics.inflight.dec()
            self.metrics.jobs.labels(code).inc()
            log.info("job finished", extra={"code": code, "seconds": round(time.perf_counter() - started, 3)})

    async def generate(self, tenant: str, options: gateway_pb2.GenerateOptions, face: bytes, audio: bytes,
                       deadline: JobDeadline, progress: Progress):
        """One generation from stored inputs (the job runner's call): job built, then run; returns (plan, mp4)."""
        return await self.run(await self.job(tenant, options, deadline, progress), face, audio)

    async def create_avatar(self, tenant: str, message: gateway_pb2.AvatarOptions, face: bytes, deadline: JobDeadline,
                            progress: Progress | None) -> AvatarRecord:
        """Plans the face media once and stores it as an avatar."""
        planner = Planner(self.clients, self.options(message.planning), self.metrics,
                          chunk_frames=self.settings.chunk_frames, limits=self.limits, deadline=deadline,
                          progress=progress)
        async with deadline.enforced():
            plan, preview = await plan_avatar(planner, face, deadline)
            record = await self.avatars.create(tenant, face, plan, message.name, message.planning, preview)
        with contextlib.suppress(ServiceError):
            self.metrics.avatars.set(await self.avatars.count())
        log.info("avatar created", extra={"avatar_id": record.avatar_id, "frames": record.frames})
        return record
