"""Batched async clients of the detector, lip-sync and enhancer services, with errors named by service."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import cv2
import grpc
import numpy as np
from superwav2lip.common.v1 import media_pb2
from superwav2lip.detector.v1 import detector_pb2, detector_pb2_grpc
from superwav2lip.enhancer.v1 import enhancer_pb2, enhancer_pb2_grpc
from superwav2lip.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc

from service_runtime.errors import DeadlineExceeded, FailedPrecondition, ResourceExhausted, ServiceError, Unavailable
from service_runtime.images import decode_image, encode_image
from service_runtime.logs import request_id_var
from service_runtime.rpc import REQUEST_ID_HEADER

from .metrics import GatewayMetrics

T = TypeVar("T")
R = TypeVar("R")
# A model service that is briefly full or restarting should cost a job a short wait, not its life: gRPC
# retries such calls itself, with exponential back-off, before the error reaches the pipeline.
RETRY_POLICY = {
    "methodConfig": [{
        "name": [{"service": "superwav2lip.detector.v1.Detector"}, {"service": "superwav2lip.lipsync.v1.LipSync"},
                 {"service": "superwav2lip.enhancer.v1.Enhancer"}],
        "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]},
    }]
}
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
                   ("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(RETRY_POLICY)),
                   # A call is retried only while its request is buffered: room for the largest batches.
                   ("grpc.per_rpc_retry_buffer_size", 64 << 20), ("grpc.retry_buffer_size", 256 << 20)]


@dataclass(frozen=True)
class Face:
    box: np.ndarray  # x1, y1, x2, y2 in frame pixels
    score: float
    landmarks: np.ndarray  # 5x2

    @property
    def area(self) -> float:
        return float(max(0, self.box[2] - self.box[0]) * max(0, self.box[3] - self.box[1]))


def _translate(service: str, address: str, error: grpc.aio.AioRpcError) -> ServiceError:
    code = error.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"the request ran out of time while waiting for the {service} service")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(f"the {service} service is overloaded ({error.details()}); retry later")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"the {service} service at {address} is unavailable: {error.details()}")
    return Unavailable(f"the {service} service at {address} failed: {code.name}: {error.details()}")


class ModelClients:
    """One channel per model service; splits work into RPC-sized batches with a bounded number in flight."""

    def __init__(self, detector: str, lipsync: str, enhancer: str, *, batch_items: int, max_inflight: int,
                 metrics: GatewayMetrics, detection_jpeg_quality: int = 0) -> None:
        self.addresses = {"detector": detector, "lipsync": lipsync, "enhancer": enhancer}
        self._batch_items = batch_items
        self._jpeg_quality = detection_jpeg_quality
        self._max_inflight = max_inflight
        self._metrics = metrics
        self._channels: dict[str, grpc.aio.Channel] = {}

    def open(self) -> None:
        """Creates the channels; must run inside the event loop that will use them."""
        self._channels = {name: grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
                          for name, address in self.addresses.items()}
        self._detector = detector_pb2_grpc.DetectorStub(self._channels["detector"])
        self._lipsync = lipsync_pb2_grpc.LipSyncStub(self._channels["lipsync"])
        self._enhancer = enhancer_pb2_grpc.EnhancerStub(self._channels["enhancer"])
        self._inflight = asyncio.Semaphore(self._max_inflight)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels = {}

    async def _call(self, service: str, rpc: Callable[..., Awaitable[R]], request, timeout: float | None) -> R:
        self._metrics.sent_bytes.labels(service).inc(request.ByteSize())
        try:
            async with self._inflight:
                return await rpc(request, timeout=timeout, metadata=((REQUEST_ID_HEADER, request_id_var.get()),))
        except grpc.aio.AioRpcError as error:
            raise _translate(service, self.addresses[service], error) from None

    async def _batched(self, items: Sequence[T], run: Callable[[Sequence[T]], Awaitable[list[R]]]) -> list[R]:
        parts = [items[i : i + self._batch_items] for i in range(0, len(items), self._batch_items)]
        results = await asyncio.gather(*(run(part) for part in parts))
        return [r for part in results for r in part]

    async def detect(self, frames: Sequence[np.ndarray], timeout: float | None = None) -> list[list[Face]]:
        async def run(part):
            images = await asyncio.to_thread(lambda: [self._detection_image(f) for f in part])
            reply = await self._call("detector", self._detector.Detect, detector_pb2.DetectRequest(frames=images),
                                     timeout)
            return [_faces(frame) for frame in reply.frames]

        return await self._batched(frames, run)

    def _detection_image(self, frame: np.ndarray) -> media_pb2.Image:
        if not self._jpeg_quality:
            return encode_image(frame)
        ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self._jpeg_quality])
        if not ok:
            return encode_image(frame)
        return media_pb2.Image(data=data.tobytes(), format=media_pb2.PIXEL_FORMAT_ENCODED)

    async def embed(self, crops: Sequence[np.ndarray], timeout: float | None = None) -> list[np.ndarray]:
        async def run(part):
            request = detector_pb2.EmbedRequest(faces=[encode_image(c) for c in part])
            reply = await self._call("detector", self._detector.Embed, request, timeout)
            return [np.asarray(_ok(e, "detector").values, np.float32) for e in reply.embeddings]

        return await self._batched(crops, run)

    async def lipsync(self, faces: Sequence[np.ndarray], mels: Sequence[np.ndarray],
                      timeout: float | None = None) -> list[np.ndarray]:
        async def run(part):
            request = lipsync_pb2.GenerateRequest(items=[
                lipsync_pb2.LipSyncItem(face=np.ascontiguousarray(f).tobytes(), mel=m.astype("<f4").tobytes())
                for f, m in part
            ])
            reply = await self._call("lipsync", self._lipsync.Generate, request, timeout)
            return [np.frombuffer(_ok(r, "lipsync").face, np.uint8).reshape(96, 96, 3) for r in reply.results]

        return await self._batched(list(zip(faces, mels)), run)

    async def describe_enhancer(self, timeout: float | None = None) -> enhancer_pb2.DescribeResponse:
        return await self._call("enhancer", self._enhancer.Describe, enhancer_pb2.DescribeRequest(), timeout)

    async def enhance(self, faces: Sequence[np.ndarray], timeout: float | None = None) -> list[np.ndarray]:
        async def run(part):
            request = enhancer_pb2.EnhanceRequest(faces=[encode_image(f) for f in part])
            reply = await self._call("enhancer", self._enhancer.Enhance, request, timeout)
            return [decode_image(_ok(r, "enhancer").face, "enhanced face") for r in reply.faces]

        return await self._batched(faces, run)


def _ok(result, service: str):
    if result.HasField("error") and result.error.code:
        raise FailedPrecondition(f"the {service} service refused an item: {result.error.message}")
    return result


def _faces(frame: detector_pb2.FrameFaces) -> list[Face]:
    _ok(frame, "detector")
    return [Face(np.array([f.x1, f.y1, f.x2, f.y2], np.float32), f.score,
                 np.array([[p.x, p.y] for p in f.landmarks], np.float32)) for f in frame.faces]



