"""Per-tenant quotas (requests per minute, generations running at once, jobs queued), counted across replicas in
Redis when it is configured, else in this process; past one, the caller gets RESOURCE_EXHAUSTED naming it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

from service_runtime.errors import ResourceExhausted

from .redis_calls import REDIS_FAILURES, bounded
from .tenants import ANONYMOUS, NO_LIMIT, Tenant, TenantRegistry, tenant_folder

log = logging.getLogger(__name__)

WINDOW_S = 60  # requests_per_minute counts calls in each clock minute
SLOT_LEASE_S = 30.0  # a running generation's slot lapses this long after its replica stops renewing it
MEMORY_WINDOWS_KEPT = 4

# Take a running-generation slot when fewer than the quota are held; lapsed slots (a dead replica's) are dropped.
_TAKE_SLOT = """redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4]) redis.call('PEXPIRE', KEYS[1], ARGV[5]) return 1"""


SLOT_KEYS = {"running_generations": "running", "live_sessions": "live"}  # the Redis key of each quota's slots


class QuotaExceeded(ResourceExhausted):
    """A tenant's quota is reached (a ResourceExhausted the job runner tells from the store's)."""


def quota_exceeded(tenant: Tenant, quota: str, value: int, doing: str, retry_after_s: float | None) -> QuotaExceeded:
    retry = f"; retry in {retry_after_s:.0f} s" if retry_after_s else ""
    return QuotaExceeded(f"tenant {tenant.name} has reached its {quota} quota of {value} ({doing}){retry}",
                             retry_after_s=retry_after_s)


class StoredBytes(Protocol):
    async def __call__(self, tenant: str) -> int:
        """The bytes the tenant keeps on the data volume now."""


async def nothing_stored(tenant: str) -> int:
    return 0


class TenantQuotas:
    def __init__(self, redis=None, timeout_s: float = 0.5, slot_lease_s: float = SLOT_LEASE_S,
                 stored_bytes: StoredBytes = nothing_stored) -> None:
        self.redis, self.timeout_s, self.slot_lease_s = redis, timeout_s, slot_lease_s
        self.stored_bytes = stored_bytes
        self._take_slot = redis.register_script(_TAKE_SLOT) if redis is not None else None
        self._minute_counts: dict[tuple[str, int], int] = {}
        self._running: dict[tuple[str, str], int] = {}  # (quota, tenant): slots held in this process alone

    async def _redis(self, call):
        return await bounded(call, self.timeout_s, "the quota counters")

    async def admit_request(self, tenant: Tenant) -> None:
        """Counts one call against requests_per_minute; refuses it past the quota."""
        quota = tenant.quotas.requests_per_minute
        if quota >= NO_LIMIT:
            return
        now = time.time()
        window = int(now // WINDOW_S)
        count = await self._shared_minute_count(tenant, window) if self.redis is not None else None
        if count is None:
            count = self._minute_counts.get((tenant.name, window), 0) + 1
            self._minute_counts[(tenant.name, window)] = count
            for old in [k for k in self._minute_counts if k[1] < window - MEMORY_WINDOWS_KEPT]:
                del self._minute_counts[old]
        if count > quota:
            raise quota_exceeded(tenant, "requests_per_minute", quota, "calls in this minute",
                                 max(1.0, (window + 1) * WINDOW_S - now))

    async def _shared_minute_count(self, tenant: Tenant, window: int) -> int | None:
        """This minute's calls on every replica, counting this one; None when Redis does not answer: the count
        is then this process's own (quotas hold per replica while Redis is down, and calls go on)."""
        key = f"swl:quota:rpm:{tenant.name}:{window}"
        try:
            count = await self._redis(self.redis.incr(key))
            if count == 1:
                await self._redis(self.redis.expire(key, 2 * WINDOW_S))
        except REDIS_FAILURES:
            return None
        return int(count)

    def generation(self, tenant: Tenant) -> contextlib.AbstractAsyncContextManager[None]:
        """Holds one of the tenant's running_generations while the block runs; refuses at once when none is free.
        While Redis does not answer, the slot is counted in this process alone, so generation goes on."""
        return self._held(tenant, "running_generations", "generations running at once")

    def live_session(self, tenant: Tenant) -> contextlib.AbstractAsyncContextManager[None]:
        """Holds one of the tenant's live_sessions, as `generation` does."""
        return self._held(tenant, "live_sessions", "live sessions open at once")

    @contextlib.asynccontextmanager
    async def _held(self, tenant: Tenant, name: str, doing: str) -> AsyncIterator[None]:
        quota = getattr(tenant.quotas, name)
        if quota >= NO_LIMIT:
            yield
            return
        key, token = f"swl:quota:{SLOT_KEYS[name]}:{tenant.name}", secrets.token_hex(8)
        shared: bool | None = None  # None: counted here alone (no Redis, or it does not answer)
        if self.redis is not None:
            with contextlib.suppress(*REDIS_FAILURES):
                shared = await self._take(key, token, quota)
        if shared is False:
            raise quota_exceeded(tenant, name, quota, f"{doing}, on every replica", 2.0)
        if not shared:
            held = (name, tenant.name)
            if self._running.get(held, 0) >= quota:
                raise quota_exceeded(tenant, name, quota, doing, 2.0)
            self._running[held] = self._running.get(held, 0) + 1
            try:
                yield
            finally:
                self._running[held] -= 1
            return
        renewal = asyncio.create_task(self._renew(key, token), name=f"quota-slot-{tenant.name}")
        try:
            yield
        finally:
            renewal.cancel()
            with contextlib.suppress(*REDIS_FAILURES):  # unreleased, the slot lapses with its lease
                await self._redis(self.redis.zrem(key, token))

    async def _take(self, key: str, token: str, quota: int) -> bool:
        now = time.time()
        lease_ms = int(self.slot_lease_s * 1000)
        assert self._take_slot is not None
        return bool(await self._redis(self._take_slot(keys=[key], args=[now, now + self.slot_lease_s, quota, token,
                                                                         2 * lease_ms])))

    async def _renew(self, key: str, token: str) -> None:
        """Keeps a held slot alive; a failure only shortens it (the lease lapses), so it is logged, never raised."""
        while True:
            await asyncio.sleep(self.slot_lease_s / 3)
            try:
                await self._redis(self.redis.zadd(key, {token: time.time() + self.slot_lease_s}, xx=True))
            except Exception:  # noqa: BLE001 - logged; the next renewal tries again
                log.exception("quota slot not renewed", extra={"key": key})

    def check_queued(self, tenant: Tenant, queued: int) -> None:
        """Refuses a job submission when the tenant already has its queued_jobs waiting."""
        quota = tenant.quotas.queued_jobs
        if queued >= quota:
            raise quota_exceeded(tenant, "queued_jobs", quota, "jobs submitted and not yet started", 5.0)


