"""Gateway start-up: settings, model-service clients, warm-up (librosa's numba kernels) and registration."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from superwav2lip.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from superwav2lip.live.v1 import live_pb2, live_pb2_grpc

from service_runtime.server import GrpcService, run_service
from service_runtime.logs import configure_logging
from service_runtime.settings import ServerSettings, SettingsError, metrics_port_setting, port_setting, setting

from .admission import JobSlots
from .audio import SAMPLE_RATE, melspectrogram
from .audit import AuditInterceptor
from .auth import TenantInterceptor
from .authz import AuthzServer, KeyCheck
from .avatars import AvatarStore
from .clients import ModelClients
from .generation import Generation
from .job_runner import JobRunner
from .job_store import JobStore, MemoryJobStore, RedisJobStore
from .jobs import JobFiles, JobLedger, Jobs
from .limits import http_body_limit_bytes
from .live.capacity import LiveCapacity
from .live.webrtc import WebRtcLive
from .metrics import GatewayMetrics
from .plan_cache import MemoryPlanCache, PlanCache, RedisPlanCache, redis_client
from .quotas import DataVolumeUsage, TenantQuotas, quota_holder
from .servicer import GatewayServicer
from .tenants import TenantRegistry, TenantsFileError, TenantsWatcher
from .uploads import UploadStore
from .webhooks import TenantWebhooks, WebhookSender

log = logging.getLogger(__name__)

CLOSE_STEP_S = 5.0


@dataclasses.dataclass(frozen=True)
class GatewaySettings(ServerSettings):
    ENV_PREFIX = "SWL_GATEWAY_"
    port: int = port_setting(50051)
    metrics_port: int = metrics_port_setting(9101)
    detector_address: str = setting("localhost:50052", "host:port of the detector service.")
    lipsync_address: str = setting("localhost:50053", "host:port of the lip-sync service.")
    enhancer_address: str = setting("localhost:50054", "host:port of the enhancer service.")
    rpc_batch_items: int = setting(32, "Items per RPC to a model service.", ge=1, le=1024)
    max_inflight_rpcs: int = setting(8, "RPCs to model services in flight at once, across all jobs.", ge=1, le=1024)
    chunk_frames: int = setting(16, "Frames per pipeline chunk; a job holds a few chunks at a time.", ge=1, le=256)
    detection_jpeg_quality: int = setting(
        90, "Detector frames travel as JPEG of this quality (1-100) to save bandwidth; 0 sends raw BGR.", ge=0, le=100)
    chunk_bytes: int = setting(1 << 20, "Bytes per streamed mp4 chunk.", ge=1024, le=32 << 20)
    encoder_threads: int = setting(
        0, "libx264 threads (0 = its own choice, fastest). Only 1 gives bit-identical output for identical input; "
           "it costs about 1.6x the encode time at 720p.", ge=0, le=64)
    serial_jobs: bool = setting(False, "Run one job at a time behind a lock, as the seed did (for comparisons).")
    # Admission and deadlines.
    max_concurrent_jobs: int = setting(
        8, "Jobs this gateway runs at once; beyond it calls get RESOURCE_EXHAUSTED with a retry hint.", ge=1, le=1024)
    job_deadline_s: float = setting(
        60.0, "Deadline of every job when the client sets none (or a later one), plus the per-second part below.",
        ge=1, le=86400)
    job_deadline_per_audio_second_s: float = setting(
        30.0, "Seconds added to the job deadline per second of speech.", ge=0, le=3600)
    # Limits on client media, all checked before the expensive work.
    max_upload_mb: int = setting(512, "Largest face + audio + reference-photo upload per job, in MiB.", ge=1,
                                 le=16384)
    max_audio_seconds: float = setting(600.0, "Longest speech accepted per job (stops decoding past it).", ge=1,
                                       le=86400)
    max_audio_sample_rate: int = setting(
        192000, "Highest sample rate speech may declare, in Hz: decoding holds samples at the declared rate.",
        ge=8000, le=1_000_000)
    max_frame_pixels: int = setting(4096 * 2160, "Largest face frame or still, in pixels (width x height).",
                                    ge=1024, le=1 << 28)
    max_fps: float = setting(120.0, "Highest frame rate a face video may declare.", ge=1, le=1000)
    max_output_frames: int = setting(36000, "Most frames one output video may have (speech seconds x fps).",
                                     ge=1, le=10_000_000)
    max_reference_face_kb: int = setting(10240, "Largest reference photo, in KiB.", ge=1, le=1 << 20)
    max_reference_face_pixels: int = setting(4096 * 4096, "Largest reference photo, in pixels.", ge=1024,
                                             le=1 << 28)
    max_output_pixel_frames: int = setting(
        1920 * 1080 * 15000, "Most output pixels x frames per job (the encoder's work): 10 min of 1080p at 25 fps.",
        ge=1024, le=1 << 50)
    max_output_mb: int = setting(512, "Largest output video, in MiB; an encoding that passes it ends with "
                                      "RESOURCE_EXHAUSTED (it bounds the memory the finished mp4 holds).", ge=1,
                                 le=1 << 20)
    min_crf: int = setting(18, "Lowest x264 crf a client may ask for (lower is larger and slower).", ge=0, le=51)
    slowest_preset: str = setting("medium", "Slowest x264 preset a client may ask for (ultrafast ... veryslow).")
    max_avatar_deadline_s: float = setting(
        1800.0, "Longest deadline of an avatar's planning, however long the face video is or claims to be.", ge=1,
        le=86400)
    # The HTTP edge: raw uploads and API keys.
    upload_idle_timeout_s: float = setting(
        30.0, "Longest wait for the next message of a streamed upload (Generate, CreateAvatar); past it the call "
              "ends with DEADLINE_EXCEEDED and frees its job slot, so slow clients cannot hold the slots.", ge=0.1,
        le=3600)
    upload_timeout_s: float = setting(
        600.0, "Longest a streamed upload may take in all, from its first message.", ge=1, le=86400)
    upload_ttl_s: float = setting(600.0, "Seconds a raw upload (POST /v1/uploads) is kept for generation.", ge=1,
                                  le=86400)
    upload_store_mb: int = setting(2048, "Disk for raw uploads in the data directory, in MiB; beyond it uploads get "
                                         "RESOURCE_EXHAUSTED.", ge=1, le=1 << 20)
    authz_port: int = setting(
        0, "Port of the HTTP API-key check that Envoy's ext_authz filter calls with each request's headers before it "
           "reads the body (deploy/envoy/render.py's --authz-port; make run and Kubernetes set it). 0 picks a free "
           "one, -1 serves none (an Envoy in front then refuses every call with 503).", ge=-1, le=65535)
    # Shared state: the plan cache and avatars.
    redis_url: str = setting("", "Redis URL (redis://host:6379/0) for the shared plan cache and avatar index; empty = "
                                 "in-process cache and meta.json files.")
    redis_timeout_s: float = setting(0.5, "Longest wait for Redis per call; past it the cache is bypassed.", ge=0.01,
                                     le=30)
    plan_cache_mb: int = setting(256, "In-process plan cache size, in MiB (when no Redis is configured); 0 disables.",
                                 ge=0, le=1 << 20)
    plan_cache_ttl_s: float = setting(7 * 86400.0, "How long Redis keeps a cached plan.", ge=1, le=365 * 86400)
    plan_cache_redis_url: str = setting(
        "", "Redis URL for the plan cache alone: a Redis of its own, which may evict (maxmemory-policy allkeys-lru), "
            "while jobs, quotas and avatars stay on redis_url's, which must not (deploy/k8s/README.md#redis); "
            "empty = the plans share redis_url's Redis.")
    data_dir: str = setting("data", "Folder for avatars, job inputs and results, and raw uploads (a shared volume "
                                    "across replicas).")
    # Asynchronous jobs (the store is Redis when redis_url is set, else this process).
    job_queue_size: int = setting(100, "Jobs that may wait; a submission beyond it gets RESOURCE_EXHAUSTED.", ge=1,
                                  le=1_000_000)
    job_workers: int = setting(2, "Jobs this replica runs at once from the queue (within max_concurrent_jobs; 0 = "
                                  "answer the jobs API but run none).", ge=0, le=1024)
    job_result_ttl_s: float = setting(86400.0, "How long a finished job and its video are kept.", ge=1,
                                      le=365 * 86400)
    job_lease_s: float = setting(10.0, "A running job's lease; a replica that stops renewing it (it died) loses the "
                                       "job to the others.", ge=0.5, le=3600)
    job_max_attempts: int = setting(3, "Runs a job gets when replicas die under it; then it FAILS (ABORTED).", ge=1,
                                    le=100)
    webhook_secret: str = setting("", "Key of the HMAC-SHA256 signature on webhooks (needed to accept a webhook_url) "
                                      "of the `default` and `anonymous` tenants; a tenants file gives each its own.")
    webhook_allowed_hosts: tuple[str, ...] = setting(
        (), "Hosts (or host:port) webhooks of the `default` and `anonymous` tenants may be sent to; empty = none, so "
            "jobs cannot probe internal networks. A tenants file gives each tenant its own.")
    webhook_max_attempts: int = setting(5, "Deliveries tried per webhook before giving up.", ge=1, le=50)
    webhook_backoff_s: float = setting(1.0, "Wait before the second delivery; it doubles after each failure.",
                                       ge=0.01, le=3600)
    webhook_timeout_s: float = setting(
        10.0, "Longest one delivery attempt may take in all (lookup, connect, send, the answer's status and "
              "headers); a receiver that answers a byte at a time is cut off at it.", ge=0.1, le=300)
    webhook_allow_private_addresses: bool = setting(
        False, "Let webhooks go to loopback, private (RFC 1918, ULA), link-local (the cloud metadata service among "
               "them) and reserved addresses; off, a name on the allow-list that resolves to one is refused. For "
               "local stacks and tests only.")
    # Tenants: who may call, what each may use, and what each sees (docs/tenants.md).
    tenants_file: str = setting(
        "", "JSON or YAML file of tenants (their key digests, quotas, webhook secret and hosts); reloaded on SIGHUP "
            "and when it changes. With it (or api_keys) every call but the health check needs a key.")
    api_keys: tuple[str, ...] = setting(
        (), "Comma-separated API keys of one tenant, `default` (a shorthand for a tenants file); x-api-key header.")
    allow_anonymous: bool = setting(
        False, "Serve calls without a key when no tenant is configured (`make run` sets it); without it, a gateway "
               "with neither tenants_file nor api_keys refuses to start. Ignored once tenants are configured.")
    tenants_poll_s: float = setting(2.0, "How often the tenants file is checked for a change.", ge=0.05, le=3600)
    # Live sessions (docs/live.md).
    live_max_sessions: int = setting(8, "Live sessions this gateway holds at once, whatever their cost.", ge=0,
                                     le=1024)
    live_capacity: float = setting(
        0.7, "Seconds of frame-making per second that live sessions may share (a frame's cost is measured); a "
              "session that would pass it gets a lower frame rate, or RESOURCE_EXHAUSTED below live_min_fps. "
              "Raise it with the lip-sync replicas behind this gateway.", ge=0.05, le=1024)
    live_min_fps: float = setting(10.0, "Lowest frame rate a live session is served at rather than refused.", ge=1,
                                  le=120)
    live_margin_ms: float = setting(
        120.0, "Time to make a live frame: speech is shown this long after Wav2Lip's 212.5 ms window has arrived "
               "(the lookahead a session's ready message states is the sum).", ge=10, le=2000)
    live_max_buffered_s: float = setting(
        10.0, "Speech a live session holds before it is played; past it the session stops reading the client's "
              "messages (HTTP/2 flow control holds the client back).", ge=0.5, le=600)
    live_idle_timeout_s: float = setting(60.0, "A live session with no message and nothing to play for this long "
                                               "is closed (DEADLINE_EXCEEDED).", ge=1, le=86400)
    live_max_session_s: float = setting(3600.0, "Longest a live session may stay open.", ge=1, le=7 * 86400)
    live_ice_servers: tuple[str, ...] = setting(
        (), "Comma-separated STUN and TURN URLs of live WebRTC sessions (stun:host:port, "
            "turn:host:port?transport=udp): the gateway gathers with them and Live/IceServers hands them to browsers. "
            "None: host candidates only, for browsers on the gateway's network (docs/live-webrtc.md).")
    live_turn_secret: str = setting(
        "", "The TURN server's shared secret (coturn's static-auth-secret): each caller gets TURN credentials of its "
            "own, valid for live_turn_credential_ttl_s. Needed with a turn: URL.")
    live_turn_credential_ttl_s: float = setting(3600.0, "How long the TURN credentials handed out stay valid.",
                                                ge=60, le=7 * 86400)
    live_ice_relay_only: bool = setting(
        False, "The gateway's side offers relay (TURN) candidates only: its own addresses (a pod's) never reach a "
               "browser, and media always goes through the TURN server.")
    batch_nice: int = setting(
        10, "Niceness of the threads that do jobs' decoding, pasting and encoding (and of the encoder threads they "
            "start): on a shared CPU live sessions' threads, at the process's own, go first. 0 = the same.",
        ge=0, le=19)

    def __repr__(self) -> str:  # API keys are secrets: never in logs or tracebacks
        hidden = ("api_keys", "webhook_secret", "live_turn_secret")
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in hidden}
        return f"GatewaySettings({shown}, secrets hidden)"


class GatewayService(GrpcService):
    name = "gateway"
    grpc_service_names = (gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name,
                          live_pb2.DESCRIPTOR.services_by_name["Live"].full_name)
    settings: GatewaySettings
    metrics: GatewayMetrics

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics | None = None) -> None:
        super().__init__(settings, metrics or GatewayMetrics())
        self.tenants = tenant_registry(settings)
        self.clients = ModelClients(settings.detector_address, settings.lipsync_address, settings.enhancer_address,
                                    batch_items=settings.rpc_batch_items, max_inflight=settings.max_inflight_rpcs,
                                    metrics=self.metrics, detection_jpeg_quality=settings.detection_jpeg_quality)
        # A client object only: connections open on first use, inside the event loop.
        self.redis = redis_client(settings.redis_url, settings.redis_timeout_s) if settings.redis_url else None
        # Plans may have a Redis of their own, one that evicts; jobs, quotas and avatars never may.
        self.plans_redis = (redis_client(settings.plan_cache_redis_url, settings.redis_timeout_s)
                            if settings.plan_cache_redis_url else self.redis)
        if self.plans_redis is not None:
            plans: PlanCache | None = RedisPlanCache(self.plans_redis, settings.plan_cache_ttl_s,
                                                     settings.redis_timeout_s, self.metrics)
        else:
            plans = MemoryPlanCache(settings.plan_cache_mb << 20, self.metrics) if settings.plan_cache_mb else None
        avatars = AvatarStore(Path(settings.data_dir), self.redis, settings.redis_timeout_s)
        if self.redis is not None:
            store: JobStore = RedisJobStore(self.redis, settings.job_queue_size, settings.job_result_ttl_s,
                                  settings.redis_timeout_s)
        else:
            store = MemoryJobStore(settings.job_queue_size, settings.job_result_ttl_s)
        self.slots = JobSlots(settings.max_concurrent_jobs)
        self.generation = Generation(self.clients, self.metrics, settings, plans=plans, avatars=avatars)
        files = JobFiles(Path(settings.data_dir))
        webhooks = WebhookSender(settings, self.metrics, TenantWebhooks(self.tenants, settings))
        ledger = JobLedger(store, files, settings, self.metrics, webhooks)
        self.jobs = Jobs(store, files, ledger, settings, self.metrics, check=self.generation.check)
        uploads = UploadStore(Path(settings.data_dir) / "uploads", settings.upload_store_mb << 20,
                              settings.upload_ttl_s)
        usage = DataVolumeUsage(avatars.root, uploads.folder, files.folder, store.job_ids)
        self.quotas = TenantQuotas(self.redis, settings.redis_timeout_s, stored_bytes=usage)
        self.job_runner = JobRunner(store, files, ledger, self.generation, settings, self.metrics, self.slots,
                                    self.supervisor, tenant_slot=lambda name: self.quotas.generation(
                                        quota_holder(self.tenants, name)))
        self.servicer = GatewayServicer(self.generation, self.jobs, avatars, uploads, self.slots, self.quotas,
                                        self.metrics, settings)
        self.live_capacity = LiveCapacity(settings.live_capacity, settings.live_min_fps, settings.live_max_sessions)
        self.live = WebRtcLive(avatars, self.clients, self.quotas, self.live_capacity, settings, self.metrics)
        self.tenants_watcher = TenantsWatcher(self.tenants, poll_s=settings.tenants_poll_s) if self.tenants.path else None
        self.authz: AuthzServer | None = None  # bound in warm_up

    def interceptors(self):
        # In this order: the tenant is known (and its requests counted) before the audit line is written.
        return [TenantInterceptor(self.tenants, self.metrics.unauthenticated.inc, admit=self.quotas.admit_request),
                AuditInterceptor()]

    @property
    def max_message_bytes(self) -> int:
        """An HTTP request arrives as one message: as large as the largest body the Envoy edge lets through, so
        that an upload over the limit gets the gateway's own clear refusal, not a transport error."""
        return max(super().max_message_bytes, http_body_limit_bytes(self.settings.max_upload_mb))

    async def warm_up(self) -> None:
        """Opens the model-service channels; compiles librosa's numba kernels so no request pays for it."""
        self.clients.open()
        if self.settings.batch_nice:
            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(
                thread_name_prefix="batch", initializer=lower_priority, initargs=(self.settings.batch_nice,)))
        noise = np.random.default_rng(0).standard_normal(SAMPLE_RATE).astype(np.float32) * 0.1
        await asyncio.to_thread(melspectrogram, noise)
        log.info("mel warmed up")
        if self.settings.authz_port >= 0:
            self.authz = AuthzServer(self.settings.host, self.settings.authz_port,
                                     KeyCheck(self.tenants, self.metrics.unauthenticated.inc))
            self.supervisor.spawn(self.authz.serve(), "authz-http")
        self.job_runner.start()
        if self.tenants_watcher is not None:
            await self.tenants_watcher.start(self.supervisor.spawn)

    def register(self, server) -> None:
        gateway_pb2_grpc.add_GatewayServicer_to_server(self.servicer, server)
        live_pb2_grpc.add_LiveServicer_to_server(self.live, server)

    async def close(self) -> None:
        """Stops the job workers, then the channels and Redis; no step may hold shutdown up (a Redis command
        cancelled mid-flight has left redis-py's close waiting forever)."""
        if self.tenants_watcher is not None:
            await self.tenants_watcher.stop()
        if self.authz is not None:
            await asyncio.to_thread(self.authz.close)
        redis_clients = [self.redis] if self.redis is not None else []
        if self.plans_redis is not None and self.plans_redis is not self.redis:  # its own: closed too
            redis_clients.append(self.plans_redis)
        for step in (self.live.close_peers(), self.job_runner.stop(), self.clients.close(),
                     *(client.aclose() for client in redis_clients)):
            try:
                await asyncio.wait_for(step, CLOSE_STEP_S)
            except TimeoutError:
                log.warning("shutdown step timed out", extra={"step": getattr(step, "__qualname__", repr(step)),
                                                              "seconds": CLOSE_STEP_S})


