"""Lips in sync in every output format, measured the classic way: a flash and a beep, decoded as players decode.

The face clip's frame FLASH_FRAME carries a white patch in a corner, away from the face the generated detector
finds there, and the speech is silent but for a short click at the time that frame should be shown. Output frame
i shows input frame i (the speech is shorter than the clip), so both events have a known place in the output.
Each output is decoded with its edit lists and composition offsets honoured, by PyAV and separately by the FFmpeg
command line (ffprobe's timestamps, ffmpeg's pixels and samples): each event must land within half a frame of
where it belongs, and the two within 10 ms of each other."""

from __future__ import annotations

import asyncio
import io
import json
import re
import struct
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from superwav2lip.gateway.v1 import gateway_pb2
from google.api import httpbody_pb2

from gateway.audio import Speech
from gateway.mp4_writer import Mp4Writer
from gateway.mp4_boxes import with_gapless_info

from tests.support.paths import system_binary
from tests.support.flash_and_click import CLICK_S, FPS, PATCH, encode_speech, flash_clip
from tests.support.stack import running_stack

HALF_FRAME_S = 0.5 / FPS
PAIR_TOLERANCE_S = 0.010


def flash_index(frames: list[np.ndarray]) -> int:
    """The one frame whose corner patch is bright."""
    levels = np.array([frame[PATCH].mean() for frame in frames])
    bright = np.flatnonzero(levels > (levels.max() + np.median(levels)) / 2)
    assert len(bright) == 1, f"expected one flash frame, found {bright.tolist()} (levels {levels.round().tolist()})"
    return int(bright[0])


def click_offset(samples: np.ndarray) -> int:
    """Index of the click's first sample: where the signal first reaches half its peak."""
    envelope = np.abs(samples)
    return int(np.argmax(envelope >= envelope.max() / 2))


def events_by_pyav(mp4: bytes) -> dict:
    with av.open(io.BytesIO(mp4)) as container:
        video = [(frame.time, frame.to_ndarray(format="gray")) for frame in container.decode(video=0)]
    with av.open(io.BytesIO(mp4)) as container:
        audio = [(frame.time, frame.sample_rate, frame.to_ndarray()[0]) for frame in container.decode(audio=0)]
    samples = np.concatenate([a[2] for a in audio])
    return {"frame_times": [t for t, _ in video], "flash": video[flash_index([f for _, f in video])][0],
            "click": audio[0][0] + click_offset(samples) / audio[0][1], "audio_start": audio[0][0]}


def events_by_ffmpeg_cli(mp4: bytes, folder: Path) -> dict:
    """ffprobe for every frame's presentation time and the streams' start times; ffmpeg for pixels and samples."""
    ffprobe, ffmpeg = system_binary("ffprobe"), system_binary("ffmpeg")
    path = folder / "output.mp4"
    path.write_bytes(mp4)

    def probe(*args: str) -> dict:
        return json.loads(subprocess.run([ffprobe, "-v", "error", "-of", "json", *args, str(path)], check=True,
                                         capture_output=True).stdout)

    starts = ffprobe_start_times(path)
    video_times = [float(f["pts_time"]) for f in
                   probe("-select_streams", "v", "-show_entries", "frame=pts_time", "-show_frames")["frames"]]
    audio_times = [float(f["pts_time"]) for f in
                   probe("-select_streams", "a", "-show_entries", "frame=pts_time", "-show_frames")["frames"]]
    width, height = (probe("-select_streams", "v", "-show_entries", "stream=width,height")["streams"][0][k]
                     for k in ("width", "height"))
    gray = subprocess.run([ffmpeg, "-v", "error", "-i", str(path), "-map", "0:v", "-fps_mode", "passthrough",
                           "-f", "rawvideo", "-pix_fmt", "gray", "-"], check=True, capture_output=True).stdout
    frames = list(np.frombuffer(gray, np.uint8).reshape(-1, height, width))
    assert len(frames) == len(video_times), (len(frames), len(video_times))
    pcm = subprocess.run([ffmpeg, "-v", "error", "-i", str(path), "-map", "0:a", "-ac", "1", "-ar", "48000",
                          "-f", "f32le", "-"], check=True, capture_output=True).stdout
    samples = np.frombuffer(pcm, np.float32)
    return {"starts": starts, "frame_times": video_times, "flash": video_times[flash_index(frames)],
            "click": audio_times[0] + click_offset(samples) / 48000, "audio_start": audio_times[0]}


