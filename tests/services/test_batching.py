"""The batching queue: cross-call batches, per-item errors, bounded depth, cancellation."""

import asyncio
import threading
import time

import pytest

from service_runtime.batching import BatchingQueue
from service_runtime.errors import InvalidArgument, ResourceExhausted, Unavailable
from service_runtime.metrics import ServiceMetrics


class SlowDoubler:
    """A fake model: doubles numbers, fails on negatives as a whole batch, records every call."""

    def __init__(self, delay: float = 0.05) -> None:
        self.calls: list[list[int]] = []
        self.delay = delay
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()  # set once the model has started on a batch

    def __call__(self, items):
        self.entered.set()
        self.release.wait(5)
        self.calls.append(list(items))
        threading.Event().wait(self.delay)
        if any(i < 0 for i in items):
            raise ValueError("negative input")
        return [2 * i for i in items]


class PerItemDoubler(SlowDoubler):
    """SlowDoubler whose batch costs `seconds_per_item` per item, as a model on a CPU does."""

    def __init__(self, seconds_per_item: float) -> None:
        super().__init__()
        self.seconds_per_item = seconds_per_item
        self.spans: list[tuple[list[int], float, float]] = []  # (items, started, ended) of every call

    def __call__(self, items):
        self.delay = self.seconds_per_item * len(items)
        started = time.monotonic()
        try:
            return super().__call__(items)
        finally:
            self.spans.append((list(items), started, time.monotonic()))


def make_queue(model, **kwargs):
    options = dict(max_batch_size=8, max_delay_s=0.02, max_queue_size=64, metrics=ServiceMetrics())
    options.update(kwargs)
    return BatchingQueue("fake", model, **options)


async def test_concurrent_calls_share_model_invocations():
    model = SlowDoubler()
    queue = make_queue(model)
    queue.start()
    results = await asyncio.gather(*(queue.run([i]) for i in range(8)))
    await queue.stop()
    assert results == [[2 * i] for i in range(8)]
    assert len(model.calls) < 8
    assert max(len(c) for c in model.calls) > 1


async def test_one_bad_item_fails_alone():
    model = SlowDoubler(delay=0)
    queue = make_queue(model)
    queue.start()
    results = await queue.run([1, -1, 3])
    await queue.stop()
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], ValueError)


async def test_prepare_errors_stay_with_their_item():
    queue = make_queue(SlowDoubler(delay=0))
    queue.start()

    def prepare(raw):
        if raw == "bad":
            raise InvalidArgument("item is bad")
        return int(raw)

    results = await queue.run_each(["1", "bad", "5"], prepare)
    await queue.stop()
    assert results[0] == 2 and results[2] == 10
    assert isinstance(results[1], InvalidArgument)


async def test_full_queue_refuses_the_whole_call():
    model = SlowDoubler()
    model.release.clear()  # hold the worker so the queue fills
    queue = make_queue(model, max_batch_size=1, max_queue_size=3)
    queue.start()
    first = asyncio.ensure_future(queue.run([1]))
    assert await asyncio.to_thread(model.entered.wait, 5)  # the worker took item 1 and is blocked in the model
    waiting = asyncio.ensure_future(queue.run([2, 3, 4]))
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted, match="queue is full"):
        queue.submit_many([5])
    model.release.set()
    assert await first == [2] and await waiting == [4, 6, 8]
    await queue.stop()


async def test_cancelled_items_are_not_executed():
    model = SlowDoubler()
    model.release.clear()
    queue = make_queue(model, max_batch_size=1)
    queue.start()
    blocker = asyncio.ensure_future(queue.run([1]))
    assert await asyncio.to_thread(model.entered.wait, 5)
    cancelled = asyncio.ensure_future(queue.run([100, 101]))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    model.release.set()
    assert await blocker == [2]
    assert await queue.run([7]) == [14]
    await queue.stop()
    executed = [i for call in model.calls for i in call]
    assert 100 not in executed and 101 not in executed


async def test_queue_that_is_not_started_is_unavailable():
    with pytest.raises(Unavailable, match="warming up"):
        make_queue(SlowDoubler()).submit_many([1])


async def test_without_cross_call_batching_each_batch_holds_one_call():
    model = SlowDoubler(delay=0.01)
    queue = make_queue(model, across_calls=False)
    queue.start()
    results = await asyncio.gather(*(queue.run([i, i + 100]) for i in range(6)))
    await queue.stop()
    assert results == [[2 * i, 2 * (i + 100)] for i in range(6)]
    assert sorted(model.calls) == [[i, i + 100] for i in range(6)]  # never mixed


