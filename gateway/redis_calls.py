"""One Redis command with a bound on its wait: a Redis out of memory becomes RESOURCE_EXHAUSTED, any other failure
(refused, timed out, dropped) UNAVAILABLE, logged once with what it was for, so that each caller decides whether to
degrade or refuse."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

import redis.exceptions

from service_runtime.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
OUT_OF_MEMORY_RETRY_S = 10.0


class RedisOutOfMemory(ResourceExhausted):
    """Redis refused a write at its maxmemory."""


REDIS_FAILURES = (Unavailable, RedisOutOfMemory)  # what a caller that degrades without Redis catches


async def bounded(call: Awaitable[T], timeout_s: float, what: str) -> T:
    """The command's answer within `timeout_s`; otherwise RedisOutOfMemory or Unavailable naming `what` ("the job
    store", ...)."""
    try:
        return await asyncio.wait_for(call, timeout_s)
    except redis.exceptions.OutOfMemoryError:
        # Redis answers but refuses writes at its maxmemory (noeviction): full, not down, and a retry may fit.
        log.warning("redis out of memory", extra={"for": what})
        raise RedisOutOfMemory(f"{what} (Redis) is out of memory; retry later", retry_after_s=OUT_OF_MEMORY_RETRY_S) \
            from None
    except Exception as error:  # noqa: BLE001 - any Redis or network failure
        reason = type(error).__name__
        log.warning("redis unavailable", extra={"for": what, "error": f"{reason}: {error}"})
        raise Unavailable(f"{what} (Redis) is unavailable ({reason}); retry shortly") from None
