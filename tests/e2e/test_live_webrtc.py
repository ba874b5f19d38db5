"""Live mode in a browser over WebRTC: a real headless Chromium (Debian's, driven by playwright) whose fake microphone
plays a speech file, the web UI process relaying the SDP offer, and an in-process stack whose gateway answers it
and sends the avatar's video and the speech back over UDP (aiortc).

The models are generated ones: their synthesised mouth is noise that barely depends on the speech, so what can be
seen of lip-sync is the mouth region leaving the avatar's own picture while speech plays and coming back to it, and
staying still, in silence (the avatar is a still photo, so its idle frames do not change)."""

import asyncio
import json
import re
import urllib.error
import urllib.request
import wave

import grpc
import numpy as np
import pytest
import pytest_asyncio
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack
from superwav2lip.live.v1 import live_pb2, live_pb2_grpc

from gateway.live import webrtc
from gateway.live.webrtc import dbfs
from tests.support.webui import sign_in, web_ui
from tests.support.live import create_avatar, speech
from tests.support.envoy import envoy_in_front
from tests.support.media_factory import encode_video, scene, with_marker
from tests.support.paths import system_binary
from tests.support.stack import MODULE_LOOP, running_stack
from tests.support.waiting import eventually_async

pytestmark = [MODULE_LOOP, pytest.mark.realtime]  # paced in real time: `make test` runs them alone
RATE = 48000
SPEECH_AT, SPEECH_S, FILE_S = 1.5, 4.0, 16.0  # the microphone: silence, speech, then silence to the end
WATCH_S = 10.0
# The lower half of where the generated models paste the mouth on this avatar (measured on its frames).
MOUTH = (180, 150, 268, 225)

# Installed in the page: when getUserMedia started the fake microphone (its file plays from then), and, once
# started, for every video frame the browser presents (requestVideoFrameCallback), its time, count and the mouth
# region scaled to 16x16 gray levels; and the inbound audio's energy every 200 ms.
WATCH = """
window.swlTest = {micAt: null, frames: [], energy: [], decoded: []};
const gum = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = async (c) => { const s = await gum(c); window.swlTest.micAt = performance.now(); return s; };
window.swlWatch = ([x0, y0, x1, y1]) => {
  const video = document.getElementById("swl-live-video");
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 16;
  const ctx = canvas.getContext("2d", {willReadFrequently: true});
  const step = (now, meta) => {
    ctx.drawImage(video, x0, y0, x1 - x0, y1 - y0, 0, 0, 16, 16);
    const data = ctx.getImageData(0, 0, 16, 16).data, gray = [];
    for (let i = 0; i < data.length; i += 4) gray.push((data[i] + data[i + 1] + data[i + 2]) / 3);
    window.swlTest.frames.push({t: now, presented: meta.presentedFrames, gray});
    video.requestVideoFrameCallback(step);
  };
  video.requestVideoFrameCallback(step);
  setInterval(async () => {
    const pc = window.swlLive.pc();
    if (!pc) return;
    (await pc.getStats()).forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "audio")
        window.swlTest.energy.push({t: performance.now(), energy: r.totalAudioEnergy || 0});
      if (r.type === "inbound-rtp" && r.kind === "video")
        window.swlTest.decoded.push({t: performance.now(), decoded: r.framesDecoded || 0, dropped: r.framesDropped || 0});
    });
  }, 200);
};
"""


