"""Waiting for a condition in tests: one helper, synchronous and asynchronous, whose failure says what was awaited
and what was last seen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(check: Callable[[], T], *, seconds: float = 30, every: float = 0.05, what: str = "the condition") -> T:
    """Calls `check` until it returns something truthy, and returns that; fails after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached within {seconds:g} s (last: {value!r})"
        time.sleep(every)


async def eventually_async(check: Callable[[], T | Awaitable[T]], *, seconds: float = 30, every: float = 0.05,
                           what: str = "the condition") -> T:
    """Like `eventually`, without blocking the event loop; `check` may be a coroutine function."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        assert time.monotonic() < deadline, f"{what} not reached within {seconds:g} s (last: {value!r})"
        await asyncio.sleep(every)


async def clear_of_a_minute_boundary(seconds: float = 5.0) -> None:
    """Waits (at most `seconds`) until the wall clock's minute has `seconds` left, so that a test counting calls
    in one clock minute (per-minute quotas) does not have its calls split across two."""
    into_the_minute = time.time() % 60
    if into_the_minute > 60 - seconds:
        await asyncio.sleep(60 - into_the_minute + 0.01)