async def test_items_are_taken_earliest_deadline_first():
    """A long job's items queued first still wait behind a live frame's: the queue is ordered by deadline."""
    model = SlowDoubler(delay=0)
    queue = make_queue(model, max_batch_size=4)
    await live_item_behind_a_long_job(model, queue, list(range(100, 112)))
    assert model.calls[1][0] == 7, model.calls  # the first batch after the blocker starts with the live item


async def test_while_urgent_items_come_batches_are_cut_to_a_share_of_their_slack():
    """A batch on the model cannot be pre-empted: with 0.2 s of slack and 50 ms per item, a full batch of 32
    would make every live frame late; while urgent items keep coming, batches hold at most 1 item
    (0.2 s x URGENT_SHARE / 0.05 s)."""
    from service_runtime import batching

    model = PerItemDoubler(0.05)
    queue = make_queue(model, max_batch_size=32, max_queue_size=256)
    queue.start()
    await queue.run(list(range(8)), time.monotonic() + 600)  # measures the model's time per item
    assert len(model.calls[-1]) == 8
    await queue.run([1], time.monotonic() + 0.2)
    bulk = asyncio.ensure_future(queue.run(list(range(16)), time.monotonic() + 600))
    await asyncio.sleep(0.3)
    cut = [len(c) for c in model.calls[2:]]
    assert cut and max(cut) <= int(0.2 * batching.URGENT_SHARE / 0.05) + 1, cut
    await bulk
    await queue.stop()


async def test_a_queue_full_of_long_jobs_still_takes_an_urgent_item():
    model = SlowDoubler(delay=0)
    queue = make_queue(model, max_batch_size=4, max_queue_size=8)

    def another_long_item_is_refused():
        with pytest.raises(ResourceExhausted):
            queue.submit_many([1], time.monotonic() + 600)

    await live_item_behind_a_long_job(model, queue, list(range(8)), another_long_item_is_refused)


async def live_item_behind_a_long_job(model, queue, bulk_items, before_live=lambda: None):
    """A blocker on the model, a long job's items queued, then a live item; the model released: the live item
    gets its answer (and the queue is stopped)."""
    model.release.clear()
    queue.start()
    blocker = asyncio.ensure_future(queue.run([0]))  # occupies the model while the rest queue up
    await asyncio.to_thread(model.entered.wait, 5)
    bulk = asyncio.ensure_future(queue.run(bulk_items, time.monotonic() + 600))
    await asyncio.sleep(0)
    before_live()
    live = asyncio.ensure_future(queue.run([7], time.monotonic() + 0.5))
    await asyncio.sleep(0)
    model.release.set()
    assert await live == [14]
    await asyncio.gather(blocker, bulk)
    await queue.stop()


async def test_while_live_frames_stream_in_a_long_jobs_items_wait_for_the_gaps():
    """Urgent items every 350 ms on a model costing 200 ms an item: a job's item started between them would hold
    the next one, so the job's items wait until the urgent stream pauses, then all complete. Judged by when the
    model ran each item, not by how long the urgent calls took, so that a loaded machine's slower thread wake-ups
    do not count as a job item's delay (the cadence leaves 175 ms of slack before the queue stops holding)."""
    model = PerItemDoubler(0.2)
    queue = make_queue(model, max_batch_size=8, max_queue_size=256)
    queue.start()
    await queue.run([0], time.monotonic() + 600)  # measures the model
    job = asyncio.ensure_future(queue.run(list(range(100, 106)), time.monotonic() + 600))
    submitted = []
    for _ in range(8):
        submitted.append(time.monotonic())
        await queue.run([1], time.monotonic() + 1.0)
        await asyncio.sleep(max(0.0, 0.35 - (time.monotonic() - submitted[-1])))
    assert await job == [2 * i for i in range(100, 106)]
    await queue.stop()
    urgent_runs = [started for items, started, _ in model.spans if items == [1]]
    job_runs = [(started, ended) for items, started, ended in model.spans if min(items) >= 100]
    assert len(urgent_runs) == 8 and job_runs
    for arrived, ran in list(zip(submitted, urgent_runs))[2:]:  # once the stream is known
        ahead = [span for span in job_runs if span[0] < ran and span[1] > arrived]
        assert not ahead, f"a job item was on the model between an urgent item's arrival and its run: {ahead}"
