"""Which face to animate: IoU tracks across detected frames, a reference identity or a rule, interpolation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .faces import Face

TRACK_IOU = 0.3


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclass
class Track:
    """One person followed over consecutive detected frames; lost when a detected frame misses them."""

    faces: dict[int, Face] = field(default_factory=dict)
    similarity: float | None = None
    # The aligned crop of the track's most confident face so far: what its one embedding is computed from.
    best_crop: np.ndarray | None = None
    best_score: float = -1.0

    @property
    def last(self) -> Face:
        return self.faces[max(self.faces)]

    def add(self, index: int, face: Face, frame: np.ndarray | None, crop: Callable | None) -> None:
        self.faces[index] = face
        if face.score > self.best_score:
            self.best_score = face.score
            if crop is not None and frame is not None:
                self.best_crop = crop(frame, face)

    def mean_area(self) -> float:
        return float(np.mean([f.area for f in self.faces.values()]))

    def mean_offset(self, center: np.ndarray) -> float:
        return float(np.mean([np.linalg.norm((f.box[:2] + f.box[2:]) / 2 - center) for f in self.faces.values()]))


class Tracker:
    """Greedy IoU matching of each detected frame's faces to the tracks alive in the previous detected frame.

    Frames arrive in order while the video streams by; `crop` (frame, face) -> aligned crop keeps each
    track's best crop so that no frame has to be kept for the embedding."""

    def __init__(self, crop: Callable[[np.ndarray, Face], np.ndarray] | None = None) -> None:
        self.tracks: list[Track] = []
        self._alive: list[Track] = []
        self._crop = crop

    def update(self, index: int, faces: list[Face], frame: np.ndarray | None = None) -> None:
        pairs = sorted(((iou(t.last.box, f.box), ti, fi) for ti, t in enumerate(self._alive)
                        for fi, f in enumerate(faces)), reverse=True)
        taken_tracks, taken_faces, alive = set(), set(), []
        for overlap, ti, fi in pairs:
            if overlap < TRACK_IOU or ti in taken_tracks or fi in taken_faces:
                continue
            self._alive[ti].add(index, faces[fi], frame, self._crop)
            taken_tracks.add(ti)
            taken_faces.add(fi)
            alive.append(self._alive[ti])
        for fi, face in enumerate(faces):
            if fi not in taken_faces:
                track = Track()
                track.add(index, face, frame, self._crop)
                self.tracks.append(track)
                alive.append(track)
        self._alive = alive


# Between two detections k frames apart, interpolation is trusted only while the faces barely moved: the main
# face keeps most of its box and its landmarks move less than a fifth of its width, and nobody came or went.
REDETECT_BELOW_IOU = 0.6
REDETECT_LANDMARK_JUMP = 0.2


def drifted(before: list[Face], after: list[Face]) -> bool:
    """True when the frames between two detections must be detected too instead of interpolated."""
    if len(before) != len(after):
        return True
    if not before:
        return False
    a, b = max(before, key=lambda f: f.area), max(after, key=lambda f: f.area)
    width = max(1.0, float(a.box[2] - a.box[0]))
    jump = float(np.max(np.linalg.norm(a.landmarks - b.landmarks, axis=1)))
    return iou(a.box, b.box) < REDETECT_BELOW_IOU or jump > REDETECT_LANDMARK_JUMP * width


def build_tracks(detections: dict[int, list[Face]]) -> list[Track]:
    tracker = Tracker()
    for index in sorted(detections):
        tracker.update(index, detections[index])
    return tracker.tracks


def rank_tracks(tracks: list[Track], rule: str, frame_size: tuple[int, int]) -> list[Track]:
    """Best first: by similarity when a reference was given, else by the rule (largest or centre)."""
    if any(t.similarity is not None for t in tracks):
        return sorted(tracks, key=lambda t: -(t.similarity or -1.0))
    if rule == "center":
        center = np.array(frame_size, np.float32) / 2
        return sorted(tracks, key=lambda t: t.mean_offset(center))
    return sorted(tracks, key=lambda t: -t.mean_area())


def target_per_frame(ranked: list[Track], detected_frames: Sequence[int]) -> dict[int, Face]:
    """For each detected frame, the face of the best-ranked track present there."""
    chosen: dict[int, Face] = {}
    for index in detected_frames:
        for track in ranked:
            if index in track.faces:
                chosen[index] = track.faces[index]
                break
    return chosen


def interpolate(chosen: dict[int, Face], detected_frames: Sequence[int], total: int) -> list[Face | None]:
    """Faces for every frame: detected ones as they are, in-between frames linearly between two targets."""
    faces: list[Face | None] = [None] * total
    ordered = sorted(detected_frames)
    for index in ordered:
        faces[index] = chosen.get(index)
    for left, right in zip(ordered, ordered[1:]):
        a, b = chosen.get(left), chosen.get(right)
        if a is None or b is None:
            continue
        for index in range(left + 1, right):
            t = (index - left) / (right - left)
            faces[index] = Face(a.box + t * (b.box - a.box), a.score + t * (b.score - a.score),
                                a.landmarks + t * (b.landmarks - a.landmarks))
    return faces


def detection_indices(total: int, every: int) -> list[int]:
    """Every k-th frame, plus the last one so that the tail is interpolated, not extrapolated."""
    indices = list(range(0, total, max(1, every)))
    if indices[-1] != total - 1:
        indices.append(total - 1)
    return indices
