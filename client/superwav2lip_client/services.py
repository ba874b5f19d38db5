"""For operators: the health and loaded models of each service, asked of each service directly."""

from __future__ import annotations

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc
from superwav2lip.detector.v1 import detector_pb2, detector_pb2_grpc
from superwav2lip.enhancer.v1 import enhancer_pb2, enhancer_pb2_grpc
from superwav2lip.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc

DEFAULT_ADDRESSES = {"gateway": "localhost:50051", "detector": "localhost:50052", "lipsync": "localhost:50053",
                     "enhancer": "localhost:50054"}
DESCRIBE = {  # role -> (stub class, request)
    "detector": (detector_pb2_grpc.DetectorStub, detector_pb2.DescribeRequest),
    "lipsync": (lipsync_pb2_grpc.LipSyncStub, lipsync_pb2.DescribeRequest),
    "enhancer": (enhancer_pb2_grpc.EnhancerStub, enhancer_pb2.DescribeRequest),
}


def health(address: str, service: str = "", timeout: float = 3.0) -> str:
    """The health status name of one server (SERVING, NOT_SERVING, or the error code when unreachable)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def describe(role: str, address: str, timeout: float = 5.0) -> dict:
    """What a model service has loaded (models, providers, generated weights), or {"error": code} if unreachable."""
    stub_class, request = DESCRIBE[role]
    with grpc.insecure_channel(address) as channel:
        try:
            reply = stub_class(channel).Describe(request(), timeout=timeout)
        except grpc.RpcError as error:
            return {"error": error.code().name}
    return MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
