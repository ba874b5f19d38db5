"""The Live tab: the visitor speaks into the microphone and the avatar speaks it back over WebRTC (docs/live-webrtc.md)."""

from __future__ import annotations

import json
import logging

import gradio as gr
import grpc
from google.protobuf import json_format
from superwav2lip.live.v1 import live_pb2, live_pb2_grpc

from .settings import WebUISettings

log = logging.getLogger(__name__)
OFFER_TIMEOUT_S = 30.0  # the gateway answers once the session is admitted and its first frames are decoded

# The browser side: getUserMedia, the offer (ICE gathered with the gateway's STUN/TURN servers: the gateway does not
# trickle), the answer, and the latency shown from getStats. The page's own server fetches the ICE servers and
# relays the offer, with the visitor's key, to the gateway.
SCRIPT = """
<script>
window.swlLive = (() => {
  let pc = null, timer = null, lookahead = 0, playout = 0.06;
  const $ = (id) => document.getElementById(id);
  const show = (text) => { const el = $("swl-live-stats"); if (el) el.textContent = text; };
  async function stop() {
    if (timer) clearInterval(timer);
    timer = null;
    if (pc) { pc.getSenders().forEach((s) => s.track && s.track.stop()); pc.close(); }
    pc = null;
  }
  async function offer(ice) {
    await stop();
    const mic = await navigator.mediaDevices.getUserMedia({audio: true});
    pc = new RTCPeerConnection({iceServers: ice ? JSON.parse(ice).iceServers || [] : []});
    mic.getTracks().forEach((track) => pc.addTrack(track, mic));
    pc.addTransceiver("video", {direction: "recvonly"});
    pc.ontrack = (event) => { const v = $("swl-live-video"); if (v.srcObject !== event.streams[0]) v.srcObject = event.streams[0]; };
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((done) => {
      if (pc.iceGatheringState === "complete") return done();
      pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && done());
    });
    show("connecting...");
    return pc.localDescription.sdp;
  }
  async function answer(text) {
    if (!pc || !text) { await stop(); return; }
    const got = JSON.parse(text);
    lookahead = got.lookahead_s; playout = got.playout_s;
    await pc.setRemoteDescription({type: "answer", sdp: got.sdp});
    timer = setInterval(stats, 1000);
  }
  let last = null;
  async function stats() {
    if (!pc) return;
    let rtt = 0, buffer = 0, decoded = 0;
    (await pc.getStats()).forEach((r) => {
      if (r.type === "candidate-pair" && r.nominated && r.currentRoundTripTime !== undefined) rtt = r.currentRoundTripTime;
      if (r.type === "inbound-rtp" && r.kind === "video") {
        decoded = r.framesDecoded || 0;
        if (r.jitterBufferEmittedCount) buffer = r.jitterBufferDelay / r.jitterBufferEmittedCount;
      }
    });
    const now = performance.now(), fps = last ? (decoded - last.decoded) * 1000 / (now - last.now) : 0;
    last = {now, decoded};
    // Speech to picture: the gateway's lookahead and playout delay, half the round trip, the browser's jitter buffer.
    const latency = (lookahead + playout + rtt / 2 + buffer) * 1000;
    window.swlLiveLatencyMs = latency;
    show(`latency ${latency.toFixed(0)} ms (gateway ${((lookahead + playout) * 1000).toFixed(0)}, network ` +
         `${(rtt * 500).toFixed(0)}, jitter buffer ${(buffer * 1000).toFixed(0)}) - ${fps.toFixed(1)} fps`);
  }
  return {offer, answer, stop, pc: () => pc};
})();
</script>
"""
VIDEO = ('<video id="swl-live-video" autoplay playsinline style="max-width:100%;background:#000"></video>'
         '<div id="swl-live-stats"></div>')


class LiveBackend:
    """Relays a visitor's SDP offer to the gateway's Live/Offer with the visitor's key; the UI keeps no media."""

    def __init__(self, settings: WebUISettings) -> None:
        self.settings = settings

    def ice_servers(self, key: str) -> str:
        """The gateway's STUN/TURN servers for this visitor as the page's RTCConfiguration wants them (JSON with
        `iceServers`), or "" when the gateway gives none or cannot be asked: the offer then says why, if it fails."""
        metadata = (("x-api-key", key),) if key else ()
        try:
            with grpc.insecure_channel(self.settings.gateway_address) as channel:
                servers = live_pb2_grpc.LiveStub(channel).IceServers(live_pb2.IceServersRequest(),
                                                                     timeout=OFFER_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as error:
            log.warning("no ICE servers from the gateway", extra={"code": error.code().name})
            return ""
        return json.dumps(json_format.MessageToDict(servers)) if servers.ice_servers else ""

    def offer(self, key: str, avatar: str, sdp: str) -> tuple[str, str]:
        """(the answer for the page as JSON, or "" when refused; the status message)."""
        if not sdp:
            return "", "**The browser made no offer:** allow the microphone and start again."
        metadata = (("x-api-key", key),) if key else ()
        request = live_pb2.OfferRequest(avatar_id=avatar.split(" ")[0], sdp=sdp)
        try:
            with grpc.insecure_channel(self.settings.gateway_address) as channel:
                answer = live_pb2_grpc.LiveStub(channel).Offer(request, timeout=OFFER_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as error:
            log.warning("live offer refused", extra={"code": error.code().name})
            return "", f"**Cannot start:** {error.details()}"
        ready = answer.ready
        message = (f"Live: {ready.width}x{ready.height} at {ready.fps:g} fps; speech is shown "
                   f"{ready.lookahead_s * 1000:.0f} ms after it is spoken. Speak; a pause of 600 ms ends an utterance.")
        if ready.reduced_because:
            message += f" Lower frame rate: {ready.reduced_because}."
        return json.dumps({"sdp": answer.sdp, "lookahead_s": ready.lookahead_s, "playout_s": 0.06}), message


def live_tab(settings: WebUISettings, signed_in, visitor: gr.State) -> gr.Dropdown:
    """Builds the tab's components inside the current gr.Tab; returns its avatar dropdown (filled at sign-in)."""
    backend = LiveBackend(settings)
    avatar = gr.Dropdown(label="Avatar", choices=[], elem_id="live-avatar")
    with gr.Row():
        start = gr.Button("Start (allow the microphone)", variant="primary", elem_id="live-start")
        stop = gr.Button("Stop", elem_id="live-stop")
    status = gr.Markdown("Pick an avatar, start, and speak.", elem_id="live-status")
    gr.HTML(VIDEO, js_on_load=None)
    ice_box = gr.Textbox(visible=False)
    offer_box = gr.Textbox(visible=False)
    answer_box = gr.Textbox(visible=False)

    def offered(current, chosen: str | None, sdp: str):
        visitor_now = signed_in(current)
        if not chosen:
            return "", "**Pick an avatar first** (make one in the Avatars tab)."
        return backend.offer(visitor_now.key, chosen, sdp)

    # Not signed in: the first step says so, and nothing more runs (success, not then).
    start.click(lambda current: backend.ice_servers(signed_in(current).key), visitor, ice_box).success(
        None, ice_box, offer_box, js="async (ice) => await window.swlLive.offer(ice)").then(
        offered, [visitor, avatar, offer_box], [answer_box, status]).then(
        None, answer_box, None, js="async (answer) => { await window.swlLive.answer(answer); }")
    stop.click(None, None, None, js="async () => { await window.swlLive.stop(); }")
    return avatar
