"""gRPC servicer of the detector: converts messages, calls the batching queues, converts back."""

from __future__ import annotations

import hashlib

import numpy as np
from superwav2lip.detector.v1 import detector_pb2, detector_pb2_grpc

from service_runtime.batching import BatchingQueue
from service_runtime.errors import Unavailable
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


class DetectorServicer(detector_pb2_grpc.DetectorServicer):
    def __init__(self, detector: FaceDetector, embedder: FaceEmbedder, detect_queue: BatchingQueue,
                 embed_queue: BatchingQueue) -> None:
        self.detector, self.embedder = detector, embedder
        self.detect_queue, self.embed_queue = detect_queue, embed_queue

    async def Detect(self, request: detector_pb2.DetectRequest, context) -> detector_pb2.DetectResponse:
        def prepare(image):
            return self.detector.prepare(decode_image(image, "frame"), request.score_threshold)

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
            request.faces, lambda image: self.embedder.prepare(decode_image(image, "face"))
        )
        return detector_pb2.EmbedResponse(embeddings=[
            detector_pb2.Embedding(error=item_status(o)) if isinstance(o, BaseException)
            else detector_pb2.Embedding(values=np.asarray(o, np.float32).tolist())
            for o in outcomes
        ])
