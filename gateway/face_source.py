"""Face media in: a still image or a video, decoded in process with FFmpeg through PyAV, frame by frame within the limits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import av
import cv2
import numpy as np

from service_runtime.errors import InvalidArgument

from .containers import check_decoder, decode_picture, open_video, picture_size
from .limits import MediaLimits

def even_crop(frame: np.ndarray) -> np.ndarray:
    """H.264 with yuv420p needs even dimensions: drop a last odd row or column."""
    height, width = frame.shape[:2]
    return frame[: height - height % 2, : width - width % 2]


class FaceSource:
    """The face input's frames by index on a constant-rate grid, decoded on demand and upright.

    A video is never held whole in memory. Its frames are placed on the grid of its nominal rate by
    timestamp, as FFmpeg's `fps` filter does: grid slot n shows the latest frame whose timestamp rounds to n
    or earlier, so gaps in a variable-rate clip repeat the frame before and frames sharing a slot keep the
    last. Rotation metadata (the display matrix) is applied. Reading forward decodes on; reading backwards
    (ping-pong) seeks to the keyframe before and decodes from there, so both passes see identical frames."""

    def __init__(self, data: bytes, still_fps: float, limits: MediaLimits = MediaLimits()) -> None:
        if not data:
            raise InvalidArgument("face: no bytes were sent")
        self._container: Any = None  # av's InputContainer once a video is opened (av's types say neither)
        # A cancelled job closes the source while a worker thread may still be decoding: FFmpeg must not
        # see both at once.
        self._lock = threading.Lock()
        self._limits = limits
        size = picture_size(data)
        self.is_still = size is not None
        self._still: np.ndarray | None
        if size is not None:
            limits.check_frame("face", *size)
            self._still = frame = even_crop(decode_picture(data, "face"))
            self.fps = Fraction(still_fps).limit_denominator(1001)
            self.estimated_frames = 1
        else:
            self._still = None
            self._open(data, limits)
            self._frame_size: tuple[int, int] | None = None  # the first frame's: later ones are resized to it
            first = self.read(0, 1)
            if not first:
                self.close()
                raise InvalidArgument("face: the video has no decodable frames")
            frame = first[0]
        try:
            limits.check_frame("face", frame.shape[1], frame.shape[0])
        except InvalidArgument:
            self.close()
            raise
        self.size: tuple[int, int] = (frame.shape[1], frame.shape[0])
        self._frame_size = self.size

    def _open(self, data: bytes, limits: MediaLimits) -> None:
        self._container = open_video(data)
        try:
            if not self._container.streams.video:
                raise InvalidArgument("face: the file has no video stream and is not a picture")
            self._stream = stream = self._container.streams.video[0]
            check_decoder(stream, "face")
            if stream.codec_context.width and stream.codec_context.height:
                limits.check_frame("face", stream.codec_context.width, stream.codec_context.height)
            self.fps = nominal_rate(stream, limits.max_fps)
            limits.check_fps(self.fps)
        except BaseException:
            self.close()
            raise
        # One decoding thread: with FFmpeg's frame (or slice) threads the frames after a seek differed from run
        # to run (measured: 4 of 7 identical jobs), and both passes must see identical frames. Decoding is a
        # small part of a job; the other core is busy with the models anyway.
        stream.thread_type = "NONE"
        stream.thread_count = 1
        self._origin = stream.start_time or 0  # the timestamp of grid slot 0
        seconds = float(stream.duration * stream.time_base) if stream.duration else (
            self._container.duration / av.time_base if self._container.duration else 0.0)
        self.estimated_frames = max(1, round(seconds * self.fps))  # for progress totals only
        self._grid: Iterator[tuple[int, av.VideoFrame]] | None = None
        self._next = 0  # index of the grid slot it yields next
        self._last: tuple[av.VideoFrame, np.ndarray] | None = None  # a repeated frame is converted once

    def _slot(self, frame: av.VideoFrame, previous: int) -> int:
        if frame.pts is None:
            return previous + 1
        return round((frame.pts - self._origin) * self._stream.time_base * self.fps)

    def _on_grid(self, first: int) -> Iterator[tuple[int, av.VideoFrame]]:
        """(index, frame) for index = first, first + 1, ... to the end of the video."""
        index, held, slot = first, None, -1
        for frame in self._container.decode(self._stream):
            slot = self._slot(frame, slot)
            while held is not None and index < slot:
                yield index, held
                index += 1
            held = frame
        if held is not None:  # the last frame lasts its own duration, and at least one slot
            end = slot + max(1, round((held.duration or 0) * self._stream.time_base * self.fps))
            while index < end:
                yield index, held
                index += 1

    def _seek(self, index: int) -> None:
        """Restarts decoding at the keyframe before grid slot `index` (half a slot early: timestamps round)."""
        seconds = max(0.0, (index - 0.5) / float(self.fps))
        self._container.seek(self._origin + int(seconds / self._stream.time_base), stream=self._stream,
                             backward=True)
        self._grid = self._on_grid(index)

    def read(self, start: int, stop: int) -> list[np.ndarray]:
        """Exactly the frames [start, stop); fewer only when the video ends first. A still repeats its picture."""
        if self._still is not None:
            return [self._still] * max(0, stop - start)
        with self._lock:
            if self._container is None:
                raise InvalidArgument("face: the video was closed (the job ended)")
            try:
                return self._read(start, stop)
            except (av.FFmpegError, ValueError) as error:
                raise InvalidArgument(f"face: FFmpeg cannot decode the video ({error.__class__.__name__})") from None

    def _read(self, start: int, stop: int) -> list[np.ndarray]:
        if self._grid is None or self._next > start:
            self._seek(start)
            self._next = start
        out: list[np.ndarray] = []
        if self._next >= stop:
            return out
        assert self._grid is not None  # _seek made it
        for index, frame in self._grid:
            self._next = index + 1
            if index >= start:
                out.append(self._pixels(frame))
            if self._next >= stop:
                break
        return out

    def _pixels(self, frame: av.VideoFrame) -> np.ndarray:
        """BGR, upright, even-sized, and the size of the first frame (a stream may change size midway)."""
        if self._last is not None and self._last[0] is frame:
            return self._last[1]
        self._limits.check_frame("face", frame.width, frame.height)  # before the frame's pixels are made
        pixels: np.ndarray = frame.to_ndarray(format="bgr24")
        quarter_turns = round((frame.rotation or 0) / 90) % 4  # counter-clockwise, as the display matrix says
        if quarter_turns:
            pixels = np.ascontiguousarray(np.rot90(pixels, quarter_turns))
        pixels = even_crop(pixels)
        if self._frame_size is not None and (pixels.shape[1], pixels.shape[0]) != self._frame_size:
            pixels = cv2.resize(pixels, self._frame_size, interpolation=cv2.INTER_AREA)
        self._last = (frame, pixels)
        return pixels

    def close(self) -> None:
        with self._lock:
            if self._container is not None:
                self._container.close()
                self._container = None
                self._grid = self._last = None


def nominal_rate(stream: av.video.stream.VideoStream, max_fps: float) -> Fraction:
    """The rate the video was made at: FFmpeg's guess (r_frame_rate) unless only the average is plausible
    (browser WebM reports its 1 kHz timestamp clock as the rate)."""
    guessed, average = stream.guessed_rate, stream.average_rate
    for rate in (guessed, average):
        if rate and 0 < rate <= max_fps:
            return Fraction(rate).limit_denominator(1001)
    return Fraction(guessed or average or 0)


def source_index(index: int, available: int, ping_pong: bool) -> int:
    """Which decoded frame output frame `index` shows when the video is shorter than the speech."""
    if available == 1:
        return 0
    if not ping_pong:
        return index % available
    period = 2 * available - 2
    phase = index % period
    return phase if phase < available else period - phase
