"""The job workers: take queued jobs under the gateway's job limit, run them through the generation layer with a
renewed lease, and keep house (requeue jobs of dead replicas, sweep orphaned files). No error ends a loop: each
is logged with its job id and the job ends with a state and a message; a loop that still ends turns the process
NOT_SERVING through its supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from superwav2lip.gateway.v1 import gateway_pb2

from service_runtime.errors import ServiceError
from service_runtime.logs import request_id_var
from service_runtime.supervision import Supervisor, cancel_and_wait

from .admission import JobSlots
from .deadline import JobDeadline
from .job_store import JobRecord, JobStore
from .jobs import JobFiles, JobLedger
from .limits import setting_name
from .options import Progress
from .quotas import QuotaExceeded

log = logging.getLogger(__name__)

PROGRESS_SAVE_S = 0.5  # a running job's progress reaches the store at most this often
WORKER_ERROR_WAIT_S = 1.0  # after an unexpected error, before a worker tries the queue again
QUOTA_WAIT_S = 0.2  # after putting back a job whose tenant runs its quota, before the worker claims again


class Generation(Protocol):
    """What the job runner needs of the gateway's generation layer (gateway/generation.py)."""

    async def check(self, tenant: str, options: gateway_pb2.GenerateOptions) -> None:
        """Refuses options (request id, the tenant's avatar) that could never run, at submission."""

    async def generate(self, tenant: str, options: gateway_pb2.GenerateOptions, face: bytes, audio: bytes,
                       deadline: JobDeadline, progress: Progress):
        """Runs one generation for the tenant; returns (plan, mp4 bytes)."""


