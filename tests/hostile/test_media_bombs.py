"""Media bombs against a real gateway process: speech declaring huge sample rates, a face video that jumps to 4K."""

import io
import struct
from fractions import Fraction

import av
import grpc
import numpy as np
import pytest
from superwav2lip_client import Client, RetryPolicy, SuperWav2LipError

from tests.support.media_factory import encode_png, encode_video, marker_frames, scene, speech_wav, with_marker
from tests.support.process_stack import ProcessStack

FACE = encode_png(with_marker(scene(), 100, 80))
GROWTH_LIMIT_KB = 32 << 10


def silent_flac(seconds: float, rate: int) -> bytes:
    """Silence compresses to almost nothing: 60 s at 384 kHz is about 20 KB that decodes to 23 M samples."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono")
        block = 1 << 16
        for start in range(0, int(seconds * rate), block):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, block), np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def wav_declaring(rate: int) -> bytes:
    """A real 1 s 16 kHz WAV whose fmt chunk says `rate` samples per second (and the matching byte rate)."""
    data = bytearray(speech_wav(1.0, rate=16000))
    fmt = data.index(b"fmt ")
    struct.pack_into("<II", data, fmt + 12, rate, rate * 2)
    return bytes(data)


def jumps_to_4k() -> bytes:
    """MPEG-TS of 10 frames at 640x360 then 3 at 3840x2160, one stream: a new SPS midway, as a broadcast would."""
    small = encode_video(marker_frames(10, 640, 360), container_format="mpegts")
    large = encode_video([np.full((2160, 3840, 3), 90, np.uint8)] * 3, container_format="mpegts",
                         ticks=[10, 11, 12], fps=Fraction(25))
    return small + large


@pytest.fixture(scope="module")
def stack(dev_models_dir, tmp_path_factory):
    """`make run`'s processes; the frame limit set under 4K (the default, 4096x2160, allows it)."""
    with ProcessStack(tmp_path_factory.mktemp("bombs"), dev_models_dir,
                      {"SWL_GATEWAY_MAX_FRAME_PIXELS": str(1920 * 1080)}) as running:
        yield running


def refusal(stack: ProcessStack, face: bytes, audio: bytes) -> tuple[SuperWav2LipError, int]:
    """How the gateway refused the generation, and how far its resident memory rose above its level before."""
    with open(f"/proc/{stack.pid('gateway')}/clear_refs", "w") as refs:
        refs.write("5")  # the peak (VmHWM) restarts from the resident memory now
    before = stack.status("gateway")["rss_kb"]
    with Client(stack.address(), retry=RetryPolicy(max_attempts=1), timeout=120) as client:
        with pytest.raises(SuperWav2LipError) as refused:
            client.generate(face, audio)
    return refused.value, stack.status("gateway")["peak_kb"] - before


@pytest.mark.parametrize("name,audio", [("384 kHz 60 s FLAC", lambda: silent_flac(60, 384000)),
                                        ("WAV declaring 2 GHz", lambda: wav_declaring(2_000_000_000))])
def test_speech_at_a_huge_declared_rate_is_refused_by_its_limit_within_32_mib(stack, name, audio):
    error, growth_kb = refusal(stack, FACE, audio())
    print(f"{name}: refused, the gateway's peak grew by {growth_kb} KiB")
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, (name, error)
    assert "SWL_GATEWAY_MAX_AUDIO_SAMPLE_RATE" in error.message, (name, error.message)
    assert growth_kb < GROWTH_LIMIT_KB, f"{name}: the gateway grew by {growth_kb >> 10} MiB"
    assert stack.health() == "SERVING"


def test_a_face_video_that_jumps_to_4k_midway_is_refused_naming_the_frame_limit(stack):
    error, growth_kb = refusal(stack, jumps_to_4k(), speech_wav(1.0))
    print(f"4K midway: refused, the gateway's peak grew by {growth_kb} KiB (FFmpeg's own 4K frames)")
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "3840x2160" in error.message and "SWL_GATEWAY_MAX_FRAME_PIXELS" in error.message, error.message
    assert stack.health() == "SERVING"
