"""Job records and the job queue: in this process, or in Redis so that every replica shares them.

A job's inputs and result live in `<data_dir>/jobs/<id>/` (a shared volume); its record (state, progress,
error, attempts) and the FIFO live here. A replica that takes a job holds a lease it renews; a job whose
lease lapsed (its replica died) goes back to the front of the queue, or fails after too many attempts."""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields

from superwav2lip.gateway.v1 import gateway_pb2

from service_runtime.errors import InvalidArgument, ResourceExhausted

from .redis_calls import bounded
from .limits import setting_name

JOB_ID = re.compile(r"job_[0-9a-f]{24}")
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
QUEUE, RUNNING, INDEX = "swl:jobs:queue", "swl:jobs:running", "swl:jobs"
log = logging.getLogger(__name__)


def tenant_index(tenant: str) -> str:
    """The sorted set of one tenant's jobs by creation time (INDEX holds every tenant's, for housekeeping)."""
    return f"{INDEX}:by-tenant:{tenant}"


def check_job_id(job_id: str) -> str:
    if not JOB_ID.fullmatch(job_id):
        raise InvalidArgument(f"job_id {job_id[:40]!r} is not a job id (job_ and 24 hex digits)")
    return job_id


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


@dataclass
class JobRecord:
    job_id: str
    state: str = "QUEUED"
    created: float = field(default_factory=time.time)
    started: float = 0.0
    finished: float = 0.0
    attempts: int = 0
    stage: str = ""
    done: int = 0
    total: int = 0
    error_code: int = 0
    error_status: str = ""
    error_message: str = ""
    result: dict = field(default_factory=dict)  # ResultInfo fields
    webhook_url: str = ""
    owner: str = ""  # the replica running it
    tenant: str = ""  # who submitted it: only that tenant sees it

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> "JobRecord":
        """The record stored as `data`; UnreadableRecord when it cannot be one (Redis is shared, and a record that
        cannot be shown must fail here, by name, not later as an INTERNAL). Fields this version does not know are
        left out, not refused: a newer replica's records stay readable during a rolling upgrade."""
        try:
            stored = json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise UnreadableRecord(f"not JSON ({error})") from None
        if not isinstance(stored, dict):
            raise UnreadableRecord(f"a JSON {type(stored).__name__}, not an object")
        unknown = sorted(name[:40] for name in stored if name not in RECORD_FIELD_TYPES)
        if unknown:
            log.info("job record fields not known to this version; left out", extra={"fields": unknown[:5]})
        known = {name: value for name, value in stored.items() if name in RECORD_FIELD_TYPES}
        for name, value in known.items():
            if isinstance(value, bool) or not isinstance(value, RECORD_FIELD_TYPES[name]):
                raise UnreadableRecord(f"field {name!r} is a {type(value).__name__}")
        if "job_id" not in known:
            raise UnreadableRecord("no job_id")
        if known.get("state", "QUEUED") not in STATES:
            raise UnreadableRecord(f"unknown state {str(known['state'])[:40]!r}")
        record = cls(**known)
        try:  # what every reader builds from it: numbers within their protobuf types, strings that encode
            record.message()
        except (TypeError, ValueError, OverflowError, UnicodeEncodeError) as error:
            raise UnreadableRecord(f"it is no Job message ({type(error).__name__}: {str(error)[:80]})") from None
        return record

    def message(self, queue_position: int = 0) -> gateway_pb2.Job:
        return gateway_pb2.Job(
            job_id=self.job_id, state=gateway_pb2.Job.State.Value(self.state),
            progress=gateway_pb2.Progress(stage=self.stage, done=self.done, total=self.total),
            queue_position=queue_position, created_unix=self.created, started_unix=self.started,
            finished_unix=self.finished, error_code=self.error_code, error_status=self.error_status,
            error_message=self.error_message, attempts=self.attempts, result=gateway_pb2.ResultInfo(**self.result),
            video_path=f"/v1/jobs/{self.job_id}/video" if self.state == "SUCCEEDED" else "")

    def fail(self, code: int, status: str, message: str) -> None:
        self.state, self.finished = "FAILED", time.time()
        self.error_code, self.error_status, self.error_message = code, status, message


