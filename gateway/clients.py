"""Batched async clients of the detector, lip-sync and enhancer services, with errors named by service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import cv2
import grpc
import numpy as np
from superwav2lip.common.v1 import media_pb2
from superwav2lip.detector.v1 import detector_pb2, detector_pb2_grpc
from superwav2lip.enhancer.v1 import enhancer_pb2, enhancer_pb2_grpc
from superwav2lip.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc

from service_runtime.errors import PASSED_THROUGH, DeadlineExceeded, ServiceError, Unavailable, error_for
from service_runtime.images import decode_image, encode_image
from service_runtime.logs import request_id_var
from service_runtime.rpc import REQUEST_ID_HEADER

from .deadline import JobDeadline
from .faces import Face
from .metrics import GatewayMetrics

log = logging.getLogger(__name__)

DESCRIBE_TTL_S = 30.0
MIN_LANDMARK_SPREAD = 2.0  # pixels: closer landmarks give no alignment (a degenerate similarity transform)
T = TypeVar("T")
R = TypeVar("R")
# Round robin over every address the name resolves to: in Kubernetes a headless Service gives one address per
# pod, and the DNS resolver re-resolves when a pod goes away or a server ends a connection for its age.
# A model service that is briefly full or restarting should cost a job a short wait, not its life: gRPC
# retries such calls itself, with exponential back-off, before the error reaches the pipeline.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "superwav2lip.detector.v1.Detector"}, {"service": "superwav2lip.lipsync.v1.LipSync"},
                 {"service": "superwav2lip.enhancer.v1.Enhancer"}],
        "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]},
    }]
}
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
                   ("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
                   # A call is retried only while its request is buffered: room for the largest batches.
                   ("grpc.per_rpc_retry_buffer_size", 64 << 20), ("grpc.retry_buffer_size", 256 << 20)]


def _translate(service: str, error: grpc.aio.AioRpcError) -> ServiceError:
    """The model service's status as the client should see it, naming the service by role, never by address:
    client-facing codes pass through, only transport failures become UNAVAILABLE."""
    code = error.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"the job ran out of time waiting for the {service} service")
    if code == grpc.StatusCode.UNAVAILABLE:
        log.warning("model service unavailable", extra={"service": service, "details": error.details()})
        return Unavailable(f"the {service} service is unavailable (down or restarting); retry shortly")
    if code in PASSED_THROUGH:
        return error_for(code, f"the {service} service: {error.details()}")
    log.error("model service failed", extra={"service": service, "code": code.name, "details": error.details()})
    return error_for(code, f"the {service} service failed ({code.name}); see the gateway log for request id "
                           f"{request_id_var.get()}")


async def run_in_parts(items: Sequence[T], size: int,
                       run: Callable[[Sequence[T]], Coroutine[Any, Any, list[R]]]) -> list[R]:
    """Runs `run` on parts of `size` items concurrently and joins the results in order; when one part fails,
    the others are cancelled (their model calls stop) and its error is raised."""
    parts = [items[i : i + size] for i in range(0, len(items), size)]
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(run(part)) for part in parts]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [r for task in tasks for r in task.result()]


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
        self._detector_info: tuple[float, detector_pb2.DescribeResponse] | None = None

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

    async def _call(self, service: str, rpc: Callable[..., Awaitable[R]], request, deadline: JobDeadline | None,
                    urgent: bool = False) -> R:
        """`urgent` calls (live frames, bounded by live-session admission) do not wait for one of the
        max_inflight_rpcs slots that jobs share: their deadline orders them in the model's queue instead."""
        self._metrics.sent_bytes.labels(service).inc(request.ByteSize())
        try:
            async with contextlib.nullcontext() if urgent else self._inflight:
                # The job's remaining time, measured when the call is sent (after the wait for a slot).
                timeout = None if deadline is None else deadline.remaining()
                return await rpc(request, timeout=timeout, metadata=((REQUEST_ID_HEADER, request_id_var.get()),))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None:
                raise deadline.exceeded(waiting_for=service) from None
            raise _translate(service, error) from None

    async def _batched(self, items: Sequence[T], run: Callable[[Sequence[T]], Coroutine[Any, Any, list[R]]]) -> list[R]:
        return await run_in_parts(items, self._batch_items, run)

    async def detect(self, frames: Sequence[np.ndarray], deadline: JobDeadline | None = None) -> list[list[Face]]:
        async def run(part):
            images = await asyncio.to_thread(lambda: [self._detection_image(f) for f in part])
            reply = await self._call("detector", self._detector.Detect, detector_pb2.DetectRequest(frames=images),
                                     deadline)
            return [_faces(frame) for frame in reply.frames]

        return await self._batched(frames, run)

    def _detection_image(self, frame: np.ndarray) -> media_pb2.Image:
        if not self._jpeg_quality:
            return encode_image(frame)
        ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self._jpeg_quality])
        if not ok:
            return encode_image(frame)
        return media_pb2.Image(data=data.tobytes(), format=media_pb2.PIXEL_FORMAT_ENCODED)

    async def embed(self, crops: Sequence[np.ndarray], deadline: JobDeadline | None = None) -> list[np.ndarray]:
        async def run(part):
            request = detector_pb2.EmbedRequest(faces=[encode_image(c) for c in part])
            reply = await self._call("detector", self._detector.Embed, request, deadline)
            return [np.asarray(_ok(e, "detector").values, np.float32) for e in reply.embeddings]

        return await self._batched(crops, run)

    async def lipsync(self, faces: Sequence[np.ndarray], mels: Sequence[np.ndarray],
                      deadline: JobDeadline | None = None, urgent: bool = False) -> list[np.ndarray]:
        async def run(part):
            request = lipsync_pb2.GenerateRequest(items=[
                lipsync_pb2.LipSyncItem(face=np.ascontiguousarray(f).tobytes(), mel=m.astype("<f4").tobytes())
                for f, m in part
            ])
            reply = await self._call("lipsync", self._lipsync.Generate, request, deadline, urgent)
            return [np.frombuffer(_ok(r, "lipsync").face, np.uint8).reshape(96, 96, 3) for r in reply.results]

        return await self._batched(list(zip(faces, mels)), run)

    @property
    def detection_encoding(self) -> str:
        """How frames travel to the detector, which changes what it finds (part of a plan's cache key)."""
        return f"jpeg{self._jpeg_quality}" if self._jpeg_quality else "raw"

    async def describe_detector(self, deadline: JobDeadline | None = None) -> detector_pb2.DescribeResponse:
        """The detector's models, asked at most every DESCRIBE_TTL_S (a redeploy is noticed that soon)."""
        now = time.monotonic()
        if self._detector_info is None or now - self._detector_info[0] > DESCRIBE_TTL_S:
            reply = await self._call("detector", self._detector.Describe, detector_pb2.DescribeRequest(), deadline)
            self._detector_info = (now, reply)
        return self._detector_info[1]

    async def describe_lipsync(self, deadline: JobDeadline | None = None) -> lipsync_pb2.DescribeResponse:
        return await self._call("lipsync", self._lipsync.Describe, lipsync_pb2.DescribeRequest(), deadline)

    async def describe_enhancer(self, deadline: JobDeadline | None = None) -> enhancer_pb2.DescribeResponse:
        return await self._call("enhancer", self._enhancer.Describe, enhancer_pb2.DescribeRequest(), deadline)

    async def enhance(self, faces: Sequence[np.ndarray], deadline: JobDeadline | None = None) -> list[np.ndarray]:
        async def run(part):
            request = enhancer_pb2.EnhanceRequest(faces=[encode_image(f) for f in part])
            reply = await self._call("enhancer", self._enhancer.Enhance, request, deadline)
            return [decode_image(_ok(r, "enhancer").face, "enhanced face") for r in reply.faces]

        return await self._batched(faces, run)


def _ok(result, service: str):
    if result.HasField("error") and result.error.code:
        code = next((c for c in grpc.StatusCode if c.value[0] == result.error.code), grpc.StatusCode.UNKNOWN)
        raise error_for(code, f"the {service} service refused an item: {result.error.message}")
    return result


def _faces(frame: detector_pb2.FrameFaces) -> list[Face]:
    """The frame's faces, without those whose landmarks are too close together to align."""
    _ok(frame, "detector")
    faces = [Face(np.array([f.x1, f.y1, f.x2, f.y2], np.float32), f.score,
                  np.array([[p.x, p.y] for p in f.landmarks], np.float32)) for f in frame.faces]
    return [face for face in faces if np.ptp(face.landmarks, axis=0).max() >= MIN_LANDMARK_SPREAD]



