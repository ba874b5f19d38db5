"""The fuzz targets: each takes bytes and fails (raises) only on behaviour the service must never show.

A client may send anything; the gateway must answer with a precise status, never INTERNAL. So a target calls
the real entry point and lets through only `ServiceError`s whose code a client may see; any other exception, or
an INTERNAL one, is a finding. The detector decoders take raw model outputs (any float, NaN and infinities
included) and must return only finite faces."""

from __future__ import annotations

import struct
from collections.abc import Callable

import grpc
import numpy as np

from service_runtime.errors import ServiceError

CLIENT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND}


class Finding(AssertionError):
    """Behaviour a fuzz target forbids."""


def _limits():
    """Small limits, so that one input costs milliseconds and the fuzzer explores instead of decoding."""
    from gateway.limits import MediaLimits

    return MediaLimits(max_output_frames=50, max_frame_pixels=640 * 480, max_audio_seconds=3.0)


def _expect_client_error(call: Callable[[], object]) -> object:
    try:
        return call()
    except ServiceError as error:
        if error.code not in CLIENT_CODES:
            raise Finding(f"{error.code.name} for client input: {error.message}") from error
        if not error.message.strip():
            raise Finding(f"{error.code.name} without a message") from error
        return None


def face_media(data: bytes) -> None:
    """The face upload: probe, then decode the first frames (a video) or the picture (a still)."""
    from gateway.face_source import FaceSource

    source = _expect_client_error(lambda: FaceSource(data, 25.0, _limits()))
    if source is None:
        return
    try:
        frames = _expect_client_error(lambda: source.read(0, 3))
        for frame in frames or ():
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise Finding(f"a decoded frame is {frame.dtype} {frame.shape}, not BGR uint8")
            if (frame.shape[1], frame.shape[0]) != source.size:
                raise Finding(f"a frame of {frame.shape[1]}x{frame.shape[0]} from a source of {source.size}")
    finally:
        source.close()


def speech(data: bytes) -> None:
    """The speech upload: decode, downmix and resample to 16 kHz, then the mel the lip-sync model takes."""
    from gateway.audio import decode_speech, melspectrogram

    decoded = _expect_client_error(lambda: decode_speech(data, _limits()))
    if decoded is None:
        return
    if decoded.samples.dtype != np.float32 or decoded.samples.ndim != 1 or not np.isfinite(decoded.samples).all():
        raise Finding("decoded speech is not finite mono float32")
    mel = melspectrogram(decoded.samples)
    if not np.isfinite(mel).all():
        raise Finding("the mel of decoded speech is not finite")


def options(data: bytes) -> None:
    """Request options as the wire carries them: parse, then the gateway's validation."""
    from google.protobuf.message import DecodeError
    from superwav2lip.gateway.v1 import gateway_pb2

    from gateway.options import JobOptions

    try:
        message = gateway_pb2.GenerateOptions.FromString(data)
    except DecodeError:
        return  # grpc refuses it before the gateway sees it
    _expect_client_error(lambda: JobOptions.from_proto(message))


def detector_outputs(data: bytes) -> None:
    """Raw outputs of each detector layout, for an input size taken from the data: faces must be finite."""
    from services.detector.decoders import DECODERS, STRIDES, retinaface_priors

    if len(data) < 3:
        return
    layout = sorted(DECODERS)[data[0] % len(DECODERS)]
    height, width = 32 * (1 + data[1] % 8), 32 * (1 + data[2] % 8)
    floats = np.frombuffer(data[3 : 3 + (len(data) - 3) // 4 * 4], np.float32) if len(data) > 6 else np.zeros(1, np.float32)
    if floats.size == 0:
        floats = np.zeros(1, np.float32)

    def filled(*shape):
        count = int(np.prod(shape))
        return np.resize(floats, count).reshape(shape).astype(np.float32)

    cells = [(height // s) * (width // s) for s in STRIDES]
    if layout == "scrfd":
        outputs = [filled(c * 2, k) for k in (1, 4, 10) for c in cells]
    elif layout == "yunet":
        outputs = [filled(1, c, k) for k in (1, 1, 4, 10) for c in cells]
    else:
        n = len(retinaface_priors(height, width))
        outputs = [filled(1, n, k) for k in (4, 2, 10)]
    found = DECODERS[layout](outputs, height, width)
    for name in ("boxes", "scores", "landmarks"):
        values = getattr(found, name)
        if not np.isfinite(values).all():
            raise Finding(f"{layout}: non-finite {name} from raw outputs {struct.pack('<2H', height, width).hex()}")
    if len(found.boxes) and not ((found.boxes[:, 2] >= found.boxes[:, 0]) & (found.boxes[:, 3] >= found.boxes[:, 1])).all():
        raise Finding(f"{layout}: a box with negative width or height")


TARGETS: dict[str, Callable[[bytes], None]] = {"face_media": face_media, "speech": speech, "options": options,
                                               "detector_outputs": detector_outputs}
