"""Gateway metrics: the shared RPC metrics plus pipeline stages, frames and bytes sent to the model services."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service_runtime.metrics import LATENCY_BUCKETS, ServiceMetrics


class GatewayMetrics(ServiceMetrics):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.stage_seconds = Histogram(
            "swl_gateway_stage_seconds", "Busy seconds per pipeline stage: per job for decode, detect, redecode and "
            "encode; per chunk for crop, lipsync (the round trip), paste and enhance.", ["stage"], registry=r,
            buckets=LATENCY_BUCKETS)
        self.frames = Counter("swl_gateway_frames_total", "Output frames produced.", registry=r)
        self.jobs = Counter("swl_gateway_jobs_total", "Generation jobs, by outcome code.", ["code"], registry=r)
        self.inflight = Gauge("swl_gateway_jobs_inflight", "Generation jobs running now.", registry=r)
        self.sent_bytes = Counter("swl_gateway_sent_bytes_total", "Request bytes sent to each model service.",
                                  ["service"], registry=r)
        self.track_embeddings = Counter("swl_gateway_track_embeddings_total",
                                        "Face tracks embedded to compare with a reference photo.", registry=r)
        self.unauthenticated = Counter("swl_gateway_unauthenticated_total",
                                       "Calls refused for a missing or wrong API key.", registry=r)
        self.uploads_bytes = Gauge("swl_gateway_upload_store_bytes", "Bytes of raw uploads held now.", registry=r)
        self.plan_cache_lookups = Counter("swl_gateway_plan_cache_lookups_total",
                                          "Face-plan cache lookups, by backend and result (hit or miss).",
                                          ["backend", "result"], registry=r)
        self.plan_cache_errors = Counter("swl_gateway_plan_cache_errors_total",
                                         "Plan-cache calls that failed or timed out (the job planned afresh).",
                                         ["backend"], registry=r)
        self.planning_seconds_saved = Counter("swl_gateway_planning_seconds_saved_total",
                                              "Planning time that cached plans and avatars saved.", registry=r)
        self.avatars = Gauge("swl_gateway_avatars", "Avatars stored (as this replica last counted them).",
                             registry=r)
        self.live_sessions = Gauge("swl_gateway_live_sessions", "Live sessions open now.", registry=r)
        self.live_frames = Counter("swl_gateway_live_frames_total", "Live frames sent, by kind (speech or idle).",
                                   ["kind"], registry=r)
        self.live_dropped = Counter("swl_gateway_live_frames_dropped_total", "Live frames skipped: not made in time "
                                    "(late) or not taken by a slow client (client).", ["reason"], registry=r)
        self.live_lateness = Histogram("swl_gateway_live_frame_lateness_seconds", "How long after its presentation "
                                       "time each live frame was sent.", registry=r,
                                       buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64))
        self.live_first_frame = Histogram("swl_gateway_live_first_frame_seconds", "From an utterance's first speech "
                                          "chunk to its first frame sent.", registry=r,
                                          buckets=(0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.75, 1, 2))
        self.live_underruns = Counter("swl_gateway_live_audio_underruns_total", "Utterances whose speech ran out "
                                      "before their end (they ended early).", registry=r)
        self.job_events = Counter("swl_gateway_job_events_total",
                                  "Asynchronous jobs submitted, succeeded, failed, cancelled or requeued.", ["event"],
                                  registry=r)
        self.webhook_attempts = Counter("swl_gateway_webhook_attempts_total", "Webhook deliveries tried, by outcome.",
                                        ["outcome"], registry=r)
        self.redetected_frames = Counter("swl_gateway_redetected_frames_total",
                                         "Frames detected between detect_every picks because the face moved too "
                                         "much to interpolate.", registry=r)
        self.received_bytes = Counter("swl_gateway_received_bytes_total", "Media bytes uploaded by clients.",
                                      registry=r)
