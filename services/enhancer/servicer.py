"""gRPC servicer of the enhancer service."""

from __future__ import annotations

from superwav2lip.enhancer.v1 import enhancer_pb2, enhancer_pb2_grpc

from service_runtime.batching import BatchingQueue
from service_runtime.errors import Unavailable
from service_runtime.images import decode_image, encode_image
from service_runtime.rpc import call_deadline, item_status

from .model import FaceRestorer


class EnhancerServicer(enhancer_pb2_grpc.EnhancerServicer):
    def __init__(self, restorer: FaceRestorer, queue: BatchingQueue) -> None:
        self.restorer, self.queue = restorer, queue

    async def Enhance(self, request: enhancer_pb2.EnhanceRequest, context) -> enhancer_pb2.EnhanceResponse:
        outcomes = await self.queue.run_each(
            request.faces, lambda image: self.restorer.prepare(decode_image(image, "face")), call_deadline(context))
        return enhancer_pb2.EnhanceResponse(faces=[
            enhancer_pb2.EnhancedFace(error=item_status(o)) if isinstance(o, BaseException)
            else enhancer_pb2.EnhancedFace(face=encode_image(o))
            for o in outcomes
        ])

    async def Describe(self, request: enhancer_pb2.DescribeRequest, context) -> enhancer_pb2.DescribeResponse:
        model = self.restorer.model
        if model is None:
            raise Unavailable("the enhancer is still loading its model; retry shortly")
        return enhancer_pb2.DescribeResponse(model=model.spec.name, providers=model.providers,
                                             generated_weights=model.is_dev)
