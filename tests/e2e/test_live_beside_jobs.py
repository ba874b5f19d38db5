"""A live session beside a batch job, on real processes with the full-size Wav2Lip stand-in (~4 GMACs a frame)."""

import asyncio
import os
import shutil
from pathlib import Path

import grpc
import pytest
from superwav2lip.gateway.v1 import gateway_pb2_grpc

from bench.full_size_models import write_full_size
from bench.throughput import FULL_SIZE_CACHE
from service_runtime.dev_models import write_dev_model
from service_runtime.manifest import load_manifest

from tests.support.live import LiveCall, assert_continuous, create_avatar, played, speech
from tests.support.media_factory import decode_all, encode_video, marker_frames, speech_wav
from tests.support.process_stack import ProcessStack
from tests.support.stack import Stack

pytestmark = pytest.mark.realtime  # paced in real time: `make test` runs them alone

ROOT = Path(__file__).resolve().parents[2]


def models_with_full_size_wav2lip(folder: Path) -> Path:
    """Generated models, but Wav2Lip at its real cost: a job's batch of 32 frames holds the model about a second."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "models" / "manifest.json", folder / "manifest.json")
    manifest = load_manifest(folder)
    for spec in manifest.models.values():
        write_dev_model(spec, folder / "dev")
    cached = FULL_SIZE_CACHE / manifest.get("wav2lip_gan").file
    if not cached.is_file():
        write_full_size(folder, FULL_SIZE_CACHE, "wav2lip_gan")
    os.symlink(cached, folder / cached.name)
    return folder


async def live_session(channel, avatar_id: str, pcm):
    live = LiveCall(channel)
    ready = await live.open(avatar_id=avatar_id, sample_rate=16000, return_audio=True, width=160, height=120)
    await played(live, pcm)
    assert_continuous(live.received, pcm, ready.fps)
    frames = live.received.frames
    return ready, sum(not f.data for _, f in frames) / len(frames), "".join(
        "S" if f.speaking else ("." if f.data else "x") for _, f in frames)


async def test_a_live_session_stays_on_time_beside_a_batch_job(tmp_path):
    """The job's model calls carry its far deadline and the live frames their near one: the lip-sync queue takes
    the live frames first and cuts the job's batches short while they come (a batch of 32 would hold a live
    frame about a second, past its margin), and the job still completes. Compared with the same session alone
    on the same stack just before, so that a busy machine is not mistaken for the job's doing."""
    models = models_with_full_size_wav2lip(tmp_path / "models")
    face, audio, pcm = encode_video(marker_frames(40)), speech_wav(4.0), speech(3.0)
    # Whatever rate this machine sustains now: the point is that the session keeps it beside the job.
    with ProcessStack(tmp_path / "stack", models, env={"SWL_GATEWAY_LIVE_MIN_FPS": "2"}) as stack:
        async with grpc.aio.insecure_channel(stack.address()) as jobs, \
                grpc.aio.insecure_channel(stack.address()) as channel:
            avatar, _ = await create_avatar(gateway_pb2_grpc.GatewayStub(jobs), encode_video(marker_frames(20)))
            _, alone, alone_pattern = await live_session(channel, avatar.avatar_id, pcm)
            job = asyncio.create_task(Stack({}, jobs).generate(face, audio, timeout=300))
            await asyncio.sleep(2.0)  # the job's batches are on the model
            ready, beside, pattern = await live_session(channel, avatar.avatar_id, pcm)
            mp4, _, _ = await job
    assert len(decode_all(mp4)[0]) == 100
    assert beside <= alone + 0.3, f"dropped {beside:.0%} beside the job ({pattern}), {alone:.0%} alone " \
                                  f"({alone_pattern}); {ready}"
