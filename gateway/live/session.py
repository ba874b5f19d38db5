"""One live session: a producer makes each frame a little before its time, an emitter sends it on time.

The producer works at most `horizon_s` ahead of the clock, so speech that arrives later is never placed on a
frame already made; a frame not ready at its time is dropped (its audio is still sent), so a session that falls
behind skips frames and never drifts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import cv2
import numpy as np
from superwav2lip.live.v1 import live_pb2

from service_runtime.errors import DeadlineExceeded, ResourceExhausted, ServiceError, Unavailable

from ..audio import MEL_STEPS, SILENCE
from ..compositing import aligned_input, aligned_paste, crop_face, mouth_window, paste_face
from ..face_source import source_index
from ..options import JobOptions
from .avatar_frames import FramedAvatar
from .output import FrameEncoder
from .speech import Utterance, frame_samples
from .timeline import Slot, Timeline

log = logging.getLogger(__name__)

MAX_BATCH_FRAMES = 4  # frames per lip-sync call: enough to batch, few enough to stay within the horizon
MAX_FAILED_CALLS = 25  # lip-sync calls failing in a row before the session ends with the service's status


@dataclass
class Prepared:
    idle: np.ndarray  # the avatar's own frame at the output size
    speech: np.ndarray | None  # the same with the synthesised mouth blended in (None: idle)
    chunk: int  # newest speech chunk used (0: none)


@dataclass(frozen=True)
class LiveParams:
    """A session's fixed terms, decided before it is ready."""

    fps: Fraction
    rate: int
    lookahead_s: float
    horizon_s: float
    return_audio: bool


Send = Callable[[live_pb2.LiveResponse], bool]  # queues a message for the client; False when its queue is full
LipSync = Callable[[list[np.ndarray], list[np.ndarray], float], Awaitable[list[np.ndarray]]]


