"""Live WebRTC through a real TURN server (coturn, started here), as a Kubernetes deployment runs it: the gateway
offers relay candidates only, and the peer (aiortc standing in for the browser, as in test_live_webrtc) is given the
servers and credentials Live/IceServers hands out and is held to relay candidates too, so that the avatar's media can
reach it only through coturn."""

import asyncio
import logging

import grpc
import pytest
import pytest_asyncio
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack
from aiortc.rtcconfiguration import RTCIceTransportPolicy
from superwav2lip.live.v1 import live_pb2, live_pb2_grpc

from tests.support.live import create_avatar
from tests.support.metrics import metric
from tests.support.media_factory import encode_video, scene, with_marker
from tests.support.stack import MODULE_LOOP, running_stack
from tests.support.turn import TurnServer
from tests.support.waiting import eventually_async

pytestmark = [MODULE_LOOP, pytest.mark.realtime]  # frames paced in real time: `make test` runs them alone
SECRET = "turn-shared-secret"


@pytest.fixture(scope="module")
def turn(tmp_path_factory):
    server = TurnServer(tmp_path_factory.mktemp("turn"), SECRET)
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(dev_models_dir, turn):
    async with running_stack(dev_models_dir, live_ice_servers=(turn.url,), live_turn_secret=SECRET,
                             live_ice_relay_only=True) as stack:
        yield stack


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def avatar_id(stack) -> str:
    avatar, _ = await create_avatar(stack.stub, encode_video([with_marker(scene(320, 240), 160, 110)] * 20))
    return avatar.avatar_id


async def relay_only_peer(servers: live_pb2.IceServersResponse) -> tuple[RTCPeerConnection, str]:
    """A browser-like offer (a microphone, a video to receive) gathered with the given servers, relay only."""
    pc = RTCPeerConnection(RTCConfiguration(
        iceServers=[RTCIceServer(urls=list(s.urls), username=s.username or None, credential=s.credential or None)
                    for s in servers.ice_servers],
        iceTransportPolicy=RTCIceTransportPolicy.RELAY))
    pc.addTrack(AudioStreamTrack())
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


def candidate_types(sdp: str) -> set[str]:
    return {line.split(" typ ")[1].split()[0] for line in sdp.splitlines() if line.startswith("a=candidate")}


async def test_the_avatars_video_reaches_a_relay_only_peer_through_the_turn_server(stack, avatar_id, turn):
    live = live_pb2_grpc.LiveStub(stack.channel)
    servers = await live.IceServers(live_pb2.IceServersRequest(), timeout=10)
    (server,) = servers.ice_servers
    assert list(server.urls) == [turn.url] and server.username == f"{servers.expires_unix}:anonymous"
    capacity = stack.servers["gateway"].service.live_capacity
    pc, sdp = await relay_only_peer(servers)
    try:
        assert candidate_types(sdp) == {"relay"}  # the credentials were accepted: coturn allocated for the peer
        answer = await live.Offer(live_pb2.OfferRequest(avatar_id=avatar_id, sdp=sdp), timeout=30)
        assert candidate_types(answer.sdp) == {"relay"}, answer.sdp  # none of the gateway's own addresses
        received = asyncio.get_running_loop().create_future()
        pc.on("track", lambda track: track.kind == "video" and not received.done() and received.set_result(track))
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer.sdp, type="answer"))
        video = await asyncio.wait_for(received, 10)
        frames = [await asyncio.wait_for(video.recv(), 10) for _ in range(25)]  # a second of the avatar, idle
        assert {(f.width, f.height) for f in frames} == {(answer.ready.width, answer.ready.height)}
        assert pc.connectionState == "connected"
    finally:
        await pc.close()
    await eventually_async(lambda: capacity.sessions == 0, seconds=20, what="the session ended with its peer")
    # The peer's relay was allocated with the credentials handed out (the gateway's, made for its offer, show in
    # its answer's relay candidates); the media could only go through the two.
    log = turn.log_text()
    assert f"user <{server.username}>: incoming packet ALLOCATE processed, success" in log, log[-3000:]


async def test_a_turn_server_that_refuses_the_gateway_fails_the_offer_with_what_to_check(dev_models_dir, turn,
                                                                                        caplog):
    caplog.set_level(logging.INFO, logger="gateway.audit")
    async with running_stack(dev_models_dir, live_ice_servers=(turn.url,), live_turn_secret="not the secret",
                             live_ice_relay_only=True) as stack:
        avatar, _ = await create_avatar(stack.stub, encode_video([with_marker(scene(320, 240), 160, 110)] * 20))
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTrack(AudioStreamTrack())
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await live_pb2_grpc.LiveStub(stack.channel).Offer(
                    live_pb2.OfferRequest(avatar_id=avatar.avatar_id, sdp=pc.localDescription.sdp), timeout=30)
        finally:
            await pc.close()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
        assert "SWL_GATEWAY_LIVE_TURN_SECRET" in refused.value.details()
        service = stack.servers["gateway"].service  # the refused offer holds no session, nor counts one
        assert service.live_capacity.sessions == 0 and service.live.sessions == {}
        assert metric(await stack.metrics_text("gateway"), "swl_gateway_live_sessions") == 0
    audit = [(r.method, r.action, r.object_id, r.outcome) for r in caplog.records if r.name == "gateway.audit"]
    assert ("Offer", "live", avatar.avatar_id, "UNAVAILABLE") in audit, audit
