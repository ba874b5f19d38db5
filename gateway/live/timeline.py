"""A live session's timeline: which utterance, if any, each frame index plays, and where new speech is placed."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .speech import Utterance

RAMP_FRAMES = 2  # frames over which the mouth blends from idle to speech and back (then alpha 1/3, 2/3, 1)


@dataclass(frozen=True)
class Slot:
    """What frame `index` shows: an utterance's frame k (with the mouth's blend weight), or idle (utterance None)."""

    index: int
    utterance: Utterance | None = None
    k: int = 0

    @property
    def speaking(self) -> bool:
        return self.utterance is not None

    @property
    def alpha(self) -> float:
        """Weight of the synthesised mouth: ramps in over the first frames and out over the last known ones."""
        if self.utterance is None:
            return 0.0
        ramp = min(1.0, (self.k + 1) / (RAMP_FRAMES + 1))
        if (frames := self.utterance.frames) is not None and not self.utterance.underran:
            ramp = min(ramp, (frames - self.k) / (RAMP_FRAMES + 1))
        return max(0.0, ramp)


class Timeline:
    """Frame n plays at `t0 + n / fps`. Speech that arrives while nothing is playing starts at the first frame at
    least `lookahead_s` later (Wav2Lip's window plus the margin to make the frame) and never before a frame that
    was already prepared; speech that follows an open utterance continues it."""

    def __init__(self, fps: Fraction, rate: int, lookahead_s: float, t0: float) -> None:
        self.fps, self.rate, self.lookahead_s, self.t0 = fps, rate, lookahead_s, t0
        self.utterances: deque[Utterance] = deque()
        self.chunks = 0

    def time_of(self, index: int) -> float:
        return self.t0 + float(index / self.fps)

    def index_at(self, t: float) -> int:
        return max(0, math.ceil((t - self.t0) * float(self.fps) - 1e-9))

    @property
    def open_utterance(self) -> Utterance | None:
        last = self.utterances[-1] if self.utterances else None
        return last if last is not None and not last.ended else None

    def push(self, pcm: np.ndarray, now: float, first_free: int) -> Utterance:
        """Adds a chunk; `first_free` is the first frame not yet prepared (a new utterance may start there)."""
        self.chunks += 1
        utterance = self.open_utterance
        if utterance is None:
            start = max(first_free, self.index_at(now + self.lookahead_s))
            if self.utterances:
                start = max(start, int(self.utterances[-1].end_frame))
            utterance = Utterance(self.rate, self.fps, start, self.chunks)
            self.utterances.append(utterance)
        utterance.add(pcm)
        return utterance

    def end_utterance(self) -> None:
        if (utterance := self.open_utterance) is not None:
            utterance.end()

    def slot(self, index: int) -> Slot:
        for utterance in self.utterances:
            if utterance.start <= index < utterance.end_frame:
                return Slot(index, utterance, index - utterance.start)
        return Slot(index)

    def clear(self, first_unshown: int) -> bool:
        """Barge-in: every frame from `first_unshown` on becomes idle and the speech not yet shown is dropped.
        True when anything was dropped."""
        dropped = False
        for utterance in list(self.utterances):
            if utterance.start >= first_unshown:
                self.utterances.remove(utterance)
                dropped = True
            elif utterance.end_frame > first_unshown:
                utterance.cut(first_unshown - utterance.start)
                dropped = True
        return dropped

    def forget_before(self, index: int) -> list[Utterance]:
        """Drops utterances that ended before frame `index` and the speech the others no longer need; returns the
        utterances finished."""
        finished = []
        while self.utterances and self.utterances[0].end_frame <= index:
            finished.append(self.utterances.popleft())
        for utterance in self.utterances:
            if utterance.start < index:
                utterance.forget_before(index - utterance.start)
        return finished

    def buffered_seconds(self, shown: int) -> float:
        """Speech received and not yet played: the back-pressure measure."""
        return sum(u.buffered_seconds(shown - u.start) for u in self.utterances)

    @property
    def busy(self) -> bool:
        return bool(self.utterances)
