"""Which face to animate: IoU tracks across detected frames, a reference identity or a rule, interpolation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .clients import Face

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

    @property
    def last(self) -> Face:
        return self.faces[max(self.faces)]

    def best(self) -> tuple[int, Face]:
        """The frame and face with the highest detector score (used for the track's one embedding)."""
        return max(self.faces.items(), key=lambda item: item[1].score)

    def mean_area(self) -> float:
        return float(np.mean([f.area for f in self.faces.values()]))

    def mean_offset(self, center: np.ndarray) -> float:
        return float(np.mean([np.linalg.norm((f.box[:2] + f.box[2:]) / 2 - center) for f in self.faces.values()]))


def build_tracks(detections: dict[int, list[Face]]) -> list[Track]:
    """Greedy IoU matching of each detected frame's faces to the tracks alive in the previous one."""
    tracks: list[Track] = []
    alive: list[Track] = []
    for index in sorted(detections):
        pairs = sorted(((iou(t.last.box, f.box), ti, fi) for ti, t in enumerate(alive)
                        for fi, f in enumerate(detections[index])), reverse=True)
        taken_tracks, taken_faces, next_alive = set(), set(), []
        for overlap, ti, fi in pairs:
            if overlap < TRACK_IOU or ti in taken_tracks or fi in taken_faces:
                continue
            alive[ti].faces[index] = detections[index][fi]
            taken_tracks.add(ti)
            taken_faces.add(fi)
            next_alive.append(alive[ti])
        for fi, face in enumerate(detections[index]):
            if fi not in taken_faces:
                track = Track({index: face})
                tracks.append(track)
                next_alive.append(track)
        alive = next_alive
    return tracks


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
