"""Admission: at most N jobs per gateway; the next caller is refused at once, before its upload is read."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from service_runtime.errors import ResourceExhausted

from .limits import setting_name

RETRY_AFTER_S = 2.0


class JobSlots:
    """A non-blocking counter of running jobs (one event loop: no lock needed)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.running >= self.limit:
            raise ResourceExhausted(
                f"this gateway is already running its limit of {self.limit} jobs "
                f"({setting_name('max_concurrent_jobs')}); retry in {RETRY_AFTER_S:g} s or use another replica",
                retry_after_s=RETRY_AFTER_S)
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
