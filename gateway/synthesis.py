"""Synthesis: lip-synced frames from a plan, the speech's mel and the face source, chunk by chunk.

Decoding and synthesis run as separate tasks joined by one-slot queues, so the frames already made are
encoded while later ones are decoded, and memory holds a few chunks only."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from service_runtime.errors import InvalidArgument

from .alignment import align_face, paste_aligned, template
from .audio import Speech, mel_window
from .clients import ModelClients
from .compositing import (
    ENHANCE_MASKS, ENHANCE_SIZE, Target, aligned_input, aligned_paste, crop_face, mouth_window, paste_face,
)
from .deadline import JobDeadline
from .face_source import FaceSource, source_index
from .limits import MediaLimits
from .mp4_writer import Mp4Writer
from .metrics import GatewayMetrics
from .options import JobOptions, Progress
from .faces import FacePlan


@dataclass(frozen=True)
class Plan:
    """Everything a job decided before generating frames: the face source and its plan, the speech, its mel
    and the output length."""

    source: FaceSource
    face: FacePlan
    speech: Speech
    mel: np.ndarray
    frames: int  # output frames: the whole speech at the face's frame rate

    @property
    def fps(self) -> Fraction:
        return self.face.fps

    @property
    def targets(self) -> tuple[Target | None, ...]:
        return self.face.targets

    @property
    def source_frames(self) -> int:
        return self.face.source_frames

    def source_of(self, index: int, ping_pong: bool) -> int:
        return source_index(index, self.source_frames, ping_pong)


@dataclass(frozen=True)
class _Failure:
    """Carries a stage's exception down the stage queues so the consumer re-raises it."""

    error: BaseException


def read_in_order(source: FaceSource, indices: list[int]) -> list[np.ndarray]:
    """Frames for source indices that run forwards or backwards (ping-pong), one decode per run."""
    frames: list[np.ndarray] = []
    start = 0
    while start < len(indices):
        end = start + 1
        step = indices[end] - indices[start] if end < len(indices) else 1
        while end < len(indices) and indices[end] - indices[end - 1] == step and step in (1, -1):
            end += 1
        low, high = min(indices[start:end]), max(indices[start:end])
        run = source.read(low, high + 1)
        frames.extend(run if indices[start] == low else run[::-1])
        start = end
    return frames


def replaced(frames: list[np.ndarray], positions: list[int], new: list[np.ndarray]) -> list[np.ndarray]:
    """A copy of the chunk's frame list with the frames at `positions` swapped for `new` ones."""
    outputs = list(frames)
    for position, frame in zip(positions, new):
        outputs[position] = frame
    return outputs


