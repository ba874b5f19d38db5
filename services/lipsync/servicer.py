"""gRPC servicer of the lip-sync service."""

from __future__ import annotations

from superwav2lip.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc

from service_runtime.batching import BatchingQueue
from service_runtime.errors import Unavailable
from service_runtime.rpc import call_deadline, item_status

from .model import LipSyncGenerator


class LipSyncServicer(lipsync_pb2_grpc.LipSyncServicer):
    def __init__(self, generator: LipSyncGenerator, queue: BatchingQueue) -> None:
        self.generator, self.queue = generator, queue

    async def Generate(self, request: lipsync_pb2.GenerateRequest, context) -> lipsync_pb2.GenerateResponse:
        outcomes = await self.queue.run_each(request.items, lambda item: self.generator.prepare(item.face, item.mel),
                                             call_deadline(context))
        return lipsync_pb2.GenerateResponse(results=[
            lipsync_pb2.LipSyncResult(error=item_status(o)) if isinstance(o, BaseException)
            else lipsync_pb2.LipSyncResult(face=o.tobytes())
            for o in outcomes
        ])

    async def Describe(self, request: lipsync_pb2.DescribeRequest, context) -> lipsync_pb2.DescribeResponse:
        model = self.generator.model
        if model is None:
            raise Unavailable("the lip-sync service is still loading its model; retry shortly")
        return lipsync_pb2.DescribeResponse(model=model.spec.name, providers=model.providers,
                                            generated_weights=model.is_dev)
