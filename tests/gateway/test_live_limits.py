"""Live sessions under load and abuse: a slowed model, a batch job alongside, speech sent too fast, silence."""

import asyncio
import time

import grpc
import pytest
from superwav2lip.live.v1 import live_pb2

from tests.support.live import LiveCall, assert_continuous, create_avatar, played, speech
from tests.support.media_factory import encode_video, marker_frames
from tests.support.stack import running_stack
from tests.support.tenants import tenants_file

pytestmark = pytest.mark.realtime  # paced in real time: `make test` runs them alone

Event = live_pb2.LiveEvent


def slowed(run_batch, seconds_per_item: float):
    """The model as it would be on a slower machine: each item costs `seconds_per_item` more."""
    def run(items):
        time.sleep(seconds_per_item * len(items))
        return run_batch(items)
    return run


async def test_where_the_model_is_too_slow_the_session_serves_a_lower_rate_and_keeps_up(dev_models_dir):
    """A model slowed to 40 ms a frame more cannot give 25 fps within 0.7 s per second: the session is served at
    the rate that fits, says why, and stays on time with its audio continuous."""
    async with running_stack(dev_models_dir, live_min_fps=2.0) as stack:  # whatever this machine adds to the 40 ms
        queue = stack.servers["lipsync"].service.servicer.queue
        queue._run_batch = slowed(queue._run_batch, 0.04)
        avatar, _ = await create_avatar(stack.stub, encode_video(marker_frames(20)))
        live = LiveCall(stack.channel)
        ready = await live.open(avatar_id=avatar.avatar_id, sample_rate=16000, return_audio=True)
        assert 2 <= ready.fps < 25 and "fps is what it sustains" in ready.reduced_because, ready
        pcm = speech(4.0)
        await played(live, pcm)
    assert_continuous(live.received, pcm, ready.fps)
    frames = live.received.frames
    dropped = sum(not f.data for _, f in frames)
    assert dropped <= 0.15 * len(frames), f"{dropped} of {len(frames)} dropped"
    late = [arrived - (frames[0][0] + (f.index - frames[0][1].index) / ready.fps) for arrived, f in frames]
    assert max(late[-10:]) < 0.5, late[-10:]  # it never falls further and further behind


async def test_speech_sent_faster_than_real_time_is_held_back_not_buffered(dev_models_dir):
    """8 s of speech written as fast as the client can: the session never holds more than its limit (the rest
    waits in HTTP/2 flow control), and all of it still plays, exactly."""
    async with running_stack(dev_models_dir, live_max_buffered_s=1.0) as stack:
        avatar, _ = await create_avatar(stack.stub, encode_video(marker_frames(20)))
        live = LiveCall(stack.channel)
        ready = await live.open(avatar_id=avatar.avatar_id, sample_rate=16000, return_audio=True)
        sessions = stack.servers["gateway"].service.live.sessions
        held: list[float] = []

        async def watch():
            while True:
                held.extend(s.buffered_seconds() for s in sessions.values())
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        pcm = speech(8.0)
        await played(live, pcm, pace=False)
        watcher.cancel()
    assert held and max(held) <= 1.0 + 0.2, max(held)
    assert_continuous(live.received, pcm, ready.fps)


async def test_a_silent_session_is_closed_with_a_reason_and_the_gateway_keeps_serving(dev_models_dir):
    async with running_stack(dev_models_dir, live_idle_timeout_s=1.0) as stack:
        avatar, _ = await create_avatar(stack.stub, encode_video(marker_frames(20)))
        live = LiveCall(stack.channel)
        await live.open(avatar_id=avatar.avatar_id, sample_rate=16000)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await asyncio.wait_for(live._reader, 10)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "idle for 1 s" in raised.value.details() and "SWL_GATEWAY_LIVE_IDLE_TIMEOUT_S" in raised.value.details()
        assert len(live.received.frames) >= 20  # idle frames played until then
        again = LiveCall(stack.channel)
        assert (await again.open(avatar_id=avatar.avatar_id, sample_rate=16000)).fps == 25
        again.call.cancel()


async def test_live_sessions_count_against_the_tenants_quota(dev_models_dir, tmp_path):
    """A tenant with `live_sessions: 1` gets RESOURCE_EXHAUSTED naming the quota for a second session; another
    tenant's session is admitted meanwhile, and the first tenant's slot is free again once its session ends."""
    path = tenants_file(tmp_path, solo={"key": "solo-key-0001", "quotas": {"live_sessions": 1}},
                        other={"key": "other-key-0002"})
    async with running_stack(dev_models_dir, tenants_file=str(path), allow_anonymous=False) as stack:
        solo, other = (("x-api-key", "solo-key-0001"),), (("x-api-key", "other-key-0002"),)
        avatar, _ = await create_avatar_as(stack, solo)
        first = LiveCall(stack.channel, metadata=solo)
        await first.open(avatar_id=avatar.avatar_id, sample_rate=16000)
        second = LiveCall(stack.channel, metadata=solo)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await second.open(avatar_id=avatar.avatar_id, sample_rate=16000)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "live_sessions quota of 1" in refused.value.details()
        other_avatar, _ = await create_avatar_as(stack, other)
        neighbour = LiveCall(stack.channel, metadata=other)
        assert (await neighbour.open(avatar_id=other_avatar.avatar_id, sample_rate=16000)).fps > 0
        await first.control(live_pb2.CONTROL_CLOSE)
        await first.finish()
        again = LiveCall(stack.channel, metadata=solo)
        assert (await again.open(avatar_id=avatar.avatar_id, sample_rate=16000)).fps > 0
        for call in (neighbour, again):
            call.call.cancel()


async def create_avatar_as(stack, metadata):
    from superwav2lip.gateway.v1 import gateway_pb2

    chunks = [gateway_pb2.CreateAvatarChunk(options=gateway_pb2.AvatarOptions(name="presenter")),
              gateway_pb2.CreateAvatarChunk(face_chunk=encode_video(marker_frames(20)))]
    events = [e async for e in stack.stub.CreateAvatar(iter(chunks), metadata=metadata, timeout=60)]
    return events[-1].avatar, events
