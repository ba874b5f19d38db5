"""The Grafana dashboard (`deploy/grafana/superwav2lip.json`), written from this one description of its panels.

    python -m deploy.grafana.dashboard          # rewrite the JSON
    python -m deploy.grafana.dashboard --check  # exit 1 when the checked-in JSON differs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DASHBOARD_PATH = Path(__file__).resolve().parent / "superwav2lip.json"
RATE = "[$__rate_interval]"


def quantile(q: float, metric: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{RATE})))"


# (title, unit, [(legend, PromQL)]); a row of two panels per pair.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Gateway stage latency, p95 per job", "s",
     [("{{stage}}", quantile(0.95, "swl_gateway_stage_seconds", "stage"))]),
    ("Model call latency, p95 per batch", "s",
     [("{{model}}", quantile(0.95, "swl_inference_seconds", "model"))]),
    ("Batch size (mean items per model call)", "none",
     [("{{model}}", f"sum by (model) (rate(swl_batch_size_sum{RATE})) / sum by (model) (rate(swl_batch_size_count{RATE}))")]),
    ("Batching queue depth", "none",
     [("{{model}} {{pod}}", "sum by (model, pod) (swl_queue_depth)"),
      ("rejected/s {{model}}", f"sum by (model) (rate(swl_queue_rejections_total{RATE}))")]),
    ("Plan cache hit rate", "percentunit",
     [("{{backend}}", f'sum by (backend) (rate(swl_gateway_plan_cache_lookups_total{{result="hit"}}{RATE})) / '
                      f"sum by (backend) (rate(swl_gateway_plan_cache_lookups_total{RATE}))"),
      ("errors/s {{backend}}", f"sum by (backend) (rate(swl_gateway_plan_cache_errors_total{RATE}))")]),
    ("Generation outcomes (per second, by status code)", "reqps",
     [("{{code}}", f"sum by (code) (rate(swl_gateway_jobs_total{RATE}))")]),
    ("Asynchronous jobs (per second, by event)", "reqps",
     [("{{event}}", f"sum by (event) (rate(swl_gateway_job_events_total{RATE}))")]),
    ("Jobs in flight and output frames", "none",
     [("jobs in flight", "sum(swl_gateway_jobs_inflight)"),
      ("frames/s", f"sum(rate(swl_gateway_frames_total{RATE}))")]),
    ("Model-service errors (per second, by code)", "reqps",
     [("{{method}} {{code}}", f'sum by (method, code) (rate(swl_grpc_requests_total{{code!="OK"}}{RATE}))')]),
    ("Bytes to model services and from clients", "Bps",
     [("to {{service}}", f"sum by (service) (rate(swl_gateway_sent_bytes_total{RATE}))"),
      ("uploaded", f"sum(rate(swl_gateway_received_bytes_total{RATE}))")]),
]


def panel(index: int, title: str, unit: str, targets: list[tuple[str, str]]) -> dict:
    return {
        "id": index + 1, "type": "timeseries", "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + n), "expr": expr, "legendFormat": legend}
                    for n, (legend, expr) in enumerate(targets)],
    }


def dashboard() -> dict:
    return {
        "title": "Super Wav2Lip", "uid": "superwav2lip", "schemaVersion": 39, "version": 1,
        "tags": ["superwav2lip"], "timezone": "utc", "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": [panel(i, *spec) for i, spec in enumerate(PANELS)],
    }


def rendered() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.check:
        if DASHBOARD_PATH.read_text() != rendered():
            sys.exit(f"{DASHBOARD_PATH} is out of date: run `python -m deploy.grafana.dashboard`")
        return
    DASHBOARD_PATH.write_text(rendered())
    print(f"wrote {DASHBOARD_PATH}")


if __name__ == "__main__":
    main()
