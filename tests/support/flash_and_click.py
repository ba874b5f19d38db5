"""The flash-and-click test media: a clip whose frame FLASH_FRAME has a white corner patch, and speech silent but
for a click at the time that frame is shown (tests/gateway/test_av_sync.py explains the measurement)."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

from tests.support.media_factory import encode_video, marker_frames

FPS = 25
CLIP_FRAMES = 50
FLASH_FRAME = 30
CLICK_S = FLASH_FRAME / FPS  # the click belongs exactly where the flash frame is shown
SPEECH_S = 1.8  # shorter than the clip: output frame i is input frame i
PATCH = (slice(4, 36), slice(4, 36))  # top-left corner, far from the marker face at x >= 100, y >= 80


def flash_clip() -> bytes:
    frames = marker_frames(CLIP_FRAMES)
    for frame in frames:
        frame[PATCH] = 20
    frames[FLASH_FRAME][PATCH] = 255
    return encode_video(frames, Fraction(FPS))


def click_samples(rate: int) -> np.ndarray:
    """Silence with a 3 ms full-scale-ish click starting at CLICK_S."""
    samples = np.zeros(round(SPEECH_S * rate), np.float32)
    start = round(CLICK_S * rate)
    samples[start : start + round(0.003 * rate)] = 0.8
    return samples


def encode_speech(kind: str, rate: int = 44100) -> bytes:
    """The click track as WAV (PCM), m4a (AAC, priming signalled by an edit list) or mp3 (LAME's delay tag)."""
    codec, container_format = {"wav": ("pcm_s16le", "wav"), "m4a": ("aac", "ipod"), "mp3": ("libmp3lame", "mp3")}[kind]
    samples = click_samples(rate)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        size = stream.codec_context.frame_size or 1024
        for offset in range(0, len(samples), size):
            part = samples[offset : offset + size]
            if len(part) < size and codec != "pcm_s16le":
                part = np.pad(part, (0, size - len(part)))
            frame = av.AudioFrame.from_ndarray(part[None], format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, offset, Fraction(1, rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