def assert_in_sync(events: dict, where: str) -> None:
    flash_error, click_error = events["flash"] - CLICK_S, events["click"] - CLICK_S
    summary = (f"{where}: flash shown at {events['flash']:.4f} s, click heard at {events['click']:.4f} s, both "
               f"belong at {CLICK_S:.4f} s; first frame at {events['frame_times'][0]:.4f} s, first audio at "
               f"{events['audio_start']:.4f} s")
    assert abs(events["frame_times"][0]) < 1e-3 and abs(events["audio_start"]) < 1e-3, summary
    assert all(abs(t - i / FPS) < 1e-3 for i, t in enumerate(events["frame_times"])), summary
    assert abs(flash_error) <= HALF_FRAME_S and abs(click_error) <= HALF_FRAME_S, summary
    assert abs(flash_error - click_error) <= PAIR_TOLERANCE_S, summary
    if "starts" in events:
        assert events["starts"] == {"video": 0.0, "audio": 0.0}, f"{where}: ffprobe start_time {events['starts']}"


def decoded_seconds(speech: bytes) -> float:
    """The upload's length as FFmpeg decodes it (an mp3 or m4a may keep some of its encoder's end padding)."""
    with av.open(io.BytesIO(speech)) as container:
        frames = list(container.decode(audio=0))
    return sum(frame.samples for frame in frames) / frames[0].sample_rate


def assert_gapless_info_exact(mp4: bytes, speech: bytes, where: str) -> None:
    """The streamed file's iTunSMPB states the priming, the end padding and the real length: the speech's samples
    at 48 kHz, and the AAC frames as they were muxed (counted from the packets)."""
    found = re.search(rb"iTunSMPB.{16} 00000000 ([0-9A-F]{8}) ([0-9A-F]{8}) ([0-9A-F]{16})", mp4, re.DOTALL)
    assert found, f"{where}: no iTunSMPB entry"
    priming, padding, samples = (int(value, 16) for value in found.groups())
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.audio[0]
        packets = [p for p in container.demux(stream) if p.size]
        frame_size = stream.codec_context.frame_size
    assert priming == 1024 and abs(samples - decoded_seconds(speech) * 48000) <= 1, (where, priming, samples)
    assert priming + samples + padding == len(packets) * frame_size and 0 <= padding < frame_size, (
        where, priming, padding, samples, len(packets))


async def outputs_of_every_format(stack, face: bytes, speech: bytes, every_format: bool) -> dict[str, bytes]:
    """The mp4 of each output path; without `every_format`, the streamed and the faststart one only."""
    stub, outputs = stack.stub, {}
    outputs["streamed (Generate)"], _, _ = await stack.generate(face, speech)
    outputs["faststart (GenerateVideo)"] = (await stack.generate_video(face, speech)).data
    if not every_format:
        return outputs
    events = stub.GenerateEvents(gateway_pb2.GenerateVideoRequest(face=face, audio=speech), timeout=120)
    outputs["streamed (GenerateEvents, the SSE route's chunks)"] = b"".join(
        [e.video_chunk async for e in events if e.WhichOneof("event") == "video_chunk"])

    job = await stub.SubmitJob(gateway_pb2.SubmitJobRequest(face=face, audio=speech), timeout=30)
    async for update in stub.WatchJob(gateway_pb2.JobRequest(job_id=job.job_id), timeout=120):
        if gateway_pb2.Job.State.Name(update.state) in {"SUCCEEDED", "FAILED", "CANCELLED"}:
            assert gateway_pb2.Job.State.Name(update.state) == "SUCCEEDED", update.error_message
            break
    outputs["job download (GetJobVideo)"] = (await stub.GetJobVideo(gateway_pb2.JobRequest(job_id=job.job_id),
                                                                     timeout=30)).data

    chunks = [gateway_pb2.CreateAvatarChunk(options=gateway_pb2.AvatarOptions(name="flash")),
              gateway_pb2.CreateAvatarChunk(face_chunk=face)]
    avatar = [e async for e in stub.CreateAvatar(iter(chunks), timeout=60)][-1].avatar
    outputs["avatar (GenerateFromAvatar)"] = (await stub.GenerateFromAvatar(gateway_pb2.GenerateFromAvatarRequest(
        avatar_id=avatar.avatar_id, audio=httpbody_pb2.HttpBody(data=speech)), timeout=120)).data
    return outputs


