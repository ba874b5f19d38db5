"""Live sessions for browsers over WebRTC: an SDP offer in, the microphone's speech into a live session, its frames and speech back as tracks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from fractions import Fraction

import av
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from superwav2lip.live.v1 import live_pb2

from service_runtime.errors import InvalidArgument, ServiceError, Unavailable

from ..tenants import tenant_of_call
from .ice import IceServers

from .servicer import LiveServicer

log = logging.getLogger(__name__)

RATE = 48000  # WebRTC's Opus rate: the session runs at it, so no resampling either way
CHUNK = RATE // 50  # 20 ms: one Opus frame, one speech chunk
VIDEO_CLOCK = 90000  # RTP's video clock
MAX_SDP_BYTES = 64 * 1024  # a browser's offer is a few KiB
# Voice activity: a chunk louder than this is speech; speech followed by HANGOVER_S of quieter chunks is an
# utterance, so the avatar idles in silence. ONSET_S of speech starts one (a click does not), with PRE_ROLL_S of
# what came before it, so the first syllable is not cut.
SPEECH_DBFS = -45.0
ONSET_S, HANGOVER_S, PRE_ROLL_S = 0.04, 0.6, 0.2
# Both tracks play what the session emitted this long after it did: a frame's audio arrives with the frame, in
# one piece, so the 20 ms audio frames need that much buffered to never run dry; video waits as long, in sync.
PLAYOUT_DELAY_S = 0.06
CONNECT_TIMEOUT_S = 15.0  # an answered peer that has not connected by then never will: its session is freed
MAX_MEDIA_SECTIONS = 4  # a browser's offer has two (audio, video); each one costs an ICE gathering
KEEPALIVE_S = 10.0  # while the microphone streams silence, the session hears from it this often (idle timeout)
# A browser's microphone sends an Opus frame every 20 ms, silence included (the answer does not ask for DTX): none for
# this long is a dead peer (a crashed tab, a lost network), ended as a hang-up long before ICE's consent checks
# give up (about 30 s).
MIC_SILENT_S = 10.0
MAX_PENDING = 500  # speech messages (10 s) waiting for the session; a peer sending faster than real time loses more


class SpeechGate:
    """Cuts a microphone's chunks into utterances: returns, for each chunk, the chunks to send as speech and
    whether the utterance ended (speech then HANGOVER_S of silence). Durations are counted in samples."""

    def __init__(self, rate: int = RATE, threshold_dbfs: float = SPEECH_DBFS) -> None:
        self.threshold = threshold_dbfs
        self.onset, self.hangover, self.pre_roll = (round(s * rate) for s in (ONSET_S, HANGOVER_S, PRE_ROLL_S))
        self.speaking = False
        self._pre_roll: deque[np.ndarray] = deque()
        self._loud = self._quiet = 0

    def feed(self, pcm: np.ndarray) -> tuple[list[np.ndarray], bool]:
        loud = dbfs(pcm) > self.threshold
        if self.speaking:
            self._quiet = 0 if loud else self._quiet + len(pcm)
            if self._quiet >= self.hangover:
                self.speaking, self._loud = False, 0
                return [pcm], True
            return [pcm], False
        self._pre_roll.append(pcm)
        self._loud = self._loud + len(pcm) if loud else 0
        if self._loud >= self.onset:
            self.speaking, self._quiet = True, 0
            chunks = list(self._pre_roll)
            self._pre_roll.clear()
            return chunks, False
        while sum(len(c) for c in self._pre_roll) > self.pre_roll:
            self._pre_roll.popleft()
        return [], False


def dbfs(pcm: np.ndarray) -> float:
    """Loudness of PCM16 samples, in dB below a full-scale square wave."""
    if not len(pcm):
        return -math.inf
    rms = math.sqrt(float(np.mean(np.square(pcm.astype(np.float64)))))
    return 20 * math.log10(max(rms, 1e-9) / 32768)


class FrameTrack(MediaStreamTrack):
    """The session's pictures as a video track, each sent PLAYOUT_DELAY_S after the session emitted it."""

    kind = "video"

    def __init__(self, width: int, height: int, fps: Fraction) -> None:
        super().__init__()
        self.size, self.fps = (width, height), fps
        self._queue: asyncio.Queue[tuple[float, av.VideoFrame] | None] = asyncio.Queue(8)

    def put(self, index: int, i420: bytes, due: float) -> None:
        width, height = self.size
        picture = av.VideoFrame.from_ndarray(np.frombuffer(i420, np.uint8).reshape(height * 3 // 2, width),
                                             format="yuv420p")
        picture.pts = round(index * VIDEO_CLOCK / self.fps)
        picture.time_base = Fraction(1, VIDEO_CLOCK)
        self._offer((due, picture))

    def finish(self) -> None:
        self._offer(None)

    def _offer(self, item) -> None:
        if self._queue.full():  # nobody is pulling (not connected yet): the newest picture matters
            self._queue.get_nowait()
        self._queue.put_nowait(item)

    async def recv(self) -> av.VideoFrame:
        item = await self._queue.get()
        if item is None:
            self.stop()
            raise MediaStreamError
        due, picture = item
        await _sleep_until(due)
        return picture


class SpeechTrack(MediaStreamTrack):
    """The session's returned speech as an audio track of 20 ms frames, on the session's clock: frame m plays at
    `base + m * 20 ms + PLAYOUT_DELAY_S`, with whatever samples have arrived for it (silence where none have)."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.base: float | None = None  # when the session's sample 0 was due
        self._pcm = bytearray()
        self._first = 0  # the session's sample index of _pcm[0]
        self._next: int | None = None  # the next frame to send
        self._started = asyncio.Event()
        self._ended = False

    def put(self, start: int, pcm: bytes, base: float) -> None:
        if self.base is None:
            self.base, self._first = base, start
            self._started.set()
        end = self._first + len(self._pcm) // 2
        if start > end:  # frames lost on the way: their time is silence
            self._pcm += bytes(2 * (start - end))
        elif start < end:
            pcm = pcm[2 * (end - start):]
        self._pcm += pcm

    def finish(self) -> None:
        self._ended = True
        self._started.set()

    async def recv(self) -> av.AudioFrame:
        await self._started.wait()
        if self._ended or self.base is None:
            self.stop()
            raise MediaStreamError
        if self._next is None:  # joined late: start at the frame playing now
            self._next = max(0, math.floor((time.monotonic() - self.base - PLAYOUT_DELAY_S) * 50))
        m, self._next = self._next, self._next + 1
        await _sleep_until(self.base + m / 50 + PLAYOUT_DELAY_S)
        lo = (m * CHUNK - self._first) * 2
        samples = bytes(self._pcm[max(0, lo): max(0, lo + 2 * CHUNK)]).ljust(2 * CHUNK, b"\0")
        if lo + 2 * CHUNK > 0:
            del self._pcm[: lo + 2 * CHUNK]
            self._first = (m + 1) * CHUNK
        frame = av.AudioFrame.from_ndarray(np.frombuffer(samples, np.int16).reshape(1, -1), format="s16",
                                           layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, m * CHUNK, Fraction(1, RATE)
        return frame


class WebRtcLive(LiveServicer):
    """The Live service with its Offer RPC: each offer drives one live session (Session, in process) from the
    peer's microphone and sends its frames and speech back over the peer connection."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._peers: set[asyncio.Task] = set()
        self.ice = IceServers.from_settings(self.settings)

    async def IceServers(self, request: live_pb2.IceServersRequest, context) -> live_pb2.IceServersResponse:
        return self.ice.for_caller(tenant_of_call().name)

    async def Offer(self, request: live_pb2.OfferRequest, context) -> live_pb2.OfferResponse:
        pc = RTCPeerConnection(self.ice.configuration(tenant_of_call().name))
        responses: AsyncIterator[live_pb2.LiveResponse] | None = None
        try:
            microphone = await _remote(pc, request.sdp)
            requests: asyncio.Queue[live_pb2.LiveRequest | None] = asyncio.Queue(MAX_PENDING)
            requests.put_nowait(live_pb2.LiveRequest(open=live_pb2.LiveOpen(
                avatar_id=request.avatar_id, width=request.width, height=request.height, fps=request.fps,
                format=live_pb2.FRAME_FORMAT_I420, sample_rate=RATE, return_audio=True)))
            responses = self.Session(_drained(requests), context)
            first = await anext(responses)  # an unknown avatar, a bad size, no capacity: this call's status
            ready = first.ready
            video, audio = FrameTrack(ready.width, ready.height, Fraction(ready.fps).limit_denominator(1001)), SpeechTrack()
            pc.addTrack(audio)
            pc.addTrack(video)
            await pc.setLocalDescription(await pc.createAnswer())
            if self.ice.relay_only and "typ relay" not in pc.localDescription.sdp:
                raise Unavailable("the TURN server gave this gateway no relay address, so no browser could reach "
                                  "it: check that SWL_GATEWAY_LIVE_ICE_SERVERS names a TURN server this gateway "
                                  "reaches and that SWL_GATEWAY_LIVE_TURN_SECRET is its static-auth-secret")
        except BaseException:
            if responses is not None:
                with contextlib.suppress(Exception):
                    await responses.aclose()  # type: ignore[attr-defined]
            await pc.close()
            raise
        task = asyncio.create_task(self._peer(pc, microphone, requests, responses, video, audio),
                                   name=f"{ready.session_id}-webrtc")
        self._peers.add(task)
        task.add_done_callback(self._peers.discard)
        log.info("webrtc session answered", extra={"session": ready.session_id, "avatar": request.avatar_id})
        return live_pb2.OfferResponse(sdp=pc.localDescription.sdp, ready=ready)

    async def _peer(self, pc: RTCPeerConnection, microphone: MediaStreamTrack, requests: asyncio.Queue,
                    responses: AsyncIterator[live_pb2.LiveResponse], video: FrameTrack, audio: SpeechTrack) -> None:
        """Runs the session until it ends, the peer hangs up or its connection fails; then closes both."""
        gone, connected = asyncio.Event(), asyncio.Event()

        @pc.on("connectionstatechange")
        def changed() -> None:
            if pc.connectionState == "connected":
                connected.set()
            if pc.connectionState in ("failed", "closed"):
                gone.set()

        async def hung_up() -> None:
            try:
                await asyncio.wait_for(connected.wait(), CONNECT_TIMEOUT_S)
            except TimeoutError:
                log.info("webrtc peer never connected", extra={"seconds": CONNECT_TIMEOUT_S})
                return
            await gone.wait()

        tasks = [asyncio.create_task(_play(responses, video, audio)),
                 asyncio.create_task(_listen(microphone, requests)), asyncio.create_task(hung_up())]
        try:
            # The microphone's end is a half-close: the session plays what it has, then _play ends.
            await asyncio.wait([tasks[0], tasks[2]], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await responses.aclose()  # type: ignore[attr-defined]
            video.finish()
            audio.finish()
            await pc.close()

    async def close_peers(self) -> None:
        for task in list(self._peers):
            task.cancel()
        await asyncio.gather(*self._peers, return_exceptions=True)


async def _remote(pc: RTCPeerConnection, sdp: str) -> MediaStreamTrack:
    """Applies the peer's offer; its microphone track. A malformed offer is the client's error, said plainly."""
    if not sdp.strip():
        raise InvalidArgument("sdp is empty: send the browser's offer (RTCPeerConnection.createOffer, after ICE "
                              "gathering completes)")
    if len(sdp.encode()) > MAX_SDP_BYTES:
        raise InvalidArgument(f"sdp has {len(sdp.encode())} bytes; an offer has at most {MAX_SDP_BYTES}")
    sections = sum(line.startswith("m=") for line in sdp.splitlines())
    if not sections:
        raise InvalidArgument("sdp has no media section (m=): send the browser's offer, with its microphone track")
    if sections > MAX_MEDIA_SECTIONS:
        raise InvalidArgument(f"the offer has {sections} media sections; send at most {MAX_MEDIA_SECTIONS} (the "
                              "microphone's audio and a video to receive)")
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
    except ServiceError:
        raise
    except Exception as error:  # aiortc's parser raises whatever the bad line makes it raise
        raise InvalidArgument(f"sdp is not an offer this server can answer: {error or type(error).__name__}") from None
    kinds = {t.kind: t for t in pc.getTransceivers()}
    if "audio" not in kinds or kinds["audio"].receiver.track is None:  # aiortc makes it for a sending peer
        raise InvalidArgument("the offer sends no audio: add the microphone's track (addTrack) before createOffer")
    if "video" not in kinds:
        raise InvalidArgument("the offer receives no video: add a video transceiver (addTransceiver('video', "
                              "{direction: 'recvonly'})) before createOffer")
    return kinds["audio"].receiver.track


async def _drained(requests: asyncio.Queue) -> AsyncIterator[live_pb2.LiveRequest]:
    while (message := await requests.get()) is not None:
        yield message


async def _listen(microphone: MediaStreamTrack, requests: asyncio.Queue) -> None:
    """The microphone's audio as 20 ms speech chunks, gated into utterances; at its end, a half-close (the session
    plays what it has, then ends)."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
    gate, pending = SpeechGate(), np.zeros(0, np.int16)
    heard = time.monotonic()
    sent_speech = False

    def send(message: live_pb2.LiveRequest) -> None:
        nonlocal heard
        heard = time.monotonic()
        with contextlib.suppress(asyncio.QueueFull):
            requests.put_nowait(message)

    loop = asyncio.get_running_loop()
    try:
        # One timer moved on at each frame (a wait_for per frame would make a task 50 times a second). Before the
        # first frame the peer is connecting: _peer's CONNECT_TIMEOUT_S covers that.
        async with asyncio.timeout(None) as silence:
            while True:
                frame = await microphone.recv()
                silence.reschedule(loop.time() + MIC_SILENT_S)
                if not isinstance(frame, av.AudioFrame):  # an audio track's receiver yields decoded audio only
                    continue
                for mono in resampler.resample(frame):
                    pending = np.concatenate([pending, mono.to_ndarray().reshape(-1).astype(np.int16)])
                while len(pending) >= CHUNK:
                    chunk, pending = pending[:CHUNK], pending[CHUNK:]
                    speech, ended = gate.feed(chunk)
                    for part in speech:
                        send(live_pb2.LiveRequest(speech=live_pb2.SpeechChunk(pcm=part.astype("<i2").tobytes())))
                    if speech and not sent_speech:
                        log.info("webrtc utterance started", extra={"dbfs": round(dbfs(chunk), 1)})
                    sent_speech = gate.speaking
                    if ended:
                        log.info("webrtc utterance ended")
                        send(live_pb2.LiveRequest(control=live_pb2.CONTROL_END_OF_UTTERANCE))
                if not gate.speaking and time.monotonic() - heard > KEEPALIVE_S:
                    # The peer is there, silent: an end of utterance with none open changes nothing and shows it.
                    send(live_pb2.LiveRequest(control=live_pb2.CONTROL_END_OF_UTTERANCE))
    except MediaStreamError:
        pass
    except TimeoutError:
        log.info("webrtc peer stopped sending", extra={"seconds": MIC_SILENT_S})
    finally:
        _end(requests)


def _end(requests: asyncio.Queue) -> None:
    """Puts the end of the speech on the queue, dropping its oldest message if it is full: without the end the
    session would outlive its peer until the idle timeout."""
    while True:
        try:
            requests.put_nowait(None)
            return
        except asyncio.QueueFull:
            requests.get_nowait()


async def _play(responses: AsyncIterator[live_pb2.LiveResponse], video: FrameTrack, audio: SpeechTrack) -> None:
    """The session's frames onto the tracks, each on the session's clock."""
    base: float | None = None
    fps = video.fps
    try:
        async for message in responses:
            if message.WhichOneof("kind") != "frame":
                continue
            frame = message.frame
            if base is None:
                base = time.monotonic() - frame.pts_s
            if frame.pcm:
                audio.put(math.floor(frame.index * RATE / fps), frame.pcm, base)
            if frame.data:
                video.put(frame.index, frame.data, base + float(frame.index / fps) + PLAYOUT_DELAY_S)
    except ServiceError as error:
        log.info("webrtc session ended: %s", error.message)


async def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
