"""Test media made in the test run: frames with a green marker face (found by the generated detector)."""

from __future__ import annotations

import io
import struct
from fractions import Fraction

import av
import cv2
import numpy as np

MARKER = (0, 255, 0)  # BGR pure green: the generated SCRFD "sees" a face there


def scene(width: int = 320, height: int = 240, seed: int = 0) -> np.ndarray:
    """A textured, muted background (gradients plus noise) so that untouched pixels are worth checking."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[:height, :width]
    base = np.stack([60 + xs * 100 // width, 60 + ys * 100 // height, 60 + (xs + ys) * 100 // (width + height)],
                    axis=-1)
    return np.clip(base + rng.integers(0, 30, base.shape), 0, 255).astype(np.uint8)


def with_marker(frame: np.ndarray, x: int, y: int, size: int = 72) -> np.ndarray:
    out = frame.copy()
    out[y : y + size, x : x + size] = MARKER
    return out


def marker_frames(count: int, width: int = 320, height: int = 240, missing: set[int] = frozenset()) -> list[np.ndarray]:
    """A marker drifting right a pixel per frame; frames in `missing` have no marker."""
    frames = []
    for i in range(count):
        background = scene(width, height, seed=i)
        frames.append(background if i in missing else with_marker(background, 100 + i, 80))
    return frames


def encode_video(frames: list[np.ndarray], fps: Fraction = Fraction(25), codec: str = "libx264",
                 ticks: list[int] | None = None, container_format: str = "mp4") -> bytes:
    """Frames at `fps`; `ticks` gives each frame's timestamp in 1/fps units (gaps make a variable-rate clip)."""
    buffer = io.BytesIO()
    height, width = frames[0].shape[:2]
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "10"} if codec == "libx264" else {}
        for index, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="bgr24")
            if ticks is not None:
                video_frame.pts, video_frame.time_base = ticks[index], Fraction(1) / fps
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def with_display_matrix(mp4: bytes, clockwise_degrees: int) -> bytes:
    """The same mp4 with its video track's tkhd matrix set to rotate the picture clockwise on display,
    as phones record portrait clips (a 90-degree clip carries the matrix [0 1; -1 0])."""
    data = bytearray(mp4)
    cos, sin = {0: (1, 0), 90: (0, 1), 180: (-1, 0), 270: (0, -1)}[clockwise_degrees]
    body = _box_body(data, [b"moov", b"trak", b"tkhd"])
    matrix_at = body + 4 + (32 if data[body] == 1 else 20) + 16  # after version/flags, times and ids, reserved
    struct.pack_into(">9i", data, matrix_at, cos << 16, sin << 16, 0, -sin << 16, cos << 16, 0, 0, 0, 1 << 30)
    return bytes(data)


def _box_body(data: bytearray, path: list[bytes], start: int = 0, end: int | None = None) -> int:
    end = len(data) if end is None else end
    while start + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, start)
        if kind == path[0]:
            return start + 8 if len(path) == 1 else _box_body(data, path[1:], start + 8, start + size)
        start += size
    raise ValueError(f"no {path[0]!r} box")


def encode_png(frame: np.ndarray) -> bytes:
    return cv2.imencode(".png", frame)[1].tobytes()


def speech_wav(seconds: float, rate: int = 22050) -> bytes:
    """A voiced-sounding tone sweep as a 16-bit mono wav."""
    t = np.arange(int(seconds * rate)) / rate
    samples = 0.3 * np.sin(2 * np.pi * (150 + 100 * np.sin(2 * np.pi * 2 * t)) * t)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray((samples * 32767).astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def stream_durations(mp4: bytes) -> dict[str, float]:
    with av.open(io.BytesIO(mp4)) as container:
        return {s.type: float(s.duration * s.time_base) for s in container.streams}


def decode_all(mp4: bytes) -> tuple[list[np.ndarray], Fraction]:
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        return [f.to_ndarray(format="bgr24") for f in container.decode(stream)], stream.average_rate


def assert_same_video(first: bytes, second: bytes, min_psnr: float = 35.0) -> None:
    """Two encodings of the same frames: equal frame counts, each frame equal up to encoder noise.

    Frames are compared exactly before encoding elsewhere (tests/gateway/test_avatars.py); after libx264 two runs of
    one job can differ in a few pixels of a few frames (seen about once in seven under concurrent load)."""
    a, b = decode_all(first)[0], decode_all(second)[0]
    assert len(a) == len(b), (len(a), len(b))
    for index, (x, y) in enumerate(zip(a, b)):
        mse = np.mean((x.astype(np.float64) - y) ** 2)
        assert mse == 0 or 10 * np.log10(255.0**2 / mse) >= min_psnr, f"frame {index} differs beyond encoder noise"