@pytest.mark.parametrize("speech_kind", ["wav", "m4a", "mp3"])
async def test_the_flash_and_the_click_are_presented_together_in_every_output(dev_models_dir, tmp_path,
                                                                              speech_kind):
    """Every output path with WAV speech; the streamed and faststart paths with m4a and mp3, whose own encoder
    delay the speech decoder must drop (the rest of the path is the same whatever the upload's codec)."""
    face, speech = flash_clip(), encode_speech(speech_kind)
    async with running_stack(dev_models_dir, data_dir=str(tmp_path / "data"), plan_cache_mb=0) as stack:
        outputs = await outputs_of_every_format(stack, face, speech, every_format=speech_kind == "wav")
    for where, mp4 in outputs.items():
        if where.startswith("streamed"):
            assert_gapless_info_exact(mp4, speech, where)
    problems = []  # every format and decoder is checked, so a failure shows the whole picture
    for where, mp4 in outputs.items():
        for decoder, events in (("PyAV", events_by_pyav(mp4)),
                                ("ffmpeg", await asyncio.to_thread(events_by_ffmpeg_cli, mp4, tmp_path))):
            try:
                assert_in_sync(events, f"{where}, decoded by {decoder}")
            except AssertionError as error:
                problems.append(str(error).splitlines()[0])
    assert not problems, "\n".join(problems)


def without_moov_child(mp4: bytes, kind: bytes) -> bytes:
    """The mp4 with moov's `kind` child box removed (as a muxer that writes no metadata would leave it)."""
    moov = mp4.index(b"moov") - 4
    moov_size = struct.unpack_from(">I", mp4, moov)[0]
    offset = moov + 8
    while offset < moov + moov_size:
        size, found = struct.unpack_from(">I4s", mp4, offset)
        if found == kind:
            head = bytearray(mp4[:offset] + mp4[offset + size :])
            struct.pack_into(">I", head, moov, moov_size - size)
            return bytes(head)
        offset += size
    raise ValueError(f"no {kind!r} in moov")


async def test_the_priming_tag_is_built_where_the_muxer_wrote_no_metadata(tmp_path):
    """with_gapless_info creates moov/udta/meta/ilst when none is there; ffprobe then starts the audio at 0."""
    speech = Speech(np.zeros(16000, np.float32), encode_speech("wav"), 1)
    writer = Mp4Writer(64, 48, Fraction(FPS), 23, "veryfast", speech, fragmented=True)
    await writer.write([np.zeros((48, 64, 3), np.uint8)] * 40)
    streamed = await writer.take() + await writer.finish()
    bare = without_moov_child(streamed, b"udta")
    assert b"iTunSMPB" not in bare
    (tmp_path / "bare.mp4").write_bytes(bare)
    (tmp_path / "retagged.mp4").write_bytes(with_gapless_info(bare, 1024, 0, 86400))
    with av.open(str(tmp_path / "retagged.mp4")) as container:
        assert container.metadata.get("iTunSMPB", "").split()[:2] == ["00000000", "00000400"], container.metadata
    assert ffprobe_start_times(tmp_path / "retagged.mp4") == {"video": 0.0, "audio": 0.0}
    if ffprobe_start_times(tmp_path / "bare.mp4")["audio"] == 0.0:  # an FFmpeg that applies the edit list alone
        pytest.skip("this ffprobe skips the priming by the edit list alone: the tag cannot be told apart here")


def ffprobe_start_times(path: Path) -> dict[str, float]:
    streams = json.loads(subprocess.run([system_binary("ffprobe"), "-v", "error", "-of", "json", "-show_entries",
                                         "stream=codec_type,start_time", str(path)], check=True,
                                        capture_output=True).stdout)["streams"]
    return {s["codec_type"]: float(s["start_time"]) for s in streams}
