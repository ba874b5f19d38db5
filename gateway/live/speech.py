"""One utterance's speech as it streams in: the client's PCM kept for playback, 16 kHz for Wav2Lip's mel windows."""

from __future__ import annotations

import bisect
import math
from fractions import Fraction

import numpy as np
import soxr

from ..audio import HOP, MEL_STEPS, N_FFT, SAMPLE_RATE, SILENCE, melspectrogram, window_start

# A mel column is centred on its hop and reaches N_FFT / 2 samples either side; the pre-emphasis of the first
# sample of a slice differs from the whole signal's, so a slice starts this many columns before the window.
CONTEXT_COLUMNS = 3


def frame_samples(k: int, rate: int, fps: Fraction) -> tuple[int, int]:
    """The samples [start, stop) at `rate` that play with frame k at `fps`."""
    per_frame = Fraction(rate) / fps
    return math.floor(k * per_frame), math.floor((k + 1) * per_frame)


class Utterance:
    """Speech from its first chunk to its end (an end-of-utterance, an underrun or a clear), scheduled to start at
    session frame `start`. Frame k of the utterance plays samples [k rate / fps, (k + 1) rate / fps) and its mouth
    follows Wav2Lip's window for frame k: the same windows a whole-file job of this speech would use."""

    def __init__(self, rate: int, fps: Fraction, start: int, first_chunk: int) -> None:
        self.rate, self.fps, self.start = rate, fps, start
        self.first_chunk = first_chunk
        self.ended = False
        self.underran = False
        self._cut_frames: int | None = None
        self._pcm = np.zeros(0, np.int16)  # the client's samples from `_pcm_base` on
        self._pcm_base = 0
        self._pcm_total = 0
        self._s16 = np.zeros(0, np.float32)  # 16 kHz from `_s16_base` on
        self._s16_base = 0
        self._s16_total = 0
        self._chunk_ends: list[int] = []  # 16 kHz samples received by the end of each chunk
        self._resampler = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32")

    # Speech in.
    def add(self, pcm: np.ndarray) -> None:
        self._pcm = np.concatenate([self._pcm, pcm])
        self._pcm_total += len(pcm)
        self._add16(self._to16(pcm.astype(np.float32) / 32768.0, last=False))
        self._chunk_ends.append(self._s16_total)

    def end(self) -> None:
        """No more speech: the resampler's tail is flushed and the length becomes known."""
        if not self.ended:
            self.ended = True
            self._add16(self._to16(np.zeros(0, np.float32), last=True))

    def underrun(self, k: int) -> None:
        """The speech for frame k has not all arrived when it must be made: the utterance ends with frame k, its
        missing samples silence (so nothing received is lost and the audio stays continuous)."""
        self.end()
        self.underran = True
        short = self.slice_bounds(k)[1] - self._pcm_total
        if short > 0:
            self._pcm = np.concatenate([self._pcm, np.zeros(short, np.int16)])
            self._pcm_total += short
            self._add16(np.zeros(int(math.ceil(short * SAMPLE_RATE / self.rate)), np.float32))

    def cut(self, k: int) -> None:
        """A clear: frames from k on are never shown, and their speech is dropped."""
        self.end()
        keep = self.slice_bounds(k)[0]
        if keep < self._pcm_total:
            self._pcm = self._pcm[: max(0, keep - self._pcm_base)]
            self._pcm_total = keep
        self._cut_frames = k

    def _to16(self, samples: np.ndarray, last: bool) -> np.ndarray:
        if self._resampler is None:
            return samples
        return self._resampler.resample_chunk(samples, last=last)

    def _add16(self, samples: np.ndarray) -> None:
        self._s16 = np.concatenate([self._s16, samples.astype(np.float32, copy=False)])
        self._s16_total += len(samples)

    # Frames out.
    @property
    def frames(self) -> int | None:
        """Frames of speech once the length is known (every received sample plays), else None."""
        if self._cut_frames is not None:
            return self._cut_frames
        if not self.ended:
            return None
        return max(1, math.ceil(self._pcm_total * self.fps / self.rate))

    @property
    def end_frame(self) -> float:
        frames = self.frames
        return math.inf if frames is None else self.start + frames

    def slice_bounds(self, k: int) -> tuple[int, int]:
        return frame_samples(k, self.rate, self.fps)

    def has_slice(self, k: int) -> bool:
        return self.ended or self._pcm_total >= self.slice_bounds(k)[1]

    def audio(self, k: int) -> bytes:
        """Frame k's samples as PCM16 (the last frame's tail padded with silence)."""
        a, b = self.slice_bounds(k)
        part = self._pcm[max(0, a - self._pcm_base) : max(0, b - self._pcm_base)]
        if len(part) < b - a:
            part = np.concatenate([part, np.zeros(b - a - len(part), np.int16)])
        return part.astype("<i2").tobytes()

    def _window_end16(self, k: int) -> int:
        """16 kHz samples needed before frame k's mel window is final: its last column's reach."""
        return (window_start(k, float(self.fps)) + MEL_STEPS - 1) * HOP + N_FFT // 2

    def window_ready(self, k: int) -> bool:
        return self.ended or self._s16_total >= self._window_end16(k)

    def mel_window(self, k: int) -> np.ndarray:
        """Wav2Lip's 80x16 window for frame k, computed on a slice of the speech; exactly the whole file's window
        once `window_ready(k)`. Before that (a frame that cannot wait), the speech not yet received is silence."""
        start = window_start(k, float(self.fps))
        first = max(0, start - CONTEXT_COLUMNS)
        lo = first * HOP - self._s16_base
        hi = len(self._s16) if self.ended else min(len(self._s16), self._window_end16(k) + HOP - self._s16_base)
        mel = melspectrogram(self._s16[max(0, lo):hi]) if hi - lo > N_FFT // 2 else np.zeros((80, 0), np.float32)
        window = mel[:, start - first : start - first + MEL_STEPS]
        if window.shape[1] < MEL_STEPS:
            pad = np.full((mel.shape[0] if mel.size else 80, MEL_STEPS - window.shape[1]), SILENCE, np.float32)
            window = np.concatenate([window, pad], axis=1)
        return np.ascontiguousarray(window, np.float32)

    def chunk_used(self, k: int) -> int:
        """The newest chunk (counted over the session from 1) whose speech frame k's window holds."""
        reach = min(self._window_end16(k), self._s16_total)
        return self.first_chunk + min(bisect.bisect_left(self._chunk_ends, reach), len(self._chunk_ends) - 1)

    def forget_before(self, k: int) -> None:
        """Drops speech no frame from k on needs, so a long utterance holds a few seconds, not all of it."""
        pcm_keep = self.slice_bounds(k)[0]
        if pcm_keep > self._pcm_base:
            self._pcm = self._pcm[pcm_keep - self._pcm_base :]
            self._pcm_base = pcm_keep
        s16_keep = max(0, window_start(k, float(self.fps)) - CONTEXT_COLUMNS) * HOP
        if s16_keep > self._s16_base:
            self._s16 = self._s16[s16_keep - self._s16_base :]
            self._s16_base = s16_keep

    def buffered_seconds(self, shown_frames: int) -> float:
        """Speech received but not yet played."""
        played = self.slice_bounds(max(0, shown_frames))[0]
        return max(0, self._pcm_total - played) / self.rate
