"""Job options: the public GenerateOptions message resolved to validated values with documented defaults."""

from __future__ import annotations

from dataclasses import dataclass

from superwav2lip.gateway.v1 import gateway_pb2

from service_runtime.errors import InvalidArgument

X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


@dataclass(frozen=True)
class JobOptions:
    pads: tuple[int, int, int, int] = (0, 10, 0, 0)  # top, bottom, left, right, as Wav2Lip's --pads
    smoothing_window: int = 5
    max_detection_size: int = 640
    still_fps: float = 25.0
    crf: int = 20
    preset: str = "veryfast"
    enhance: bool = False
    keep_frames_without_face: bool = False
    ping_pong: bool = True

    @classmethod
    def from_proto(cls, message: gateway_pb2.GenerateOptions) -> "JobOptions":
        defaults = cls()
        pads = defaults.pads
        if message.HasField("padding"):
            p = message.padding
            pads = (p.top, p.bottom, p.left, p.right)
        options = cls(
            pads=pads,
            smoothing_window=message.smoothing_window if message.HasField("smoothing_window") else defaults.smoothing_window,
            max_detection_size=message.max_detection_size if message.HasField("max_detection_size") else defaults.max_detection_size,
            still_fps=message.still_fps if message.HasField("still_fps") else defaults.still_fps,
            crf=message.crf if message.HasField("crf") else defaults.crf,
            preset=message.preset if message.HasField("preset") else defaults.preset,
            enhance=message.enhance,
            keep_frames_without_face=message.no_face_policy == gateway_pb2.NO_FACE_POLICY_KEEP_FRAME,
            ping_pong=message.loop_mode != gateway_pb2.LOOP_MODE_LOOP,
        )
        options.validate()
        return options

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
        if self.preset not in X264_PRESETS:
            raise InvalidArgument(f"preset {self.preset!r} is not an x264 preset ({', '.join(X264_PRESETS)})")
