"""The Wav2Lip pipeline: speech + face media -> detected, smoothed boxes -> lip-synced frames -> mp4."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from fractions import Fraction

import cv2
import numpy as np

from service_runtime.errors import FailedPrecondition, InvalidArgument

from .audio import Speech, decode_speech, frame_count, mel_window, melspectrogram
from .clients import Face, ModelClients
from .media import FaceMedia, Mp4Writer, decode_face, face_rate, source_index
from .metrics import GatewayMetrics
from .options import JobOptions

log = logging.getLogger(__name__)

FACE_SIZE = 96
ENHANCE_SIZE = 512
Progress = Callable[[str, int, int, str], Awaitable[None]]
Box = tuple[int, int, int, int]  # x1, y1, x2, y2, integer pixels, x2/y2 exclusive


@dataclass(frozen=True)
class Plan:
    """Everything decided before frames are generated: media, speech, mel, output length and boxes."""

    media: FaceMedia
    speech: Speech
    mel: np.ndarray
    fps: Fraction
    frames: int
    boxes: list[Box | None]  # per decoded frame; None = no face (kept untouched)


def largest_face(faces: list[Face]) -> Face | None:
    return max(faces, key=lambda f: f.area) if faces else None


def padded_box(face: Face, pads: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    """Wav2Lip's padding (top, bottom, left, right), clipped to the frame."""
    top, bottom, left, right = pads
    x1, y1, x2, y2 = face.box
    return np.array([max(0.0, x1 - left), max(0.0, y1 - top), min(width, x2 + right), min(height, y2 + bottom)])


def smooth_boxes(boxes: list[np.ndarray | None], window: int) -> list[np.ndarray | None]:
    """Each box becomes the mean of itself and the following boxes within `window` frames (fewer at the end)."""
    if window <= 1:
        return boxes
    smoothed = []
    for index, box in enumerate(boxes):
        following = [b for b in boxes[index : index + window] if b is not None]
        smoothed.append(None if box is None else np.mean(following, axis=0))
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


def crop_face(frame: np.ndarray, box: Box) -> np.ndarray:
    x1, y1, x2, y2 = box
    return cv2.resize(frame[y1:y2, x1:x2], (FACE_SIZE, FACE_SIZE))


