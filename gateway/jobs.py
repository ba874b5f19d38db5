"""Asynchronous jobs: submission, the workers that run them under the gateway's job limit, leases that survive
a dying replica, results kept for a TTL, cancellation, and signed webhooks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

from superwav2lip.gateway.v1 import gateway_pb2

from service_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, ServiceError

from .admission import JobSlots
from .deadline import JobDeadline
from .job_store import TERMINAL, JobRecord, check_job_id, new_job_id
from .limits import MediaLimits, setting_name
from .metrics import GatewayMetrics

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "x-swl-signature"
TIMESTAMP_HEADER = "x-swl-timestamp"
PROGRESS_SAVE_S = 0.5  # a running job's progress reaches the store at most this often


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """HMAC-SHA256 over `timestamp.body`, as the webhook header carries it."""
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def check_webhook(url: str, allowed_hosts: tuple[str, ...], secret: str) -> str:
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise InvalidArgument("webhook_url must be an http(s) URL with a host and no user name")
    host = parts.hostname.lower()
    if host not in allowed_hosts and f"{host}:{parts.port}" not in allowed_hosts:
        raise InvalidArgument(f"webhook_url host {host!r} is not on this gateway's allow-list "
                              f"({setting_name('webhook_allowed_hosts')}: {', '.join(allowed_hosts) or 'empty'})")
    if not secret:
        raise FailedPrecondition(f"this gateway has no webhook secret ({setting_name('webhook_secret')}); "
                                 "it cannot sign webhooks")
    return url


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect could lead off the allow-list
        return None


class Jobs:
    def __init__(self, store, data_dir: Path, settings, metrics: GatewayMetrics, slots: JobSlots, *,
                 check: Callable[..., Awaitable], make_job: Callable[..., Awaitable],
                 run_job: Callable[..., Awaitable]) -> None:
        self.store, self.settings, self.metrics, self.slots = store, settings, metrics, slots
        self.root = Path(data_dir) / "jobs"
        self.limits = MediaLimits.from_settings(settings)
        self._check, self._make_job, self._run_job = check, make_job, run_job
        self.replica = f"{socket.gethostname()}-{os.getpid()}"
        self._tasks: set[asyncio.Task] = set()
        self._opener = urllib.request.build_opener(_NoRedirects)

    # --- The API -----------------------------------------------------------------------------------------

    async def submit(self, request: gateway_pb2.SubmitJobRequest) -> JobRecord:
        s = self.settings
        check_webhook(request.webhook_url, s.webhook_allowed_hosts, s.webhook_secret)
        await self._check(request.options)  # options, request id and avatar refused now, not when it runs
        self.limits.check_upload(len(request.face) + len(request.audio) + len(request.options.reference_face))
        record = JobRecord(new_job_id(), webhook_url=request.webhook_url)
        await asyncio.to_thread(self._write_inputs, record.job_id, request)
        try:
            await self.store.enqueue(record)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, self.root / record.job_id, True)
            raise
        self.metrics.job_events.labels("submitted").inc()
        return record

    def _write_inputs(self, job_id: str, request: gateway_pb2.SubmitJobRequest) -> None:
        folder = self.root / job_id
        folder.mkdir(parents=True)
        (folder / "face").write_bytes(request.face)
        (folder / "audio").write_bytes(request.audio)
        (folder / "options.pb").write_bytes(request.options.SerializeToString())

    async def get(self, job_id: str) -> tuple[JobRecord, int]:
        record = await self.store.load(check_job_id(job_id))
        if record is None:
            raise NotFound(f"job {job_id} does not exist, or it ended more than {self.settings.job_result_ttl_s:.0f} s "
                           f"ago and its result was deleted ({setting_name('job_result_ttl_s')})")
        return record, await self.store.position(job_id) if record.state == "QUEUED" else 0

    async def video(self, job_id: str) -> bytes:
        record, _ = await self.get(job_id)
        if record.state != "SUCCEEDED":
            raise FailedPrecondition(f"job {job_id} is {record.state}; its video exists once it has SUCCEEDED")
        try:
            return await asyncio.to_thread((self.root / job_id / "result.mp4").read_bytes)
        except FileNotFoundError:
            raise NotFound(f"job {job_id}'s video is gone from the data directory") from None

    async def delete(self, job_id: str) -> JobRecord:
        """Cancels a queued job at once, a running one within a heartbeat; removes a finished one."""
        record, _ = await self.get(job_id)
        if record.state in TERMINAL:
            await self.store.delete(job_id)
            await asyncio.to_thread(shutil.rmtree, self.root / job_id, True)
            return record
        if record.state == "QUEUED" and await self.store.unqueue(job_id):
            await self._cancelled(record)
            return record
        await self.store.request_cancel(job_id)  # the running replica sees it within a heartbeat
        return record

    async def recent(self, page_size: int, page_token: str) -> tuple[list[JobRecord], str]:
        size = min(500, page_size or 50)
        if page_token and not page_token.isdigit():
            raise InvalidArgument("page_token must be the next_page_token of a previous page")
        start = int(page_token or 0)
        records = await self.store.recent(start, size + 1)
        return records[:size], str(start + size) if len(records) > size else ""

    # --- Running them ------------------------------------------------------------------------------------

    def start(self) -> None:
        for _ in range(self.settings.job_workers):
            self._spawn(self._worker())
        self._spawn(self._housekeeping())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, work) -> asyncio.Task:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _worker(self) -> None:
        while True:
            try:
                if self.slots.running >= self.slots.limit or not await self._take_one():
                    await asyncio.sleep(0.2)
            except ServiceError as error:  # the store is down: wait, and keep the worker alive
                log.warning("job worker waiting", extra={"error": error.message})
                await asyncio.sleep(1.0)

    async def _take_one(self) -> bool:
        job_id = await self.store.claim(self.replica, self.settings.job_lease_s)
        if job_id is None:
            return False
        try:
            with self.slots.slot():
                await self._run_one(job_id)
        except ServiceError:  # no slot after all (a call took it): back to the front
            await self.store.release(job_id)
            await self.store.requeue_front(job_id)
        return True

    async def _run_one(self, job_id: str) -> None:
        record = await self.store.load(job_id)
        if record is None or record.state != "QUEUED":
            await self.store.release(job_id)
            return
        if await self.store.cancel_requested(job_id):
            await self.store.release(job_id)
            await self._cancelled(record)
            return
        record.state, record.started, record.owner = "RUNNING", time.time(), self.replica
        record.attempts += 1
        await self.store.save(record)
        saved = {"at": 0.0}

        async def progress(stage: str, done: int, total: int, message: str = "") -> None:
            record.stage, record.done, record.total = stage, done, total
            if time.monotonic() - saved["at"] >= PROGRESS_SAVE_S:
                saved["at"] = time.monotonic()
                await self.store.save(record)

        run = self._spawn(self._execute(record, progress))
        cancelled_by_user = asyncio.Event()
        heartbeat = self._spawn(self._heartbeat(job_id, run, cancelled_by_user))
        try:
            mp4_info = await run
            record.state, record.finished, record.result = "SUCCEEDED", time.time(), mp4_info
            self.metrics.job_events.labels("succeeded").inc()
        except asyncio.CancelledError:
            if not cancelled_by_user.is_set():
                raise  # this replica is stopping: the lease lapses and another replica takes the job
            await self._cancelled(record)
            return
        except ServiceError as error:
            record.fail(error.code.value[0], error.code.name, error.message)
            self.metrics.job_events.labels("failed").inc()
        finally:
            heartbeat.cancel()
            with contextlib.suppress(ServiceError):
                await self.store.release(job_id)
        await self.store.save(record)
        self._spawn(self._notify(record))

    async def _execute(self, record: JobRecord, progress) -> dict:
        folder = self.root / record.job_id
        face, audio, options = await asyncio.to_thread(
            lambda: ((folder / "face").read_bytes(), (folder / "audio").read_bytes(),
                     gateway_pb2.GenerateOptions.FromString((folder / "options.pb").read_bytes())))
        deadline = JobDeadline(self.settings.job_deadline_s, self.settings.job_deadline_per_audio_second_s)
        job = await self._make_job(options, deadline, progress)
        plan, mp4 = await self._run_job(job, face, audio)
        await asyncio.to_thread((folder / "result.mp4").write_bytes, mp4)
        width, height = plan.face.size
        return {"width": width, "height": height, "fps": float(plan.fps), "frames": plan.frames,
                "audio_seconds": plan.speech.seconds, "size_bytes": len(mp4)}

    async def _heartbeat(self, job_id: str, run: asyncio.Task, cancelled_by_user: asyncio.Event) -> None:
        """Renews the lease, and cancels the run within a beat of a cancel from any replica."""
        beat = min(0.5, self.settings.job_lease_s / 3)
        while not run.done():
            await asyncio.sleep(beat)
            with contextlib.suppress(ServiceError):
                await self.store.renew(job_id, self.settings.job_lease_s)
                if await self.store.cancel_requested(job_id):
                    cancelled_by_user.set()
                    run.cancel()
                    return

    async def _cancelled(self, record: JobRecord) -> None:
        record.state, record.finished = "CANCELLED", time.time()
        await self.store.save(record)
        await asyncio.to_thread(shutil.rmtree, self.root / record.job_id, True)
        self.metrics.job_events.labels("cancelled").inc()
        self._spawn(self._notify(record))

    async def _housekeeping(self) -> None:
        """Requeues jobs whose replica died; deletes the files of results past their TTL."""
        interval = max(0.2, min(self.settings.job_lease_s / 2, self.settings.job_result_ttl_s / 2, 30.0))
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(ServiceError):
                await self._requeue_orphans()
                await self._sweep()

    async def _requeue_orphans(self) -> None:
        for job_id in await self.store.expired_leases():
            record = await self.store.load(job_id)
            if record is None or record.state != "RUNNING":
                continue
            if record.attempts >= self.settings.job_max_attempts:
                record.fail(10, "ABORTED", f"the gateway replica running this job stopped {record.attempts} times "
                                           f"before it finished ({setting_name('job_max_attempts')}); submit it again")
                await self.store.save(record)
                self.metrics.job_events.labels("failed").inc()
                self._spawn(self._notify(record))
                continue
            log.warning("job orphaned by a dead replica; requeued", extra={"job_id": job_id, "owner": record.owner})
            record.state, record.owner, record.stage, record.done, record.total = "QUEUED", "", "", 0, 0
            await self.store.save(record)
            await self.store.requeue_front(job_id)
            self.metrics.job_events.labels("requeued").inc()

    async def _sweep(self) -> None:
        if not self.root.is_dir():
            return
        known = await self.store.known()
        settle = time.time() - 2  # a folder being written before its record exists is not an orphan
        for folder in await asyncio.to_thread(lambda: list(self.root.iterdir())):
            if folder.name not in known and folder.stat().st_mtime < settle:
                await asyncio.to_thread(shutil.rmtree, folder, True)

    async def _notify(self, record: JobRecord) -> None:
        """POSTs the signed outcome to the job's webhook, retrying with exponential back-off."""
        if not record.webhook_url:
            return
        body = json.dumps({"job_id": record.job_id, "state": record.state, "code": record.error_code,
                           "status": record.error_status or "OK", "message": record.error_message,
                           "video_path": f"/v1/jobs/{record.job_id}/video" if record.state == "SUCCEEDED" else ""
                           }).encode()
        for attempt in range(self.settings.webhook_max_attempts):
            timestamp = str(int(time.time()))
            request = urllib.request.Request(record.webhook_url, data=body, method="POST", headers={
                "content-type": "application/json", TIMESTAMP_HEADER: timestamp,
                SIGNATURE_HEADER: sign(self.settings.webhook_secret, timestamp, body)})
            try:
                await asyncio.to_thread(self._opener.open, request, None, 10)
                self.metrics.webhook_attempts.labels("delivered").inc()
                return
            except (urllib.error.URLError, OSError, ValueError) as error:
                self.metrics.webhook_attempts.labels("failed").inc()
                log.warning("webhook delivery failed", extra={"job_id": record.job_id, "attempt": attempt + 1,
                                                               "error": str(error)})
            await asyncio.sleep(self.settings.webhook_backoff_s * 2**attempt)
