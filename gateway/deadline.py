"""A job's deadline: the client's, or the gateway's default scaled with the speech, enforced on every await."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator

from service_runtime.errors import DeadlineExceeded

from .limits import setting_name


class JobDeadline:
    """When a job must end. Without a client deadline (or with a later one) the gateway's default applies:
    `base_s` from the start, plus `per_audio_second_s` for each second of speech once the speech is known."""

    def __init__(self, base_s: float, per_audio_second_s: float, client_remaining_s: float | None = None) -> None:
        self._started = time.monotonic()
        self._base_s, self._per_second = base_s, per_audio_second_s
        self._default_s = base_s
        self._client_at = math.inf if client_remaining_s is None else self._started + client_remaining_s
        self._scope: asyncio.Timeout | None = None
        self._capped_by = ""  # the setting that capped the default, if one did

    @property
    def at(self) -> float:
        """The deadline on the `time.monotonic` clock."""
        return min(self._client_at, self._started + self._default_s)

    def remaining(self) -> float:
        """Seconds left, for the timeout of a call about to be sent; DeadlineExceeded once none are."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise self.exceeded()
        return left

    def scale_to_speech(self, seconds: float, at_most: tuple[float, str] | None = None) -> None:
        """`at_most`: (seconds, setting) the default may not pass, however long the media is or claims to be."""
        self._default_s = self._base_s + self._per_second * seconds
        if at_most is not None and self._default_s > at_most[0]:
            self._default_s, self._capped_by = at_most[0], at_most[1]
        self._reschedule()

    def exceeded(self, waiting_for: str | None = None) -> DeadlineExceeded:
        where = f" (it was waiting for the {waiting_for} service)" if waiting_for else ""
        if self._client_at <= self._started + self._default_s:
            return DeadlineExceeded(f"the job did not finish within the client's deadline{where}")
        if self._capped_by:
            return DeadlineExceeded(f"the job did not finish within this gateway's longest deadline of "
                                    f"{self._default_s:.0f} s{where} ({self._capped_by}); send shorter media")
        return DeadlineExceeded(
            f"the job did not finish within this gateway's deadline of {self._default_s:.0f} s{where} "
            f"({setting_name('job_deadline_s')} + {setting_name('job_deadline_per_audio_second_s')} x speech seconds); "
            "set a longer deadline on the call, or send shorter speech")

    def _reschedule(self) -> None:
        if self._scope is not None and self.at != math.inf:
            loop = asyncio.get_running_loop()
            self._scope.reschedule(loop.time() + (self.at - time.monotonic()))

    @contextlib.asynccontextmanager
    async def enforced(self) -> AsyncIterator[None]:
        """Cancels the work inside when the deadline passes (also after `scale_to_speech` moves it)."""
        try:
            async with asyncio.timeout(None) as scope:
                self._scope = scope
                self._reschedule()
                yield
        except TimeoutError:
            raise self.exceeded() from None
        finally:
            self._scope = None
