"""The asynchronous job API (submit, get, download, cancel, list), the jobs' files on the shared volume, and the
ledger that records how each job ended. The workers that run them are in job_runner.py, webhooks in webhooks.py."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from superwav2lip.gateway.v1 import gateway_pb2

from service_runtime.errors import FailedPrecondition, InvalidArgument, NotFound

from .job_store import JOB_ID, TERMINAL, JobRecord, JobStore, check_job_id, new_job_id
from .limits import MediaLimits, setting_name
from .metrics import GatewayMetrics
from .webhooks import WebhookSender

log = logging.getLogger(__name__)

INPUTS = ("face", "audio", "options.pb")  # a job's files as submitted, beside its result.mp4
FINAL_SAVE_BACKOFF_S = (0.2, 5.0)  # first and longest wait between tries of a finished job's save


class JobFiles:
    """`<data_dir>/jobs/<id>/`: face, audio and options.pb as submitted, then result.mp4."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "jobs"

    def folder(self, job_id: str) -> Path:
        """The job's folder. Ids also come back from Redis, which is not trusted with paths: anything but a job id
        (an absolute path, `..`) is refused here, before any path is built from it."""
        if not JOB_ID.fullmatch(job_id):
            raise ValueError(f"{job_id[:40]!r} is not a job id; no folder is named by it")
        return self.root / job_id

    async def write_inputs(self, job_id: str, request: gateway_pb2.SubmitJobRequest) -> None:
        def write() -> None:
            folder = self.folder(job_id)
            folder.mkdir(parents=True)
            for name, data in zip(INPUTS, (request.face, request.audio, request.options.SerializeToString())):
                (folder / name).write_bytes(data)

        await asyncio.to_thread(write)

    async def read_inputs(self, job_id: str) -> tuple[bytes, bytes, gateway_pb2.GenerateOptions]:
        folder = self.folder(job_id)
        return await asyncio.to_thread(
            lambda: ((folder / "face").read_bytes(), (folder / "audio").read_bytes(),
                     gateway_pb2.GenerateOptions.FromString((folder / "options.pb").read_bytes())))

    async def write_result(self, job_id: str, mp4: bytes) -> None:
        await asyncio.to_thread((self.folder(job_id) / "result.mp4").write_bytes, mp4)

    async def remove_inputs(self, job_id: str) -> None:
        """A finished job's face, audio and options: only its video is kept, for its TTL."""
        folder = self.folder(job_id)

        def remove() -> None:
            for name in INPUTS:
                (folder / name).unlink(missing_ok=True)

        await asyncio.to_thread(remove)

    async def read_result(self, job_id: str) -> bytes:
        return await asyncio.to_thread((self.folder(job_id) / "result.mp4").read_bytes)

    async def remove(self, job_id: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self.folder(job_id), True)


class JobLedger:
    """Records a job's end: the terminal record saved with its lease released, its files removed when it has no
    result, the count, and its webhook. A worker, which owns the job, retries the save until the store answers
    (so no record is left RUNNING); a call (DeleteJob) gets the store's UNAVAILABLE at once, as any job call does."""

    def __init__(self, store: JobStore, files: JobFiles, settings, metrics: GatewayMetrics,
                 webhooks: WebhookSender) -> None:
        self.store, self.files, self.settings, self.metrics, self.webhooks = store, files, settings, metrics, webhooks

    async def succeeded(self, record: JobRecord, result: dict) -> None:
        record.state, record.finished, record.result = "SUCCEEDED", time.time(), result
        await self._end(record, "succeeded")
        # Only once the record says SUCCEEDED: a replica dying before that reruns the job from its inputs.
        await self.files.remove_inputs(record.job_id)

    async def failed(self, record: JobRecord, code: int, status: str, message: str) -> None:
        record.fail(code, status, message)
        await self.files.remove(record.job_id)
        await self._end(record, "failed")

    async def cancelled(self, record: JobRecord, until_saved: bool = True) -> None:
        record.state, record.finished = "CANCELLED", time.time()
        await self.files.remove(record.job_id)
        await self._end(record, "cancelled", until_saved)

    async def _end(self, record: JobRecord, event: str, until_saved: bool = True) -> None:
        if until_saved:
            await self._finish_until_saved(record)
        else:
            await self.store.finish(record)
        self.metrics.job_events.labels(event).inc()
        self.webhooks.send(record)

    async def _finish_until_saved(self, record: JobRecord) -> None:
        wait = FINAL_SAVE_BACKOFF_S[0]
        while True:
            try:
                await self.store.finish(record)
                break
            except Exception as error:  # noqa: BLE001 - the store is down (or worse): keep the outcome, retry
                log.warning("a finished job's record could not be saved; retrying",
                            extra={"job_id": record.job_id, "state": record.state, "retry_in_s": wait,
                                   "error": f"{type(error).__name__}: {error}"})
                await asyncio.sleep(wait)
                wait = min(wait * 2, FINAL_SAVE_BACKOFF_S[1])
                try:  # keep the job ours meanwhile, so no replica reruns what is done
                    await self.store.renew(record.job_id, self.settings.job_lease_s)
                except Exception:  # noqa: BLE001 - the same outage; the save above is what matters
                    pass


