"""gRPC servicer of the detector: converts messages, calls the batching queues, converts back."""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image
from superwav2lip.common.v1 import media_pb2
from superwav2lip.detector.v1 import detector_pb2, detector_pb2_grpc

from service_runtime.batching import BatchingQueue
from service_runtime.errors import InvalidArgument, Unavailable
from service_runtime.images import decode_image
from service_runtime.rpc import item_status

from .decoders import Detections
from .model import FaceDetector, FaceEmbedder


def faces_message(found: Detections) -> detector_pb2.FrameFaces:
    faces = [
        detector_pb2.Face(
            x1=float(box[0]), y1=float(box[1]), x2=float(box[2]), y2=float(box[3]), score=float(score),
            landmarks=[detector_pb2.Point(x=float(x), y=float(y)) for x, y in points],
        )
        for box, score, points in zip(found.boxes, found.scores, found.landmarks)
    ]
    return detector_pb2.FrameFaces(faces=faces)


HEADER_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")  # sized by Pillow from the header alone
MAX_PIXELS_SETTING = "SWL_DETECTOR_MAX_FRAME_PIXELS"


def header_size(image: media_pb2.Image) -> tuple[int, int] | None:
    """(width, height) before any pixel is decoded: the message's for raw BGR, the header's for a picture Pillow
    can size, else None (OpenCV may still decode it; its size is checked after)."""
    if image.format != media_pb2.PIXEL_FORMAT_ENCODED:
        return image.width, image.height
    try:
        with Image.open(io.BytesIO(image.data), formats=HEADER_FORMATS) as picture:
            return picture.size
    except Image.DecompressionBombError:  # Pillow's own bomb check: far past any sensible limit
        return 1 << 16, 1 << 16
    except (OSError, ValueError, SyntaxError):
        return None


def check_pixels(what: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise InvalidArgument(f"{what}: {width}x{height} = {width * height} pixels is more than this detector's "
                              f"limit of {max_pixels} ({MAX_PIXELS_SETTING}); scale it down")


def decode_within(image: media_pb2.Image, what: str, max_pixels: int) -> np.ndarray:
    """The image's pixels, refused when larger than `max_pixels`: from the header when it tells the size."""
    size = header_size(image)
    if size is not None:
        check_pixels(what, *size, max_pixels)
    pixels = decode_image(image, what)
    check_pixels(what, pixels.shape[1], pixels.shape[0], max_pixels)
    return pixels


class DetectorServicer(detector_pb2_grpc.DetectorServicer):
    def __init__(self, detector: FaceDetector, embedder: FaceEmbedder, detect_queue: BatchingQueue,
                 embed_queue: BatchingQueue, max_pixels: int = 4096 * 4096) -> None:
        self.detector, self.embedder, self.max_pixels = detector, embedder, max_pixels
        self.detect_queue, self.embed_queue = detect_queue, embed_queue

    async def Detect(self, request: detector_pb2.DetectRequest, context) -> detector_pb2.DetectResponse:
        def prepare(image):
            return self.detector.prepare(decode_within(image, "frame", self.max_pixels), request.score_threshold)

        outcomes = await self.detect_queue.run_each(request.frames, prepare)
        return detector_pb2.DetectResponse(frames=[
            detector_pb2.FrameFaces(error=item_status(o)) if isinstance(o, BaseException) else faces_message(o)
            for o in outcomes
        ])

    async def Describe(self, request: detector_pb2.DescribeRequest, context) -> detector_pb2.DescribeResponse:
        detection, recognition = self.detector.model, self.embedder.model
        if detection is None or recognition is None:
            raise Unavailable("the detector is still loading its models; retry shortly")
        fingerprint = hashlib.sha256(f"{detection.weights_sha256}:{recognition.weights_sha256}:"
                                     f"{self.detector.size}:{'square' if self.detector.square else 'aspect'}".encode()
                                     ).hexdigest()
        return detector_pb2.DescribeResponse(
            detection_model=detection.spec.name, recognition_model=recognition.spec.name,
            detection_size=self.detector.size, fingerprint=fingerprint, providers=detection.providers)

    async def Embed(self, request: detector_pb2.EmbedRequest, context) -> detector_pb2.EmbedResponse:
        outcomes = await self.embed_queue.run_each(
            request.faces, lambda image: self.embedder.prepare(decode_within(image, "face", self.max_pixels))
        )
        return detector_pb2.EmbedResponse(embeddings=[
            detector_pb2.Embedding(error=item_status(o)) if isinstance(o, BaseException)
            else detector_pb2.Embedding(values=np.asarray(o, np.float32).tolist())
            for o in outcomes
        ])
