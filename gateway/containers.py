"""Client bytes opened safely: FFmpeg on allow-listed demuxers and decoders with no protocols, pictures sized first.

Client bytes are hostile. FFmpeg's playlist and reference demuxers (concat, HLS, DASH, image sequences,
`subfile:`) open names found inside the data, which would let an upload read files off this machine or
make it fetch URLs. So every `av.open` on client bytes names the demuxers it accepts, and allows no
protocol at all: the in-memory buffer is the only input. Each of FFmpeg's hundreds of decoders is attack
surface, so only those the service needs may run: while FFmpeg probes the streams (its codec_whitelist) and
before any frame is decoded (a stream in any other codec is refused by name). Pictures are sized from their header by Pillow
before anything is decoded, so a small file cannot expand into gigabytes of pixels."""

from __future__ import annotations

import io

import av
import cv2
import numpy as np
from PIL import Image

from service_runtime.errors import InvalidArgument

# FFmpeg demuxer names: "mov" is mp4/mov/m4a/3gp, "matroska" is mkv/webm.
VIDEO_DEMUXERS = ("mov", "matroska", "avi", "flv", "mpegts")
AUDIO_DEMUXERS = ("wav", "mp3", "aac", "flac", "ogg", *VIDEO_DEMUXERS)
VIDEO_FORMATS = "mp4, mov, mkv, webm, avi, flv or MPEG-TS"
AUDIO_FORMATS = "wav, mp3, aac, m4a, flac, ogg or opus (or a video file with a sound track)"
PICTURE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
# FFmpeg decoder names (several per format where FFmpeg has alternatives: the native one and a library's).
VIDEO_DECODERS = ("h264", "hevc", "vp8", "libvpx", "vp9", "libvpx-vp9", "av1", "libdav1d", "libaom-av1", "mpeg4",
                  "mjpeg", "png")
AUDIO_DECODERS = ("aac", "aac_fixed", "mp3", "mp3float", "opus", "libopus", "vorbis", "libvorbis", "flac",
                  *sorted(name for name in av.codecs_available if name.startswith("pcm_")))
VIDEO_CODECS = "H.264, HEVC, VP8, VP9, AV1 or MPEG-4 video (or MJPEG, PNG)"
AUDIO_CODECS = "WAV (PCM), MP3, AAC, FLAC, Vorbis or Opus"
# The gateway's own pixel limits (checked on the header size) replace Pillow's process-wide bomb check, which
# would otherwise refuse a large picture without saying its size.
Image.MAX_IMAGE_PIXELS = None
# No protocol may be opened from inside the data: this name matches none, so every nested open is refused.
NO_PROTOCOLS = "none"


def open_media(data: bytes, what: str, demuxers: tuple[str, ...], formats: str) -> av.container.InputContainer:
    """Opens client bytes with FFmpeg, refusing any demuxer not listed and any nested input."""
    try:
        return av.open(io.BytesIO(data), mode="r", container_options={
            "format_whitelist": ",".join(demuxers), "protocol_whitelist": NO_PROTOCOLS,
            "codec_whitelist": ",".join((*VIDEO_DECODERS, *AUDIO_DECODERS))})
    except (av.FFmpegError, ValueError, IndexError, OSError) as error:
        raise InvalidArgument(f"{what}: not a {formats} file FFmpeg can read ({error.__class__.__name__}); "
                              "playlists and references to other files are refused") from None


def check_decoder(stream, what: str) -> None:
    """Refuses a stream whose decoder is not on the allow-list for its kind, naming its codec."""
    allowed, codecs = (VIDEO_DECODERS, VIDEO_CODECS) if stream.type == "video" else (AUDIO_DECODERS, AUDIO_CODECS)
    context = stream.codec_context
    if context is None:  # FFmpeg has no decoder for the stream's codec at all
        raise InvalidArgument(f"{what}: the {stream.type} codec cannot be decoded; send {codecs}")
    if context.codec.name not in allowed:
        raise InvalidArgument(f"{what}: the {context.codec.name!r} {stream.type} codec is not accepted here; "
                              f"send {codecs}")


def open_video(data: bytes) -> av.container.InputContainer:
    return open_media(data, "face", VIDEO_DEMUXERS, VIDEO_FORMATS)


def open_audio(data: bytes) -> av.container.InputContainer:
    return open_media(data, "audio", AUDIO_DEMUXERS, AUDIO_FORMATS)


def picture_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header when the bytes are a PNG, JPEG, WebP or BMP picture, else None."""
    try:
        with Image.open(io.BytesIO(data), formats=PICTURE_FORMATS) as picture:
            return picture.size
    except (OSError, ValueError, SyntaxError):
        return None


def decode_picture(data: bytes, what: str) -> np.ndarray:
    """BGR pixels of a picture already sized by `picture_size` (EXIF orientation applied)."""
    picture = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if picture is None:
        raise InvalidArgument(f"{what}: the picture is damaged and cannot be decoded")
    return picture
