"""Face media in (still image or video, decoded in process with FFmpeg through PyAV) and H.264 mp4 out."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from fractions import Fraction

import av
import cv2
import numpy as np

from service_runtime.errors import InvalidArgument

from .faststart import faststart

# AAC adds 1024 priming samples to the track: 21 ms at 48 kHz stays within one video frame (46 ms at 22 kHz would not).
AAC_RATE = 48000


def even_crop(frame: np.ndarray) -> np.ndarray:
    """H.264 with yuv420p needs even dimensions: drop a last odd row or column."""
    height, width = frame.shape[:2]
    return frame[: height - height % 2, : width - width % 2]


def _decode_error(error: Exception) -> InvalidArgument:
    return InvalidArgument(f"face: neither a picture nor a video FFmpeg can decode ({error})")


class FaceSource:
    """The face input's frames by index, decoded on demand: a video is never held whole in memory.

    Reading forward decodes on; reading backwards (ping-pong) seeks to the keyframe before and decodes
    from there."""

    def __init__(self, data: bytes, still_fps: float) -> None:
        if not data:
            raise InvalidArgument("face: no bytes were sent")
        self._data = data
        self._container = None
        # A cancelled job closes the source while a worker thread may still be decoding: FFmpeg must not
        # see both at once.
        self._lock = threading.Lock()
        picture = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        self.is_still = picture is not None
        if self.is_still:
            self._still = frame = even_crop(picture)
            self.fps = Fraction(still_fps).limit_denominator(1001)
        else:
            self._still = None
            self._open()
            first = self.read(0, 1)
            if not first:
                self.close()
                raise InvalidArgument("face: the video has no decodable frames")
            frame = first[0]
        if min(frame.shape[:2]) < 2:
            raise InvalidArgument("face: frames are too small")
        self.size = (frame.shape[1], frame.shape[0])

    def _open(self) -> None:
        try:
            self._container = av.open(io.BytesIO(self._data), mode="r")
            if not self._container.streams.video:
                raise InvalidArgument("face: the file has no video stream and is not a picture")
            self._stream = self._container.streams.video[0]
            self._stream.thread_type = "AUTO"
        except InvalidArgument:
            raise
        except (av.FFmpegError, ValueError, IndexError) as error:
            raise _decode_error(error) from None
        self.fps = Fraction(self._stream.average_rate or self._stream.guessed_rate or 25)
        self._start = self._stream.start_time or 0
        self._frames = None  # the decoder's frame iterator
        self._next = 0  # index of the frame it yields next

    def _index_of(self, frame: av.VideoFrame, fallback: int) -> int:
        if frame.pts is None:
            return fallback
        return round(float((frame.pts - self._start) * self._stream.time_base * self.fps))

    def _seek(self, index: int) -> None:
        target = self._start + int(index / self.fps / self._stream.time_base)
        self._container.seek(target, stream=self._stream, backward=True)
        self._frames = None
        self._next = -1  # unknown until the first frame's timestamp is read

    def read(self, start: int, stop: int) -> list[np.ndarray]:
        """Frames [start, stop); fewer when the video ends first. A still repeats its picture."""
        if self.is_still:
            return [self._still] * max(0, stop - start)
        with self._lock:
            if self._container is None:
                raise InvalidArgument("face: the video was closed (the job ended)")
            return self._read(start, stop)

    def _read(self, start: int, stop: int) -> list[np.ndarray]:
        if self._frames is not None and self._next > start:
            self._seek(start)
        out: list[np.ndarray] = []
        try:
            if self._frames is None:
                self._frames = self._container.decode(self._stream)
            for frame in self._frames:
                index = self._index_of(frame, self._next)
                self._next = index + 1
                if index >= start:
                    out.append(even_crop(frame.to_ndarray(format="bgr24")))
                if self._next >= stop:
                    break
        except (av.FFmpegError, ValueError) as error:
            raise _decode_error(error) from None
        return out

    def close(self) -> None:
        with self._lock:
            if self._container is not None:
                self._container.close()
                self._container = None


def source_index(index: int, available: int, ping_pong: bool) -> int:
    """Which decoded frame output frame `index` shows when the video is shorter than the speech."""
    if available == 1:
        return 0
    if not ping_pong:
        return index % available
    period = 2 * available - 2
    phase = index % period
    return phase if phase < available else period - phase


def _audio_layout(source: bytes) -> str:
    """The AAC track keeps the speech's channels (mono or stereo)."""
    with av.open(io.BytesIO(source), mode="r") as container:
        return "mono" if container.streams.audio[0].channels == 1 else "stereo"


def _audio_frames(source: bytes, rate: int, layout: str) -> Iterator[av.AudioFrame]:
    with av.open(io.BytesIO(source), mode="r") as container:
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        for frame in container.decode(audio=0):
            yield from resampler.resample(frame)
        yield from resampler.resample(None)


class Mp4Writer:
    """Encodes BGR frames with libx264 (yuv420p) and the speech as AAC into memory, `moov` first."""

    def __init__(self, width: int, height: int, fps: Fraction, crf: int, preset: str, speech_source: bytes) -> None:
        self._speech = speech_source
        self._buffer = io.BytesIO()
        self._container = av.open(self._buffer, mode="w", format="mp4")
        self._video = self._container.add_stream("libx264", rate=fps)
        self._video.width, self._video.height = width, height
        self._video.pix_fmt = "yuv420p"
        self._video.options = {"crf": str(crf), "preset": preset}
        # Every stream must exist before the first packet is muxed (the header is written then).
        self._audio = self._container.add_stream("aac", rate=AAC_RATE, layout=_audio_layout(speech_source))
        self._frames = 0

    def write(self, frame: np.ndarray) -> None:
        video_frame = av.VideoFrame.from_ndarray(frame, format="bgr24")
        video_frame.pts = self._frames
        self._frames += 1
        self._container.mux(self._video.encode(video_frame))

    def finish(self) -> bytes:
        """Flushes the video, encodes the audio track and returns the mp4 bytes."""
        self._container.mux(self._video.encode(None))
        for frame in _audio_frames(self._speech, self._audio.rate, self._audio.layout.name):
            frame.pts = None
            self._container.mux(self._audio.encode(frame))
        self._container.mux(self._audio.encode(None))
        self._container.close()
        return faststart(self._buffer.getvalue())

    def abort(self) -> None:
        try:
            self._container.close()
        except (av.FFmpegError, ValueError):
            pass
