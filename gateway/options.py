"""Job options: the public GenerateOptions message resolved to validated values with documented defaults."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from superwav2lip.gateway.v1 import gateway_pb2

from service_runtime.errors import InvalidArgument

from .limits import X264_PRESETS, MediaLimits

# How a job reports progress: stage, done, total, and a note for people (a warning) or "".
Progress = Callable[[str, int, int, str], Awaitable[None]]
# The options that shape planning (and so a cached plan or an avatar); the rest shape synthesis and encoding.
PLANNING_FIELDS = ("pads", "smoothing_window", "max_detection_size", "still_fps", "keep_frames_without_face",
                   "reference_face", "target_rule", "similarity_threshold", "detect_every")


@dataclass(frozen=True)
class JobOptions:
    pads: tuple[int, int, int, int] = (0, 10, 0, 0)  # top, bottom, left, right, as Wav2Lip's --pads
    smoothing_window: int = 5
    max_detection_size: int = 480  # bench/detection.py: the smallest size that agrees with 640 on the real clips
    still_fps: float = 25.0
    crf: int = 20
    preset: str = "veryfast"
    enhance: bool = False
    keep_frames_without_face: bool = False
    ping_pong: bool = True
    reference_face: bytes = b""
    target_rule: str = "largest"
    similarity_threshold: float = 0.4
    detect_every: int = 5  # bench/detection.py: the largest k that agrees with every-frame detection on the real clips
    crop_mode: str = "aligned"
    mouth_padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, bottom, left, right
    enhance_region: str = "face"

    @classmethod
    def from_proto(cls, message: gateway_pb2.GenerateOptions, limits: MediaLimits | None = None) -> "JobOptions":
        """The checked options; with `limits`, also within what this gateway's encoder may spend."""
        defaults = cls()

        def optional(name: str):
            # names below are the message's optional fields (mypy-protobuf types HasField with their literals)
            return getattr(message, name) if message.HasField(name) else getattr(defaults, name)  # type: ignore[arg-type]

        def padding(name: str, default):
            p = getattr(message, name)
            return (p.top, p.bottom, p.left, p.right) if message.HasField(name) else default  # type: ignore[arg-type]

        options = cls(
            pads=padding("padding", defaults.pads),
            smoothing_window=optional("smoothing_window"),
            max_detection_size=optional("max_detection_size"),
            still_fps=optional("still_fps"),
            crf=optional("crf"),
            preset=optional("preset"),
            enhance=message.enhance,
            keep_frames_without_face=message.no_face_policy == gateway_pb2.NO_FACE_POLICY_KEEP_FRAME,
            ping_pong=message.loop_mode != gateway_pb2.LOOP_MODE_LOOP,
            reference_face=message.reference_face,
            target_rule="center" if message.target_rule == gateway_pb2.TARGET_RULE_CENTER else "largest",
            similarity_threshold=optional("similarity_threshold"),
            detect_every=optional("detect_every"),
            crop_mode="box" if message.crop_mode == gateway_pb2.CROP_MODE_BOX else "aligned",
            mouth_padding=padding("mouth_padding", defaults.mouth_padding),
            enhance_region="mouth" if message.enhance_region == gateway_pb2.ENHANCE_REGION_MOUTH else "face",
        )
        options.validate()
        if limits is not None:
            limits.check_encoding(options.crf, options.preset)
        return options

    def with_planning_of(self, other: "JobOptions") -> "JobOptions":
        """These options, with `other`'s planning options (an avatar's)."""
        return dataclasses.replace(self, **{name: getattr(other, name) for name in PLANNING_FIELDS})

    def validate(self) -> None:
        if min(self.pads) < 0 or max(self.pads) > 1000:
            raise InvalidArgument(f"padding {self.pads} must be between 0 and 1000 pixels")
        if not 0 <= self.smoothing_window <= 100:
            raise InvalidArgument(f"smoothing_window {self.smoothing_window} must be between 0 (off) and 100 frames")
        if not 64 <= self.max_detection_size <= 4096:
            raise InvalidArgument(f"max_detection_size {self.max_detection_size} must be between 64 and 4096")
        if not 0 < self.still_fps <= 120:
            raise InvalidArgument(f"still_fps {self.still_fps} must be above 0 and at most 120")
        if not 0 <= self.crf <= 51:
            raise InvalidArgument(f"crf {self.crf} must be between 0 and 51")
        if not -1 <= self.similarity_threshold <= 1:
            raise InvalidArgument(f"similarity_threshold {self.similarity_threshold} must be a cosine in [-1, 1]")
        if not 1 <= self.detect_every <= 100:
            raise InvalidArgument(f"detect_every {self.detect_every} must be between 1 and 100 frames")
        if max(abs(v) for v in self.mouth_padding) > 60:
            raise InvalidArgument(f"mouth_padding {self.mouth_padding} must move each edge by at most 60 pixels")
        if self.preset not in X264_PRESETS:
            raise InvalidArgument(f"preset {self.preset!r} is not an x264 preset ({', '.join(X264_PRESETS)})")
