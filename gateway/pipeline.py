"""The Wav2Lip pipeline: speech + face media -> target face per frame -> lip-synced frames -> mp4."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from fractions import Fraction

import cv2
import numpy as np

from service_runtime.errors import FailedPrecondition, InvalidArgument

from .alignment import align_face, paste_aligned, template
from .audio import Speech, decode_speech, frame_count, mel_window, melspectrogram
from .clients import Face, ModelClients
from .containers import decode_picture, picture_size
from .compositing import (
    ENHANCE_MASKS, ENHANCE_SIZE, Box, Target, aligned_input, aligned_paste, crop_face, mouth_window, paste_face,
)
from .deadline import JobDeadline
from .limits import MediaLimits
from .media import FaceSource, Mp4Writer, source_index
from .metrics import GatewayMetrics
from .options import JobOptions
from .tracking import Tracker, interpolate, rank_tracks, target_per_frame

log = logging.getLogger(__name__)

GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
Progress = Callable[[str, int, int, str], Awaitable[None]]


@dataclass(frozen=True)
class Plan:
    """Everything decided before frames are generated: the face source, speech, mel, length and targets."""

    source: FaceSource
    speech: Speech
    mel: np.ndarray
    fps: Fraction
    frames: int
    targets: list[Target | None]  # per source frame used; None = no target (frame kept untouched)

    @property
    def source_frames(self) -> int:
        return len(self.targets)

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


def padded_box(face: Face, pads: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    """Wav2Lip's padding (top, bottom, left, right), clipped to the frame."""
    top, bottom, left, right = pads
    x1, y1, x2, y2 = face.box
    return np.array([max(0.0, x1 - left), max(0.0, y1 - top), min(width, x2 + right), min(height, y2 + bottom)])


def smooth(values: list[np.ndarray | None], window: int) -> list[np.ndarray | None]:
    """Each value becomes the mean of itself and the following ones within `window` frames (fewer at the end)."""
    if window <= 1:
        return values
    smoothed = []
    for index, value in enumerate(values):
        following = [v for v in values[index : index + window] if v is not None]
        smoothed.append(None if value is None else np.mean(following, axis=0))
    return smoothed


def to_pixels(box: np.ndarray | None) -> Box | None:
    if box is None:
        return None
    x1, y1, x2, y2 = (int(v) for v in box)
    return (x1, y1, x2, y2) if x2 - x1 >= 2 and y2 - y1 >= 2 else None


def detection_frame(frame: np.ndarray, max_size: int) -> tuple[np.ndarray, float]:
    """The frame downscaled so its longer side is at most max_size, and the factor back to full size."""
    height, width = frame.shape[:2]
    scale = min(1.0, max_size / max(height, width))
    if scale == 1.0:
        return frame, 1.0
    small = cv2.resize(frame, (max(1, round(width * scale)), max(1, round(height * scale))),
                       interpolation=cv2.INTER_AREA)
    return small, 1.0 / scale


def replaced(frames: list[np.ndarray], positions: list[int], new: list[np.ndarray]) -> list[np.ndarray]:
    """A copy of the chunk's frame list with the frames at `positions` swapped for `new` ones."""
    outputs = list(frames)
    for position, frame in zip(positions, new):
        outputs[position] = frame
    return outputs