class Synthesiser:
    """Makes one job's frames against the lip-sync (and enhancer) services, and encodes them."""

    def __init__(self, clients: ModelClients, options: JobOptions, metrics: GatewayMetrics, *, chunk_frames: int,
                 deadline: JobDeadline | None = None, progress: Progress | None = None,
                 encoder_threads: int = 0, limits: MediaLimits = MediaLimits()) -> None:
        self.clients, self.options, self.metrics, self.limits = clients, options, metrics, limits
        self.encoder_threads = encoder_threads
        self.chunk_frames, self.deadline = chunk_frames, deadline
        self._progress = progress
        self._window = mouth_window(options.mouth_padding)

    async def progress(self, stage: str, done: int, total: int, message: str = "") -> None:
        if self._progress is not None:
            await self._progress(stage, done, total, message)

    async def encode(self, plan: Plan, on_video: Callable[[bytes], Awaitable[None]] | None = None) -> bytes:
        """The mp4 of the whole job: frames are encoded as their chunks are made. With `on_video`, the output is a
        fragmented MP4 handed over fragment by fragment as it is made (nothing is returned); without, one
        faststart file."""
        width, height = plan.face.size
        writer = Mp4Writer(width, height, plan.fps, self.options.crf, self.options.preset, plan.speech,
                           self.encoder_threads, fragmented=on_video is not None, limits=self.limits)
        try:
            # The chunk stages stop before the writer (and then the source) they use are closed.
            encoding = 0.0
            async with contextlib.aclosing(self.chunks(plan)) as chunks:
                async for outputs, _ in chunks:
                    started = time.perf_counter()
                    await writer.write(outputs)
                    encoding += time.perf_counter() - started
                    if on_video is not None and (data := await writer.take()):
                        await on_video(data)
            started = time.perf_counter()
            await self.progress("encode", plan.frames, plan.frames)
            mp4 = await writer.finish()
            self.metrics.stage_seconds.labels("encode").observe(encoding + time.perf_counter() - started)
            if on_video is None:
                return mp4
            await on_video(mp4)
            return b""
        except BaseException:
            await writer.abort()
            raise

    async def chunks(self, plan: Plan) -> AsyncGenerator[tuple[list[np.ndarray], list[Target | None]], None]:
        """Output frames in order, a chunk at a time, each with the target that was replaced (None = untouched).

        Decoding and synthesis run as separate tasks joined by small bounded queues, so the frames
        already made are encoded while later ones are decoded, and memory holds a few chunks only."""
        decoded: asyncio.Queue = asyncio.Queue(maxsize=1)
        synthesised: asyncio.Queue = asyncio.Queue(maxsize=1)
        stages = [asyncio.create_task(self._decode_stage(plan, decoded)),
                  asyncio.create_task(self._synthesis_stage(plan, decoded, synthesised))]
        try:
            while (item := await synthesised.get()) is not None:
                if isinstance(item, _Failure):
                    raise item.error
                outputs, targets, done = item
                self.metrics.frames.inc(len(outputs))
                yield outputs, targets
                await self.progress("lipsync", done, plan.frames)
        finally:
            for stage in stages:
                stage.cancel()
            await asyncio.gather(*stages, return_exceptions=True)

    async def frames(self, plan: Plan) -> AsyncIterator[tuple[np.ndarray, Target | None]]:
        """`chunks`, one frame at a time."""
        async with contextlib.aclosing(self.chunks(plan)) as chunks:
            async for outputs, targets in chunks:
                for output, target in zip(outputs, targets):
                    yield output, target

    async def _decode_stage(self, plan: Plan, out: asyncio.Queue) -> None:
        try:
            decoding = 0.0
            for start in range(0, plan.frames, self.chunk_frames):
                indices = list(range(start, min(plan.frames, start + self.chunk_frames)))
                sources = [plan.source_of(i, self.options.ping_pong) for i in indices]
                started = time.perf_counter()
                frames = await asyncio.to_thread(read_in_order, plan.source, sources)
                decoding += time.perf_counter() - started
                if len(frames) != len(sources):
                    raise InvalidArgument("face: the video could not be decoded a second time")
                await out.put((indices, frames, [plan.targets[s] for s in sources]))
            self.metrics.stage_seconds.labels("redecode").observe(decoding)
            await out.put(None)
        except Exception as error:
            await out.put(_Failure(error))

    async def _synthesis_stage(self, plan: Plan, inp: asyncio.Queue, out: asyncio.Queue) -> None:
        fps = float(plan.fps)
        try:
            while (item := await inp.get()) is not None:
                if isinstance(item, _Failure):
                    raise item.error
                indices, frames, targets = item
                outputs = await self._sync_chunk(plan, indices, frames, targets, fps)
                await out.put((outputs, targets, indices[-1] + 1))
            await out.put(None)
        except Exception as error:
            await out.put(_Failure(error))

    async def _sync_chunk(self, plan: Plan, indices: list[int], frames: list[np.ndarray],
                          targets: list[Target | None], fps: float) -> list[np.ndarray]:
        """Crops, the lip-sync call, paste-back and enhancement of one chunk; each is a stage in the metrics."""
        todo = [k for k, target in enumerate(targets) if target is not None]
        aligned = self.options.crop_mode == "aligned"

        def prepare():
            if aligned:
                return [aligned_input(frames[k], targets[k], self._window) for k in todo]
            return [(None, crop_face(frames[k], targets[k].box)) for k in todo]

        with self._stage("crop"):
            prepared = await asyncio.to_thread(prepare)
            mels = [mel_window(plan.mel, indices[k], fps) for k in todo]
        with self._stage("lipsync"):  # the round trip: transfer, queueing and the model
            faces = await self.clients.lipsync([c for _, c in prepared], mels, self.deadline) if todo else []

        def paste():
            if aligned:
                return [aligned_paste(frames[k], a, f, self._window) for k, (a, _), f in zip(todo, prepared, faces)]
            return [paste_face(frames[k], targets[k].box, f) for k, f in zip(todo, faces)]

        with self._stage("paste"):
            outputs = replaced(frames, todo, await asyncio.to_thread(paste))
        if self.options.enhance and todo:
            with self._stage("enhance"):
                outputs = await self._enhance(outputs, targets, todo)
        return outputs

    @contextlib.contextmanager
    def _stage(self, name: str):
        started = time.perf_counter()
        yield
        self.metrics.stage_seconds.labels(name).observe(time.perf_counter() - started)

    async def _enhance(self, frames: list[np.ndarray], targets: list[Target | None], todo: list[int]) -> list[np.ndarray]:
        """Aligns each synthesised face to FFHQ 512, restores it, and blends it back through a feathered mask."""
        points = template("ffhq", ENHANCE_SIZE)
        aligned = await asyncio.to_thread(
            lambda: [align_face(frames[k], targets[k].landmarks, points, ENHANCE_SIZE)  # type: ignore[union-attr]
                     for k in todo])  # todo: only frames that have a target
        restored = await self.clients.enhance([crop for crop, _ in aligned], self.deadline)
        mask = ENHANCE_MASKS[self.options.enhance_region]
        pasted = await asyncio.to_thread(
            lambda: [paste_aligned(frames[k], face, matrix, mask)
                     for k, face, (_, matrix) in zip(todo, restored, aligned)])
        return replaced(frames, todo, pasted)
