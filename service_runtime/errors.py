"""Domain errors that carry their gRPC status code; the RPC layer maps them in one place."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base of every error a caller should see with a specific status code and an actionable message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ModelLoadError(Exception):
    """A model cannot be loaded (missing file, wrong tensors, missing provider): start-up must stop."""
