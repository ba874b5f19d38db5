"""One Redis command with a bound on its wait: any failure (refused, timed out, dropped) becomes UNAVAILABLE,
logged once with what it was for, so that each caller decides whether to degrade or refuse."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

from service_runtime.errors import Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


async def bounded(call: Awaitable[T], timeout_s: float, what: str) -> T:
    """The command's answer within `timeout_s`; otherwise Unavailable naming `what` ("the job store", ...)."""
    try:
        return await asyncio.wait_for(call, timeout_s)
    except Exception as error:  # noqa: BLE001 - any Redis or network failure
        reason = type(error).__name__
        log.warning("redis unavailable", extra={"for": what, "error": f"{reason}: {error}"})
        raise Unavailable(f"{what} (Redis) is unavailable ({reason}); retry shortly") from None
