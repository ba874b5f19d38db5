"""Planning: who to animate in every frame of the face media, as a serialisable FacePlan.

Planning decodes the face media once, detects faces (every k-th frame, interpolating between), follows
people as tracks, picks the target (the largest or most central person, or the one matching a reference
photo) and smooths its box and landmarks. Its result depends on the face media, the detector and the
planning options only, so it is cached by content and kept with avatars; synthesis needs nothing else."""

from __future__ import annotations

import asyncio
import time

import cv2
import numpy as np

from service_runtime.errors import FailedPrecondition, InvalidArgument

from .alignment import align_face, template
from .clients import ModelClients
from .containers import decode_picture, picture_size
from .deadline import JobDeadline
from .faces import Box, Face, FacePlan, Target
from .limits import MediaLimits
from .face_source import FaceSource
from .metrics import GatewayMetrics
from .options import JobOptions, Progress
from .tracking import Tracker, drifted, interpolate, rank_tracks, target_per_frame

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


class Planner:
    """Plans one face media against the detector service (detection, recognition) with the job's options."""

    def __init__(self, clients: ModelClients, options: JobOptions, metrics: GatewayMetrics, *, chunk_frames: int,
                 limits: MediaLimits = MediaLimits(), deadline: JobDeadline | None = None,
                 progress: Progress | None = None) -> None:
        self.clients, self.options, self.metrics = clients, options, metrics
        self.chunk_frames, self.limits, self.deadline = chunk_frames, limits, deadline
        self._progress = progress
        self._reference: np.ndarray | None = None  # the reference photo's embedding

    async def plan(self, source: FaceSource) -> FacePlan:
        """The whole face media's plan (a video up to the output-frame limit), so that it serves any speech."""
        started = time.perf_counter()
        wanted = 1 if source.is_still else self.limits.max_output_frames
        targets = await self.find_targets(source, wanted)
        return FacePlan(source.fps, source.size, tuple(targets), round(time.perf_counter() - started, 3))

    async def progress(self, stage: str, done: int, total: int, message: str = "") -> None:
        if self._progress is not None:
            await self._progress(stage, done, total, message)

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

        With detect_every k, the frames between two detections are detected as well when the faces moved too much
        between them to interpolate (`drifted`); the undetected frames since the last detection are kept for that.
        Returns how many frames the source has (up to `wanted`) and the detected indices."""
        every, step = self.options.detect_every, self.chunk_frames
        detected: list[int] = []
        count = 0
        last: tuple[int, list[Face]] | None = None
        between: dict[int, np.ndarray] = {}  # frames since the last detection, not detected
        pending = asyncio.ensure_future(asyncio.to_thread(source.read, 0, min(wanted, step)))
        while True:
            chunk = await pending
            last_chunk = len(chunk) < min(step, wanted - count) or count + len(chunk) >= wanted
            if not last_chunk:
                pending = asyncio.ensure_future(asyncio.to_thread(source.read, count + len(chunk),
                                                                  min(wanted, count + len(chunk) + step)))
            frames = {count + j: frame for j, frame in enumerate(chunk)}
            pool = {**between, **frames}
            picks = [i for i in frames if i % every == 0]
            if last_chunk and pool and max(pool) not in picks:  # the very last frame, so the tail is interpolated
                picks.append(max(pool))
            results = dict(zip(picks, await self.detect([pool[i] for i in picks])))
            redo: list[int] = []
            for index in picks:
                gap = [i for i in pool if (last is None or i > last[0]) and i < index]
                if last is not None and gap and drifted(last[1], results[index]):
                    redo += gap
                last = (index, results[index])
            if redo:
                results.update(zip(redo, await self.detect([pool[i] for i in redo])))
                self.metrics.redetected_frames.inc(len(redo))
            between = {i: f for i, f in pool.items() if last is None or i > last[0]}

            def track(pool=pool, order=sorted(results)):
                for index in order:
                    tracker.update(index, results[index], pool.get(index))  # aligns crops: not on the event loop
                    detected.append(index)

            await asyncio.to_thread(track)
            count += len(chunk)
            await self.progress("detect", count, max(count, min(wanted, source.estimated_frames)))
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
        return [None if (box := to_pixels(b)) is None else Target(box, np.asarray(p, np.float64))
                for b, p in zip(boxes, points)]

    def _missing_message(self, missing: list[int], total: int, tracks) -> str:
        where = f"frame {missing[0]} of the face input ({len(missing)} of {total} frames)"
        if self.options.reference_face:
            best = max((t.similarity for t in tracks if t.similarity is not None), default=None)
            seen = "no face at all" if best is None else f"best similarity {best:.2f}"
            return (f"the reference person is not in {where}: {seen}, threshold "
                    f"{self.options.similarity_threshold:.2f}; check the photo or use the keep-frame no-face policy")
        return (f"no face found in {where}; use a clip where the face is visible throughout, "
                "or the keep-frame no-face policy")
