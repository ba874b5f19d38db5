"""The owner of a process's long-lived tasks: one that ends while the process serves is logged and the process goes NOT_SERVING."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0  # longest wait at shutdown for cancelled tasks to end
# Called with the task's name and what ended it (None: it returned, which a loop meant to run forever must not).
DeathHandler = Callable[[str, BaseException | None], None]


class Supervisor:
    """Starts and watches the loops that must run as long as the process serves (job workers, housekeeping,
    batching workers). Each loop recovers from what it can itself; the supervisor is the last line: a loop that
    still ends is a bug, so it is logged with its traceback and `on_death` is told (the server then reports
    NOT_SERVING, so Kubernetes restarts the process instead of routing traffic to a replica that silently
    stopped working)."""

    def __init__(self) -> None:
        self.on_death: DeathHandler = lambda name, error: None
        self.dead: list[str] = []
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False

    def spawn(self, work: Coroutine, name: str) -> asyncio.Task:
        """Runs `work` as a watched, long-lived task."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def report(self, name: str, error: BaseException | None) -> None:
        """For loops watched by their own owner (a batching queue): record and announce their death."""
        if self._stopping:
            return
        self.dead.append(name)
        log.error("background task stopped; this process no longer serves", extra={"task": name},
                  exc_info=(type(error), error, error.__traceback__) if error is not None else None)
        self.on_death(name, error)

    def _ended(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        self.report(task.get_name(), task.exception())

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Cancels every watched task; their ends are then expected, not deaths. A task that does not end within
        `timeout_s` (one stuck in a client library's clean-up, as redis-py's can be) is logged and left behind,
        so shutdown is never held up."""
        self._stopping = True
        await cancel_and_wait(self._tasks, timeout_s)


async def cancel_and_wait(tasks: Iterable[asyncio.Task], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Cancels the tasks and waits at most `timeout_s` for them to end; one that does not (stuck in a client
    library's clean-up, as redis-py's can be when a command is cancelled) is logged and left behind."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        log.warning("task did not stop when cancelled; left behind", extra={"task": task.get_name()})
