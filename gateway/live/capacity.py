"""Admission of live sessions: the frame rate this gateway can sustain for one more, measured, or a refusal."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

from service_runtime.errors import ResourceExhausted

from ..limits import setting_name

PROBE_FRAMES = 1  # live calls carry a frame or two: a larger probe batch would price frames too low
RATE_STEP = Fraction(1, 2)  # a reduced rate is a multiple of half a frame per second


@dataclass(frozen=True)
class Admission:
    fps: Fraction
    reduced_because: str


class LiveCapacity:
    """Live sessions share `budget` seconds of frame-making per second (SWL_GATEWAY_LIVE_CAPACITY). A frame's
    cost is measured when each session opens. A session that would not fit at its asked rate gets the highest rate that fits, down to `min_fps`;
    below that it is refused, so the sessions already running keep their rate."""

    def __init__(self, budget: float, min_fps: float, max_sessions: int) -> None:
        self.budget, self.min_fps, self.max_sessions = budget, Fraction(min_fps), max_sessions
        self.seconds_per_frame: float | None = None
        self._sessions: dict[int, Fraction] = {}
        self._ids = iter(range(1 << 62))

    async def measure(self, probe: Callable[[int], Awaitable[None]]) -> float:
        """The cost of a frame now: a frame alone through the lip-sync model, the faster of two (the first may pay
        for cold caches), measured at every opening, so that the price includes what else the machine is doing
        (a long job beside, other sessions)."""
        costs = []
        for _ in range(2):
            started = time.monotonic()
            await probe(PROBE_FRAMES)
            costs.append((time.monotonic() - started) / PROBE_FRAMES)
        self.seconds_per_frame = min(costs)
        return self.seconds_per_frame

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def load(self) -> float:
        return float(sum(self._sessions.values())) * (self.seconds_per_frame or 0.0)

    @contextlib.contextmanager
    def admitted(self, asked: Fraction) -> Iterator[Admission]:
        admission = self._choose(asked)
        key = next(self._ids)
        self._sessions[key] = admission.fps
        try:
            yield admission
        finally:
            del self._sessions[key]

    def _choose(self, asked: Fraction) -> Admission:
        if len(self._sessions) >= self.max_sessions:
            raise ResourceExhausted(f"this gateway holds its most live sessions ({self.max_sessions}, "
                                    f"{setting_name('live_max_sessions')}); retry later or on another replica",
                                    retry_after_s=5.0)
        cost = self.seconds_per_frame or 0.0
        free = self.budget - self.load()
        if cost <= 0 or float(asked) * cost <= free:
            fps = asked
        else:
            fps = max(Fraction(0), math.floor(Fraction(free / cost) / RATE_STEP) * RATE_STEP)
        if fps < min(self.min_fps, asked):
            raise ResourceExhausted(
                f"no capacity for another live session: a frame costs {cost * 1000:.0f} ms here and the sessions "
                f"running use {self.load():.2f} of {self.budget:g} s per second ({setting_name('live_capacity')}); "
                f"fewer than {float(self.min_fps):g} fps would be left. Retry later or on another replica",
                retry_after_s=5.0)
        reason = "" if fps == asked else (
            f"a frame costs {cost * 1000:.0f} ms on this gateway and {free:.2f} s per second of frame-making is "
            f"free: {float(fps):g} fps is what it sustains")
        return Admission(fps, reason)
