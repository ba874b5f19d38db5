"""Face media in (still image or video, decoded in process with FFmpeg through PyAV) and H.264 mp4 out."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import cv2
import numpy as np

from service_runtime.errors import InvalidArgument

from .faststart import faststart

# AAC adds 1024 priming samples to the track: 21 ms at 48 kHz stays within one video frame (46 ms at 22 kHz would not).
AAC_RATE = 48000


@dataclass
class FaceMedia:
    """Decoded face frames (BGR, even width and height) and their rate; a still has one frame."""

    frames: list[np.ndarray]
    fps: Fraction
    is_still: bool

    @property
    def size(self) -> tuple[int, int]:
        height, width = self.frames[0].shape[:2]
        return width, height


def even_crop(frame: np.ndarray) -> np.ndarray:
    """H.264 with yuv420p needs even dimensions: drop a last odd row or column."""
    height, width = frame.shape[:2]
    return frame[: height - height % 2, : width - width % 2]


def _video_frames(data: bytes, max_frames: int) -> tuple[list[np.ndarray], Fraction]:
    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.video:
            raise InvalidArgument("face: the file has no video stream and is not a picture")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        frames = []
        for frame in container.decode(stream):
            frames.append(even_crop(frame.to_ndarray(format="bgr24")))
            if len(frames) >= max_frames:
                break
    return frames, Fraction(rate)


def face_rate(data: bytes, still_fps: float) -> Fraction:
    """The output frame rate: the video's own, or `still_fps` for a picture. Decodes nothing else."""
    if not data:
        raise InvalidArgument("face: no bytes were sent")
    if _looks_like_picture(data):
        return Fraction(still_fps).limit_denominator(1001)
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise InvalidArgument("face: the file has no video stream and is not a picture")
            stream = container.streams.video[0]
            return Fraction(stream.average_rate or stream.guessed_rate or 25)
    except InvalidArgument:
        raise
    except (av.FFmpegError, ValueError, IndexError) as error:
        raise InvalidArgument(f"face: neither a picture nor a video FFmpeg can decode ({error})") from None


def _looks_like_picture(data: bytes) -> bool:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8) is not None


def decode_face(data: bytes, still_fps: float, max_frames: int) -> FaceMedia:
    """A picture (PNG, JPEG, ...) or a video; reads at most `max_frames` frames (the rest is never used)."""
    if not data:
        raise InvalidArgument("face: no bytes were sent")
    picture = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if picture is not None:
        return FaceMedia([even_crop(picture)], Fraction(still_fps).limit_denominator(1001), True)
    try:
        frames, rate = _video_frames(data, max_frames)
    except InvalidArgument:
        raise
    except (av.FFmpegError, ValueError, IndexError) as error:
        raise InvalidArgument(f"face: neither a picture nor a video FFmpeg can decode ({error})") from None
    if not frames:
        raise InvalidArgument("face: the video has no decodable frames")
    if min(frames[0].shape[:2]) < 2:
        raise InvalidArgument("face: frames are too small")
    return FaceMedia(frames, rate, False)


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
