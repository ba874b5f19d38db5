"""Writes the seed corpus (small valid and near-valid inputs per target); the output is checked in.

    python -m fuzz.seeds"""

from __future__ import annotations

import hashlib
import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _video(fmt: str, codec: str, frames: int = 3, size=(48, 32), pix_fmt="yuv420p") -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=Fraction(10))
        stream.width, stream.height, stream.pix_fmt = *size, pix_fmt
        for i in range(frames):
            picture = np.full((size[1], size[0], 3), 40 * i, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="bgr24")))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def _audio(fmt: str, codec: str, rate: int = 16000, layout: str = "mono", seconds: float = 0.1) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        channels = 2 if layout == "stereo" else 1
        samples = (np.sin(np.arange(int(rate * seconds)) / 7) * 9000).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.tile(samples, (1, channels)).reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        out.mux(stream.encode(None))
    return buffer.getvalue()


def _picture(ext: str) -> bytes:
    import cv2

    ok, data = cv2.imencode(ext, np.full((24, 32, 3), 128, np.uint8))
    assert ok
    return data.tobytes()


def seeds() -> dict[str, list[bytes]]:
    from superwav2lip.gateway.v1 import gateway_pb2

    faces = [_video("mp4", "libx264"), _video("matroska", "libx264"), _video("avi", "mpeg4"),
             _picture(".png"), _picture(".jpg"), _picture(".bmp"),
             b"ffconcat version 1.0\nfile '/etc/passwd'\n", b"#EXTM3U\n#EXT-X-ENDLIST\n"]
    speech = [_audio("wav", "pcm_s16le"), _audio("wav", "pcm_s16le", 44100, "stereo"), _audio("flac", "flac"),
              _audio("mp4", "aac", 22050), _audio("ogg", "libopus", 48000), b"RIFF\x24\x00\x00\x00WAVEfmt "]
    options = [gateway_pb2.GenerateOptions().SerializeToString(),
               gateway_pb2.GenerateOptions(enhance=True, crf=18, preset="fast", detect_every=3,
                                           max_detection_size=320).SerializeToString(),
               gateway_pb2.GenerateOptions(padding=gateway_pb2.Padding(bottom=10), still_fps=30, smoothing_window=3,
                                           similarity_threshold=0.4).SerializeToString()]
    rng = np.random.default_rng(0)
    detector = [bytes([k, 3, 5]) + rng.standard_normal(64).astype(np.float32).tobytes() for k in range(3)]
    detector.append(bytes([0, 0, 0]) + np.array([np.inf, -np.inf, np.nan, 1e30], np.float32).tobytes())
    return {"face_media": faces, "speech": speech, "options": options, "detector_outputs": detector}


def main() -> None:
    for target, inputs in seeds().items():
        folder = ROOT / "fuzz" / "corpus" / target
        folder.mkdir(parents=True, exist_ok=True)
        for data in inputs:
            (folder / hashlib.sha1(data).hexdigest()).write_bytes(data)
        print(f"{target}: {len(inputs)} seeds in {folder.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