class UnreadableRecord(ValueError):
    """Stored bytes that are no job record (altered or corrupted in Redis)."""


_STORED_AS: dict[str, type | tuple[type, ...]] = {"str": str, "float": (int, float), "int": int, "dict": dict}
RECORD_FIELD_TYPES = {f.name: _STORED_AS[str(f.type)] for f in fields(JobRecord)}  # annotations are strings here
STATES = set(gateway_pb2.Job.State.keys()) - {"STATE_UNSPECIFIED"}


class MemoryJobStore:
    """Records and queue in this process: jobs are lost with it (configure Redis to share and keep them)."""

    def __init__(self, max_queue: int, result_ttl_s: float) -> None:
        self.max_queue, self.result_ttl_s = max_queue, result_ttl_s
        self._records: OrderedDict[str, JobRecord] = OrderedDict()
        self._queue: list[str] = []
        self._leases: dict[str, float] = {}
        self._cancels: set[str] = set()

    async def request_cancel(self, job_id: str) -> None:
        self._cancels.add(job_id)

    async def cancel_requested(self, job_id: str) -> bool:
        return job_id in self._cancels

    async def enqueue(self, record: JobRecord) -> None:
        if len(self._queue) >= self.max_queue:
            raise queue_full(self.max_queue)
        self._records[record.job_id] = record
        self._queue.append(record.job_id)

    async def claim(self, owner: str, lease_s: float) -> str | None:
        if not self._queue:
            return None
        job_id = self._queue.pop(0)
        self._leases[job_id] = time.monotonic() + lease_s
        return job_id

    async def renew(self, job_id: str, lease_s: float) -> None:
        self._leases[job_id] = time.monotonic() + lease_s

    async def release(self, job_id: str) -> None:
        self._leases.pop(job_id, None)

    async def expired_leases(self) -> list[str]:
        now = time.monotonic()
        expired = [job_id for job_id, until in self._leases.items() if until < now]
        for job_id in expired:
            del self._leases[job_id]
        return expired

    async def requeue_front(self, job_id: str) -> None:
        self._queue.insert(0, job_id)

    async def requeue_back(self, job_id: str) -> None:
        self._queue.append(job_id)

    async def save(self, record: JobRecord) -> None:
        self._records[record.job_id] = JobRecord(**asdict(record))  # a copy: later changes need another save

    async def finish(self, record: JobRecord) -> None:
        """Saves a finished job's record and releases its lease, together."""
        await self.save(record)
        await self.release(record.job_id)

    async def load(self, job_id: str) -> JobRecord | None:
        record = self._records.get(job_id)
        if record is not None and record.state in TERMINAL and record.finished + self.result_ttl_s < time.time():
            return None
        return None if record is None else JobRecord(**asdict(record))  # a copy, as Redis would give

    async def position(self, job_id: str) -> int:
        return self._queue.index(job_id) + 1 if job_id in self._queue else 0

    async def unqueue(self, job_id: str) -> bool:
        if job_id in self._queue:
            self._queue.remove(job_id)
            return True
        return False

    async def job_ids(self, tenant: str) -> list[str]:
        """Every job of the tenant the store still holds."""
        return [job_id for job_id, record in self._records.items() if record.tenant == tenant]

    async def queued(self, tenant: str) -> int:
        """The tenant's jobs waiting in the queue."""
        return sum(1 for job_id in self._queue if self._records[job_id].tenant == tenant)

    async def recent(self, tenant: str, start: int, count: int) -> list[JobRecord]:
        ids = [job_id for job_id in reversed(self._records) if self._records[job_id].tenant == tenant]
        return [r for r in [await self.load(i) for i in ids[start : start + count]] if r is not None]

    async def delete(self, record: JobRecord) -> None:
        self._records.pop(record.job_id, None)
        await self.unqueue(record.job_id)

    async def known(self) -> set[str]:
        return {job_id for job_id in self._records if await self.load(job_id) is not None}


# Atomic steps as Redis scripts, so that two replicas never take or requeue the same job.
_ENQUEUE = """if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1]) return 1"""
_CLAIM = """local id = redis.call('LPOP', KEYS[1])
if id then redis.call('SADD', KEYS[2], id) redis.call('SET', 'swl:job:' .. id .. ':lease', ARGV[1], 'PX', ARGV[2]) end
return id"""


