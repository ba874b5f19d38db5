"""The cache of face plans by content: in-process LRU by default, Redis (shared by replicas) when configured.

A cache must never fail a job: a Redis that is down or slow is logged, counted and bypassed (the job plans
afresh), and every Redis call is bounded by a timeout."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from typing import Protocol

import redis.asyncio

from .metrics import GatewayMetrics
from .options import PLANNING_FIELDS, JobOptions

log = logging.getLogger(__name__)


def plan_key(face_sha256: str, detector_fingerprint: str, detection_encoding: str, options: JobOptions,
             frames_cap: int) -> str:
    """Everything a plan depends on: the face media, the detector's weights, how frames travel to it, the
    planning options (the reference photo by hash) and how many frames are planned at most."""
    planning = {name: getattr(options, name) for name in PLANNING_FIELDS}
    planning["reference_face"] = hashlib.sha256(options.reference_face).hexdigest() if options.reference_face else ""
    text = json.dumps({"face": face_sha256, "detector": detector_fingerprint, "encoding": detection_encoding,
                       "frames_cap": frames_cap, **planning}, sort_keys=True, default=list)
    return "swl:plan:" + hashlib.sha256(text.encode()).hexdigest()


def redis_client(url: str, timeout_s: float) -> redis.asyncio.Redis:
    """A client object only: connections open on first use, inside the event loop; connecting and each call are
    bounded by `timeout_s`."""
    return redis.asyncio.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


class PlanCache(Protocol):
    backend: str

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes) -> None: ...


class MemoryPlanCache:
    """Least recently used plans within a byte budget, in this process only."""

    backend = "memory"

    def __init__(self, max_bytes: int, metrics: GatewayMetrics) -> None:
        self.max_bytes, self.metrics = max_bytes, metrics
        self._plans: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    async def get(self, key: str) -> bytes | None:
        value = self._plans.get(key)
        if value is not None:
            self._plans.move_to_end(key)
        self.metrics.plan_cache_lookups.labels(self.backend, "hit" if value is not None else "miss").inc()
        return value

    async def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        if key in self._plans:
            self._bytes -= len(self._plans.pop(key))
        self._plans[key] = value
        self._bytes += len(value)
        while self._bytes > self.max_bytes:
            _, evicted = self._plans.popitem(last=False)
            self._bytes -= len(evicted)


class RedisPlanCache:
    """Plans in Redis with a TTL, shared by every gateway replica; errors and timeouts bypass the cache."""

    backend = "redis"

    def __init__(self, client, ttl_s: float, timeout_s: float, metrics: GatewayMetrics) -> None:
        self.client, self.ttl_s, self.timeout_s, self.metrics = client, ttl_s, timeout_s, metrics

    async def get(self, key: str) -> bytes | None:
        try:
            value = await asyncio.wait_for(self.client.get(key), self.timeout_s)
        except Exception as error:  # noqa: BLE001 - any Redis or network failure: plan afresh
            self._failed("get", error)
            return None
        self.metrics.plan_cache_lookups.labels(self.backend, "hit" if value is not None else "miss").inc()
        return value

    async def put(self, key: str, value: bytes) -> None:
        try:
            await asyncio.wait_for(self.client.set(key, value, px=int(self.ttl_s * 1000)), self.timeout_s)
        except Exception as error:  # noqa: BLE001
            self._failed("set", error)

    def _failed(self, operation: str, error: BaseException) -> None:
        self.metrics.plan_cache_errors.labels(self.backend).inc()
        log.warning("plan cache unavailable; planning afresh",
                    extra={"backend": self.backend, "operation": operation, "error": f"{type(error).__name__}: {error}"})


class TenantPlanCache:
    """One tenant's view of a plan cache: its keys carry the tenant's name, so that whether a face was planned
    before (a hit) says nothing about what other tenants have sent."""

    def __init__(self, cache: PlanCache, tenant: str) -> None:
        self.cache, self.prefix, self.backend = cache, f"{tenant}:", cache.backend

    async def get(self, key: str) -> bytes | None:
        return await self.cache.get(self.prefix + key)

    async def put(self, key: str, value: bytes) -> None:
        await self.cache.put(self.prefix + key, value)