def paste_face(frame: np.ndarray, box: Box, face: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = box
    out = frame.copy()
    out[y1:y2, x1:x2] = cv2.resize(face, (x2 - x1, y2 - y1))
    return out


class LipSyncJob:
    """One generation request, run against the model services."""

    def __init__(self, clients: ModelClients, options: JobOptions, metrics: GatewayMetrics, *,
                 chunk_frames: int, max_seconds: float, progress: Progress | None = None,
                 timeout: Callable[[], float | None] = lambda: None) -> None:
        self.clients, self.options, self.metrics = clients, options, metrics
        self.chunk_frames, self.max_seconds = chunk_frames, max_seconds
        self._progress = progress
        self._timeout = timeout

    async def progress(self, stage: str, done: int, total: int, message: str = "") -> None:
        if self._progress is not None:
            await self._progress(stage, done, total, message)

    async def plan(self, face: bytes, audio: bytes) -> Plan:
        started = time.perf_counter()
        await self.progress("decode", 0, 1)
        speech = await asyncio.to_thread(decode_speech, audio)
        if speech.seconds > self.max_seconds:
            raise InvalidArgument(f"audio: {speech.seconds:.1f} s is longer than this gateway's limit of "
                                  f"{self.max_seconds:.0f} s; split the speech into shorter parts")
        mel = await asyncio.to_thread(melspectrogram, speech.samples)
        fps = await asyncio.to_thread(face_rate, face, self.options.still_fps)
        frames = frame_count(speech.seconds, float(fps))
        media = await asyncio.to_thread(decode_face, face, self.options.still_fps, frames)
        self.metrics.stage_seconds.labels("decode").observe(time.perf_counter() - started)
        await self.progress("decode", 1, 1)
        boxes = await self.find_boxes(media)
        return Plan(media, speech, mel, fps, frames, boxes)

    async def find_boxes(self, media: FaceMedia) -> list[Box | None]:
        started = time.perf_counter()
        total = len(media.frames)
        detected: list[list[Face]] = []
        step = max(1, self.chunk_frames)
        for start in range(0, total, step):
            part = media.frames[start : start + step]
            shrunk = await asyncio.to_thread(lambda: [detection_frame(f, self.options.max_detection_size) for f in part])
            faces = await self.clients.detect([small for small, _ in shrunk], timeout=self._timeout())
            for found, (_, scale) in zip(faces, shrunk):
                detected.append([Face(f.box * scale, f.score, f.landmarks * scale) for f in found])
            await self.progress("detect", len(detected), total)
        width, height = media.size
        chosen = [largest_face(faces) for faces in detected]
        padded = [None if f is None else padded_box(f, self.options.pads, width, height) for f in chosen]
        boxes = [to_pixels(b) for b in smooth_boxes(padded, self.options.smoothing_window)]
        missing = [i for i, box in enumerate(boxes) if box is None]
        self.metrics.stage_seconds.labels("detect").observe(time.perf_counter() - started)
        if missing and not self.options.keep_frames_without_face:
            raise FailedPrecondition(
                f"no face found in frame {missing[0]} of the face input ({len(missing)} of {total} frames have none); "
                "use a clip where the face is visible throughout, or the keep-frame no-face policy"
            )
        return boxes

    async def frames(self, plan: Plan) -> AsyncIterator[tuple[np.ndarray, Box | None]]:
        """Output frames in order, each with the box that was replaced (None = untouched)."""
        fps = float(plan.fps)
        for start in range(0, plan.frames, self.chunk_frames):
            indices = range(start, min(plan.frames, start + self.chunk_frames))
            sources = [source_index(i, len(plan.media.frames), self.options.ping_pong) for i in indices]
            frames = [plan.media.frames[s] for s in sources]
            boxes = [plan.boxes[s] for s in sources]
            outputs = await self._sync_chunk(plan, list(indices), frames, boxes, fps)
            self.metrics.frames.inc(len(outputs))
            for output, box in zip(outputs, boxes):
                yield output, box
            await self.progress("lipsync", indices[-1] + 1, plan.frames)

    async def _sync_chunk(self, plan: Plan, indices: list[int], frames: list[np.ndarray],
                          boxes: list[Box | None], fps: float) -> list[np.ndarray]:
        started = time.perf_counter()
        todo = [k for k, box in enumerate(boxes) if box is not None]
        crops = await asyncio.to_thread(lambda: [crop_face(frames[k], boxes[k]) for k in todo])
        mels = [mel_window(plan.mel, indices[k], fps) for k in todo]
        faces = await self.clients.lipsync(crops, mels, timeout=self._timeout()) if todo else []
        outputs = list(frames)
        pasted = await asyncio.to_thread(lambda: [paste_face(frames[k], boxes[k], f) for k, f in zip(todo, faces)])
        for k, frame in zip(todo, pasted):
            outputs[k] = frame
        if self.options.enhance and todo:
            outputs = await self._enhance(outputs, boxes, todo)
        self.metrics.stage_seconds.labels("lipsync").observe(time.perf_counter() - started)
        return outputs

    async def _enhance(self, frames: list[np.ndarray], boxes: list[Box | None], todo: list[int]) -> list[np.ndarray]:
        """Restores each synthesised face region at GFPGAN's 512x512 input size and pastes it back."""
        crops = [cv2.resize(frames[k][b[1]:b[3], b[0]:b[2]], (ENHANCE_SIZE, ENHANCE_SIZE))
                 for k in todo if (b := boxes[k])]
        restored = await self.clients.enhance(crops, timeout=self._timeout())
        outputs = list(frames)
        for k, face in zip(todo, restored):
            outputs[k] = paste_face(frames[k], boxes[k], face)  # type: ignore[arg-type]
        return outputs

    async def render(self, face: bytes, audio: bytes) -> tuple[Plan, bytes]:
        """Runs the whole job and returns the plan and the mp4 bytes."""
        plan = await self.plan(face, audio)
        width, height = plan.media.size
        writer = Mp4Writer(width, height, plan.fps, self.options.crf, self.options.preset, plan.speech.source)
        try:
            pending: list[np.ndarray] = []
            async for frame, _ in self.frames(plan):
                pending.append(frame)
                if len(pending) >= self.chunk_frames:
                    await asyncio.to_thread(lambda batch=pending: [writer.write(f) for f in batch])
                    pending = []
            started = time.perf_counter()
            await self.progress("encode", plan.frames, plan.frames)
            mp4 = await asyncio.to_thread(lambda: ([writer.write(f) for f in pending], writer.finish())[1])
            self.metrics.stage_seconds.labels("encode").observe(time.perf_counter() - started)
        except BaseException:
            writer.abort()
            raise
        return plan, mp4
