"""Domain errors that carry their gRPC status code; the RPC layer maps them in one place."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base of every error a caller should see with a specific status code and an actionable message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s  # sent to the client as google.rpc.RetryInfo


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


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


PASSED_THROUGH = {error.code: error for error in (InvalidArgument, FailedPrecondition, ResourceExhausted,
                                                  DeadlineExceeded)}


def error_for(code: grpc.StatusCode, message: str) -> ServiceError:
    """A domain error for a status another service returned: client-facing codes keep their code,
    UNAVAILABLE stays retryable, anything else is a server-side failure (INTERNAL)."""
    if code in PASSED_THROUGH:
        return PASSED_THROUGH[code](message)
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(message)
    return ServiceError(message)


class ModelLoadError(Exception):
    """A model cannot be loaded (missing file, wrong tensors, missing provider): start-up must stop."""
