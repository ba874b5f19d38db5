"""A live-session client for tests: speech sent at real-time pace, everything received kept with its arrival time."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import av
import grpc
import numpy as np
from superwav2lip.gateway.v1 import gateway_pb2
from superwav2lip.live.v1 import live_pb2, live_pb2_grpc

from tests.support.media_factory import speech_wav



@dataclass
class Received:
    ready: live_pb2.LiveReady | None = None
    frames: list[tuple[float, live_pb2.LiveFrame]] = field(default_factory=list)
    events: list[tuple[float, live_pb2.LiveEvent]] = field(default_factory=list)

    def pcm(self) -> np.ndarray:
        return np.frombuffer(b"".join(f.pcm for _, f in self.frames), "<i2")

    def pictures(self) -> list[live_pb2.LiveFrame]:
        return [f for _, f in self.frames if f.data]

    def kinds(self, kind: int) -> list[live_pb2.LiveEvent]:
        return [e for _, e in self.events if e.kind == kind]


class LiveCall:
    """One Session call: `open()`, then `speak()` / `control()`, while `received` fills in the background."""

    def __init__(self, channel, metadata=()) -> None:
        self.call = live_pb2_grpc.LiveStub(channel).Session(metadata=metadata)
        self.received = Received()
        self.sent_at: list[float] = []  # when each speech chunk was written
        self._reader: asyncio.Task | None = None

    async def open(self, **options) -> live_pb2.LiveReady:
        await self.call.write(live_pb2.LiveRequest(open=live_pb2.LiveOpen(**options)))
        first = await self.call.read()
        assert first.WhichOneof("kind") == "ready", first
        self.received.ready = first.ready
        self._reader = asyncio.create_task(self._read())
        return first.ready

    async def _read(self) -> None:
        while (message := await self.call.read()) is not grpc.aio.EOF:
            now = time.monotonic()
            if message.WhichOneof("kind") == "frame":
                self.received.frames.append((now, message.frame))
            elif message.WhichOneof("kind") == "event":
                self.received.events.append((now, message.event))

    async def speak(self, pcm: np.ndarray, rate: int, chunk_s: float = 0.1, pace: bool = True) -> None:
        """Sends the samples in chunks, each when its last sample would have been spoken."""
        step = int(rate * chunk_s)
        started = time.monotonic()
        for i, start in enumerate(range(0, len(pcm), step)):
            if pace:
                delay = started + (i + 1) * chunk_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            self.sent_at.append(time.monotonic())
            await self.call.write(live_pb2.LiveRequest(speech=live_pb2.SpeechChunk(
                pcm=pcm[start : start + step].astype("<i2").tobytes())))

    async def control(self, control: int) -> None:
        await self.call.write(live_pb2.LiveRequest(control=control))

    async def wait_for(self, kind: int, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received.kinds(kind)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no event {kind} after {timeout} s: {self.received.events}")
            await asyncio.sleep(0.02)

    async def finish(self, timeout: float = 30) -> None:
        """Half-closes and reads to the end; raises the call's error, if any."""
        await self.call.done_writing()
        assert self._reader is not None
        await asyncio.wait_for(self._reader, timeout)


SHARED_SPEECH = Path(__file__).resolve().parents[3] / "shared" / "media" / "speech_en_60s_16k.wav"


def speech(seconds: float, rate: int = 16000) -> np.ndarray:
    """Real speech (../shared/media) when present, else a voiced tone sweep: PCM16 mono at `rate`."""
    data = SHARED_SPEECH.read_bytes() if SHARED_SPEECH.exists() else speech_wav(seconds, rate)
    with av.open(io.BytesIO(data)) as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        parts = [f.to_ndarray().reshape(-1) for frame in container.decode(audio=0) for f in resampler.resample(frame)]
    return np.concatenate(parts)[: int(seconds * rate)].astype(np.int16)


async def create_avatar(stub, face: bytes, **planning) -> tuple[gateway_pb2.Avatar, list]:
    chunks = [gateway_pb2.CreateAvatarChunk(options=gateway_pb2.AvatarOptions(
                  name="presenter", planning=gateway_pb2.GenerateOptions(**planning))),
              gateway_pb2.CreateAvatarChunk(face_chunk=face)]
    events = [e async for e in stub.CreateAvatar(iter(chunks), timeout=60)]
    assert events[-1].WhichOneof("event") == "avatar"
    return events[-1].avatar, [e.progress for e in events[:-1]]


async def played(live: LiveCall, pcm: np.ndarray, pace: bool = True) -> None:
    await live.speak(pcm, 16000, pace=pace)
    await live.control(live_pb2.CONTROL_END_OF_UTTERANCE)
    await live.wait_for(live_pb2.LiveEvent.KIND_PLAYBACK_FINISHED, timeout=60)
    await live.control(live_pb2.CONTROL_CLOSE)
    await live.finish()


def assert_continuous(received, pcm: np.ndarray, fps: float) -> None:
    """Every frame's time came in order, and the returned audio is the speech between silences."""
    indices = [f.index for _, f in received.frames]
    assert indices == list(range(len(indices)))
    audio = received.pcm()
    assert abs(len(audio) - len(indices) * 16000 / fps) <= 2  # (utterances start on the frame grid)
    assert not received.kinds(live_pb2.LiveEvent.KIND_AUDIO_UNDERRUN), received.events
    start = int(np.flatnonzero(audio)[0]) - int(np.flatnonzero(pcm)[0])
    assert np.array_equal(audio[start : start + len(pcm)], pcm)
