"""One lip-sync job: speech in, the face's plan (from an avatar, the plan cache or the planner), synthesis, mp4."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np

from service_runtime.providers import GPU_PROVIDERS

from .avatars import preview_jpeg
from .audio import decode_speech, frame_count, melspectrogram
from .clients import ModelClients
from .deadline import JobDeadline
from .limits import MediaLimits, setting_name
from .face_source import FaceSource
from .metrics import GatewayMetrics
from .options import JobOptions, Progress
from .plan_cache import PlanCache, plan_key
from .faces import FacePlan, Target
from .planning import Planner
from .synthesis import Plan, Synthesiser

log = logging.getLogger(__name__)

__all__ = ["LipSyncJob", "Plan"]

FETCH_WEIGHTS = "make models"  # or `superwav2lip-models` outside a checkout (service_runtime/model_store.py)


class LipSyncJob:
    """One generation request, run against the model services."""

    def __init__(self, clients: ModelClients, options: JobOptions, metrics: GatewayMetrics, *,
                 chunk_frames: int, limits: MediaLimits = MediaLimits(), deadline: JobDeadline | None = None,
                 progress: Progress | None = None, plans: PlanCache | None = None, encoder_threads: int = 0) -> None:
        self.clients, self.options, self.metrics = clients, options, metrics
        self.limits, self.deadline, self.plans = limits, deadline, plans
        self._progress = progress
        self.planner = Planner(clients, options, metrics, chunk_frames=chunk_frames, limits=limits,
                               deadline=deadline, progress=progress)
        self.synthesiser = Synthesiser(clients, options, metrics, chunk_frames=chunk_frames, deadline=deadline,
                                       progress=progress, encoder_threads=encoder_threads, limits=limits)
        self._avatar: tuple[bytes, FacePlan] | None = None

    def use_avatar(self, face: bytes, plan: FacePlan) -> None:
        """Generate from an avatar: its media and its plan (no detection at all)."""
        self._avatar = (face, plan)

    @property
    def has_avatar(self) -> bool:
        return self._avatar is not None

    async def progress(self, stage: str, done: int, total: int, message: str = "") -> None:
        if self._progress is not None:
            await self._progress(stage, done, total, message)

    async def prepare_reference(self) -> None:
        await self.planner.prepare_reference()

    async def plan(self, face: bytes, audio: bytes, face_plan: FacePlan | None = None) -> Plan:
        """Decodes the speech, opens the face media and finds (or takes) its plan."""
        started = time.perf_counter()
        await self.progress("decode", 0, 1)
        speech = await asyncio.to_thread(decode_speech, audio, self.limits)
        if self.deadline is not None:
            self.deadline.scale_to_speech(speech.seconds)
        mel = await asyncio.to_thread(melspectrogram, speech.samples)
        source = await asyncio.to_thread(FaceSource, face, self.options.still_fps, self.limits)
        frames = frame_count(speech.seconds, float(source.fps))
        self.metrics.stage_seconds.labels("decode").observe(time.perf_counter() - started)
        await self.progress("decode", 1, 1)
        try:
            self.limits.check_output_frames(frames, source.fps, source.size)
            if self.options.enhance:
                await self.warn_if_enhancer_is_slow()
            if face_plan is None:
                face_plan = await self.face_plan(face, source)
        except BaseException:
            source.close()
            raise
        return Plan(source, face_plan, speech, mel, frames)

    async def face_plan(self, face: bytes, source: FaceSource) -> FacePlan:
        """The cached plan of this face media and these options, or a fresh one (then cached)."""
        if self.plans is None:
            return await self.planner.plan(source)
        key = await self.cache_key(face)
        cached = await self.plans.get(key)
        if cached is not None:
            try:
                plan = FacePlan.from_json(cached)
            except ValueError as error:
                log.warning("unreadable cached plan; planning afresh", extra={"error": str(error)})
            else:
                self.metrics.planning_seconds_saved.inc(plan.planning_seconds)
                await self.progress("detect", plan.source_frames, plan.source_frames, "")
                return plan
        plan = await self.planner.plan(source)
        await self.plans.put(key, plan.to_json())
        return plan

    async def cache_key(self, face: bytes) -> str:
        detector = await self.clients.describe_detector(self.deadline)
        digest = await asyncio.to_thread(lambda: hashlib.sha256(face).hexdigest())
        return plan_key(digest, detector.fingerprint, self.clients.detection_encoding, self.options,
                        self.limits.max_output_frames)

    async def warn_if_demo_weights(self, planned_frames: int) -> None:
        """A newcomer's `make run` serves generated weights: say so where they look (the CLI prints progress
        warnings, the web UI shows them, unary calls carry them as a trailer / HTTP header)."""
        info = await self.clients.describe_lipsync(self.deadline)
        if info.generated_weights:
            await self.progress("detect", planned_frames, planned_frames, f"warning: the lip-sync model ({info.model}) runs on generated demo "
                                f"weights, so the mouth will be noise; install the real weights with `{FETCH_WEIGHTS}` "
                                "(docs/development.md)")

    async def warn_if_enhancer_is_slow(self) -> None:
        info = await self.clients.describe_enhancer(self.deadline)
        if not GPU_PROVIDERS & set(info.providers):
            await self.progress("detect", 0, 1, f"warning: the enhancer ({info.model}) runs on CPU only; "
                                "expect about a second per frame")

    def chunks(self, plan: Plan) -> AsyncIterator[tuple[list[np.ndarray], list[Target | None]]]:
        return self.synthesiser.chunks(plan)

    def frames(self, plan: Plan) -> AsyncIterator[tuple[np.ndarray, Target | None]]:
        return self.synthesiser.frames(plan)

    async def render(self, face: bytes, audio: bytes, face_plan: FacePlan | None = None,
                     on_video: Callable[[bytes], Awaitable[None]] | None = None) -> tuple[Plan, bytes]:
        """Runs the whole job and returns the plan and the mp4 bytes; with `on_video` the mp4 is streamed to it as
        a fragmented MP4 while it is made, and the bytes returned are empty."""
        if self._avatar is not None:
            face, face_plan = self._avatar
            self.metrics.planning_seconds_saved.inc(face_plan.planning_seconds)
        plan = await self.plan(face, audio, face_plan)
        try:
            await self.warn_if_demo_weights(plan.face.source_frames)  # asks the lip-sync service, next in line
            mp4 = await self.synthesiser.encode(plan, on_video)
        finally:
            plan.source.close()
        return plan, mp4



async def plan_avatar(planner: Planner, face: bytes, deadline: JobDeadline | None) -> tuple[FacePlan, bytes]:
    """Plans face media for an avatar; returns the plan and a preview of what will be animated."""
    source = await asyncio.to_thread(FaceSource, face, planner.options.still_fps, planner.limits)
    try:
        if deadline is not None:  # planning a long presenter video takes about as long as the video
            deadline.scale_to_speech(source.estimated_frames / float(source.fps), at_most=(
                planner.limits.max_avatar_deadline_s, setting_name("max_avatar_deadline_s")))
        await planner.prepare_reference()
        plan = await planner.plan(source)
        (first,) = await asyncio.to_thread(source.read, 0, 1)
    finally:
        source.close()
    return plan, await asyncio.to_thread(preview_jpeg, first, plan)