def tenant_registry(settings: GatewaySettings) -> TenantRegistry:
    """The configured tenants; fails closed: with none, the gateway starts only when told to serve anonymously."""
    tenants = TenantRegistry.from_settings(settings.tenants_file or None, settings.api_keys)
    if not tenants.required and not settings.allow_anonymous:
        raise SettingsError(
            "no tenant is configured, so anyone could call this gateway: set SWL_GATEWAY_TENANTS_FILE (or "
            "SWL_GATEWAY_API_KEYS), or SWL_GATEWAY_ALLOW_ANONYMOUS=true to serve without keys on purpose")
    if not tenants.required:
        log.warning("serving without API keys: SWL_GATEWAY_ALLOW_ANONYMOUS is set and no tenant is configured")
    return tenants


def lower_priority(nice: int) -> None:
    """Makes the calling thread (on Linux, a thread is its own scheduling entity) `nice` steps less urgent."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: every thread keeps the process's priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice)


def keep_large_buffers_returnable() -> None:
    """Frames are megabytes each: keep them in mmap'd blocks that glibc returns to the system when freed.

    Otherwise glibc raises its mmap threshold after the first frees and serves frames from the heap, whose
    fragmentation makes the gateway's memory creep up with the length of each video."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 20)


def main() -> None:
    keep_large_buffers_returnable()
    configure_logging()  # so that a configuration mistake is a JSON line too; run_service applies log_level
    try:
        service = GatewayService(GatewaySettings.from_env())
    except (SettingsError, TenantsFileError) as error:  # a configuration mistake: one line, no traceback
        log.error("cannot start: %s", error, extra={"service": "gateway"})
        sys.exit(2)
    run_service(service)
