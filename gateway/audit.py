"""The audit log: one JSON line (logger `gateway.audit`) per call that makes, changes or deletes something, and
per download, with the tenant, the method, the object's id, the request id and the outcome. Never a key."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from service_runtime.errors import ServiceError
from service_runtime.handlers import behaviour_of, same_shape
from service_runtime.logs import request_id_var

from .tenants import current_tenant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Audited:
    action: str  # create, generate, delete, cancel, download, live, credentials
    request_id_field: str = ""  # the object named by the request
    response_id_field: str = ""  # the object the call made (for streams: on the event that carries it)


AUDITED = {
    "Generate": Audited("generate"),
    "GenerateVideo": Audited("generate"),
    "GenerateEvents": Audited("generate"),
    "UploadMedia": Audited("create", response_id_field="upload_id"),
    "GenerateFromUpload": Audited("generate", request_id_field="face_upload_id"),
    "CreateAvatar": Audited("create", response_id_field="avatar.avatar_id"),
    "CreateAvatarFromJson": Audited("create", response_id_field="avatar_id"),
    "GetAvatar": Audited("download", request_id_field="avatar_id"),  # it carries the face's preview
    "DeleteAvatar": Audited("delete", request_id_field="avatar_id"),
    "GenerateFromAvatar": Audited("generate", request_id_field="avatar_id"),
    "SubmitJob": Audited("create", response_id_field="job_id"),
    "GetJobVideo": Audited("download", request_id_field="job_id"),
    "DeleteJob": Audited("cancel", request_id_field="job_id"),
}
AUDITED_LIVE = {
    "Session": Audited("live", response_id_field="ready.session_id"),
    "Offer": Audited("live", request_id_field="avatar_id"),
    "IceServers": Audited("credentials"),  # TURN credentials of the caller's own
}
AUDITED_BY_SERVICE = {"/superwav2lip.gateway.": AUDITED, "/superwav2lip.live.": AUDITED_LIVE}


def field_of(message: Any, path: str) -> str:
    """A string field of a protobuf message by dotted path ("" when absent or not a message)."""
    for name in path.split("."):
        if not hasattr(message, "DESCRIPTOR") or name not in message.DESCRIPTOR.fields_by_name:
            return ""
        message = getattr(message, name)
    return message if isinstance(message, str) else ""


def outcome_of(error: BaseException | None) -> str:
    if error is None:
        return "OK"
    if isinstance(error, ServiceError):
        return error.code.name
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    if isinstance(error, grpc.aio.AbortError):
        return "ABORTED_BY_INTERCEPTOR"
    return "INTERNAL"


class AuditedCall:
    """One audited call: the object it names or makes, and its line, written when it ends however it ends."""

    def __init__(self, method: str, audited: Audited, request: Any) -> None:
        self.method, self.audited = method, audited
        self.object_id = field_of(request, audited.request_id_field)

    def saw(self, response: Any) -> None:
        self.object_id = self.object_id or field_of(response, self.audited.response_id_field)

    @contextlib.contextmanager
    def recorded(self) -> Iterator[None]:
        error: BaseException | None = None
        try:
            yield
        except BaseException as raised:
            error = raised
            raise
        finally:
            tenant = current_tenant.get()
            log.info("audit", extra={"tenant": tenant.name if tenant else "-", "method": self.method,
                                     "action": self.audited.action, "object_id": self.object_id[:64],
                                     "outcome": outcome_of(error), "request_id": request_id_var.get()})


class AuditInterceptor(grpc.aio.ServerInterceptor):
    """Writes the audit line of each audited call when it ends, whatever its end. Installed after the tenant
    interceptor, so that the caller's tenant is known."""

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        method = details.method.rsplit("/", 1)[-1]
        audited = next((table.get(method) for prefix, table in AUDITED_BY_SERVICE.items()
                        if details.method.startswith(prefix)), None)
        if handler is None or audited is None:
            return handler
        return audited_handler(handler, method, audited)


def audited_handler(handler: grpc.RpcMethodHandler, method: str, audited: Audited) -> grpc.RpcMethodHandler:
    behaviour = behaviour_of(handler)

    async def unary_response(request, context):
        call = AuditedCall(method, audited, request)
        with call.recorded():
            response = await behaviour(request, context)
            call.saw(response)
            return response

    async def stream_response(request, context) -> AsyncIterator[Any]:
        call = AuditedCall(method, audited, request)
        with call.recorded():
            async for response in behaviour(request, context):
                call.saw(response)
                yield response

    if handler.response_streaming and not inspect.isasyncgenfunction(behaviour):
        return handler  # the reader/writer form: the gateway serves none
    return same_shape(handler, stream_response if handler.response_streaming else unary_response)
