"""Face media in (still image or video, decoded in process with FFmpeg through PyAV) and H.264 mp4 out."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import av
import cv2
import numpy as np

from service_runtime.errors import InvalidArgument

from .audio import Speech
from .containers import decode_picture, open_audio, open_video, picture_size
from .mp4_boxes import faststart, has_complete_moov, with_gapless_info
from .limits import MediaLimits

# AAC adds 1024 priming samples to the track, which the edit list skips; the rate stays 48 kHz, the one players
# expect (and 21 ms of priming is less than a frame for a player that ignores edit lists).
AAC_RATE = 48000


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
        self._container = None
        # A cancelled job closes the source while a worker thread may still be decoding: FFmpeg must not
        # see both at once.
        self._lock = threading.Lock()
        size = picture_size(data)
        self.is_still = size is not None
        if self.is_still:
            limits.check_frame("face", *size)
            self._still = frame = even_crop(decode_picture(data, "face"))
            self.fps = Fraction(still_fps).limit_denominator(1001)
            self.estimated_frames = 1
        else:
            self._still = None
            self._open(data, limits)
            self.size: tuple[int, int] | None = None  # set by the first frame
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
        self.size = (frame.shape[1], frame.shape[0])

    def _open(self, data: bytes, limits: MediaLimits) -> None:
        self._container = open_video(data)
        try:
            if not self._container.streams.video:
                raise InvalidArgument("face: the file has no video stream and is not a picture")
            self._stream = stream = self._container.streams.video[0]
            if stream.codec_context is None:  # FFmpeg has no decoder for the stream's codec
                raise InvalidArgument("face: the video codec cannot be decoded; send H.264, HEVC, VP8/VP9, AV1 or MPEG-4 video")
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
        if self.is_still:
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
        pixels = frame.to_ndarray(format="bgr24")
        quarter_turns = round((frame.rotation or 0) / 90) % 4  # counter-clockwise, as the display matrix says
        if quarter_turns:
            pixels = np.ascontiguousarray(np.rot90(pixels, quarter_turns))
        pixels = even_crop(pixels)
        if self.size is not None and (pixels.shape[1], pixels.shape[0]) != self.size:
            pixels = cv2.resize(pixels, self.size, interpolation=cv2.INTER_AREA)
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


def _audio_frames(source: bytes, rate: int, layout: str) -> Iterator[av.AudioFrame]:
    with open_audio(source) as container:
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        for frame in container.decode(audio=0):
            yield from resampler.resample(frame)
        yield from resampler.resample(None)


FRAGMENT_SECONDS = 2  # a keyframe, hence a fragment a streaming client can use, every 2 s of video
# delay_moov holds the `moov` back until the first fragment is cut, when the muxer knows each track's first
# timestamps, so it carries the edit lists that present the first frame and the first speech sample at t = 0:
# the video's list takes back x264's B-frame delay, the audio's skips AAC's 1024 priming samples. It costs no bytes
# and no latency (nothing is playable before the first fragment anyway). Without it the streamed video was shown
# two frames late. Negative composition offsets cannot signal AAC priming, and output without B-frames measured
# 12-17% larger at the same quality (x264 veryfast, crf 23, on two of the shared talking-head clips).
FRAGMENTED_MOVFLAGS = "frag_keyframe+empty_moov+delay_moov+default_base_moof"


class _Sink:
    """A write-only, unseekable file for the fragmented muxer: FFmpeg must stream, never go back. Its head (`ftyp`
    and `moov`) is held until complete and passes once through `edit_head` before anything is handed on."""

    def __init__(self, edit_head: Callable[[bytes], bytes]) -> None:
        self._parts: list[bytes] = []
        self._edit_head: Callable[[bytes], bytes] | None = edit_head

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        if self._edit_head is not None:
            if not has_complete_moov(data):
                self._parts = [data] if data else []
                return b""
            data, self._edit_head = self._edit_head(data), None
        return data


class Mp4Writer:
    """Encodes BGR frames with libx264 (yuv420p) and the speech as AAC into memory: `moov` first (faststart), or,
    `fragmented`, as a fragmented MP4 whose bytes can be sent while later frames are still being made, with the
    audio interleaved as the video advances.

    FFmpeg's encoder is not thread-safe and PyAV releases the GIL while it encodes, so the writer owns one
    worker thread: every write, the finish and the abort run there in order, and an abort after a
    cancellation waits for the chunk being encoded instead of closing the container under it."""

    def __init__(self, width: int, height: int, fps: Fraction, crf: int, preset: str, speech: Speech,
                 threads: int = 0, fragmented: bool = False) -> None:
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mp4-writer")
        self._speech = speech.source
        self._fragmented = fragmented
        self._buffer: io.BytesIO | _Sink = _Sink(self._with_gapless_info) if fragmented else io.BytesIO()
        self._container = av.open(self._buffer, mode="w", format="mp4",
                                  options={"movflags": FRAGMENTED_MOVFLAGS} if fragmented else {})
        self._fps = fps
        self._video = self._container.add_stream("libx264", rate=fps)
        self._video.width, self._video.height = width, height
        self._video.pix_fmt = "yuv420p"
        # x264's own thread count (0) is faster but not bit-reproducible run to run; 1 is (measured).
        self._video.options = {"crf": str(crf), "preset": preset, **({"threads": str(threads)} if threads else {}),
                               **({"g": str(round(fps * FRAGMENT_SECONDS))} if fragmented else {})}
        # Every stream must exist before the first packet is muxed (the header is written then).
        self._audio = self._container.add_stream("aac", rate=AAC_RATE, layout="mono" if speech.channels == 1 else "stereo")
        self._audio_left: Iterator[av.AudioFrame] | None = None
        self._audio_samples = 0  # at AAC_RATE, the resampler's output rate
        self._priming: int | None = None  # the encoder's leading samples, from its first packet's timestamp
        self._frames = 0

    async def _run(self, work, *args):
        return await asyncio.wrap_future(self._worker.submit(work, *args))

    async def write(self, frames: list[np.ndarray]) -> None:
        await self._run(self._write, frames)

    async def take(self) -> bytes:
        """Fragmented: the bytes muxed since the last take (empty until a fragment is complete)."""
        assert isinstance(self._buffer, _Sink), "take() is for fragmented output"
        return await self._run(self._buffer.take)

    async def finish(self) -> bytes:
        """Flushes the video, encodes the rest of the audio and returns the mp4 bytes (fragmented: those not yet
        taken)."""
        try:
            return await self._run(self._finish)
        finally:
            self._worker.shutdown(wait=False)

    async def abort(self) -> None:
        """Closes the container after any work already queued; safe to call while that work runs."""
        closing = self._worker.submit(self._close)
        self._worker.shutdown(wait=False)
        await asyncio.shield(asyncio.wrap_future(closing))

    def _write(self, frames: list[np.ndarray]) -> None:
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(frame, format="bgr24")
            video_frame.pts = self._frames
            self._frames += 1
            self._container.mux(self._video.encode(video_frame))
        if self._fragmented:  # keep the audio level with the video, so each fragment carries both
            self._mux_audio(until=self._frames / self._fps)

    def _mux_audio(self, until: float | None = None) -> None:
        """Encodes speech up to `until` seconds (all of it when None)."""
        if self._audio_left is None:
            self._audio_left = _audio_frames(self._speech, self._audio.rate, self._audio.layout.name)
        while until is None or self._audio_samples < until * AAC_RATE:
            frame = next(self._audio_left, None)
            if frame is None:
                break
            # Timestamps counted in samples from 0: the encoder then dates its priming before 0, and the muxer's
            # edit list skips it. (With none, FFmpeg counted the priming as speech: heard 21 ms late.)
            frame.pts, frame.time_base = self._audio_samples, Fraction(1, AAC_RATE)
            self._audio_samples += frame.samples
            packets = self._audio.encode(frame)
            if packets and self._priming is None:
                self._priming = -round(packets[0].pts * packets[0].time_base * AAC_RATE)
            self._container.mux(packets)

    def _with_gapless_info(self, head: bytes) -> bytes:
        """The fragmented head with iTunSMPB: AAC's priming, end padding and real length, counted exactly (the
        speech is decoded once more just to count its samples: the head goes out before the audio is through)."""
        samples = sum(frame.samples for frame in _audio_frames(self._speech, self._audio.rate,
                                                               self._audio.layout.name))
        priming = self._priming or 0
        frame_size = self._audio.codec_context.frame_size or 1024
        padding = -(priming + samples) % frame_size
        return with_gapless_info(head, priming, padding, samples)

    def _finish(self) -> bytes:
        self._container.mux(self._video.encode(None))
        self._mux_audio()
        self._container.mux(self._audio.encode(None))
        self._container.close()
        if isinstance(self._buffer, _Sink):
            return self._buffer.take()
        return faststart(self._buffer.getvalue())

    def _close(self) -> None:
        try:
            self._container.close()
        except (av.FFmpegError, ValueError):
            pass
