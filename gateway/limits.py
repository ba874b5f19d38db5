"""Limits on client media, built once from the gateway settings; each refusal names its setting and the value."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from service_runtime.errors import InvalidArgument

MIN_FRAME_SIDE = 32  # below this no detector finds a face worth animating


def setting_name(field: str) -> str:
    """The environment variable of a gateway setting (kept beside the messages that cite it)."""
    return f"SWL_GATEWAY_{field.upper()}"


def http_body_limit_bytes(max_upload_mb: int) -> int:
    """The largest HTTP body the Envoy edge accepts, and so the largest gRPC message the gateway must take: the
    upload limit in base64 JSON (4/3 larger) plus 1 MiB for the options around it."""
    return (max_upload_mb << 20) * 4 // 3 + (1 << 20)


@dataclass(frozen=True)
class MediaLimits:
    max_upload_bytes: int = 512 << 20
    max_audio_seconds: float = 600.0
    max_frame_pixels: int = 4096 * 2160
    max_fps: float = 120.0
    max_output_frames: int = 36000
    max_reference_bytes: int = 10 << 20
    max_reference_pixels: int = 4096 * 4096

    @classmethod
    def from_settings(cls, settings) -> "MediaLimits":
        return cls(max_upload_bytes=settings.max_upload_mb << 20, max_audio_seconds=settings.max_audio_seconds,
                   max_frame_pixels=settings.max_frame_pixels, max_fps=settings.max_fps,
                   max_output_frames=settings.max_output_frames,
                   max_reference_bytes=settings.max_reference_face_kb << 10,
                   max_reference_pixels=settings.max_reference_face_pixels)

    def check_upload(self, size: int) -> None:
        if size > self.max_upload_bytes:
            raise InvalidArgument(f"the upload ({size >> 20} MiB so far) exceeds this gateway's limit of "
                                  f"{self.max_upload_bytes >> 20} MiB ({setting_name('max_upload_mb')}); "
                                  "send shorter or more compressed media")

    def check_frame(self, what: str, width: int, height: int) -> None:
        if min(width, height) < MIN_FRAME_SIDE:
            raise InvalidArgument(f"{what}: frames of {width}x{height} pixels are too small; send at least "
                                  f"{MIN_FRAME_SIDE}x{MIN_FRAME_SIDE}")
        if width * height > self.max_frame_pixels:
            raise InvalidArgument(f"{what}: {width}x{height} = {width * height} pixels per frame is more than this "
                                  f"gateway's limit of {self.max_frame_pixels} ({setting_name('max_frame_pixels')}); "
                                  "scale it down")

    def check_fps(self, fps: Fraction) -> None:
        if not 0 < fps <= self.max_fps:
            raise InvalidArgument(f"face: the video declares {float(fps):g} frames per second; this gateway accepts "
                                  f"at most {self.max_fps:g} ({setting_name('max_fps')})")

    def check_audio_seconds(self, seconds: float, claimed: bool = False) -> None:
        if seconds > self.max_audio_seconds:
            verb = "claims" if claimed else "has more than"
            raise InvalidArgument(f"audio: the speech {verb} {seconds:.1f} s, longer than this gateway's limit of "
                                  f"{self.max_audio_seconds:g} s ({setting_name('max_audio_seconds')}); "
                                  "split it into shorter parts")

    def check_output_frames(self, frames: int, fps: Fraction) -> None:
        if frames > self.max_output_frames:
            raise InvalidArgument(f"the output would have {frames} frames at {float(fps):g} fps, more than this "
                                  f"gateway's limit of {self.max_output_frames} "
                                  f"({setting_name('max_output_frames')}); send shorter speech or a lower frame rate")

    def check_reference(self, size: int) -> None:
        if size > self.max_reference_bytes:
            raise InvalidArgument(f"reference_face: {size >> 10} KiB is larger than this gateway's limit of "
                                  f"{self.max_reference_bytes >> 10} KiB ({setting_name('max_reference_face_kb')}); "
                                  "send a smaller photo")

    def check_reference_pixels(self, width: int, height: int) -> None:
        if width * height > self.max_reference_pixels:
            raise InvalidArgument(f"reference_face: {width}x{height} = {width * height} pixels is more than this "
                                  f"gateway's limit of {self.max_reference_pixels} "
                                  f"({setting_name('max_reference_face_pixels')}); scale it down")
