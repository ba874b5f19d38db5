"""Live sessions against an in-process stack with generated models: pacing, frame counts, audio, clear, limits."""

import asyncio
import time

import av
import grpc
import numpy as np
import pytest
import pytest_asyncio
from superwav2lip.live.v1 import live_pb2


from tests.support.live import LiveCall, create_avatar, speech
from tests.support.media_factory import encode_video, marker_frames
from tests.support.stack import MODULE_LOOP, shared_stack

pytestmark = [MODULE_LOOP, pytest.mark.realtime]  # paced in real time: `make test` runs them alone
stack = shared_stack()
Event = live_pb2.LiveEvent


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def avatar_id(stack):
    avatar, _ = await create_avatar(stack.stub, encode_video(marker_frames(20)))
    return avatar.avatar_id


async def test_ten_seconds_of_speech_play_in_time_and_in_sync(stack, avatar_id):
    pcm = speech(10.0)
    live = LiveCall(stack.channel)
    ready = await live.open(avatar_id=avatar_id, sample_rate=16000, return_audio=True,
                            format=live_pb2.FRAME_FORMAT_JPEG)
    fps = ready.fps
    await asyncio.sleep(0.5)  # idle frames first
    await live.speak(pcm, 16000)
    await live.control(live_pb2.CONTROL_END_OF_UTTERANCE)
    await live.wait_for(Event.KIND_PLAYBACK_FINISHED, timeout=30)
    await asyncio.sleep(0.5)  # idle frames after
    await live.control(live_pb2.CONTROL_CLOSE)
    await live.finish()
    got = live.received
    indices = [f.index for _, f in got.frames]
    assert indices == list(range(len(indices)))  # every frame's time came, in order: no drift, no gap
    assert all(abs(f.pts_s - f.index / fps) < 1e-9 for _, f in got.frames)
    pictures = got.pictures()
    dropped = {f.index for _, f in got.frames if not f.data}
    assert len(dropped) <= 0.2 * len(indices), f"{len(dropped)} of {len(indices)} frames dropped"
    assert not pictures[0].speaking and not pictures[-1].speaking  # idle before and after
    # Audio: silence, exactly the speech sent, silence.
    audio = got.pcm()
    lead = int(np.flatnonzero(pcm)[0])
    start = int(np.flatnonzero(audio)[0]) - lead
    assert np.array_equal(audio[start : start + len(pcm)], pcm)
    assert not audio[:start].any() and not audio[start + len(pcm):].any()
    # Frames: the speech's length at the frame rate (every sample plays), each speaking unless dropped.
    per_frame = 16000 / fps
    assert start % per_frame == 0  # the speech starts on a frame
    first_speech_frame, speech_frames = int(start // per_frame), int(np.ceil(len(pcm) / per_frame))
    assert abs(speech_frames - 10.0 * fps) <= 1
    spoken = {f.index for f in pictures if f.speaking}
    assert spoken | (dropped & set(range(first_speech_frame, first_speech_frame + speech_frames))) == set(
        range(first_speech_frame, first_speech_frame + speech_frames))
    # Sync: the speech starts at a frame boundary, the lookahead after its first chunk was sent.
    per_frame = 16000 / fps
    assert start % per_frame == 0
    first_speech_frame = int(start // per_frame)
    shown_at = next(t for t, f in got.frames if f.index == first_speech_frame)
    delay = shown_at - live.sent_at[0]
    assert ready.lookahead_s - 0.05 <= delay <= ready.lookahead_s + 1 / fps + 0.25, delay
    assert len(got.kinds(Event.KIND_SPEAKING_STARTED)) == 1


async def test_a_clear_returns_to_idle_within_two_frames(stack, avatar_id):
    live = LiveCall(stack.channel)
    ready = await live.open(avatar_id=avatar_id, sample_rate=16000)
    await live.speak(speech(1.5), 16000)
    await live.wait_for(Event.KIND_SPEAKING_STARTED)
    await asyncio.sleep(0.3)
    await live.control(live_pb2.CONTROL_CLEAR)
    await live.wait_for(Event.KIND_CLEARED)
    await asyncio.sleep(0.5)
    await live.control(live_pb2.CONTROL_CLOSE)
    await live.finish()
    cleared = live.received.kinds(Event.KIND_CLEARED)[0].frame_index
    later = [f for f in live.received.pictures() if f.index >= cleared + 2]
    assert later and not any(f.speaking for f in later)
    assert any(f.speaking for f in live.received.pictures() if f.index < cleared)
    assert ready.fps > 0


async def test_a_session_closed_mid_way_frees_its_slot(stack, avatar_id):
    live_capacity = stack.servers["gateway"].service.live_capacity
    live = LiveCall(stack.channel)
    await live.open(avatar_id=avatar_id, sample_rate=16000)
    assert live_capacity.sessions == 1
    await live.speak(speech(0.5), 16000)
    live.call.cancel()
    deadline = time.monotonic() + 5
    while live_capacity.sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert live_capacity.sessions == 0


@pytest.mark.parametrize("open_options, chunk, code, words", [
    ({"sample_rate": 7000}, None, grpc.StatusCode.INVALID_ARGUMENT, "sample_rate"),
    ({"sample_rate": 16000}, live_pb2.SpeechChunk(pcm=b"\x00" * 321), grpc.StatusCode.INVALID_ARGUMENT, "even"),
    ({"sample_rate": 16000}, live_pb2.SpeechChunk(pcm=b"\x00" * 6402 * 2), grpc.StatusCode.INVALID_ARGUMENT, "200 ms"),
    ({"sample_rate": 16000}, live_pb2.SpeechChunk(pcm=b"\x00" * 320, sample_rate=8000),
     grpc.StatusCode.INVALID_ARGUMENT, "differs"),
    ({"sample_rate": 16000, "avatar_id": "av_" + "0" * 24}, None, grpc.StatusCode.NOT_FOUND, "av_"),
    ({"sample_rate": 16000, "width": 33, "height": 20}, None, grpc.StatusCode.INVALID_ARGUMENT, "even"),
])
async def test_bad_messages_get_their_code_and_the_gateway_keeps_serving(stack, avatar_id, open_options, chunk,
                                                                         code, words):
    options = {"avatar_id": avatar_id, **open_options}
    call = LiveCall(stack.channel).call
    await call.write(live_pb2.LiveRequest(open=live_pb2.LiveOpen(**options)))
    if chunk is not None:
        await call.write(live_pb2.LiveRequest(speech=chunk))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        while await call.read() is not grpc.aio.EOF:
            pass
    assert raised.value.code() == code and words in raised.value.details(), raised.value.details()
    live = LiveCall(stack.channel)
    assert (await live.open(avatar_id=avatar_id, sample_rate=16000)).fps > 0
    live.call.cancel()


@pytest.mark.parametrize("kind", [live_pb2.FRAME_FORMAT_H264, live_pb2.FRAME_FORMAT_I420])
async def test_h264_and_i420_frames_decode_one_picture_each(stack, avatar_id, kind):
    """H.264: Annex B access units, a key frame first, one picture out per unit in (no B-frames to wait for);
    I420: width x height x 3/2 bytes of planar YUV."""
    live = LiveCall(stack.channel)
    ready = await live.open(avatar_id=avatar_id, sample_rate=16000, format=kind, width=160, height=120)
    await live.speak(speech(1.0), 16000)
    await live.control(live_pb2.CONTROL_END_OF_UTTERANCE)
    await live.wait_for(Event.KIND_PLAYBACK_FINISHED)
    await live.control(live_pb2.CONTROL_CLOSE)
    await live.finish()
    pictures = live.received.pictures()
    assert (ready.width, ready.height) == (160, 120) and len(pictures) >= 15
    if kind == live_pb2.FRAME_FORMAT_I420:
        assert all(len(f.data) == 160 * 120 * 3 // 2 for f in pictures)
        return
    decoder = av.CodecContext.create("h264", "r")
    decoded = []
    for unit in pictures:
        packets = decoder.parse(unit.data)
        assert len(packets) <= 1
        for packet in packets:
            decoded.extend(decoder.decode(packet))
    assert pictures[0].data.startswith(b"\x00\x00\x00\x01") and decoded[0].key_frame
    assert len(decoded) >= len(pictures) - 1  # the parser holds the last unit until the next start code
    assert (decoded[0].width, decoded[0].height) == (160, 120)