class JobRunner:
    def __init__(self, store: JobStore, files: JobFiles, ledger: JobLedger, generation: Generation, settings, metrics,
                 slots: JobSlots, supervisor: Supervisor,
                 tenant_slot: Callable[[str], AbstractAsyncContextManager] = lambda tenant: contextlib.nullcontext()
                 ) -> None:
        self.store, self.files, self.ledger, self.generation = store, files, ledger, generation
        self.settings, self.metrics, self.slots, self.supervisor = settings, metrics, slots, supervisor
        self.tenant_slot = tenant_slot  # one of the tenant's running_generations (gateway/quotas.py), or refuses
        self.replica = f"{socket.gethostname()}-{os.getpid()}"
        self._loops: list[asyncio.Task] = []
        self._jobs: set[asyncio.Task] = set()  # one per running job and its heartbeat

    def start(self) -> None:
        for number in range(self.settings.job_workers):
            self._loops.append(self.supervisor.spawn(self._worker(), f"job-worker-{number}"))
        self._loops.append(self.supervisor.spawn(self._housekeeping(), "job-housekeeping"))

    async def stop(self) -> None:
        await cancel_and_wait([*self._loops, *self._jobs])
        await self.ledger.webhooks.stop()

    def _track(self, work, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return task

    async def _worker(self) -> None:
        while True:
            try:
                if self.slots.running >= self.slots.limit or not await self._take_one():
                    await asyncio.sleep(0.2)
            except ServiceError as error:  # the store is down: wait, and keep the worker alive
                log.warning("job worker waiting", extra={"error": error.message})
                await asyncio.sleep(WORKER_ERROR_WAIT_S)
            except Exception:  # a bug: logged with its traceback; the job (if any) is requeued by its lease
                log.exception("job worker: unexpected error; going on")
                await asyncio.sleep(WORKER_ERROR_WAIT_S)

    async def _take_one(self) -> bool:
        job_id = await self.store.claim(self.replica, self.settings.job_lease_s)
        if job_id is None:
            return False
        if self.slots.running >= self.slots.limit:  # a call took the last slot during the claim: back to the front
            await self.store.release(job_id)
            await self.store.requeue_front(job_id)
            return True
        with self.slots.slot():  # no await since the check: the slot is there
            await self._run_one(job_id)
        return True

    async def _run_one(self, job_id: str) -> None:
        record = await self.store.load(job_id)
        if record is None or record.state != "QUEUED":
            await self.store.release(job_id)
            return
        if await self.store.cancel_requested(job_id):
            await self.ledger.cancelled(record)
            return
        async with contextlib.AsyncExitStack() as held:
            try:
                await held.enter_async_context(self.tenant_slot(record.tenant))
            except QuotaExceeded:  # the tenant runs its quota of generations now: others' jobs go first
                await self.store.release(job_id)
                await self.store.requeue_back(job_id)
                await asyncio.sleep(QUOTA_WAIT_S)
                return
            await self._start(job_id, record)

    async def _start(self, job_id: str, record: JobRecord) -> None:
        """Runs a claimed job to its end, within its tenant's running_generations."""
        record.state, record.started, record.owner = "RUNNING", time.time(), self.replica
        record.attempts += 1
        await self.store.save(record)  # if this fails the lease lapses and housekeeping requeues the job
        ids = {"request_id": job_id}  # _execute puts the options' request id here once it has read them
        run = self._track(self._execute(record, ids), f"job-{job_id}")
        cancelled_by_user = asyncio.Event()
        heartbeat = self._track(self._heartbeat(job_id, run, cancelled_by_user), f"heartbeat-{job_id}")
        try:
            result = await run
        except asyncio.CancelledError:
            if not cancelled_by_user.is_set():
                raise  # this replica is stopping: the lease lapses and another replica takes the job
            await self.ledger.cancelled(record)
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise  # and this replica is stopping too: the worker stops with it
            return
        except ServiceError as error:
            await self.ledger.failed(record, error.code.value[0], error.code.name, error.message)
            return
        except Exception as error:  # a bug, a full volume: the job ends, the worker goes on
            log.exception("job failed on an unexpected error", extra={"job_id": job_id,
                                                                      "job_request_id": ids["request_id"]})
            await self.ledger.failed(record, 13, "INTERNAL", (
                f"job {job_id} failed inside the gateway (request id {ids['request_id']}): {type(error).__name__}: "
                f"{error}. Not a problem with the inputs: submit it again, and report the request id if it recurs"))
            return
        finally:
            heartbeat.cancel()
        await self.ledger.succeeded(record, result)

    async def _execute(self, record: JobRecord, ids: dict[str, str]) -> dict:
        face, audio, options = await self.files.read_inputs(record.job_id)
        ids["request_id"] = options.request_id or record.job_id
        request_id_var.set(ids["request_id"])  # this task's log lines

        async def progress(stage: str, done: int, total: int, message: str = "") -> None:
            record.stage, record.done, record.total = stage, done, total
            if time.monotonic() - saved["at"] >= PROGRESS_SAVE_S:
                saved["at"] = time.monotonic()
                with contextlib.suppress(ServiceError):  # progress is best effort; the end is not
                    await self.store.save(record)

        saved = {"at": 0.0}
        deadline = JobDeadline(self.settings.job_deadline_s, self.settings.job_deadline_per_audio_second_s)
        plan, mp4 = await self.generation.generate(record.tenant, options, face, audio, deadline, progress)
        await self.files.write_result(record.job_id, mp4)
        width, height = plan.face.size
        return {"width": width, "height": height, "fps": float(plan.fps), "frames": plan.frames,
                "audio_seconds": plan.speech.seconds, "size_bytes": len(mp4)}

    async def _heartbeat(self, job_id: str, run: asyncio.Task, cancelled_by_user: asyncio.Event) -> None:
        """Renews the lease until the run has ended, and cancels the run within a beat of a cancel from any
        replica, again at every beat until it ends: a cancel can be lost inside the pipeline (Python 3.11's
        asyncio.wait_for returns a result that completed as the cancel arrived), and the run then went on, its
        lease no longer renewed, so that housekeeping queued the job again while it ran."""
        beat = min(0.5, self.settings.job_lease_s / 3)
        while not run.done():
            await asyncio.wait({run}, timeout=beat)
            if run.done():
                return
            try:
                await self.store.renew(job_id, self.settings.job_lease_s)
                if cancelled_by_user.is_set() or await self.store.cancel_requested(job_id):
                    cancelled_by_user.set()
                    run.cancel()
            except Exception as error:  # noqa: BLE001 - a missed beat is retried; the lease outlasts three
                log.warning("job heartbeat failed", extra={"job_id": job_id, "error": f"{type(error).__name__}"})

    async def _housekeeping(self) -> None:
        """Requeues jobs whose replica died; deletes the files of results past their TTL."""
        interval = max(0.2, min(self.settings.job_lease_s / 2, self.settings.job_result_ttl_s / 2, 30.0))
        while True:
            await asyncio.sleep(interval)
            for step in (self._requeue_orphans, self._sweep):
                try:
                    await step()
                except ServiceError as error:
                    log.warning("job housekeeping waiting for the store", extra={"error": error.message})
                except Exception:
                    log.exception("job housekeeping: unexpected error; going on", extra={"step": step.__name__})

    async def _requeue_orphans(self) -> None:
        for job_id in await self.store.expired_leases():
            record = await self.store.load(job_id)
            if record is None or record.state not in ("QUEUED", "RUNNING"):
                continue
            if record.state == "QUEUED":  # claimed by a replica that stopped before it started it
                log.warning("job claimed but never started; requeued", extra={"job_id": job_id})
                await self.store.requeue_front(job_id)
                continue
            if record.attempts >= self.settings.job_max_attempts:
                await self.ledger.failed(record, 10, "ABORTED", (
                    f"the gateway replica running this job stopped {record.attempts} times before it finished "
                    f"({setting_name('job_max_attempts')}); submit it again"))
                continue
            log.warning("job orphaned by a dead replica; requeued", extra={"job_id": job_id, "owner": record.owner})
            record.state, record.owner, record.stage, record.done, record.total = "QUEUED", "", "", 0, 0
            await self.store.save(record)
            await self.store.requeue_front(job_id)
            self.metrics.job_events.labels("requeued").inc()

    async def _sweep(self) -> None:
        root = self.files.root
        if not root.is_dir():
            return
        known = await self.store.known()
        settle = time.time() - 2  # a folder being written before its record exists is not an orphan
        for folder in await asyncio.to_thread(lambda: list(root.iterdir())):
            try:
                orphan = folder.name not in known and folder.stat().st_mtime < settle
            except FileNotFoundError:  # another replica removed it meanwhile
                continue
            if orphan:
                await asyncio.to_thread(shutil.rmtree, folder, True)
