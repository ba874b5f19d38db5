"""H.264 mp4 out: frames and speech encoded in memory, `moov` first (faststart) or fragmented for streaming, timed exactly."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import av
import numpy as np


from .audio import Speech
from .containers import open_audio
from .limits import MediaLimits
from .mp4_boxes import faststart, has_complete_moov, with_gapless_info

# AAC adds 1024 priming samples to the track, which the edit list skips; the rate stays 48 kHz, the one players
# expect (and 21 ms of priming is less than a frame for a player that ignores edit lists).
AAC_RATE = 48000


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
                 threads: int = 0, fragmented: bool = False, limits: MediaLimits = MediaLimits()) -> None:
        self._limits = limits  # max_output_bytes, checked after every frame muxed
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
        self._encoded = 0  # bytes of the packets muxed so far

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
            self._mux(self._video.encode(video_frame))
        if self._fragmented:  # keep the audio level with the video, so each fragment carries both
            self._mux_audio(until=self._frames / self._fps)

    def _mux_audio(self, until: Fraction | float | None = None) -> None:
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
                self._priming = -round((packets[0].pts or 0) * packets[0].time_base * AAC_RATE)
            self._mux(packets)

    def _with_gapless_info(self, head: bytes) -> bytes:
        """The fragmented head with iTunSMPB: AAC's priming, end padding and real length, counted exactly (the
        speech is decoded once more just to count its samples: the head goes out before the audio is through)."""
        samples = sum(frame.samples for frame in _audio_frames(self._speech, self._audio.rate,
                                                               self._audio.layout.name))
        priming = self._priming or 0
        frame_size = self._audio.codec_context.frame_size or 1024
        padding = -(priming + samples) % frame_size
        return with_gapless_info(head, priming, padding, samples)

    def _mux(self, packets: list[av.Packet]) -> None:
        """Muxes packets within max_output_bytes. Their bytes are counted, not the file's: until the audio comes,
        the faststart muxer holds every video packet in its interleaving queue and writes nothing."""
        self._encoded += sum(packet.size for packet in packets)
        self._limits.check_output_bytes(self._encoded)
        self._container.mux(packets)

    def _finish(self) -> bytes:
        self._mux(self._video.encode(None))
        self._mux_audio()
        self._mux(self._audio.encode(None))
        self._container.close()
        if isinstance(self._buffer, _Sink):
            return self._buffer.take()
        # The rewrite reads the muxer's buffer in place, then the buffer goes: the mp4 is held twice at most.
        with self._buffer.getbuffer() as view:
            mp4 = faststart(view)
        self._buffer = io.BytesIO()
        return mp4

    def _close(self) -> None:
        try:
            self._container.close()
        except (av.FFmpegError, ValueError):
            pass