class LipSyncJob:
    """One generation request, run against the model services."""

    def __init__(self, clients: ModelClients, options: JobOptions, metrics: GatewayMetrics, *,
                 chunk_frames: int, limits: MediaLimits = MediaLimits(), deadline: JobDeadline | None = None,
                 progress: Progress | None = None) -> None:
        self.clients, self.options, self.metrics = clients, options, metrics
        self.chunk_frames, self.limits, self.deadline = chunk_frames, limits, deadline
        self._progress = progress
        self._window = mouth_window(options.mouth_padding)
        self._reference: np.ndarray | None = None  # the reference photo's embedding

    async def progress(self, stage: str, done: int, total: int, message: str = "") -> None:
        if self._progress is not None:
            await self._progress(stage, done, total, message)

    async def plan(self, face: bytes, audio: bytes) -> Plan:
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
            self.limits.check_output_frames(frames, source.fps)
            if self.options.enhance:
                await self.warn_if_enhancer_is_slow()
            targets = await self.find_targets(source, 1 if source.is_still else frames)
        except BaseException:
            source.close()
            raise
        return Plan(source, speech, mel, source.fps, frames, targets)

    async def warn_if_enhancer_is_slow(self) -> None:
        info = await self.clients.describe_enhancer(self.deadline)
        if not GPU_PROVIDERS & set(info.providers):
            await self.progress("detect", 0, 1, f"warning: the enhancer ({info.model}) runs on CPU only; "
                                "expect about a second per frame")

    async def detect(self, frames: list[np.ndarray], stage: str | None = None) -> list[list[Face]]:
        """Faces in full-resolution coordinates; frames are sent downscaled."""
        found: list[list[Face]] = []
        for start in range(0, len(frames), self.chunk_frames):
            part = frames[start : start + self.chunk_frames]
            shrunk = await asyncio.to_thread(lambda: [detection_frame(f, self.options.max_detection_size) for f in part])
            replies = await self.clients.detect([small for small, _ in shrunk], self.deadline)
            for faces, (_, scale) in zip(replies, shrunk):
                found.append([Face(f.box * scale, f.score, f.landmarks * scale) for f in faces])
            if stage:
                await self.progress(stage, len(found), len(frames))
        return found

    async def prepare_reference(self) -> None:
        """Checks the reference photo (size, decodable, a face found) and embeds it. The servicer runs this as
        soon as the options arrive, so a bad photo is refused before any media is uploaded."""
        data = self.options.reference_face
        if not data or self._reference is not None:
            return
        self.limits.check_reference(len(data))
        size = picture_size(data)
        if size is None:
            raise InvalidArgument("reference_face: not a PNG, JPEG, WebP or BMP picture")
        self.limits.check_reference_pixels(*size)
        picture = await asyncio.to_thread(decode_picture, data, "reference_face")
        (faces,) = await self.detect([picture])
        if not faces:  # a tight crop of a face gives detectors too little context: add a neutral border
            margin = max(picture.shape[:2]) // 2
            picture = await asyncio.to_thread(cv2.copyMakeBorder, picture, margin, margin, margin, margin,
                                              cv2.BORDER_CONSTANT, value=(127, 127, 127))
            (faces,) = await self.detect([picture])
        if not faces:
            raise InvalidArgument("reference_face: no face found in the reference photo; send a photo where the "
                                  "person's face is clearly visible")
        largest = max(faces, key=lambda f: f.area)
        crop, _ = await asyncio.to_thread(align_face, picture, largest.landmarks, template("arcface", 112), 112)
        (self._reference,) = await self.clients.embed([crop], self.deadline)

    async def score_tracks(self, tracks) -> None:
        """One embedding per track, from its most confident face, compared with the reference."""
        await self.prepare_reference()
        reference = self._reference
        crops = [t.best_crop for t in tracks]
        embeddings = await self.clients.embed(crops, self.deadline) if crops else []
        self.metrics.track_embeddings.inc(len(crops))
        for track, embedding in zip(tracks, embeddings):
            track.similarity = float(reference @ embedding)

    async def detect_stream(self, source: FaceSource, wanted: int, tracker: Tracker) -> tuple[int, list[int]]:
        """Decodes up to `wanted` frames chunk by chunk (the next chunk decodes while this one is detected).

        Returns how many frames the source has (up to `wanted`) and the detected indices."""
        every, step = self.options.detect_every, self.chunk_frames
        detected: list[int] = []
        count = 0
        pending = asyncio.ensure_future(asyncio.to_thread(source.read, 0, min(wanted, step)))
        while True:
            chunk = await pending
            last_chunk = len(chunk) < min(step, wanted - count) or count + len(chunk) >= wanted
            if not last_chunk:
                pending = asyncio.ensure_future(asyncio.to_thread(source.read, count + len(chunk),
                                                                  min(wanted, count + len(chunk) + step)))
            picks = [j for j in range(len(chunk)) if (count + j) % every == 0 or (last_chunk and j == len(chunk) - 1)]
            found = await self.detect([chunk[j] for j in picks])

            def track(first=count):
                for j, faces in zip(picks, found):
                    tracker.update(first + j, faces, chunk[j])  # aligns a crop per face: not on the event loop
                    detected.append(first + j)

            await asyncio.to_thread(track)
            count += len(chunk)
            await self.progress("detect", count, wanted)
            if last_chunk:
                return count, detected

    async def find_targets(self, source: FaceSource, wanted: int) -> list[Target | None]:
        started = time.perf_counter()
        crop = None
        if self.options.reference_face:
            def crop(frame, face):
                return align_face(frame, face.landmarks, template("arcface", 112), 112)[0]
        tracker = Tracker(crop)
        total, indices = await self.detect_stream(source, wanted, tracker)
        if total == 0:
            raise InvalidArgument("face: the video has no decodable frames")
        tracks = tracker.tracks
        if self.options.reference_face:
            await self.score_tracks(tracks)
            candidates = [t for t in tracks if t.similarity is not None and t.similarity >= self.options.similarity_threshold]
        else:
            candidates = tracks
        ranked = rank_tracks(candidates, self.options.target_rule, source.size)
        targets = await asyncio.to_thread(self._targets, target_per_frame(ranked, indices), indices, total,
                                          source.size)
        self.metrics.stage_seconds.labels("detect").observe(time.perf_counter() - started)
        missing = [i for i, t in enumerate(targets) if t is None]
        if missing and not self.options.keep_frames_without_face:
            raise FailedPrecondition(self._missing_message(missing, total, tracks))
        return targets

    def _targets(self, detected: dict, indices: list[int], total: int, size: tuple[int, int]) -> list[Target | None]:
        """The chosen person's box and landmarks on every frame: interpolated between detections, then smoothed."""
        faces = interpolate(detected, indices, total)
        width, height = size
        boxes = smooth([None if f is None else padded_box(f, self.options.pads, width, height) for f in faces],
                       self.options.smoothing_window)
        points = smooth([None if f is None else f.landmarks for f in faces], self.options.smoothing_window)
        return [None if (box := to_pixels(b)) is None else Target(box, p) for b, p in zip(boxes, points)]

    def _missing_message(self, missing: list[int], total: int, tracks) -> str:
        where = f"frame {missing[0]} of the face input ({len(missing)} of {total} frames)"
        if self.options.reference_face:
            best = max((t.similarity for t in tracks if t.similarity is not None), default=None)
            seen = "no face at all" if best is None else f"best similarity {best:.2f}"
            return (f"the reference person is not in {where}: {seen}, threshold "
                    f"{self.options.similarity_threshold:.2f}; check the photo or use the keep-frame no-face policy")
        return (f"no face found in {where}; use a clip where the face is visible throughout, "
                "or the keep-frame no-face policy")

    async def chunks(self, plan: Plan) -> AsyncIterator[tuple[list[np.ndarray], list[Target | None]]]:
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
            for start in range(0, plan.frames, self.chunk_frames):
                indices = list(range(start, min(plan.frames, start + self.chunk_frames)))
                sources = [plan.source_of(i, self.options.ping_pong) for i in indices]
                frames = await asyncio.to_thread(read_in_order, plan.source, sources)
                if len(frames) != len(sources):
                    raise InvalidArgument("face: the video could not be decoded a second time")
                await out.put((indices, frames, [plan.targets[s] for s in sources]))
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
        started = time.perf_counter()
        todo = [k for k, target in enumerate(targets) if target is not None]
        aligned = self.options.crop_mode == "aligned"

        def prepare():
            if aligned:
                return [aligned_input(frames[k], targets[k], self._window) for k in todo]
            return [(None, crop_face(frames[k], targets[k].box)) for k in todo]

        prepared = await asyncio.to_thread(prepare)
        mels = [mel_window(plan.mel, indices[k], fps) for k in todo]
        faces = await self.clients.lipsync([c for _, c in prepared], mels, self.deadline) if todo else []

        def paste():
            if aligned:
                return [aligned_paste(frames[k], a, f, self._window) for k, (a, _), f in zip(todo, prepared, faces)]
            return [paste_face(frames[k], targets[k].box, f) for k, f in zip(todo, faces)]

        outputs = replaced(frames, todo, await asyncio.to_thread(paste))
        if self.options.enhance and todo:
            outputs = await self._enhance(outputs, targets, todo)
        self.metrics.stage_seconds.labels("lipsync").observe(time.perf_counter() - started)
        return outputs

    async def _enhance(self, frames: list[np.ndarray], targets: list[Target | None], todo: list[int]) -> list[np.ndarray]:
        """Aligns each synthesised face to FFHQ 512, restores it, and blends it back through a feathered mask."""
        points = template("ffhq", ENHANCE_SIZE)
        aligned = await asyncio.to_thread(
            lambda: [align_face(frames[k], targets[k].landmarks, points, ENHANCE_SIZE) for k in todo])
        restored = await self.clients.enhance([crop for crop, _ in aligned], self.deadline)
        mask = ENHANCE_MASKS[self.options.enhance_region]
        pasted = await asyncio.to_thread(
            lambda: [paste_aligned(frames[k], face, matrix, mask)
                     for k, face, (_, matrix) in zip(todo, restored, aligned)])
        return replaced(frames, todo, pasted)

    async def render(self, face: bytes, audio: bytes) -> tuple[Plan, bytes]:
        """Runs the whole job and returns the plan and the mp4 bytes."""
        plan = await self.plan(face, audio)
        try:
            width, height = plan.source.size
            writer = Mp4Writer(width, height, plan.fps, self.options.crf, self.options.preset, plan.speech)
            try:
                # The chunk stages stop before the source and the writer they use are closed.
                async with contextlib.aclosing(self.chunks(plan)) as chunks:
                    async for outputs, _ in chunks:
                        await writer.write(outputs)
                started = time.perf_counter()
                await self.progress("encode", plan.frames, plan.frames)
                mp4 = await writer.finish()
                self.metrics.stage_seconds.labels("encode").observe(time.perf_counter() - started)
            except BaseException:
                await writer.abort()
                raise
        finally:
            plan.source.close()
        return plan, mp4
