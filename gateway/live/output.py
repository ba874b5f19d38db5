"""A live frame's pixels at the asked size, and its bytes in the asked format (JPEG, raw I420 or H.264)."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import av
import cv2
import numpy as np
from superwav2lip.live.v1 import live_pb2

from service_runtime.errors import InvalidArgument

from ..faces import FacePlan

DEFAULT_JPEG_QUALITY = 85
DEFAULT_H264_CRF = 23
H264_KEYFRAME_SECONDS = 2  # a client joining a recording, or losing a packet, waits at most this for a picture


class Framing:
    """Crops each avatar frame to the output's aspect around the face (the mean of the plan's face boxes), then
    scales it: the same rectangle for every frame, so the picture never moves."""

    def __init__(self, plan: FacePlan, width: int, height: int) -> None:
        src_w, src_h = plan.size
        self.size = (width or src_w, height or src_h)
        out_w, out_h = self.size
        if out_w % 2 or out_h % 2 or not (16 <= out_w <= src_w * 2 and 16 <= out_h <= src_h * 2):
            raise InvalidArgument(f"open.width x open.height {out_w}x{out_h}: both must be even, at least 16 and at "
                                  f"most twice the avatar's {src_w}x{src_h}")
        scale = max(out_w / src_w, out_h / src_h)
        crop_w, crop_h = min(src_w, round(out_w / scale)), min(src_h, round(out_h / scale))
        boxes = [t.box for t in plan.targets if t is not None]
        cx = float(np.mean([(b[0] + b[2]) / 2 for b in boxes])) if boxes else src_w / 2
        cy = float(np.mean([(b[1] + b[3]) / 2 for b in boxes])) if boxes else src_h / 2
        x0 = int(np.clip(round(cx - crop_w / 2), 0, src_w - crop_w))
        y0 = int(np.clip(round(cy - crop_h / 2), 0, src_h - crop_h))
        self.crop = (x0, y0, x0 + crop_w, y0 + crop_h)
        self.identity = self.crop == (0, 0, src_w, src_h) and self.size == (src_w, src_h)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if self.identity:
            return frame
        x0, y0, x1, y1 = self.crop
        return cv2.resize(frame[y0:y1, x0:x1], self.size, interpolation=cv2.INTER_AREA)


class FrameEncoder:
    """Turns BGR frames into the session's format. H.264 is one stream: frames must be encoded in order."""

    def __init__(self, kind: int, size: tuple[int, int], fps: Fraction, quality: int) -> None:
        self.kind = kind or live_pb2.FRAME_FORMAT_JPEG
        self.size = size
        if self.kind == live_pb2.FRAME_FORMAT_JPEG:
            if quality > 100:
                raise InvalidArgument(f"open.quality {quality}: JPEG quality is 1 to 100")
            self._params = [cv2.IMWRITE_JPEG_QUALITY, quality or DEFAULT_JPEG_QUALITY]
        elif self.kind == live_pb2.FRAME_FORMAT_H264:
            if quality > 51:
                raise InvalidArgument(f"open.quality {quality}: H.264 crf is 0 to 51")
            self._codec: Any = _h264(size, fps, quality or DEFAULT_H264_CRF)
        elif self.kind != live_pb2.FRAME_FORMAT_I420:
            raise InvalidArgument(f"open.format {kind} is not a FrameFormat")
        self._index = 0

    def encode(self, frame: np.ndarray) -> bytes:
        if self.kind == live_pb2.FRAME_FORMAT_JPEG:
            ok, data = cv2.imencode(".jpg", frame, self._params)
            if not ok:
                raise RuntimeError("JPEG encoding failed")
            return data.tobytes()
        if self.kind == live_pb2.FRAME_FORMAT_I420:
            return cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420).tobytes()
        picture = av.VideoFrame.from_ndarray(frame, format="bgr24").reformat(format="yuv420p")
        picture.pts = self._index
        self._index += 1
        return b"".join(bytes(packet) for packet in self._codec.encode(picture))

    def close(self) -> None:
        """Drops the encoder (frames still inside it are never shown: the session has ended)."""
        self._codec = None


def _h264(size: tuple[int, int], fps: Fraction, crf: int):
    """libx264 for live use: no B-frames and no lookahead (zerolatency), one access unit out per frame in."""
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height = size
    codec.pix_fmt = "yuv420p"
    codec.time_base = 1 / fps
    codec.framerate = fps
    codec.gop_size = max(1, round(float(fps) * H264_KEYFRAME_SECONDS))
    codec.max_b_frames = 0
    codec.options = {"preset": "veryfast", "tune": "zerolatency", "crf": str(crf),
                     "x264-params": "repeat-headers=1:bframes=0"}
    codec.open()
    return codec