def quota_holder(tenants: TenantRegistry, name: str) -> Tenant:
    """The tenant whose quotas a stored job counts against: as configured now; one removed from the tenants file
    since keeps the default quotas, so its jobs still end."""
    if name == ANONYMOUS.name:
        return ANONYMOUS
    return tenants.tenant(name) or Tenant(name, ())


async def check_stored(quotas: TenantQuotas, tenant: Tenant, adding: int) -> None:
    """Refuses a write of `adding` bytes that would take the tenant past its stored_bytes quota."""
    quota = tenant.quotas.stored_bytes
    if quota >= NO_LIMIT:
        return
    held = await quotas.stored_bytes(tenant.name)
    if held + adding > quota:
        raise quota_exceeded(tenant, "stored_bytes", quota, f"{held} bytes of uploads, avatars and job results kept, "
                             f"{adding} more sent; delete avatars or jobs, or wait for uploads and results to expire",
                             None)


def folder_bytes(folder: Path) -> int:
    """The size of every file under `folder` (0 when it is gone, as another replica may remove it meanwhile)."""
    total = 0
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for entry in entries:
        try:
            total += folder_bytes(Path(entry.path)) if entry.is_dir(follow_symlinks=False) else entry.stat().st_size
        except FileNotFoundError:
            continue
    return total


class DataVolumeUsage:
    """What a tenant keeps on the shared data volume: its avatars' and uploads' folders, and its jobs' folders
    (inputs and results), measured when asked: stored_bytes is checked only before a write."""

    def __init__(self, avatars_root: Path, uploads_root: Path, job_folder: Callable[[str], Path],
                 job_ids: Callable[[str], Awaitable[list[str]]]) -> None:
        self.avatars_root, self.uploads_root, self.job_folder, self.job_ids = (avatars_root, uploads_root, job_folder,
                                                                               job_ids)

    async def __call__(self, tenant: str) -> int:
        ids = await self.job_ids(tenant)
        return await asyncio.to_thread(lambda: folder_bytes(tenant_folder(self.avatars_root, tenant))
                                       + folder_bytes(tenant_folder(self.uploads_root, tenant))
                                       + sum(folder_bytes(self.job_folder(i)) for i in ids))
