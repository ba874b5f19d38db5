"""Limits on client media, built once from the gateway settings; each refusal names its setting and the value."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from service_runtime.errors import InvalidArgument, ResourceExhausted
from service_runtime.settings import SettingsError

MIN_FRAME_SIDE = 32  # below this no detector finds a face worth animating
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


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
    max_audio_rate: int = 192000
    max_frame_pixels: int = 4096 * 2160
    max_fps: float = 120.0
    max_output_frames: int = 36000
    max_reference_bytes: int = 10 << 20
    max_reference_pixels: int = 4096 * 4096
    max_output_pixel_frames: int = 1920 * 1080 * 15000
    max_output_bytes: int = 512 << 20
    min_crf: int = 18
    slowest_preset: str = "medium"
    max_avatar_deadline_s: float = 1800.0

    @classmethod
    def from_settings(cls, settings) -> "MediaLimits":
        if settings.slowest_preset not in X264_PRESETS:
            raise SettingsError(f"{setting_name('slowest_preset')}={settings.slowest_preset!r} is not an x264 preset "
                                f"({', '.join(X264_PRESETS)})")
        return cls(max_upload_bytes=settings.max_upload_mb << 20, max_audio_seconds=settings.max_audio_seconds,
                   max_audio_rate=settings.max_audio_sample_rate,
                   max_frame_pixels=settings.max_frame_pixels, max_fps=settings.max_fps,
                   max_output_frames=settings.max_output_frames,
                   max_reference_bytes=settings.max_reference_face_kb << 10,
                   max_reference_pixels=settings.max_reference_face_pixels,
                   max_output_pixel_frames=settings.max_output_pixel_frames,
                   max_output_bytes=settings.max_output_mb << 20, min_crf=settings.min_crf,
                   slowest_preset=settings.slowest_preset, max_avatar_deadline_s=settings.max_avatar_deadline_s)

    def check_encoding(self, crf: int, preset: str) -> None:
        """The client's crf and preset, within what this gateway's encoder may spend (before any media is read)."""
        if crf < self.min_crf:
            raise InvalidArgument(f"crf {crf} is below this gateway's lowest of {self.min_crf} "
                                  f"({setting_name('min_crf')}); lower crf makes larger, slower output")
        if preset in X264_PRESETS and X264_PRESETS.index(preset) > X264_PRESETS.index(self.slowest_preset):
            raise InvalidArgument(f"preset {preset!r} is slower than this gateway's slowest, "
                                  f"{self.slowest_preset!r} ({setting_name('slowest_preset')}); choose a faster one")

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

    def check_audio_rate(self, rate: int) -> None:
        if rate > self.max_audio_rate:
            raise InvalidArgument(f"audio: the speech declares {rate} samples per second, more than this gateway's "
                                  f"limit of {self.max_audio_rate} ({setting_name('max_audio_sample_rate')}); "
                                  "send it at 48 kHz or less")

    def check_output_frames(self, frames: int, fps: Fraction, size: tuple[int, int] | None = None) -> None:
        """The output's frames, and with its `size` (width, height) its pixels x frames: the encoder's work."""
        if frames > self.max_output_frames:
            raise InvalidArgument(f"the output would have {frames} frames at {float(fps):g} fps, more than this "
                                  f"gateway's limit of {self.max_output_frames} "
                                  f"({setting_name('max_output_frames')}); send shorter speech or a lower frame rate")
        if size is not None and size[0] * size[1] * frames > self.max_output_pixel_frames:
            raise InvalidArgument(f"the output would be {frames} frames of {size[0]}x{size[1]} = "
                                  f"{size[0] * size[1] * frames} pixels x frames, more than this gateway's limit of "
                                  f"{self.max_output_pixel_frames} ({setting_name('max_output_pixel_frames')}); "
                                  "send shorter speech, a lower frame rate or smaller face media")

    def check_output_bytes(self, size: int) -> None:
        """While encoding: the mp4 so far."""
        if size > self.max_output_bytes:
            raise ResourceExhausted(f"the output video passed {self.max_output_bytes >> 20} MiB while encoding, this "
                                    f"gateway's limit ({setting_name('max_output_mb')}); ask for a higher crf, "
                                    "shorter speech or smaller face media")

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
