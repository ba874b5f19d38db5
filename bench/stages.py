"""Where one job's time goes, read from the services' own metrics: the gateway's per-stage busy seconds and the
model services' inference seconds, before and after one fresh request on the running stack.

    python -m bench.stages [--seconds 5]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent

from bench.results import publish  # noqa: E402
from service_runtime import registry  # noqa: E402
from bench.throughput import Stack, clip, prepare_models, speech  # noqa: E402
from superwav2lip_client import Client  # noqa: E402
from superwav2lip.gateway.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: E402

SERVICES = registry.names()  # metrics ports follow this order from the stack's metrics base port
GATEWAY_STAGES = ("decode", "detect", "redecode", "crop", "lipsync", "paste", "enhance", "encode")


def sums(text: str) -> dict[tuple[str, str], float]:
    """(metric, label) -> the `_sum` of each histogram child, from a /metrics page."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                label = sample.labels.get("stage") or sample.labels.get("model") or ""
                found[(family.name, label)] = sample.value
    return found


def snapshot(metrics_base_port: int) -> dict[str, dict[tuple[str, str], float]]:
    return {name: sums(urllib.request.urlopen(f"http://127.0.0.1:{metrics_base_port + i}/metrics", timeout=5)
                       .read().decode()) for i, name in enumerate(SERVICES)}


def breakdown(before: dict, after: dict, wall: float) -> list[tuple[str, float, str]]:
    """Rows (stage, busy seconds, what it is) from the difference of two snapshots."""
    def delta(service, metric, label):
        return after[service].get((metric, label), 0.0) - before[service].get((metric, label), 0.0)

    rows = [(f"gateway: {stage}", delta("gateway", "swl_gateway_stage_seconds", stage), "gateway stage")
            for stage in GATEWAY_STAGES]
    for service in (entry.name for entry in registry.model_services()):
        for (metric, model) in after[service]:
            if metric == "swl_inference_seconds":
                rows.append((f"{service}: {model} inference", delta(service, metric, model), "model alone"))
    lipsync_model = sum(seconds for name, seconds, kind in rows if name.startswith("lipsync:"))
    rows.append(("lip-sync transfer and queueing", max(0.0, dict((r[0], r[1]) for r in rows)["gateway: lipsync"]
                                                       - lipsync_model), "round trip minus model"))
    rows.append(("end to end (wall)", wall, "the client's wait"))
    return rows


def table(rows: list[tuple[str, float, str]], wall: float) -> str:
    lines = ["| stage | busy seconds | share of wall | what |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {name} | {seconds:.2f} | {seconds / wall:.0%} | {kind} |" for name, seconds, kind in rows]
    return "\n".join(lines)


def first_bytes(address: str, face: bytes, audio: bytes) -> dict[str, float]:
    """Seconds from sending the request to the first video bytes, the first complete fragment and the end."""
    import grpc

    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.GenerateVideoRequest(face=face, audio=audio)
        started, marks = time.perf_counter(), {}
        for event in stub.GenerateEvents(request, timeout=1800):
            now = time.perf_counter() - started
            if event.WhichOneof("event") == "video_chunk":
                marks.setdefault("first video bytes", now)
                if b"moof" in event.video_chunk:
                    marks.setdefault("first playable fragment", now)
        marks["whole video"] = time.perf_counter() - started
    return marks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="swl-bench-stages-"))
    try:
        detector = prepare_models(work)
        face, audio = clip(args.seconds), speech(args.seconds)
        stack = Stack(work, work / "logs", {})
        try:
            with Client(stack.address, timeout=1800) as client:
                client.generate(clip(args.seconds, crf=30), audio)  # warm: numba kernels, sessions, caches
                before = snapshot(stack.metrics_port)
                started = time.perf_counter()
                client.generate(face, audio)
                wall = time.perf_counter() - started
                after = snapshot(stack.metrics_port)
                streamed = first_bytes(stack.address, clip(args.seconds, crf=24), audio)  # a fresh face again
        finally:
            stack.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    marks = "\n".join(f"| {name} | {seconds:.2f} |" for name, seconds in streamed.items())
    text = (f"One fresh {args.seconds:g} s 1280x720 25 fps clip, no enhancer, full-size Wav2Lip, detector {detector}; "
            "stages overlap (decode, synthesis and encode run as a pipeline), so busy seconds may add up to more "
            f"than the wall time.\n\n{table(breakdown(before, after, wall), wall)}\n\n"
            "Streaming (`GenerateEvents`, fragmented MP4, a fragment every 2 s of video), another fresh face:\n\n"
            f"| moment | seconds after the request |\n| --- | ---: |\n{marks}")
    publish("stages", "Where a job's time goes, from the services' metrics (`make bench-stages`)", text,
            write=not args.no_write)


if __name__ == "__main__":
    main()