class LiveSession:
    def __init__(self, params: LiveParams, avatar: FramedAvatar, options: JobOptions, encoder: FrameEncoder,
                 lipsync: LipSync, metrics, send: Send) -> None:
        self.id = "live_" + secrets.token_hex(12)
        self.params, self.avatar, self.options = params, avatar, options
        self.encoder, self.lipsync, self.metrics, self.send = encoder, lipsync, metrics, send
        self.step = Fraction(avatar.plan.fps) / params.fps  # source frames per output frame
        self.timeline = Timeline(params.fps, params.rate, params.lookahead_s, time.monotonic())
        self._prepared: dict[int, Prepared] = {}
        self._next_prepare = 0
        self._next_emit = 0
        self._speech_arrived = asyncio.Event()
        self._closing = False
        self._window = mouth_window(options.mouth_padding)
        # Measured time to make a batch, with speech (a lip-sync call) and without: when a frame must be started.
        self._make_s = {True: 0.06, False: 0.01}
        self._encode_s = 0.005
        self._chunk_arrivals: dict[int, float] = {}
        self._started_utterance: Utterance | None = None
        self.sent_frames = 0
        self._failures = 0
        self._heads_up: asyncio.Task | None = None
        # Two: the producer's and the emitter's work overlap (one frame is made while another is encoded).
        self._threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix=self.id)
        self.dropped = 0

    def _in_thread(self, work, *args):
        """The session's own threads: the default pool is shared with every job's decoding and encoding, and a
        live frame must not wait behind them."""
        return asyncio.get_running_loop().run_in_executor(self._threads, work, *args)

    # Client side (called by the servicer).
    def start(self, t0: float) -> None:
        self.timeline.t0 = t0

    def push(self, pcm: np.ndarray) -> None:
        now = time.monotonic()
        starts = self.timeline.open_utterance is None
        self.timeline.push(pcm, now, self._next_prepare)
        self._chunk_arrivals[self.timeline.chunks] = now
        self._speech_arrived.set()
        if starts and (self._heads_up is None or self._heads_up.done()):
            self._heads_up = asyncio.get_running_loop().create_task(self._warn_model(now))

    async def _warn_model(self, now: float) -> None:
        """One blank frame through the lip-sync model as speech starts, a lookahead before its first frame: the
        model's queue then holds long jobs' items for the live frames to come (service_runtime.batching)."""
        with contextlib.suppress(ServiceError):
            await self.lipsync(*blank_frames(1), now + self.params.lookahead_s)

    def end_utterance(self) -> None:
        self.timeline.end_utterance()
        self._speech_arrived.set()

    def clear(self) -> None:
        first = self._next_emit
        if self.timeline.clear(first):
            for index in [i for i in self._prepared if i >= first]:
                self._prepared[index].speech = None
            self._send_event(live_pb2.LiveEvent.KIND_CLEARED, first)

    def close(self) -> None:
        """Ends after the speech already received has played."""
        self.timeline.end_utterance()
        self._closing = True
        self._speech_arrived.set()

    def buffered_seconds(self) -> float:
        return self.timeline.buffered_seconds(self._next_emit)

    @property
    def finished(self) -> bool:
        return self._closing and not self.timeline.busy

    # The two loops.
    async def run(self) -> None:
        """Runs until closed (or cancelled); the servicer owns the task."""
        producer = asyncio.create_task(self._produce(), name=f"{self.id}-produce")
        emitter = asyncio.create_task(self._emit(), name=f"{self.id}-emit")
        try:
            # The producer never ends by itself: if it does, it failed, and the session ends with its error.
            done, _ = await asyncio.wait([producer, emitter], return_when=asyncio.FIRST_COMPLETED)
            if producer in done:
                emitter.cancel()
                producer.result()
                raise RuntimeError("the live frame producer stopped")
            emitter.result()
        finally:
            emitter.cancel()
            producer.cancel()
            if self._heads_up is not None:
                self._heads_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
            self._threads.shutdown(wait=False)
            self.encoder.close()

    async def _produce(self) -> None:
        while True:
            n = self._next_prepare = max(self._next_prepare, self._next_emit)
            due = self.timeline.time_of(n)
            await _sleep_until(due - self.params.horizon_s)
            slot = self.timeline.slot(n)
            if time.monotonic() > due - self._make_s[slot.speaking] - self._encode_s:  # too late: skip it
                self._decide(slot, forced=True)
                self._next_prepare = n + 1
                continue
            batch = await self._batch_from(n)
            if not batch:
                continue
            started = time.monotonic()
            await self._make(batch)
            took = time.monotonic() - started
            speaking = any(s.speaking for s in batch)
            self._make_s[speaking] = 0.8 * self._make_s[speaking] + 0.2 * took
            self._next_prepare = batch[-1].index + 1

    async def _batch_from(self, n: int) -> list[Slot]:
        """Frames from n whose time is within the horizon, stopping at a speech frame whose window has not yet
        arrived (the producer then waits for speech, or for the last moment to make the frame anyway)."""
        batch: list[Slot] = []
        while len(batch) < MAX_BATCH_FRAMES:
            index = n + len(batch)
            due = self.timeline.time_of(index)
            if batch and due - time.monotonic() > self.params.horizon_s:
                break
            slot = self.timeline.slot(index)
            if slot.utterance is not None and not slot.utterance.window_ready(slot.k):
                last_moment = due - self._make_s[True] - self._encode_s
                forced = time.monotonic() >= last_moment
                if batch and not forced:
                    break
                if not forced:
                    self._speech_arrived.clear()
                    wait = last_moment - time.monotonic()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._speech_arrived.wait(), max(0.0, wait))
                    return batch
                slot = self._decide(slot, forced=True)
            batch.append(slot)
        return batch

    def _decide(self, slot: Slot, forced: bool) -> Slot:
        """A speech frame made before its window arrived: if even its own audio is missing, the utterance ends
        there (an underrun); otherwise it is made with the part of the window received."""
        utterance = slot.utterance
        if utterance is not None and forced and not utterance.has_slice(slot.k):
            utterance.underrun(slot.k)
            self.metrics.live_underruns.inc()
            self._send_event(live_pb2.LiveEvent.KIND_AUDIO_UNDERRUN, slot.index)
            return self.timeline.slot(slot.index)
        return slot

    async def _make(self, batch: list[Slot]) -> None:
        sources = [source_index(int(s.index * self.step), self.avatar.plan.source_frames, True) for s in batch]
        frames = await self.avatar.frames(sources, self._threads)
        targets = [self.avatar.targets[i] for i in sources]
        speaking = [k for k, s in enumerate(batch) if s.speaking and targets[k] is not None]
        aligned = self.options.crop_mode == "aligned"
        mels = [batch[k].utterance.mel_window(batch[k].k) for k in speaking]  # type: ignore[union-attr]

        def prepare():
            if aligned:
                return [aligned_input(frames[k], targets[k], self._window) for k in speaking]
            return [(None, crop_face(frames[k], targets[k].box)) for k in speaking]

        crops = await self._in_thread(prepare) if speaking else []
        faces = []
        if speaking:
            due = self.timeline.time_of(batch[speaking[0]].index) - self._encode_s
            try:
                faces = await self.lipsync([c for _, c in crops], mels, due)
                self._failures = 0
            except (DeadlineExceeded, Unavailable, ResourceExhausted) as error:
                # Late or refused: these frames are dropped at their time; a service that keeps failing ends
                # the session with its status rather than serving idle frames for ever.
                self._failures += 1
                if self._failures >= MAX_FAILED_CALLS:
                    raise Unavailable(
                        f"live frames could not be made in time: {MAX_FAILED_CALLS} lip-sync calls in a row were "
                        f"late or refused (the last: {error.code.name}); this replica is too busy for a live "
                        "session now, retry later or on another replica", retry_after_s=5.0) from None
                log.warning("live frames not made: %s", error.message, extra={"session": self.id})
                return

        def finish() -> list[Prepared]:
            out = [Prepared(f, None, 0) for f in frames]
            for k, (crop, face) in zip(speaking, zip(crops, faces)):
                slot = batch[k]
                pasted = (aligned_paste(frames[k], crop[0], face, self._window) if aligned
                          else paste_face(frames[k], targets[k].box, face))  # type: ignore[union-attr]
                alpha = slot.alpha
                if alpha < 1:
                    pasted = cv2.addWeighted(pasted, alpha, out[k].idle, 1 - alpha, 0)
                out[k].speech = pasted
                out[k].chunk = slot.utterance.chunk_used(slot.k)  # type: ignore[union-attr]
            return out

        for slot, prepared in zip(batch, await self._in_thread(finish)):
            if slot.index >= self._next_emit:
                self._prepared[slot.index] = prepared

    async def _emit(self) -> None:
        while not self.finished:
            n = self._next_emit
            due = self.timeline.time_of(n)
            await _sleep_until(due - self._encode_s)
            slot = self._decide(self.timeline.slot(n), forced=True)
            prepared = self._prepared.pop(n, None)
            frame = live_pb2.LiveFrame(index=n, pts_s=float(n / self.params.fps), speaking=False)
            if slot.speaking and self.params.return_audio:
                frame.pcm = slot.utterance.audio(slot.k)  # type: ignore[union-attr]
            elif self.params.return_audio:
                start, stop = frame_samples(n, self.params.rate, self.params.fps)
                frame.pcm = bytes(2 * (stop - start))
            if prepared is not None:
                speech = prepared.speech if slot.speaking else None
                image = speech if speech is not None else prepared.idle
                started = time.monotonic()
                frame.data = await self._in_thread(self.encoder.encode, image)
                self._encode_s = 0.8 * self._encode_s + 0.2 * (time.monotonic() - started)
                frame.speaking = speech is not None
                frame.speech_chunk = prepared.chunk if speech is not None else 0
            self._announce(slot)
            await _sleep_until(due)
            if prepared is None or not self.send(live_pb2.LiveResponse(frame=frame)):
                self._dropped(n, "late" if prepared is None else "client")
                if prepared is None and frame.pcm:  # the audio goes out even without its picture
                    self.send(live_pb2.LiveResponse(frame=live_pb2.LiveFrame(index=n, pts_s=frame.pts_s,
                                                                             pcm=frame.pcm)))
            else:
                self._sent(n, frame, slot, time.monotonic() - due)
            self._next_emit = n + 1
            for finished in self.timeline.forget_before(self._next_emit):
                self._send_event(live_pb2.LiveEvent.KIND_PLAYBACK_FINISHED, self._next_emit - 1)
                log.info("live utterance played", extra={"session": self.id, "frames": finished.frames,
                                                         "underrun": finished.underran})

    def _announce(self, slot: Slot) -> None:
        if slot.speaking and slot.utterance is not self._started_utterance:
            self._started_utterance = slot.utterance
            self._send_event(live_pb2.LiveEvent.KIND_SPEAKING_STARTED, slot.index)

    def _sent(self, n: int, frame: live_pb2.LiveFrame, slot: Slot, late_s: float) -> None:
        self.sent_frames += 1
        self.metrics.live_frames.labels("speech" if frame.speaking else "idle").inc()
        self.metrics.live_lateness.observe(max(0.0, late_s))
        if frame.speaking and slot.k == 0 and slot.utterance is not None:
            arrived = self._chunk_arrivals.get(slot.utterance.first_chunk)
            if arrived is not None:
                self.metrics.live_first_frame.observe(time.monotonic() - arrived)
        for chunk in [c for c in self._chunk_arrivals if c <= frame.speech_chunk - 8]:
            del self._chunk_arrivals[chunk]

    def _dropped(self, n: int, why: str) -> None:
        self.dropped += 1
        self.metrics.live_dropped.labels(why).inc()
        self._send_event(live_pb2.LiveEvent.KIND_FRAMES_DROPPED, n, count=1, reason=why)

    def _send_event(self, kind: Any, index: int, count: int = 0, reason: str = "") -> None:
        self.send(live_pb2.LiveResponse(event=live_pb2.LiveEvent(kind=kind, frame_index=index, count=count,
                                                                 reason=reason)))


def blank_frames(n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`n` black faces with silent mel windows: lip-sync inputs that cost what a live frame costs, for probes."""
    return [np.zeros((96, 96, 3), np.uint8)] * n, [np.full((80, MEL_STEPS), SILENCE, np.float32)] * n


async def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