class Jobs:
    """The job API the servicer calls: each method checks its input and answers from the store and the files."""

    def __init__(self, store: JobStore, files: JobFiles, ledger: JobLedger, settings, metrics: GatewayMetrics,
                 check: Callable[[str, gateway_pb2.GenerateOptions], Awaitable[None]]) -> None:
        self.store, self.files, self.ledger, self.settings, self.metrics = store, files, ledger, settings, metrics
        self.limits = MediaLimits.from_settings(settings)
        self._check = check  # the generation layer's check of options (request id, avatar) at submission

    async def submit(self, tenant: str, request: gateway_pb2.SubmitJobRequest) -> JobRecord:
        await self.ledger.webhooks.check(tenant, request.webhook_url)  # its host resolved and checked too
        await self._check(tenant, request.options)  # options, request id and avatar refused now, not when it runs
        self.limits.check_upload(len(request.face) + len(request.audio) + len(request.options.reference_face))
        record = JobRecord(new_job_id(), webhook_url=request.webhook_url, tenant=tenant)
        await self.files.write_inputs(record.job_id, request)
        try:
            await self.store.enqueue(record)
        except BaseException:
            await self.files.remove(record.job_id)
            raise
        self.metrics.job_events.labels("submitted").inc()
        return record

    async def get(self, tenant: str, job_id: str) -> tuple[JobRecord, int]:
        """The caller's job; another tenant's is not found, in the same words as a missing one."""
        record = await self.store.load(check_job_id(job_id))
        if record is None or record.tenant != tenant:
            raise NotFound(f"job {job_id} does not exist, or it ended more than {self.settings.job_result_ttl_s:.0f} s "
                           f"ago and its result was deleted ({setting_name('job_result_ttl_s')})")
        return record, await self.store.position(job_id) if record.state == "QUEUED" else 0

    async def video(self, tenant: str, job_id: str) -> bytes:
        record, _ = await self.get(tenant, job_id)
        if record.state != "SUCCEEDED":
            raise FailedPrecondition(f"job {job_id} is {record.state}; its video exists once it has SUCCEEDED")
        try:
            return await self.files.read_result(job_id)
        except FileNotFoundError:
            raise NotFound(f"job {job_id}'s video is gone from the data directory") from None

    async def delete(self, tenant: str, job_id: str) -> JobRecord:
        """Cancels a queued job at once, a running one within a heartbeat; removes a finished one."""
        record, _ = await self.get(tenant, job_id)
        if record.state in TERMINAL:
            await self.store.delete(record)
            await self.files.remove(job_id)
            return record
        if record.state == "QUEUED" and await self.store.unqueue(job_id):
            await self.ledger.cancelled(record, until_saved=False)
            return record
        await self.store.request_cancel(job_id)  # the running replica sees it within a heartbeat
        return record

    async def recent(self, tenant: str, page_size: int, page_token: str) -> tuple[list[JobRecord], str]:
        size = min(500, page_size or 50)
        if page_token and not page_token.isdigit():
            raise InvalidArgument("page_token must be the next_page_token of a previous page")
        start = int(page_token or 0)
        records = await self.store.recent(tenant, start, size + 1)
        return records[:size], str(start + size) if len(records) > size else ""