class RedisJobStore:
    """Records, queue and leases in Redis, shared by every replica; a restart loses no queued job."""

    def __init__(self, client, max_queue: int, result_ttl_s: float, timeout_s: float) -> None:
        self.client, self.max_queue, self.result_ttl_s, self.timeout_s = client, max_queue, result_ttl_s, timeout_s
        self._enqueue = client.register_script(_ENQUEUE)
        self._claim = client.register_script(_CLAIM)

    async def request_cancel(self, job_id: str) -> None:
        """A flag of its own, so that the running replica's progress writes never overwrite it."""
        await self._call(self.client.set(f"swl:job:{job_id}:cancel", 1, px=int(self.result_ttl_s * 1000)))

    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self._call(self.client.exists(f"swl:job:{job_id}:cancel")))

    async def _call(self, call):
        return await bounded(call, self.timeout_s * 4, "the job store")

    async def enqueue(self, record: JobRecord) -> None:
        await self.save(record)
        await self._call(self.client.zadd(INDEX, {record.job_id: record.created}))
        await self._call(self.client.zadd(tenant_index(record.tenant), {record.job_id: record.created}))
        if not await self._call(self._enqueue(keys=[QUEUE], args=[record.job_id, self.max_queue])):
            await self.delete(record)
            raise queue_full(self.max_queue)

    async def claim(self, owner: str, lease_s: float) -> str | None:
        raw = await self._call(self._claim(keys=[QUEUE, RUNNING], args=[owner, int(lease_s * 1000)]))
        if not raw:
            return None
        job_id = raw.decode(errors="replace")
        if not JOB_ID.fullmatch(job_id):  # put there by someone else: removed by its own bytes, never run
            log.warning("not a job id in the job queue; dropped", extra={"job_id": job_id[:64]})
            await self._call(self.client.srem(RUNNING, raw))
            await self._call(self.client.delete(b"swl:job:" + raw + b":lease"))
            return None
        return job_id

    async def renew(self, job_id: str, lease_s: float) -> None:
        await self._call(self.client.pexpire(f"swl:job:{job_id}:lease", int(lease_s * 1000)))

    async def release(self, job_id: str) -> None:
        await self._call(self.client.srem(RUNNING, job_id))
        await self._call(self.client.delete(f"swl:job:{job_id}:lease"))

    async def expired_leases(self) -> list[str]:
        """Running jobs whose lease lapsed; each is returned to exactly one caller (SREM decides)."""
        expired = []
        for raw in await self._call(self.client.smembers(RUNNING)):
            job_id = raw.decode(errors="replace")
            if not JOB_ID.fullmatch(job_id):
                log.warning("not a job id among running jobs; dropped", extra={"job_id": job_id[:64]})
                await self._call(self.client.srem(RUNNING, raw))
                continue
            if not await self._call(self.client.exists(f"swl:job:{job_id}:lease")):
                if await self._call(self.client.srem(RUNNING, job_id)):
                    expired.append(job_id)
        return expired

    async def requeue_front(self, job_id: str) -> None:
        await self._call(self.client.lpush(QUEUE, job_id))

    async def requeue_back(self, job_id: str) -> None:
        await self._call(self.client.rpush(QUEUE, job_id))

    async def save(self, record: JobRecord) -> None:
        ttl = int(self.result_ttl_s * 1000) if record.state in TERMINAL else None
        await self._call(self.client.set(f"swl:job:{record.job_id}", record.to_json(), px=ttl))

    async def finish(self, record: JobRecord) -> None:
        """Saves a finished job's record and releases its lease in one MULTI/EXEC: both happen or neither, so
        no record says RUNNING once its lease is gone, and no lease outlives a finished record."""
        async def transaction():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(f"swl:job:{record.job_id}", record.to_json(), px=int(self.result_ttl_s * 1000))
                pipe.srem(RUNNING, record.job_id)
                pipe.delete(f"swl:job:{record.job_id}:lease")
                await pipe.execute()

        await self._call(transaction())

    async def load(self, job_id: str) -> JobRecord | None:
        """The record stored under a job id. Redis is not trusted with identities: an id from the queue or an
        index that is no job id names no record, and the key, not the record's own `job_id`, says whose it is."""
        if not JOB_ID.fullmatch(job_id):
            log.warning("not a job id in the job store; ignored", extra={"job_id": job_id[:64]})
            return None
        data = await self._call(self.client.get(f"swl:job:{job_id}"))
        if data is None:
            return None
        try:
            record = JobRecord.from_json(data)
        except UnreadableRecord as error:  # shown as no job at all: whose it was cannot be told
            log.error("unreadable job record; treated as none", extra={"job_id": job_id, "error": str(error)})
            # It expires as a finished job's would, and housekeeping then removes its folder with it.
            await self._call(self.client.expire(f"swl:job:{job_id}", max(1, int(self.result_ttl_s)), nx=True))
            return None
        if record.job_id != job_id:
            log.warning("job record names another job; its key's id is used",
                        extra={"job_id": job_id, "claimed": str(record.job_id)[:64]})
            record.job_id = job_id
        return record

    async def position(self, job_id: str) -> int:
        index = await self._call(self.client.lpos(QUEUE, job_id))
        return 0 if index is None else index + 1

    async def unqueue(self, job_id: str) -> bool:
        return bool(await self._call(self.client.lrem(QUEUE, 0, job_id)))

    async def job_ids(self, tenant: str) -> list[str]:
        """Every job of the tenant in its index (expired ones until a listing drops them; their folders are gone).
        Members that are no job id (the index is in Redis, which is not trusted with paths) are left out."""
        ids = _as_text(await self._call(self.client.zrange(tenant_index(tenant), 0, -1)))
        hostile = [i for i in ids if not JOB_ID.fullmatch(i)]
        if hostile:
            log.warning("not a job id in a tenant's job index; ignored", extra={"tenant": tenant,
                                                                                "job_id": hostile[0][:64]})
        return [i for i in ids if JOB_ID.fullmatch(i)]

    async def queued(self, tenant: str) -> int:
        """The tenant's jobs waiting in the queue: one read of the queue and one of its records (the queue is
        bounded by SWL_GATEWAY_JOB_QUEUE_SIZE)."""
        ids = _as_text(await self._call(self.client.lrange(QUEUE, 0, -1)))
        records = await self._call(self.client.mget([f"swl:job:{i}" for i in ids])) if ids else []
        return sum(1 for data in records if data is not None and _tenant_of(data) == tenant)

    async def recent(self, tenant: str, start: int, count: int) -> list[JobRecord]:
        index = tenant_index(tenant)
        ids = _as_text(await self._call(self.client.zrevrange(index, start, start + count - 1)))
        records = [await self.load(i) for i in ids]
        for job_id, record in zip(ids, records):
            if record is None:  # expired: drop it from the indexes too
                await self._call(self.client.zrem(index, job_id))
                await self._call(self.client.zrem(INDEX, job_id))
        return [r for r in records if r is not None]

    async def delete(self, record: JobRecord) -> None:
        await self._call(self.client.delete(f"swl:job:{record.job_id}"))
        await self._call(self.client.zrem(INDEX, record.job_id))
        await self._call(self.client.zrem(tenant_index(record.tenant), record.job_id))
        await self.unqueue(record.job_id)

    async def known(self) -> set[str]:
        ids = _as_text(await self._call(self.client.zrange(INDEX, 0, -1)))
        exists = [await self._call(self.client.exists(f"swl:job:{i}")) for i in ids]
        return {i for i, e in zip(ids, exists) if e}


def _as_text(members: list[bytes]) -> list[str]:
    """Redis members as text; bytes that are not UTF-8 (anyone may write there) become U+FFFD, never an error."""
    return [member.decode(errors="replace") for member in members]


def _tenant_of(data: bytes) -> str | None:
    try:
        return JobRecord.from_json(data).tenant
    except UnreadableRecord:
        return None


JobStore = MemoryJobStore | RedisJobStore  # the same methods: one process's, or shared through Redis


def queue_full(size: int) -> ResourceExhausted:
    return ResourceExhausted(f"the job queue is full ({size} jobs waiting, {setting_name('job_queue_size')}); "
                             "retry later", retry_after_s=5.0)
