"""Dynamic batching across gRPC calls on a real in-process lip-sync service with a slow fake model.

The fake replaces only the model's batch function (a real slow GPU cannot run here); the server, the
queue, the wire format and the metrics are the real ones."""

import asyncio
import threading

import grpc
import numpy as np
import pytest
from superwav2lip.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc

from services.lipsync.service import LipSyncService, LipSyncSettings

from tests.support.inprocess import local_settings, started

RNG = np.random.default_rng(5)


def item(valid=True):
    face = RNG.integers(0, 256, (96, 96, 3), dtype=np.uint8).tobytes()
    return lipsync_pb2.LipSyncItem(face=face if valid else face[:10], mel=np.zeros((80, 16), "<f4").tobytes())


class SlowModel:
    """Wraps the real generator's batch function: sleeps per call and records batch sizes and items."""

    def __init__(self, real, delay=0.1):
        self.real, self.delay = real, delay
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set once the model has started on a batch

    def __call__(self, items):
        self.entered.set()
        self.gate.wait(10)
        threading.Event().wait(self.delay)
        self.batches.append(len(items))
        return self.real(items)


async def service_with_slow_model(models_dir, **overrides):
    service = LipSyncService(local_settings(LipSyncSettings, models_dir, **overrides))
    slow = SlowModel(service.generator.run_batch)
    service.queues[service.settings.model]._run_batch = slow
    return service, slow


def batch_histogram(service):
    samples = {s.name: s.value for m in service.metrics.batch_size.collect() for s in m.samples}
    return samples["swl_batch_size_count"], samples["swl_batch_size_sum"]


@pytest.mark.parametrize("across_calls", [True, False])
async def test_eight_concurrent_calls_share_model_invocations(dev_models_dir, across_calls):
    service, slow = await service_with_slow_model(dev_models_dir, batch_across_calls=across_calls,
                                                  max_batch_delay_ms=50.0)
    async with started(service) as (_, channel):
        stub = lipsync_pb2_grpc.LipSyncStub(channel)
        replies = await asyncio.gather(*(stub.Generate(lipsync_pb2.GenerateRequest(items=[item()]))
                                         for _ in range(8)))
    assert all(len(r.results[0].face) == 96 * 96 * 3 for r in replies)
    calls, items = batch_histogram(service)
    assert items == 8
    if across_calls:
        assert calls < 8 and max(slow.batches) > 1
    else:
        assert calls == 8 and max(slow.batches) == 1  # the seed: one call at a time


async def test_per_item_errors_stay_per_item_across_calls(dev_models_dir):
    service, _ = await service_with_slow_model(dev_models_dir)
    async with started(service) as (_, channel):
        stub = lipsync_pb2_grpc.LipSyncStub(channel)
        good, mixed = await asyncio.gather(stub.Generate(lipsync_pb2.GenerateRequest(items=[item(), item()])),
                                           stub.Generate(lipsync_pb2.GenerateRequest(items=[item(False), item()])))
    assert all(r.face for r in good.results)
    assert mixed.results[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and mixed.results[1].face


async def test_cancelled_call_items_are_not_executed(dev_models_dir):
    service, slow = await service_with_slow_model(dev_models_dir, max_batch_size=1)
    async with started(service) as (_, channel):
        stub = lipsync_pb2_grpc.LipSyncStub(channel)
        slow.gate.clear()  # the model is busy with the first call
        first = asyncio.ensure_future(stub.Generate(lipsync_pb2.GenerateRequest(items=[item()])))
        assert await asyncio.to_thread(slow.entered.wait, 10)
        doomed = stub.Generate(lipsync_pb2.GenerateRequest(items=[item() for _ in range(5)]))
        queue = service.queues[service.settings.model]
        while queue.waiting < 5:  # the doomed items are queued
            await asyncio.sleep(0.01)
        doomed.cancel()
        while queue.waiting:  # the server has seen the cancellation
            await asyncio.sleep(0.01)
        slow.gate.set()
        await first
        after = await stub.Generate(lipsync_pb2.GenerateRequest(items=[item()]))
    assert after.results[0].face
    assert sum(slow.batches) == 2  # the first call and the last; none of the cancelled five


async def test_full_queue_is_resource_exhausted_with_a_retry_hint(dev_models_dir):
    service, slow = await service_with_slow_model(dev_models_dir, max_batch_size=1, max_queue_size=4)
    async with started(service) as (_, channel):
        stub = lipsync_pb2_grpc.LipSyncStub(channel)
        slow.gate.clear()
        busy = asyncio.ensure_future(stub.Generate(lipsync_pb2.GenerateRequest(items=[item() for _ in range(4)])))
        assert await asyncio.to_thread(slow.entered.wait, 10)
        while service.queues[service.settings.model].depth < 3:  # one item in the model, three waiting
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Generate(lipsync_pb2.GenerateRequest(items=[item(), item()]))
        slow.gate.set()
        await busy
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry after a short back-off" in error.value.details()