def microphone_file(path) -> None:
    """Silence, SPEECH_S of real speech (or a voiced sweep), silence: PCM16 mono WAV at 48 kHz."""
    voice = speech(SPEECH_S + 5.0, RATE)
    loud = [i for i in range(0, len(voice), RATE // 50) if dbfs(voice[i: i + RATE // 50]) > -35]
    voice = voice[loud[0]: loud[0] + int(SPEECH_S * RATE)]  # the recording's room noise before its first word left out
    samples = np.zeros(int(FILE_S * RATE), np.int16)
    start = int(SPEECH_AT * RATE)
    samples[start: start + len(voice)] = voice
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(samples.tobytes())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(dev_models_dir):
    async with running_stack(dev_models_dir) as stack:
        yield stack


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def avatar_id(stack) -> str:
    """A still photo's avatar (20 equal frames)."""
    avatar, _ = await create_avatar(stack.stub, encode_video([with_marker(scene(320, 240), 160, 110)] * 20))
    return avatar.avatar_id


async def test_the_browser_sees_and_hears_the_avatar_speak_in_time(stack, avatar_id, tmp_path):
    from playwright.async_api import async_playwright, expect

    capacity = stack.servers["gateway"].service.live_capacity
    microphone = tmp_path / "microphone.wav"
    microphone_file(microphone)
    with web_ui(stack.address("gateway"), tmp_path / "webui.log") as url:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=system_binary("chromium"), args=[
                "--no-sandbox", "--autoplay-policy=no-user-gesture-required", "--use-fake-device-for-media-stream",
                "--use-fake-ui-for-media-stream", f"--use-file-for-fake-audio-capture={microphone}%noloop"])
            try:
                context = await browser.new_context(viewport={"width": 1280, "height": 900})
                await context.add_init_script(WATCH)
                page = await context.new_page()
                await page.goto(url)
                await sign_in(page, "", "Signed in without a key")
                await page.get_by_role("tab", name="Live").click()
                await expect(page.locator("#live-avatar input")).to_have_value(re.compile(avatar_id),
                                                                               timeout=30_000)
                await page.locator("#live-start").click()
                status = page.locator("#live-status")
                await expect(status).to_contain_text("Live:", timeout=60_000)
                fps = float(re.search(r"at ([\d.]+) fps", await status.inner_text()).group(1))
                await page.wait_for_function("() => document.getElementById('swl-live-video').videoWidth > 0",
                                             timeout=30_000)
                await page.evaluate("(box) => window.swlWatch(box)", list(MOUTH))
                await asyncio.sleep(WATCH_S)
                got = await page.evaluate("() => window.swlTest")
                shown = await page.locator("#swl-live-stats").inner_text()
                await page.locator("#live-stop").click()  # the peer connection closes: so does the session
                await eventually_async(lambda: capacity.sessions == 0, seconds=10, what="the session ended")
            finally:
                await browser.close()
    frames, mic_at = got["frames"], got["micAt"]
    # The frame rate: the browser decoded the track at the announced rate for the 10 s (getStats; the frames it
    # presents, counted by requestVideoFrameCallback, also depend on how busy its headless compositor is).
    first, last = got["decoded"][0], got["decoded"][-1]
    measured = (last["decoded"] - first["decoded"]) / ((last["t"] - first["t"]) / 1000)
    assert last["t"] - first["t"] >= 0.9 * WATCH_S * 1000
    dropped = re.findall(r'^swl_gateway_live_frames_dropped_total\{reason="(\w+)"\} (\S+)$',
                         await stack.metrics_text("gateway"), re.M)
    assert abs(measured - fps) <= 0.1 * fps, f"{measured:.2f} fps decoded, {fps:g} announced; gateway dropped {dropped}"
    presented = (frames[-1]["presented"] - frames[0]["presented"]) / ((frames[-1]["t"] - frames[0]["t"]) / 1000)
    # The mouth leaves the avatar's picture while the speech plays, and is back and still once it is over (an
    # utterance ends 600 ms into silence).
    gray = [((f["t"] - mic_at) / 1000, np.array(f["gray"])) for f in frames]
    idle = np.median([g for _, g in gray[-10:]], axis=0)  # the end of the watch is silent
    speaking = [np.abs(g - idle).mean() for t, g in gray if SPEECH_AT + 0.8 <= t <= SPEECH_AT + SPEECH_S]
    silent = [g for t, g in gray if t >= SPEECH_AT + SPEECH_S + 2.0]
    assert len(speaking) >= 2 * fps and len(silent) >= fps, (len(speaking), len(silent), [round(t, 2) for t, _ in gray])
    moving = sum(d > 8.0 for d in speaking) / len(speaking)
    assert moving >= 0.8, f"the mouth differed from the idle picture in {moving:.0%} of the speech frames: {speaking}"
    still = max(np.abs(a - b).mean() for a, b in zip(silent, silent[1:]))
    away = max(np.abs(g - idle).mean() for g in silent)
    assert still < 1.0 and away < 2.0, f"the mouth still changed in silence: {still:.2f} frame to frame, {away:.2f}"
    # The speech came back: the audio's energy grew while it played, and hardly in silence.
    energy = [(((e["t"] - mic_at) / 1000), e["energy"]) for e in got["energy"]]
    spoken = _growth(energy, SPEECH_AT + 0.5, SPEECH_AT + SPEECH_S)
    quiet = _growth(energy, SPEECH_AT + SPEECH_S + 2.0, 99)
    assert spoken > 20 * max(quiet, 1e-6), (spoken, quiet)
    # The page shows its latency.
    assert re.search(r"latency \d+ ms", shown), shown
    print(f"\ndecoded {measured:.2f} fps of {fps:g} ({presented:.2f} presented, {last['dropped']} dropped; gateway "
          f"dropped {dropped}); mouth away from idle in {moving:.0%} of speech frames (median "
          f"{np.median(speaking):.1f} gray levels), at most {still:.2f} frame to frame in silence; audio energy {spoken:.3g} speaking vs {quiet:.3g} silent; page: {shown}")


def _growth(samples: list[tuple[float, float]], start: float, end: float) -> float:
    inside = [e for t, e in samples if start <= t <= end]
    if len(inside) < 2:
        pytest.fail(f"no audio statistics between {start:g} and {end:g} s: {samples}")
    return inside[-1] - inside[0]


async def browser_like_offer() -> tuple[RTCPeerConnection, str]:
    """An offer as the page makes it (a microphone track, a video to receive), from aiortc standing in for it."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(AudioStreamTrack())
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def offer_status(stack, **request) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await live_pb2_grpc.LiveStub(stack.channel).Offer(live_pb2.OfferRequest(**request), timeout=30)
    return refused.value


async def test_bad_offers_are_refused_with_what_to_change(stack, avatar_id):
    capacity = stack.servers["gateway"].service.live_capacity
    before = capacity.sessions
    pc, sdp = await browser_like_offer()
    audio_only = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    audio_only.addTrack(AudioStreamTrack())
    await audio_only.setLocalDescription(await audio_only.createOffer())
    receive_only = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    receive_only.addTransceiver("audio", direction="recvonly")
    receive_only.addTransceiver("video", direction="recvonly")
    await receive_only.setLocalDescription(await receive_only.createOffer())
    video = sdp[sdp.index("m=video"):]
    cases = {
        "": (grpc.StatusCode.INVALID_ARGUMENT, "sdp is empty"),
        "v=0\r\nthis is no offer\r\n": (grpc.StatusCode.INVALID_ARGUMENT, "no media section"),
        re.sub(r"m=audio \d+", "m=audio port", sdp): (grpc.StatusCode.INVALID_ARGUMENT, "sdp is not an offer"),
        "x" * 70_000: (grpc.StatusCode.INVALID_ARGUMENT, "at most 65536"),
        sdp + video * 4: (grpc.StatusCode.INVALID_ARGUMENT, "media sections"),
        audio_only.localDescription.sdp: (grpc.StatusCode.INVALID_ARGUMENT, "receives no video"),
        receive_only.localDescription.sdp: (grpc.StatusCode.INVALID_ARGUMENT, "sends no audio"),
    }
    try:
        for offer, (code, message) in cases.items():
            error = await offer_status(stack, avatar_id=avatar_id, sdp=offer)
            assert (error.code(), message in error.details()) == (code, True), (offer[:80], error)
        error = await offer_status(stack, avatar_id="av_" + "0" * 24, sdp=sdp)
        assert error.code() == grpc.StatusCode.NOT_FOUND, error
        error = await offer_status(stack, avatar_id=avatar_id, sdp=sdp, width=15, height=16)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "even" in error.details(), error
    finally:
        for peer in (pc, audio_only, receive_only):
            await peer.close()
    assert capacity.sessions == before  # no refused offer holds a session


async def test_the_offer_through_the_envoy_edge_over_http_and_grpc(stack, avatar_id, tmp_path):
    """A real Envoy rendered by deploy/envoy/render.py: POST /v1/live:offer (JSON, transcoded) and the native gRPC
    method both reach the gateway."""
    pc, sdp = await browser_like_offer()
    try:
        async with envoy_in_front(stack, tmp_path) as edge:
            def post(body: dict) -> tuple[int, dict]:
                request = urllib.request.Request(f"{edge}/v1/live:offer", json.dumps(body).encode(),
                                                 {"content-type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=30) as reply:
                        return reply.status, json.load(reply)
                except urllib.error.HTTPError as error:
                    return error.code, json.load(error)

            status, refused = await asyncio.to_thread(post, {"avatar_id": avatar_id, "sdp": ""})
            assert status == 400 and "sdp is empty" in refused["message"], refused
            status, answered = await asyncio.to_thread(post, {"avatar_id": avatar_id, "sdp": sdp})
            assert status == 200 and "a=candidate" in answered["sdp"] and answered["ready"]["fps"] == 25, answered
            async with grpc.aio.insecure_channel(edge.removeprefix("http://")) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused_grpc:
                    await live_pb2_grpc.LiveStub(channel).Offer(live_pb2.OfferRequest(avatar_id=avatar_id), timeout=30)
            assert refused_grpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused_grpc.value
    finally:
        await pc.close()  # the answered session ends when its peer never connects


async def test_an_answered_peer_that_never_connects_frees_its_session(stack, avatar_id, monkeypatch):
    monkeypatch.setattr(webrtc, "CONNECT_TIMEOUT_S", 1.0)
    capacity = stack.servers["gateway"].service.live_capacity
    before = capacity.sessions
    pc, sdp = await browser_like_offer()  # its answer is never applied: no ICE check ever reaches the gateway
    try:
        answer = await live_pb2_grpc.LiveStub(stack.channel).Offer(
            live_pb2.OfferRequest(avatar_id=avatar_id, sdp=sdp), timeout=30)
        assert answer.ready.session_id and "a=candidate" in answer.sdp and answer.ready.fps == 25
        assert capacity.sessions == before + 1
        await eventually_async(lambda: capacity.sessions == before, seconds=10, what="the session freed")
    finally:
        await pc.close()


async def test_a_peer_that_stops_sending_without_hanging_up_frees_its_session(stack, avatar_id, monkeypatch):
    """A browser that dies (a crashed tab, a lost network) sends nothing more and never closes; ICE notices only
    when its consent checks fail, about 30 s later. Here the peer stays up (it still answers consent checks) but its
    microphone stops sending: the session ends MIC_SILENT_S later, and not while the microphone streams."""
    monkeypatch.setattr(webrtc, "MIC_SILENT_S", 1.0)  # counted from the peer's first audio, not from the answer
    capacity = stack.servers["gateway"].service.live_capacity
    before = capacity.sessions
    pc, sdp = await browser_like_offer()
    try:
        answer = await live_pb2_grpc.LiveStub(stack.channel).Offer(
            live_pb2.OfferRequest(avatar_id=avatar_id, sdp=sdp), timeout=30)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer.sdp, type="answer"))
        await eventually_async(lambda: pc.connectionState == "connected", seconds=10, what="the peer connected")
        await asyncio.sleep(2.5)  # the microphone streams (aiortc's silence): the session stays
        assert capacity.sessions == before + 1
        pc.getSenders()[0].replaceTrack(None)  # no more audio packets; the connection itself stays up
        await eventually_async(lambda: capacity.sessions == before, seconds=10, what="the silent peer's session freed")
    finally:
        await pc.close()


async def test_speech_gate_cuts_utterances_at_600_ms_of_silence():  # async: the module's tests share its loop
    gate, chunk = webrtc.SpeechGate(), webrtc.CHUNK
    loud = (np.sin(np.arange(chunk) / 8) * 8000).astype(np.int16)
    quiet = (np.random.default_rng(0).standard_normal(chunk) * 30).astype(np.int16)  # room noise, -60 dBFS
    assert gate.feed(quiet) == ([], False) and gate.feed(loud) == ([], False)  # one loud chunk: a click
    assert gate.feed(quiet) == ([], False)
    sent, ended = gate.feed(loud)
    assert sent == [] and not ended
    sent, ended = gate.feed(loud)  # 40 ms of speech: an utterance, with what came before it
    assert len(sent) == 5 and sent[-1] is loud and not ended and gate.speaking
    for _ in range(29):  # 580 ms of silence: still the utterance (its pauses are spoken)
        sent, ended = gate.feed(quiet)
        assert len(sent) == 1 and not ended
    sent, ended = gate.feed(quiet)
    assert len(sent) == 1 and ended and not gate.speaking
    assert gate.feed(quiet) == ([], False)
