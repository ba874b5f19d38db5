"""What the SDK's callers see: options as typed keyword arguments, enums, progress, results and the one error."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypedDict, Union

import grpc

Media = Union[bytes, str, os.PathLike, BinaryIO]
"""Face media or speech: the bytes, a path, or an open binary file."""


class CropMode(str, enum.Enum):
    ALIGNED = "aligned"  # 5-point FFHQ alignment, mouth window, feathered paste-back (the default)
    BOX = "box"  # Rudrabha/Wav2Lip: padded detector box, hard paste


class NoFacePolicy(str, enum.Enum):
    FAIL = "fail"  # FAILED_PRECONDITION naming the first frame without a face (the default)
    KEEP_FRAME = "keep_frame"  # leave such frames untouched


class LoopMode(str, enum.Enum):
    PING_PONG = "ping_pong"  # a face video shorter than the speech plays forward then backward (the default)
    LOOP = "loop"  # ... restarts from its first frame


class TargetRule(str, enum.Enum):
    LARGEST = "largest"  # the person whose face is largest on average (the default)
    CENTER = "center"  # the person nearest the centre of the frame


class EnhanceRegion(str, enum.Enum):
    FACE = "face"
    MOUTH = "mouth"


class Options(TypedDict, total=False):
    """Generation options, passed as keyword arguments; every one is optional and the server has a default.

    crop_mode: CropMode or its value ("aligned", "box").
    enhance: restore the synthesised face with GFPGAN (slow on CPU).
    enhance_region: EnhanceRegion ("face", "mouth").
    padding: (top, bottom, left, right) pixels added to the detected box (box mode).
    mouth_padding: (top, bottom, left, right) pixels moving the mouth window (aligned mode).
    reference_face: a photo of the person to animate when several are in the clip (Media).
    similarity_threshold: cosine similarity a person needs to match the reference photo (default 0.4).
    target_rule: TargetRule without a reference photo ("largest", "center").
    no_face_policy: NoFacePolicy ("fail", "keep_frame").
    loop_mode: LoopMode for a face video shorter than the speech ("ping_pong", "loop").
    smoothing_window: frames over which face boxes are smoothed.
    detect_every: detect faces on every k-th frame and interpolate between.
    max_detection_size: longest side of the frames the detector sees.
    still_fps: frame rate of a video made from a still photo.
    crf: libx264 quality (lower is better, larger files).
    preset: libx264 preset ("veryfast", "medium", ...).
    """

    crop_mode: CropMode | str
    enhance: bool
    enhance_region: EnhanceRegion | str
    padding: tuple[int, int, int, int]
    mouth_padding: tuple[int, int, int, int]
    reference_face: Media
    similarity_threshold: float
    target_rule: TargetRule | str
    no_face_policy: NoFacePolicy | str
    loop_mode: LoopMode | str
    smoothing_window: int
    detect_every: int
    max_detection_size: int
    still_fps: float
    crf: int
    preset: str


class SuperWav2LipError(Exception):
    """Any failure of a call: the gRPC `code`, the server's `message` and the `request_id` to quote in a report."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str = "") -> None:
        super().__init__(f"{code.name}: {message}" + (f" (request id {request_id})" if request_id else ""))
        self.code, self.message, self.request_id = code, message, request_id


@dataclass(frozen=True)
class Progress:
    """One step of a running job: `done` of `total` units of `stage`; `message` carries warnings."""

    stage: str
    done: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    frames: int
    audio_seconds: float
    size_bytes: int


@dataclass(frozen=True)
class Result:
    """A finished generation: the mp4 bytes, what they hold, and the request id."""

    mp4: bytes
    info: VideoInfo
    request_id: str

    def save(self, path: str | os.PathLike) -> Path:
        target = Path(path)
        target.write_bytes(self.mp4)
        return target


Event = Union[Progress, Result]
"""What `generate_events` yields: progress in order, then one Result."""


# ---- live sessions


class FrameFormat(str, enum.Enum):
    JPEG = "jpeg"  # one JPEG per frame (the default)
    I420 = "i420"  # raw planar YUV 4:2:0, width x height x 3/2 bytes
    H264 = "h264"  # H.264 Annex B access units: no B-frames, zero-latency tune, a key frame first


class LiveEventKind(str, enum.Enum):
    SPEAKING_STARTED = "speaking_started"  # the first frame of an utterance is the next one
    PLAYBACK_FINISHED = "playback_finished"  # the last frame of an utterance was sent
    CLEARED = "cleared"  # a clear took effect: frames from `frame_index` on are idle
    FRAMES_DROPPED = "frames_dropped"  # `count` frames were not ready in time (their audio still came)
    AUDIO_UNDERRUN = "audio_underrun"  # speech ran out before its end of utterance: the utterance ended early
    CLOSED = "closed"  # the session ends; `reason` says why
    UNKNOWN = "unknown"  # a kind newer than this SDK


@dataclass(frozen=True)
class LiveReady:
    """The session's terms: `fps` may be lower than asked (`reduced_because` says why); speech is shown
    `lookahead_s` after it arrives."""

    session_id: str
    fps: float
    width: int
    height: int
    lookahead_s: float
    format: FrameFormat
    reduced_because: str = ""


@dataclass(frozen=True)
class LiveFrame:
    """One frame of the session's timeline (presentation time `index / fps`). `data` is empty when the frame was
    dropped; `pcm` is the PCM16 audio that plays with it (with return_audio); `speech_chunk` is the newest speech
    chunk (counted from 1) its mouth used, 0 for idle frames; `received_at` is time.monotonic() on arrival."""

    index: int
    pts_s: float
    data: bytes
    speaking: bool
    pcm: bytes
    speech_chunk: int
    received_at: float

    @property
    def dropped(self) -> bool:
        return not self.data


@dataclass(frozen=True)
class LiveEvent:
    kind: LiveEventKind
    frame_index: int
    count: int = 0
    reason: str = ""
    received_at: float = 0.0


LiveItem = Union[LiveFrame, LiveEvent]
"""What iterating over a live session yields, in the order the server sent them."""
