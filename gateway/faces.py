"""The face data types that detection, tracking, planning, compositing and the plan cache share, free of any transport:
a detected Face, a frame's Target, and the FacePlan of a whole face media."""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

Box = tuple[int, int, int, int]  # x1, y1, x2, y2, integer pixels, x2/y2 exclusive
PLAN_FORMAT = 1


def box_of(values) -> Box:
    """Four integer pixel coordinates, from any sequence of four numbers."""
    x1, y1, x2, y2 = (int(v) for v in values)
    return x1, y1, x2, y2


@dataclass(frozen=True)
class Face:
    box: np.ndarray  # x1, y1, x2, y2 in frame pixels
    score: float
    landmarks: np.ndarray  # 5x2

    @property
    def area(self) -> float:
        return float(max(0, self.box[2] - self.box[0]) * max(0, self.box[3] - self.box[1]))


@dataclass(frozen=True)
class Target:
    """The face to animate in one frame: its padded, smoothed box and its smoothed 5 landmarks."""

    box: Box
    landmarks: np.ndarray


@dataclass(frozen=True)
class FacePlan:
    """Per frame of the face media, the target to animate (None: leave the frame untouched), with the
    media's frame rate and size. Landmarks are float64, whether fresh or read back, so both give equal frames."""

    fps: Fraction
    size: tuple[int, int]
    targets: tuple[Target | None, ...]
    planning_seconds: float = 0.0  # what planning cost: what a cache hit saves

    @property
    def source_frames(self) -> int:
        return len(self.targets)

    def to_json(self) -> bytes:
        return json.dumps({
            "format": PLAN_FORMAT, "fps": [self.fps.numerator, self.fps.denominator], "size": list(self.size),
            "planning_seconds": self.planning_seconds,
            "targets": [None if t is None else {"box": list(t.box), "landmarks": t.landmarks.tolist()}
                        for t in self.targets],
        }, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "FacePlan":
        """Reads a plan back; raises ValueError for anything but a plan this version wrote."""
        try:
            raw = json.loads(data)
            if raw["format"] != PLAN_FORMAT:
                raise ValueError(f"plan format {raw['format']}")
            targets = tuple(None if t is None else
                            Target(box_of(t["box"]), np.asarray(t["landmarks"], np.float64).reshape(5, 2))
                            for t in raw["targets"])
            return cls(Fraction(*raw["fps"]), (int(raw["size"][0]), int(raw["size"][1])), targets,
                       float(raw["planning_seconds"]))
        except (KeyError, TypeError, IndexError, json.JSONDecodeError) as error:
            raise ValueError(f"not a face plan: {error}") from None
