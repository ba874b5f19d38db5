"""Speech input: decode allow-listed audio as librosa.load does, Wav2Lip's mel spectrogram, and its per-frame windows."""

from __future__ import annotations

from dataclasses import dataclass

import av
import librosa
import numpy as np

from service_runtime.errors import InvalidArgument

from .containers import check_decoder, open_audio
from .limits import MediaLimits

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
    """Mono 16 kHz float32 samples, the original bytes (re-read for the output's AAC track) and their channels."""

    samples: np.ndarray
    source: bytes
    channels: int = 1

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE


BUDGET_RATE = 48_000  # the highest rate whose speech may be as long as max_audio_seconds

def decode_speech(data: bytes, limits: MediaLimits = MediaLimits()) -> Speech:
    """Mono 16 kHz float32 as `librosa.load(path, sr=16000)` gives it: the mean of the channels, resampled with
    librosa's default (soxr HQ). Decoding stops as soon as the speech passes the length limit."""
    if not data:
        raise InvalidArgument("audio: no bytes were sent")
    check_wav_claim(data, limits)
    with open_audio(data) as container:
        if not container.streams.audio:
            raise InvalidArgument("audio: the file has no audio stream")
        stream = container.streams.audio[0]
        check_decoder(stream, "audio")
        if container.duration:
            limits.check_audio_seconds(container.duration / av.time_base, claimed=True)
        rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
        if not rate:
            raise InvalidArgument("audio: the stream has no sample rate")
        limits.check_audio_rate(rate)
        mono = _decode_mono(container, stream, rate, limits)
    if rate != SAMPLE_RATE and len(mono):
        mono = librosa.resample(mono, orig_sr=rate, target_sr=SAMPLE_RATE)
    if len(mono) < MEL_STEPS * HOP:
        raise InvalidArgument(
            f"audio: {len(mono) / SAMPLE_RATE * 1000:.0f} ms of sound is shorter than one Wav2Lip window "
            f"({MEL_STEPS * HOP / SAMPLE_RATE * 1000:.0f} ms of speech); send a longer clip"
        )
    return Speech(np.ascontiguousarray(mono, np.float32), data, channels)


def check_wav_claim(data: bytes, limits: MediaLimits) -> None:
    """A WAV header states its rate and length, and FFmpeg quietly trusts the bytes present instead: a rate past
    the limit, a claim past the limit, or past the end of the upload (a truncated file), is refused here."""
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    offset, byte_rate = 12, 0
    while offset + 8 <= len(data):
        kind, size = data[offset : offset + 4], int.from_bytes(data[offset + 4 : offset + 8], "little")
        if kind == b"fmt " and size >= 12:
            limits.check_audio_rate(int.from_bytes(data[offset + 12 : offset + 16], "little"))
            byte_rate = int.from_bytes(data[offset + 16 : offset + 20], "little")
        if kind == b"data":
            if not byte_rate or size in (0, 0xFFFFFFFF):  # 0 and all ones mean "unknown" (a streamed WAV)
                return
            limits.check_audio_seconds(size / byte_rate, claimed=True)
            present = len(data) - offset - 8
            if size > present:
                raise InvalidArgument(f"audio: the WAV header claims {size / byte_rate:.1f} s of sound but the "
                                      f"upload holds {present / byte_rate:.1f} s; it was cut short, send all of it")
            return
        offset += 8 + size + (size & 1)


def _decode_mono(container, stream, rate: int, limits: MediaLimits) -> np.ndarray:
    """The channels' mean at the source rate, in float32 as libsndfile reads PCM (int / 2^(bits-1))."""
    # Same rate and layout: an exact sample-format conversion. Packed, not planar: PyAV reads planar frames of 8
    # or more channels past FFmpeg's data pointers and crashes the process (found by `make fuzz`).
    to_float = av.AudioResampler(format="flt")
    # Samples held, not seconds, are what costs memory: past BUDGET_RATE the length allowed shrinks, so a file
    # declaring a huge rate holds no more than the longest speech at 48 kHz would.
    budget = int(limits.max_audio_seconds * min(rate, BUDGET_RATE))
    parts, total = [], 0
    try:
        for frame in container.decode(stream):
            for packed in to_float.resample(frame):
                channels = packed.to_ndarray().reshape(-1, len(packed.layout.channels)).T  # as planar: one row each
                parts.append(channels.mean(axis=0, dtype=np.float32))
                total += len(parts[-1])
            if total > budget:
                limits.check_audio_seconds(total / rate)
                raise InvalidArgument(
                    f"audio: at {rate} Hz, more than {budget / rate:.1f} s of sound is refused (the limit of "
                    f"{limits.max_audio_seconds:g} s holds for {BUDGET_RATE} Hz or less, and shrinks above it); "
                    "send it at 48 kHz or less")
    except (av.FFmpegError, ValueError) as error:
        raise InvalidArgument(f"audio: FFmpeg cannot decode it ({error.__class__.__name__})") from None
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


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
