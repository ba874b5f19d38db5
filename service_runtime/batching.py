"""A bounded dynamic batching queue per model: items from all calls are gathered into one model call."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .errors import InvalidArgument, ResourceExhausted, ServiceError, Unavailable
from .metrics import ServiceMetrics

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")
# Runs a whole batch; returns one result or one exception per item, in order.
BatchFn = Callable[[list[Item]], Sequence["Result | Exception"]]


@dataclass(frozen=True)
class BatchPolicy:
    """How one model's queue batches (each model of a service may have its own, as in Triton and MLServer)."""

    max_batch_size: int  # most items one model call takes
    max_delay_s: float  # longest wait for more items once a batch has its first one
    max_queue_size: int  # items that may wait; beyond it calls get RESOURCE_EXHAUSTED
    across_calls: bool = True  # gather items from concurrent calls (False: one call's items at a time)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue_size < 1 or self.max_delay_s < 0:
            raise ValueError(f"max_batch_size and max_queue_size must be at least 1 and max_delay_s at least 0: "
                             f"{self}")


# Items whose caller allows less than this at arrival are urgent (a live frame, not a batch job): while such
# items keep coming, batches are cut so that one batch takes at most URGENT_SHARE of the tightest recent slack,
# because a batch already on the model cannot be pre-empted.
URGENT_SLACK_S = 2.0
URGENT_SHARE = 0.25
# How long urgent traffic is remembered after its last item: a live session's next utterance may come a while
# after its last, and its first frames must not find a full batch of a long job on the model.
URGENT_MEMORY_S = 60.0
# Live frames come every frame period or two. While they do, the model is kept free for the next one: a long job's
# item waits until HOLD_PERIODS of their usual interval have passed without one (a pause in speech), so jobs run
# between utterances and in the gaps, and a live frame never waits behind a job's item on the model.
HOLD_PERIODS = 1.5
MAX_URGENT_GAP_S = 0.5


@dataclass(order=True)
class _Entry(Generic[Item]):
    deadline: float  # time.monotonic() by which the caller wants it (inf: none); the queue's order
    seq: int  # arrival order among equal deadlines
    item: Item = field(compare=False)
    future: asyncio.Future = field(compare=False)
    call: int = field(compare=False)  # which submit_many call the item came with


