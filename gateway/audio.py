"""Speech input: decode any FFmpeg-readable audio, Wav2Lip's mel spectrogram, and its per-frame windows."""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import librosa
import numpy as np

from service_runtime.errors import InvalidArgument

SAMPLE_RATE = 16000
N_FFT, HOP, WIN = 800, 200, 800
N_MELS, FMIN, FMAX = 80, 55.0, 7600.0
PREEMPHASIS = 0.97
MIN_LEVEL_DB, REF_LEVEL_DB, MAX_ABS = -100.0, 20.0, 4.0
MEL_STEPS = 16
MEL_FRAMES_PER_SECOND = 80.0  # SAMPLE_RATE / HOP
SILENCE = -MAX_ABS  # the normalised value of silence (the floor of the dB scale)

_MEL_BASIS = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX)


@dataclass(frozen=True)
class Speech:
    """Mono 16 kHz float32 samples and the original bytes (re-read for the output's AAC track)."""

    samples: np.ndarray
    source: bytes

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def decode_speech(data: bytes) -> Speech:
    """Decodes and resamples to mono 16 kHz float32; raises InvalidArgument for anything unusable."""
    if not data:
        raise InvalidArgument("audio: no bytes were sent")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise InvalidArgument("audio: the file has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            parts = []
            for frame in container.decode(audio=0):
                parts.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(frame))
            parts.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(None))
    except InvalidArgument:
        raise
    except (av.FFmpegError, ValueError, IndexError) as error:
        raise InvalidArgument(f"audio: FFmpeg cannot decode it ({error})") from None
    samples = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    if len(samples) < MEL_STEPS * HOP:
        raise InvalidArgument(
            f"audio: {len(samples) / SAMPLE_RATE * 1000:.0f} ms of sound is shorter than one Wav2Lip window "
            f"({MEL_STEPS * HOP / SAMPLE_RATE * 1000:.0f} ms of speech); send a longer clip"
        )
    return Speech(samples, data)


def melspectrogram(samples: np.ndarray) -> np.ndarray:
    """Wav2Lip's normalised log-mel spectrogram, 80 x (1 + len // 200), values in [-4, 4]."""
    emphasised = np.append(samples[:1], samples[1:] - PREEMPHASIS * samples[:-1]).astype(np.float32)
    # librosa >= 0.10 pads with zeros by default; Wav2Lip was trained with reflect padding.
    spectrum = np.abs(librosa.stft(y=emphasised, n_fft=N_FFT, hop_length=HOP, win_length=WIN,
                                   center=True, pad_mode="reflect"))
    db = 20 * np.log10(np.maximum(1e-5, _MEL_BASIS @ spectrum)) - REF_LEVEL_DB
    return np.clip(2 * MAX_ABS * (db - MIN_LEVEL_DB) / -MIN_LEVEL_DB - MAX_ABS, -MAX_ABS, MAX_ABS).astype(np.float32)


def frame_count(seconds: float, fps: float) -> int:
    """Output frames: the whole speech at the output rate (Wav2Lip stops up to 150 ms early)."""
    return max(1, round(seconds * fps))


def window_start(index: int, fps: float) -> int:
    return int(index * (MEL_FRAMES_PER_SECOND / fps))  # the reference's exact float expression


def mel_window(mel: np.ndarray, index: int, fps: float) -> np.ndarray:
    """The 80x16 window for video frame `index`, padded with silence past the end of the mel."""
    start = window_start(index, fps)
    window = mel[:, start : start + MEL_STEPS]
    if window.shape[1] < MEL_STEPS:
        pad = np.full((mel.shape[0], MEL_STEPS - window.shape[1]), SILENCE, np.float32)
        window = np.concatenate([window, pad], axis=1)
    return np.ascontiguousarray(window, dtype=np.float32)
