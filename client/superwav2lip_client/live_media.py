"""Media for live sessions (PyAV, imported on use): speech files as PCM16, and a session recorded into an mp4."""

from __future__ import annotations

import math
import os
from fractions import Fraction
from typing import Any

from .types import LiveFrame


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise ValueError("live media needs PyAV: pip install av") from None
    return av


def speech_pcm16(path: str | os.PathLike, rate: int = 16000) -> bytes:
    """A speech file (any format FFmpeg reads) as PCM16 little-endian mono at `rate`."""
    av = _av()
    try:
        container = av.open(os.fspath(path))
    except (OSError, av.FFmpegError) as error:
        raise ValueError(f"cannot read the speech file {os.fspath(path)!r}: {error}") from None
    with container:
        if not container.streams.audio:
            raise ValueError(f"the speech file {os.fspath(path)!r} has no audio stream")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        parts = [_s16_bytes(out) for frame in container.decode(audio=0) for out in resampler.resample(frame)]
        parts += [_s16_bytes(out) for out in resampler.resample(None)]
    return b"".join(parts)


def _s16_bytes(frame: Any) -> bytes:
    return bytes(frame.planes[0])[: 2 * frame.samples]  # a plane may be padded past its samples


class Recording:
    """What a session sent back: H.264 access units by frame index, and each frame's audio at its place on the
    session's timeline (a frame whose message never came leaves silence), written as one mp4."""

    def __init__(self, fps: float, width: int, height: int, rate: int) -> None:
        self.fps = Fraction(fps).limit_denominator(1001)
        self.size, self.rate = (width, height), rate
        self.pictures: list[tuple[int, bytes]] = []
        self._audio = bytearray()

    def add(self, frame: LiveFrame) -> None:
        if frame.data:
            self.pictures.append((frame.index, frame.data))
        if frame.pcm:
            start = 2 * math.floor(frame.index * self.rate / self.fps)
            if len(self._audio) < start:
                self._audio.extend(bytes(start - len(self._audio)))
            self._audio[start : start + len(frame.pcm)] = frame.pcm

    @property
    def audio_seconds(self) -> float:
        return len(self._audio) / 2 / self.rate

    def write(self, path: str | os.PathLike) -> None:
        """The access units muxed as they are (no re-encoding; PyAV takes the SPS/PPS from the first key frame)
        at their own times, dropped frames leaving gaps; the audio encoded as AAC."""
        av = _av()
        with av.open(os.fspath(path), "w", format="mp4") as out:
            video = out.add_mux_stream("h264", rate=self.fps, width=self.size[0], height=self.size[1])
            frame_time = 1 / self.fps  # the stream's own time base becomes the muxer's once its header is written
            video.time_base = frame_time
            audio = out.add_stream("aac", rate=self.rate, layout="mono") if self._audio else None
            for index, data in self.pictures:
                packet = av.Packet(data)
                packet.stream, packet.pts, packet.dts, packet.time_base = video, index, index, frame_time
                packet.is_keyframe = _has_idr(data)
                out.mux(packet)
            if audio is not None:
                frame = av.AudioFrame(format="s16", layout="mono", samples=len(self._audio) // 2)
                frame.planes[0].update(bytes(self._audio))
                frame.sample_rate, frame.pts, frame.time_base = self.rate, 0, Fraction(1, self.rate)
                out.mux(audio.encode(frame))
                out.mux(audio.encode(None))


def _has_idr(access_unit: bytes) -> bool:
    """Whether an Annex B access unit holds an IDR slice (NAL type 5)."""
    for part in access_unit.split(b"\x00\x00\x01")[1:]:
        if part and part[0] & 0x1F == 5:
            return True
    return False
