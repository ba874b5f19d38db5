"""The SDK's live sessions (sync and asyncio), the `superwav2lip live` command and the TTS example, against an
in-process stack with generated models."""

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import av
import grpc
import numpy as np
import pytest
import pytest_asyncio
from superwav2lip.live.v1 import live_pb2

from superwav2lip_client import (AsyncClient, Client, FrameFormat, LiveEvent, LiveEventKind, LiveFrame, LiveReady,
                                 SuperWav2LipError)
from superwav2lip_client.core import speech_requests

from tests.support.live import create_avatar, speech
from tests.support.media_factory import encode_video, marker_frames
from tests.support.paths import ROOT
from tests.support.processes import cli
from tests.support.stack import MODULE_LOOP, shared_stack

pytestmark = [MODULE_LOOP, pytest.mark.realtime]  # paced in real time: `make test` runs them alone
stack = shared_stack()
RATE = 16000
UNKNOWN_AVATAR = "av_" + "0" * 24


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def avatar_id(stack):
    avatar, _ = await create_avatar(stack.stub, encode_video(marker_frames(20)))
    return avatar.avatar_id


def check_session(ready: LiveReady, items: list, pcm: np.ndarray, sent_chunks: list[range]) -> None:
    """What a session of one utterance, then close, must have received: contiguous frames at the served rate,
    the speech's length at that rate, the speech back exactly between silences, the chunks counted as sent."""
    assert isinstance(ready, LiveReady) and ready.fps > 0 and ready.format == FrameFormat.JPEG
    assert all(isinstance(item, (LiveFrame, LiveEvent)) for item in items)
    frames = [item for item in items if isinstance(item, LiveFrame)]
    events = [item for item in items if isinstance(item, LiveEvent)]
    assert [f.index for f in frames] == list(range(len(frames)))  # the SDK loses and reorders nothing
    assert all(abs(f.pts_s - f.index / ready.fps) < 1e-9 for f in frames)
    # sends longer than 200 ms were split: chunk numbers run on without a gap, and the frames used the last one
    assert [n for r in sent_chunks for n in r] == list(range(1, sum(map(len, sent_chunks)) + 1))
    assert max(f.speech_chunk for f in frames) == sent_chunks[-1][-1]
    audio = np.frombuffer(b"".join(f.pcm for f in frames), "<i2")
    lead = int(np.flatnonzero(pcm)[0])
    start = int(np.flatnonzero(audio)[0]) - lead
    assert np.array_equal(audio[start : start + len(pcm)], pcm)
    assert not audio[:start].any() and not audio[start + len(pcm):].any()
    per_frame = RATE / ready.fps
    first, count = int(start // per_frame), int(np.ceil(len(pcm) / per_frame))
    speech_frames = [f for f in frames if first <= f.index < first + count]
    assert len(speech_frames) == count and abs(count - len(pcm) / RATE * ready.fps) <= 1
    assert all(f.speaking or f.dropped for f in speech_frames)
    assert not any(f.speaking for f in frames if not first <= f.index < first + count)
    kinds = [e.kind for e in events]
    assert kinds.count(LiveEventKind.SPEAKING_STARTED) == 1 and kinds.count(LiveEventKind.PLAYBACK_FINISHED) == 1


def paced(pcm: np.ndarray, chunk_s: float):
    """(delay before, chunk) pairs: each chunk sent when its last sample would have been spoken."""
    step = int(RATE * chunk_s)
    return [(chunk_s, pcm[i : i + step]) for i in range(0, len(pcm), step)]


async def test_sync_live_session_from_plain_threads(stack, avatar_id):
    pcm = speech(2.0)

    def session():
        sent: list[range] = []
        with Client(stack.address("gateway")) as client, \
                client.live(avatar_id, sample_rate=RATE, return_audio=True) as live:
            def sender():  # 300 ms sends, over the gateway's 200 ms chunk limit: the SDK splits them
                started = time.monotonic()
                for i, (_, chunk) in enumerate(paced(pcm, 0.3)):
                    time.sleep(max(0.0, started + (i + 1) * 0.3 - time.monotonic()))
                    sent.append(live.send(chunk))
                live.end_utterance()
                live.close()

            thread = threading.Thread(target=sender)
            thread.start()
            items = list(live)
            thread.join()
            with pytest.raises(ValueError, match="closed"):
                live.send(pcm[:160])
        assert not [t for t in threading.enumerate() if t.name.startswith("live-reader")]  # the reader ended
        return live.ready, items, sent

    ready, items, sent = await asyncio.to_thread(session)
    check_session(ready, items, pcm, sent)
    assert [len(r) for r in sent] == [2] * 6 + [1]  # 2 s in 300 ms sends: 200 + 100 ms each, then the last 200 ms


async def test_async_live_session_sends_from_one_task_while_another_reads(stack, avatar_id):
    pcm = speech(2.0)
    sent: list[range] = []
    async with AsyncClient(stack.address("gateway")) as client:
        async with client.live(avatar_id, sample_rate=RATE, return_audio=True) as live:
            async def sender():
                started = time.monotonic()
                for i, (_, chunk) in enumerate(paced(pcm, 0.1)):
                    await asyncio.sleep(max(0.0, started + (i + 1) * 0.1 - time.monotonic()))
                    sent.append(await live.send(chunk))
                await live.end_utterance()
                await live.close()

            task = asyncio.create_task(sender())
            items = [item async for item in live]
            await task
            with pytest.raises(ValueError, match="closed"):
                await live.send(pcm[:160])
    check_session(live.ready, items, pcm, sent)
    assert [len(r) for r in sent] == [1] * 20


async def test_a_clear_from_the_sdk_returns_to_idle(stack, avatar_id):
    async with AsyncClient(stack.address("gateway")) as client:
        async with client.live(avatar_id, sample_rate=RATE) as live:
            items: list = []
            cleared: list[LiveEvent] = []

            async def read():
                async for item in live:
                    items.append(item)
                    if isinstance(item, LiveFrame) and item.speaking and not cleared:
                        await live.clear()  # barge-in once the avatar is seen speaking
                    if isinstance(item, LiveEvent) and item.kind == LiveEventKind.CLEARED:
                        cleared.append(item)  # (a clear is answered once)
                    if cleared and isinstance(item, LiveFrame) and item.index == cleared[0].frame_index + 5:
                        await live.close()

            reader = asyncio.create_task(read())
            for _, chunk in paced(speech(1.5), 0.1):
                await live.send(chunk)  # faster than real time: the gateway buffers it
            await asyncio.wait_for(reader, 30)
    later = [f for f in items if isinstance(f, LiveFrame) and f.index >= cleared[0].frame_index + 2]
    assert len(later) >= 4 and not any(f.speaking for f in later)
    assert any(f.speaking for f in items if isinstance(f, LiveFrame) and f.index < cleared[0].frame_index)


async def test_an_unknown_avatar_raises_not_found_and_bad_speech_is_refused_before_sending(stack, avatar_id):
    address = stack.address("gateway")

    def sync_open():
        with Client(address) as client:
            with pytest.raises(SuperWav2LipError) as raised:
                with client.live(UNKNOWN_AVATAR):
                    pass
            return raised.value

    error = await asyncio.to_thread(sync_open)
    assert error.code == grpc.StatusCode.NOT_FOUND and UNKNOWN_AVATAR in error.message and error.request_id
    async with AsyncClient(address) as client:
        with pytest.raises(SuperWav2LipError) as raised:
            async with client.live(UNKNOWN_AVATAR):
                pass
        assert raised.value.code == grpc.StatusCode.NOT_FOUND and UNKNOWN_AVATAR in raised.value.message
        with pytest.raises(ValueError, match="format='png'"):
            client.live(avatar_id, format="png")
        async with client.live(avatar_id, sample_rate=RATE) as live:
            with pytest.raises(ValueError, match="even number"):
                await live.send(b"\x00" * 321)
            with pytest.raises(ValueError, match="mono"):
                await live.send(np.zeros((1600, 2), np.int16))
            with pytest.raises(TypeError, match="int16"):
                await live.send(np.zeros(1600, np.float32))
            await live.send(np.zeros((1600, 1), np.int16))  # one column is mono
        # the gateway's own refusal, mid-session, comes back as the SDK's error with the server's words (a 1 s
        # chunk written past the SDK's splitting, the one way to make the gateway refuse speech through it)
        async with client.live(avatar_id, sample_rate=RATE) as live:
            with pytest.raises(SuperWav2LipError) as raised:
                await live._write(live_pb2.LiveRequest(speech=live_pb2.SpeechChunk(pcm=bytes(2 * RATE))))
                async for _ in live:
                    pass
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and "200 ms" in raised.value.message


def test_speech_is_split_into_chunks_of_at_most_200_ms():
    chunks = speech_requests(np.arange(7000, dtype=np.int16), 16000)
    assert [len(c.speech.pcm) for c in chunks] == [6400, 6400, 1200]
    assert b"".join(c.speech.pcm for c in chunks) == np.arange(7000, dtype="<i2").tobytes()
    assert [len(c.speech.pcm) for c in speech_requests(bytes(2 * 4410), 22050)] == [2 * 4410]


async def test_the_cli_records_a_playable_mp4_and_prints_the_latency(stack, avatar_id, tmp_path):
    wav = tmp_path / "speech.wav"
    with av.open(str(wav), "w", format="wav") as out:  # 22.05 kHz: the CLI resamples to 16 kHz
        stream = out.add_stream("pcm_s16le", rate=22050, layout="mono")
        frame = av.AudioFrame.from_ndarray(speech(2.0, 22050).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 22050
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    run = await asyncio.to_thread(cli, "live", "--avatar", avatar_id, "--audio", str(wav), "--out",
                                  str(tmp_path / "live.mp4"), "--lead", "0.3", "--json",
                                  f"--server={stack.address('gateway')}")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    with av.open(str(tmp_path / "live.mp4")) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name == "h264" and audio.codec_context.name == "aac"
        times = [float(frame.pts * frame.time_base) for frame in container.decode(video=0)]
        video_s, audio_s = float(video.duration * video.time_base), float(audio.duration * audio.time_base)
    fps = report["fps"]
    # every frame received is in the video at its index / fps; a dropped one leaves a gap of 1/fps
    assert len(times) == report["frames"] > 2 * fps
    slots = [round(t * fps) for t in times]
    assert all(abs(t * fps - slot) < 1e-3 for t, slot in zip(times, slots)) and slots == sorted(set(slots))
    assert slots[-1] + 1 - len(slots) <= report["frames_dropped"]
    assert abs(video_s - (slots[-1] + 1 - slots[0]) / fps) < 1e-3, (video_s, slots)
    assert abs(audio_s - video_s) <= 0.1 and report["audio_seconds"] >= 2.0
    assert report["speaking_frames"] >= 2.0 * fps - 1 - report["frames_dropped"]
    assert report["chunks"] == 20 and report["chunks_never_shown"] == 0
    assert 0 < report["first_speech_frame_s"] < 5 and report["chunk_latency_p50_s"] <= report["chunk_latency_p95_s"]
    text = await asyncio.to_thread(cli, "live", "--avatar", UNKNOWN_AVATAR, "--audio", str(wav), "--out",
                                   str(tmp_path / "x.mp4"), f"--server={stack.address('gateway')}")
    assert text.returncode == 3 and "NOT_FOUND" in text.stderr and not (tmp_path / "x.mp4").exists()


async def test_the_tts_example_streams_sentences_and_prints_events(stack, avatar_id, tmp_path):
    wav = tmp_path / "speech.wav"
    with av.open(str(wav), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(speech(2.5).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    env = dict(os.environ, SUPERWAV2LIP_ADDRESS=stack.address("gateway"), PYTHONPATH=str(ROOT / "client"))
    run = await asyncio.to_thread(subprocess.run, [sys.executable, str(ROOT / "client" / "examples" / "live_tts.py"),
                                                   avatar_id, str(wav)], capture_output=True, text=True, env=env,
                                  timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ready: ")
    # three sentences (1.2 + 1.2 + 0.1 s), each its own utterance
    assert run.stdout.count("speaking_started") == 3 and run.stdout.count("playback_finished") == 3, run.stdout
    assert "3 sentences" in run.stdout
