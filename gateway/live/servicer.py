"""The Live gRPC service: checks what the client sends, admits the session, and streams what it makes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from fractions import Fraction

import numpy as np
from superwav2lip.live.v1 import live_pb2, live_pb2_grpc

from service_runtime.errors import DeadlineExceeded, InvalidArgument, ServiceError, Unavailable

from ..audio import HOP, MEL_STEPS, N_FFT, SAMPLE_RATE
from ..avatars import AvatarStore, check_avatar_id
from ..clients import ModelClients
from ..deadline import JobDeadline
from ..face_source import FaceSource
from ..limits import MediaLimits, setting_name
from ..options import JobOptions
from ..quotas import TenantQuotas
from ..tenants import tenant_of_call
from .avatar_frames import DECODE_RUN, FramedAvatar, FramedAvatars
from .capacity import LiveCapacity
from .output import FrameEncoder, Framing
from .session import LiveParams, LiveSession, blank_frames

log = logging.getLogger(__name__)

MIN_RATE, MAX_RATE = 8000, 48000
MAX_CHUNK_S = 0.2
# A live frame waits at most for one cut-short batch of another call on the model, then its own: margins below
# three frames' cost make every speech frame late.
MARGIN_PER_FRAME_COST = 2.5
# A probe waits at most for the model's batch in progress (a long job's may be 32 frames) and is urgent (under
# service_runtime.batching.URGENT_SLACK_S), so the queue cuts the batches after it short.
PROBE_DEADLINE_S = 1.9
OUT_QUEUE = 16  # messages waiting for a slow reader; past it frames are dropped, never held
# 212.5 ms: the speech beyond a frame's time that its window reaches (its last mel column's centre plus half
# an FFT), so the earliest a frame can be made exactly.
WINDOW_S = ((MEL_STEPS - 1) * HOP + N_FFT // 2) / SAMPLE_RATE


class LiveServicer(live_pb2_grpc.LiveServicer):
    def __init__(self, avatars: AvatarStore, clients: ModelClients, quotas: TenantQuotas, capacity: LiveCapacity,
                 settings, metrics) -> None:
        self.avatars, self.clients, self.quotas, self.capacity = avatars, clients, quotas, capacity
        self.settings, self.metrics = settings, metrics
        self.limits = MediaLimits.from_settings(settings)
        self.sessions: dict[str, LiveSession] = {}  # open now, by id (for tests and the debugger)
        self.framed = FramedAvatars(lambda face: FaceSource(face, 25.0, self.limits))

    async def Session(self, request_iterator: AsyncIterator[live_pb2.LiveRequest], context):
        requests = aiter(request_iterator)
        first = await self._next(requests)
        if first is None or first.WhichOneof("kind") != "open":
            raise InvalidArgument("the first message of a live session must be `open` (LiveOpen)")
        opened = first.open
        tenant = tenant_of_call()
        self._check_open(opened)
        check_avatar_id(opened.avatar_id)
        async with self.quotas.live_session(tenant):  # before the avatar's media is read
            avatar = await self.avatars.load(tenant.name, opened.avatar_id)
            avatar_fps = Fraction(*avatar.record.fps)
            asked = avatar_fps if not opened.fps else Fraction(opened.fps).limit_denominator(1001)
            if asked > avatar_fps or asked <= 0:
                raise InvalidArgument(f"open.fps {opened.fps:g}: at most the avatar's {float(avatar_fps):g} fps "
                                      "(0 = it)")
            framing = Framing(avatar.plan, opened.width, opened.height)
            try:
                await self.capacity.measure(self._probe)
            except ServiceError as error:
                raise Unavailable(f"the lip-sync model did not make a probe frame within {PROBE_DEADLINE_S:g} s "
                                  f"({error.code.name}): too busy for a live session now; retry later or on another "
                                  "replica", retry_after_s=5.0) from None
            with self.capacity.admitted(asked) as admission:
                framed = self.framed.get((tenant.name, opened.avatar_id, framing.size), avatar.face, avatar.plan,
                                         framing)
                await framed.frames(list(range(min(DECODE_RUN, avatar.plan.source_frames))))  # before the clock
                async with contextlib.aclosing(self._serve(requests, opened, avatar, admission, framed)) as served:
                    async for message in served:
                        yield message

    def _check_open(self, opened: live_pb2.LiveOpen) -> None:
        if not MIN_RATE <= opened.sample_rate <= MAX_RATE:
            raise InvalidArgument(f"open.sample_rate {opened.sample_rate}: send PCM16 mono at {MIN_RATE} to "
                                  f"{MAX_RATE} Hz and say which")

    async def _probe(self, frames: int) -> None:
        """Blank frames through the lip-sync model as a live frame goes (urgent), which also tells its queue that
        live frames are coming, so it cuts long jobs' batches short before this session's first speech frame."""
        await self._lipsync(*blank_frames(frames), time.monotonic() + PROBE_DEADLINE_S)

    async def _serve(self, requests, opened, avatar, admission, framed: FramedAvatar):
        s = self.settings
        # A speech frame can be made only once its window has arrived, so the margin must hold its making: the
        # setting, or more where a frame costs more here (a slow machine), measured.
        margin = max(s.live_margin_ms / 1000, MARGIN_PER_FRAME_COST * (self.capacity.seconds_per_frame or 0.0))
        params = LiveParams(fps=admission.fps, rate=opened.sample_rate, lookahead_s=WINDOW_S + margin,
                            horizon_s=margin, return_audio=opened.return_audio)
        encoder = FrameEncoder(opened.format, framed.framing.size, params.fps, opened.quality)
        out: asyncio.Queue = asyncio.Queue(OUT_QUEUE)

        def send(message: live_pb2.LiveResponse) -> bool:
            try:
                out.put_nowait(message)
                return True
            except asyncio.QueueFull:
                return False

        session = LiveSession(params, framed, JobOptions.from_proto(avatar.planning), encoder, self._lipsync,
                              self.metrics, send)
        self.metrics.live_sessions.inc()
        self.sessions[session.id] = session
        log.info("live session opened", extra={"session": session.id, "avatar": opened.avatar_id,
                                               "fps": float(params.fps), "size": list(framed.framing.size)})
        tasks: list[asyncio.Task] = []
        try:  # from the ready message on: a caller that stops after it (a failed WebRTC answer) still closes here
            yield live_pb2.LiveResponse(ready=live_pb2.LiveReady(
                session_id=session.id, fps=float(params.fps), width=framed.framing.size[0],
                height=framed.framing.size[1], lookahead_s=params.lookahead_s,
                reduced_because=admission.reduced_because, format=encoder.kind))  # type: ignore[arg-type]
            session.start(time.monotonic())
            tasks += [asyncio.create_task(session.run(), name=f"{session.id}-run"),
                      asyncio.create_task(self._read(requests, session, opened.sample_rate), name=f"{session.id}-read")]
            async for message in _drain(out, tasks):
                yield message
            for task in tasks:  # a failure of either (a bad chunk, an idle timeout) ends the call with its status
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.metrics.live_sessions.dec()
            self.sessions.pop(session.id, None)
            log.info("live session closed", extra={"session": session.id, "frames": session.sent_frames,
                                                   "dropped": session.dropped})

    async def _read(self, requests, session: LiveSession, rate: int) -> None:
        """The client's messages, checked; speech past live_max_buffered_s is not read until some has played
        (HTTP/2 flow control then holds the client back)."""
        s = self.settings
        opened_at = time.monotonic()
        while True:
            while session.buffered_seconds() > s.live_max_buffered_s:
                await asyncio.sleep(0.05)
            message = await self._next(requests, session, opened_at)
            if message is None:
                session.close()
                return
            kind = message.WhichOneof("kind")
            if kind == "speech":
                session.push(self._pcm(message.speech, rate))
            elif kind == "control":
                self._control(session, message.control)
                if message.control == live_pb2.CONTROL_CLOSE:
                    return
            else:
                raise InvalidArgument(f"a live session takes speech and control messages after open, not {kind}")

    async def _next(self, requests, session: LiveSession | None = None, opened_at: float = 0.0):
        """The next message, or None at the end; a session quiet for live_idle_timeout_s with nothing to play,
        or open past live_max_session_s, is closed with DEADLINE_EXCEEDED."""
        s = self.settings
        while True:
            wait = s.live_idle_timeout_s
            if session is not None:
                wait = min(wait, max(0.0, opened_at + s.live_max_session_s - time.monotonic()))
            try:
                return await asyncio.wait_for(anext(requests, None), wait)
            except TimeoutError:
                if session is not None and time.monotonic() - opened_at >= s.live_max_session_s:
                    raise DeadlineExceeded(f"the live session reached its longest duration, "
                                           f"{s.live_max_session_s:g} s ({setting_name('live_max_session_s')})") from None
                if session is None or not session.timeline.busy:
                    raise DeadlineExceeded(f"the live session was idle for {s.live_idle_timeout_s:g} s "
                                           f"({setting_name('live_idle_timeout_s')})") from None

    @staticmethod
    def _pcm(chunk: live_pb2.SpeechChunk, rate: int) -> np.ndarray:
        if chunk.sample_rate and chunk.sample_rate != rate:
            raise InvalidArgument(f"speech.sample_rate {chunk.sample_rate} differs from the session's {rate} Hz "
                                  "(open.sample_rate); resample it, or open a new session")
        if len(chunk.pcm) % 2:
            raise InvalidArgument(f"speech.pcm has {len(chunk.pcm)} bytes: PCM16 needs an even number")
        if not chunk.pcm:
            raise InvalidArgument("speech.pcm is empty")
        if len(chunk.pcm) // 2 > MAX_CHUNK_S * rate:
            raise InvalidArgument(f"speech.pcm holds {len(chunk.pcm) // 2 / rate * 1000:.0f} ms; send at most "
                                  f"{MAX_CHUNK_S * 1000:.0f} ms per chunk")
        return np.frombuffer(chunk.pcm, "<i2").astype(np.int16)

    @staticmethod
    def _control(session: LiveSession, control: int) -> None:
        if control == live_pb2.CONTROL_END_OF_UTTERANCE:
            session.end_utterance()
        elif control == live_pb2.CONTROL_CLEAR:
            session.clear()
        elif control == live_pb2.CONTROL_CLOSE:
            session.close()
        else:
            raise InvalidArgument(f"control {control} is not a Control")

    async def _lipsync(self, faces, mels, due: float):
        """A live frame's model call: its deadline is the frame's time, which orders the model's queue."""
        deadline = JobDeadline(max(0.001, due - time.monotonic()), 0.0)
        return await self.clients.lipsync(faces, mels, deadline, urgent=True)


async def _drain(out: asyncio.Queue, tasks: list[asyncio.Task]) -> AsyncIterator[live_pb2.LiveResponse]:
    """Messages until the session ends (either task finishes with an error, or the session runs out)."""
    run = tasks[0]
    while True:
        getter = asyncio.ensure_future(out.get())
        done, _ = await asyncio.wait([getter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            yield getter.result()
            continue
        getter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await getter
        failed = [t for t in done if not t.cancelled() and t.exception() is not None]
        if failed or run in done:
            while not out.empty():
                yield out.get_nowait()
            return
        tasks.remove(next(iter(done)))  # the reader ended cleanly (close): wait for the session to play out
