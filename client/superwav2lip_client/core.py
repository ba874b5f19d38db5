"""What the sync and asyncio clients share: requests from options, media reading, retries, event decoding."""

from __future__ import annotations

import array
import enum
import os
import random
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from superwav2lip.gateway.v1 import gateway_pb2
from superwav2lip.live.v1 import live_pb2

from .types import (CropMode, EnhanceRegion, Event, FrameFormat, LiveEvent, LiveEventKind, LiveFrame, LiveReady,
                    LoopMode, Media, NoFacePolicy, Options, Progress, Result, SuperWav2LipError, TargetRule,
                    VideoInfo)

API_KEY_ENV = "SUPERWAV2LIP_API_KEY"
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", -1)]
ENUMS: dict[str, tuple[type[enum.Enum], str]] = {  # option -> (its Python enum, the proto enum's name prefix)
    "crop_mode": (CropMode, "CROP_MODE_"),
    "enhance_region": (EnhanceRegion, "ENHANCE_REGION_"),
    "target_rule": (TargetRule, "TARGET_RULE_"),
    "no_face_policy": (NoFacePolicy, "NO_FACE_POLICY_"),
    "loop_mode": (LoopMode, "LOOP_MODE_"),
}
PADDINGS = ("padding", "mouth_padding")
PLAIN = ("enhance", "similarity_threshold", "smoothing_window", "detect_every", "max_detection_size", "still_fps",
         "crf", "preset")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of calls refused as UNAVAILABLE or RESOURCE_EXHAUSTED (never other codes), with full-jitter
    exponential back-off: attempt n waits a random time up to min(max_backoff_s, initial_backoff_s * 2**n)."""

    max_attempts: int = 3
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff_s, self.initial_backoff_s * 2 ** attempt))

    def should_retry(self, error: SuperWav2LipError, attempt: int) -> bool:
        return error.code in RETRYABLE and attempt + 1 < self.max_attempts


NO_RETRY = RetryPolicy(max_attempts=1)


def read_media(source: Media | None, what: str) -> bytes:
    """Bytes from bytes, a path or an open binary file; a missing path is the caller's error, said plainly."""
    if source is None:
        return b""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as handle:
                return handle.read()
        except OSError as error:
            raise ValueError(f"cannot read the {what} file {os.fspath(source)!r}: {error.strerror}") from None
    if hasattr(source, "read"):
        return source.read()
    raise TypeError(f"{what} must be bytes, a path or a binary file, not {type(source).__name__}")


def _enum_value(option: str, value: Any) -> int:
    enum_class, prefix = ENUMS[option]
    try:
        member: enum.Enum = value if isinstance(value, enum_class) else enum_class(str(value).lower())
    except ValueError:
        allowed = ", ".join(str(m.value) for m in enum_class)
        raise ValueError(f"{option}={value!r} is not one of: {allowed}") from None
    return gateway_pb2.DESCRIPTOR.enum_types_by_name[enum_class.__name__].values_by_name[
        prefix + member.name].number


def options_proto(options: Options, *, avatar: str | None = None, request_id: str = "") -> gateway_pb2.GenerateOptions:
    """The protobuf the gateway takes, from keyword options; an unknown option is a TypeError, as in Python."""
    unknown = set(options) - set(ENUMS) - set(PADDINGS) - set(PLAIN) - {"reference_face"}
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    message = gateway_pb2.GenerateOptions(request_id=request_id, avatar_id=avatar or "")
    for name, value in options.items():
        if name in ENUMS:
            setattr(message, name, _enum_value(name, value))
        elif name in PADDINGS:
            pads: Sequence[int] = value  # type: ignore[assignment]  # a padding option is four ints
            top, bottom, left, right = pads
            getattr(message, name).CopyFrom(gateway_pb2.Padding(top=top, bottom=bottom, left=left, right=right))
        elif name == "reference_face":
            message.reference_face = read_media(value, "reference photo")  # type: ignore[arg-type]
        else:
            setattr(message, name, value)
    return message


def new_request_id() -> str:
    return uuid.uuid4().hex


def call_metadata(api_key: str | None, request_id: str, extra: Sequence[tuple[str, str]]) -> tuple:
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
    return (("x-request-id", request_id), *((("x-api-key", key),) if key else ()), *extra)


def sdk_error(error: grpc.RpcError, request_id: str) -> SuperWav2LipError:
    return SuperWav2LipError(error.code(), error.details() or "", request_id)