class BatchingQueue(Generic[Item, Result]):
    """Gathers items until `max_batch_size` or `max_delay_s`, runs the batch off the event loop. Items are taken
    earliest deadline first (the caller's gRPC deadline), so a live frame is never queued behind a long job."""

    @classmethod
    def with_policy(cls, name: str, run_batch: BatchFn, policy: BatchPolicy,
                    metrics: ServiceMetrics) -> BatchingQueue[Item, Result]:
        return cls(name, run_batch, max_batch_size=policy.max_batch_size, max_delay_s=policy.max_delay_s,
                   max_queue_size=policy.max_queue_size, metrics=metrics, across_calls=policy.across_calls)

    def __init__(
        self,
        name: str,
        run_batch: BatchFn,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
        metrics: ServiceMetrics,
        across_calls: bool = True,
    ) -> None:
        self.policy = BatchPolicy(max_batch_size, max_delay_s, max_queue_size, across_calls)  # checks them
        self.name = name
        self._run_batch = run_batch
        self._max_batch = max_batch_size
        self._max_delay = max_delay_s
        self._max_queue = max_queue_size
        self._metrics = metrics
        self._across_calls = across_calls
        self._calls = 0
        self._pending: list[_Entry] = []  # a heap: earliest deadline first
        self._seq = itertools.count()
        self._seconds_per_item = 0.0  # measured: a moving average over batches
        self._urgent_slack = math.inf  # the tightest slack of recent urgent items
        self._urgent_until = 0.0
        self._urgent_last = -math.inf  # when the last urgent item came
        self._urgent_period = 0.0  # their usual interval (a moving average; 0: unknown)
        self._arrived = asyncio.Event()
        # One thread per model keeps one batch on the model at a time while the event loop keeps serving.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")
        self._worker: asyncio.Task | None = None
        self._died: BaseException | None = None

    def start(self, on_death: Callable[[str, BaseException | None], None] = lambda name, error: None) -> None:
        """Starts the worker; if it ever ends by itself, every waiting item fails, new ones are refused, and
        `on_death(name, error)` is told (the model service reports NOT_SERVING)."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.name}")
            self._worker.add_done_callback(lambda task: self._ended(task, on_death))

    def _ended(self, task: asyncio.Task, on_death: Callable[[str, BaseException | None], None]) -> None:
        if task.cancelled():
            return  # stop()
        self._died = task.exception() or RuntimeError("the worker returned")
        self._fail_pending(Unavailable(f"model {self.name}'s batching worker stopped ({self._died}); this replica "
                                       "is NOT_SERVING and will be restarted: retry another replica"))
        on_death(self.name, self._died)

    def _fail_pending(self, error: ServiceError) -> None:
        while self._pending:
            entry = heapq.heappop(self._pending)
            if not entry.future.done():
                entry.future.set_exception(error)
        self._metrics.queue_depth.labels(self.name).set(0)

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        self._fail_pending(Unavailable(f"model {self.name} is shutting down; retry another replica"))
        self._executor.shutdown(wait=False)

    @property
    def depth(self) -> int:
        """Entries in the queue, including those of cancelled calls not yet skipped."""
        return len(self._pending)

    @property
    def waiting(self) -> int:
        """Items still wanted by a caller."""
        return sum(not entry.future.done() for entry in self._pending)

    def submit_many(self, items: Sequence[Item], deadline: float = math.inf) -> list[asyncio.Future]:
        """Queues all items or none: a call that does not fit gets RESOURCE_EXHAUSTED with a retry hint.
        `deadline` (time.monotonic()) orders the queue: earliest first."""
        if self._worker is None:
            raise Unavailable(f"model {self.name} is not serving yet (warming up); retry shortly")
        if self._died is not None:
            raise Unavailable(f"model {self.name}'s batching worker stopped ({self._died}); this replica is "
                              "NOT_SERVING and will be restarted: retry another replica")
        # Urgent items (live frames, bounded by their own admission) have a reserve beyond the bound, so a queue
        # filled by long jobs does not refuse them.
        reserve = self._max_batch if deadline - time.monotonic() < URGENT_SLACK_S else 0
        if len(self._pending) + len(items) > self._max_queue + reserve:
            self._metrics.queue_rejections.labels(self.name).inc(len(items))
            raise ResourceExhausted(
                f"model {self.name} queue is full ({len(self._pending)} of {self._max_queue} items waiting, "
                f"{len(items)} more asked): retry after a short back-off or send smaller batches"
            )
        loop = asyncio.get_running_loop()
        futures = []
        self._calls += 1
        self._note_urgency(deadline)
        for item in items:
            future = loop.create_future()
            heapq.heappush(self._pending, _Entry(deadline, next(self._seq), item, future, self._calls))
            futures.append(future)
        self._metrics.queue_depth.labels(self.name).set(len(self._pending))
        self._arrived.set()
        return futures

    def _note_urgency(self, deadline: float) -> None:
        now = time.monotonic()
        slack = deadline - now
        if now > self._urgent_until:
            self._urgent_slack = math.inf
        if slack < URGENT_SLACK_S:
            self._urgent_slack = min(self._urgent_slack, max(slack, 0.0))
            self._urgent_until = now + URGENT_MEMORY_S
            gap = now - self._urgent_last
            if gap < MAX_URGENT_GAP_S:  # within a stream of live frames (a longer gap is a pause in speech)
                self._urgent_period = gap if not self._urgent_period else 0.7 * self._urgent_period + 0.3 * gap
            self._urgent_last = now

    def _holding_for_urgent(self) -> float:
        """Seconds to keep the model free for the next urgent item, expected within its usual period: while live
        frames stream in, a long job's item started now would hold the next one behind it (0: no need)."""
        if not self._urgent_period:
            return 0.0
        now = time.monotonic()
        if self._urgent_last + self._urgent_period - now >= self._seconds_per_item:
            return 0.0  # an item fits before the next live frame is due (a fast model: a GPU)
        return max(0.0, self._urgent_last + HOLD_PERIODS * self._urgent_period - now)

    @staticmethod
    def _is_urgent(entry: _Entry) -> bool:
        return entry.deadline - time.monotonic() < URGENT_SLACK_S

    def _batch_limit(self) -> int:
        """max_batch_size, or fewer while urgent items keep coming (see URGENT_SHARE)."""
        if time.monotonic() > self._urgent_until or not self._seconds_per_item:
            return self._max_batch
        return max(1, min(self._max_batch, int(self._urgent_slack * URGENT_SHARE / self._seconds_per_item)))

    async def run(self, items: Sequence[Item], deadline: float = math.inf) -> list[Result | Exception]:
        """Submits items and waits; cancelling the caller cancels its still-queued items."""
        futures = self.submit_many(items, deadline)
        try:
            return await asyncio.gather(*futures, return_exceptions=True)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise

    async def run_each(self, raw_items: Sequence, prepare: Callable[[object], Item],
                       deadline: float = math.inf) -> list[Result | Exception]:
        """Prepares each raw item (a failure stays that item's error), batches the rest, keeps the order."""
        if not raw_items:
            raise InvalidArgument("the request has no items")
        outcomes: list[Result | Exception] = [None] * len(raw_items)  # type: ignore[list-item]
        prepared, positions = [], []
        for position, raw in enumerate(raw_items):
            try:
                prepared.append(prepare(raw))
                positions.append(position)
            except ServiceError as error:
                outcomes[position] = error
        for position, result in zip(positions, await self.run(prepared, deadline) if prepared else []):
            outcomes[position] = result
        return outcomes

    async def _gather_batch(self) -> list[_Entry]:
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        if not self._across_calls:  # the seed's behaviour: one call's items at a time, no waiting for others
            return self._take(lambda entry, first: entry.call == first.call)
        while not self._is_urgent(self._pending[0]) and (hold := self._holding_for_urgent()) > 0:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), hold)
        deadline = time.monotonic() + self._max_delay
        while len(self._pending) < self._batch_limit():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        return self._take(lambda entry, first: True)

    def _take(self, belongs: Callable[[_Entry, _Entry], bool]) -> list[_Entry]:
        batch: list[_Entry] = []
        limit = self._batch_limit()
        while self._pending and len(batch) < limit and (not batch or belongs(self._pending[0], batch[0])):
            entry = heapq.heappop(self._pending)
            if not entry.future.done():  # skip items whose caller cancelled
                batch.append(entry)
        self._metrics.queue_depth.labels(self.name).set(len(self._pending))
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather_batch()
            if not batch:
                continue
            results = await loop.run_in_executor(self._executor, self._run_safely, [e.item for e in batch])
            for entry, result in zip(batch, results):
                if entry.future.done():
                    continue
                if isinstance(result, BaseException):
                    entry.future.set_exception(result)
                else:
                    entry.future.set_result(result)

    def _run_safely(self, items: list[Item]) -> Sequence[Result | Exception]:
        """Runs the batch; if the whole call fails, runs items one by one so each gets its own outcome."""
        labels = self.name
        started = time.perf_counter()
        try:
            results = self._run_batch(items)
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        except Exception as batch_error:
            if len(items) == 1:
                results = [batch_error]
            else:
                log.warning("batch failed; retrying items one by one", extra={"model": labels, "error": str(batch_error)})
                results = [self._run_single(item) for item in items]
        elapsed = time.perf_counter() - started
        self._seconds_per_item = elapsed / len(items) if not self._seconds_per_item else (
            0.8 * self._seconds_per_item + 0.2 * elapsed / len(items))
        self._metrics.inference_seconds.labels(labels).observe(elapsed)
        self._metrics.batch_size.labels(labels).observe(len(items))
        self._metrics.batches.labels(labels).inc()
        failed = sum(isinstance(r, BaseException) for r in results)
        self._metrics.items.labels(labels, "ok").inc(len(items) - failed)
        self._metrics.items.labels(labels, "error").inc(failed)
        return results

    def _run_single(self, item: Item) -> Result | Exception:
        try:
            return self._run_batch([item])[0]
        except Exception as error:
            return error