class EventDecoder:
    """Turns the gateway's events into Progress items and, at the end, one Result."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._info: gateway_pb2.ResultInfo | None = None
        self._parts: list[bytes] = []

    def feed(self, event: gateway_pb2.GenerateEvent) -> Iterator[Event]:
        kind = event.WhichOneof("event")
        if kind == "progress":
            p = event.progress
            yield Progress(p.stage, p.done, p.total, p.message)
        elif kind == "result":
            self._info = event.result
        elif kind == "video_chunk":
            self._parts.append(event.video_chunk)
        elif kind == "error":  # a failure after the stream started travels in-band
            code = next((c for c in grpc.StatusCode if c.name == event.error.status), grpc.StatusCode.UNKNOWN)
            raise SuperWav2LipError(code, event.error.message, self.request_id)

    def result(self) -> Result:
        if self._info is None:
            raise SuperWav2LipError(grpc.StatusCode.UNAVAILABLE, "the gateway closed the stream without a result; "
                                    "retry", self.request_id)
        i = self._info
        return Result(b"".join(self._parts), VideoInfo(i.width, i.height, i.fps, i.frames, i.audio_seconds,
                                                       i.size_bytes), self.request_id)


def generate_request(face: Media | None, audio: Media, avatar: str | None, options: Options,
                     request_id: str) -> gateway_pb2.GenerateVideoRequest:
    if face is None and not avatar:
        raise ValueError("give face media, or avatar=<id> of an avatar made with create_avatar")
    return gateway_pb2.GenerateVideoRequest(options=options_proto(options, avatar=avatar, request_id=request_id),
                                            face=read_media(face, "face"), audio=read_media(audio, "speech"))


# ---- live sessions

MAX_CHUNK_S = 0.2  # the gateway refuses longer speech chunks; longer speech is sent as several
CONTROLS = {"end_utterance": live_pb2.CONTROL_END_OF_UTTERANCE, "clear": live_pb2.CONTROL_CLEAR,
            "close": live_pb2.CONTROL_CLOSE}
NATIVE_INT16 = {"h", "@h", "=h", "<h" if sys.byteorder == "little" else ">h"}


def live_open_request(avatar_id: str, *, width: int, height: int, format: FrameFormat | str, fps: float,
                      sample_rate: int, return_audio: bool, quality: int) -> live_pb2.LiveRequest:
    try:
        kind = format if isinstance(format, FrameFormat) else FrameFormat(str(format).lower())
    except ValueError:
        raise ValueError(f"format={format!r} is not one of: {', '.join(f.value for f in FrameFormat)}") from None
    wire_format = live_pb2.FrameFormat.Value(f"FRAME_FORMAT_{kind.name}")
    return live_pb2.LiveRequest(open=live_pb2.LiveOpen(
        avatar_id=avatar_id, width=width, height=height, format=wire_format, fps=fps, sample_rate=sample_rate,
        return_audio=return_audio, quality=quality))


def pcm_bytes(pcm: Any) -> bytes:
    """PCM16 little-endian mono bytes from bytes or a one-channel int16 array (anything with the buffer protocol)."""
    if isinstance(pcm, (bytes, bytearray)):
        data = bytes(pcm)
    else:
        try:
            view = memoryview(pcm)
        except TypeError:
            raise TypeError(f"speech must be PCM16 bytes or an int16 array, not {type(pcm).__name__}") from None
        if view.format not in NATIVE_INT16 | {"B", "b", "c"}:
            raise TypeError(f"speech samples must be int16 (PCM16), not buffer format {view.format!r}")
        shape = tuple(view.shape or ())
        if len(shape) > 1 and sorted(shape)[-2] != 1:
            raise ValueError(f"speech must be mono: an array of shape {shape} has several channels")
        data = view.tobytes()
        if view.format in NATIVE_INT16 and sys.byteorder != "little":  # the wire is little-endian
            swapped = array.array("h", data)
            swapped.byteswap()
            data = swapped.tobytes()
    if len(data) % 2:
        raise ValueError(f"speech has {len(data)} bytes: PCM16 needs an even number")
    return data


def speech_requests(pcm: Any, sample_rate: int) -> list[live_pb2.LiveRequest]:
    """The speech as chunks of at most 200 ms (the gateway's limit per chunk)."""
    data = pcm_bytes(pcm)
    step = 2 * int(sample_rate * MAX_CHUNK_S)
    return [live_pb2.LiveRequest(speech=live_pb2.SpeechChunk(pcm=data[i : i + step]))
            for i in range(0, len(data), step)]


def control_request(name: str) -> live_pb2.LiveRequest:
    return live_pb2.LiveRequest(control=CONTROLS[name])


def live_ready(ready: live_pb2.LiveReady) -> LiveReady:
    name = live_pb2.FrameFormat.Name(ready.format).removeprefix("FRAME_FORMAT_")
    return LiveReady(ready.session_id, ready.fps, ready.width, ready.height, ready.lookahead_s,
                     FrameFormat[name] if name in FrameFormat.__members__ else FrameFormat.JPEG, ready.reduced_because)


def live_item(response: live_pb2.LiveResponse, received_at: float) -> LiveFrame | LiveEvent | LiveReady | None:
    """The typed form of one server message (None for a kind this SDK does not know)."""
    kind = response.WhichOneof("kind")
    if kind == "frame":
        f = response.frame
        return LiveFrame(f.index, f.pts_s, f.data, f.speaking, f.pcm, f.speech_chunk, received_at)
    if kind == "event":
        e = response.event
        known = e.kind in live_pb2.LiveEvent.Kind.values()
        name = live_pb2.LiveEvent.Kind.Name(e.kind).removeprefix("KIND_") if known else ""
        event_kind = LiveEventKind[name] if name in LiveEventKind.__members__ else LiveEventKind.UNKNOWN
        return LiveEvent(event_kind, e.frame_index, e.count, e.reason, received_at)
    if kind == "ready":
        return live_ready(response.ready)
    return None


def not_ready(first: object, request_id: str) -> SuperWav2LipError:
    return SuperWav2LipError(grpc.StatusCode.UNKNOWN, f"the gateway answered the live session's open with "
                             f"{type(first).__name__}, not ready", request_id)
