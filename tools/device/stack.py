"""The stack end to end on the device: the model services on the GPU, the gateway on the machine's cores.

Started by `tools/device/runner.py --measure stack` once the bundle is installed (or here with --providers cpu on
generated models: tests/tools/test_device_bundle.py). Steps, most important first, each saved to stack.json and
stack.md under --out as soon as it is measured, so a run stopped at its limit still returns what it had:

1. fresh: one fresh 5 s 720p clip without and one with GFPGAN, each as a real-time factor, and the gateway's
   busy seconds per frame by stage for the first one (bench/stages.py's metrics).
2. clients: batched against the seed's lock at 1, 8 and 32 clients (bench/throughput.py's clients); from the
   largest batched run, the gateway's CPU seconds per frame (from /proc) and the GPU's inference seconds per frame
   (from the services' metrics), hence how many gateway cores one GPU keeps busy: the GPU overlay's replica ratio.
3. seed: the seed's comparison, a fresh process per request against the resident services (bench/seed.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from bench import seed, stages, throughput  # noqa: E402
from service_runtime import registry  # noqa: E402
from superwav2lip_client import Client  # noqa: E402

MODEL_SERVICES = tuple(entry.name for entry in registry.model_services())
FULL_SIZE = ("wav2lip_gan", "gfpgan_v1.4", "arcface_seed")
# The gateway container's CPU limit in deploy/k8s/base/gateway/deployment.yaml (tests/tools/test_device_bundle.py
# checks the two agree): one replica can use this many cores.
GATEWAY_CORES = 4
TIMEOUT_S = 600


def service_env(provider: str) -> dict[str, str]:
    """What the GPU overlay sets on each model service, less TensorRT (not on the device): CUDA, refuse to start
    without a GPU, I/O binding as the GPU default; on cpu only the provider."""
    env = {}
    for name in MODEL_SERVICES:
        prefix = f"SWL_{name.upper()}_"
        env[prefix + "PROVIDERS"] = provider
        if provider == "cuda":
            env[prefix + "REQUIRE_GPU"] = "true"
            env[prefix + "IO_BINDING"] = "auto"
    return env


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a process has used (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def inference_seconds(snapshot: dict, services: tuple[str, ...]) -> float:
    """The model services' summed inference seconds in one bench/stages.py snapshot."""
    return sum(value for service in services for (metric, _), value in snapshot[service].items()
               if metric == "swl_inference_seconds")


class Recorder:
    """The result so far, rewritten to --out after each step."""

    def __init__(self, out: Path, header: dict) -> None:
        self.out, self.result = out, {"environment": header, "skipped": []}

    def add(self, step: str, value) -> None:
        self.result[step] = value
        self.save()

    def skip(self, why: str) -> None:
        self.result["skipped"].append(why)
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "stack.json").write_text(json.dumps(self.result, indent=1) + "\n")
        (self.out / "stack.md").write_text(markdown(self.result))


class Faces:
    """Fresh clips (new content: a plan-cache miss, as a new user's) made ahead, on every core."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.next_variant = seconds, 1

    def take(self, count: int) -> list[bytes]:
        variants = range(self.next_variant, self.next_variant + count)
        self.next_variant += count
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            return list(pool.map(lambda v: throughput.clip(self.seconds, variant=v), variants))


def fresh_step(stack: throughput.Stack, faces: Faces, audio: bytes, seconds: float) -> dict:
    """One fresh clip without and with GFPGAN after a warm request each; stage busy seconds for the first."""
    frames = round(seconds * 25)
    plain, enhanced, warm_plain, warm_enhanced = faces.take(4)
    with Client(stack.address, timeout=TIMEOUT_S) as client:
        client.generate(warm_plain, audio)
        client.generate(warm_enhanced, audio, enhance=True)
        before, cpu_before = stages.snapshot(stack.metrics_port), cpu_seconds(stack.gateway_pid())
        wall = throughput.timed(lambda: client.generate(plain, audio))
        after, cpu_after = stages.snapshot(stack.metrics_port), cpu_seconds(stack.gateway_pid())
        wall_enhanced = throughput.timed(lambda: client.generate(enhanced, audio, enhance=True))
    busy = {name.removeprefix("gateway: "): value / frames
            for name, value, _ in stages.breakdown(before, after, wall) if name.startswith("gateway: ")}
    return {"seconds": seconds, "wall_s": wall, "real_time_factor": seconds / wall, "wall_enhanced_s": wall_enhanced,
            "real_time_factor_enhanced": seconds / wall_enhanced, "gateway_stage_busy_s_per_frame": busy,
            "gateway_cpu_s_per_frame": (cpu_after - cpu_before) / frames}


def clients_run(stack: throughput.Stack, faces: list[bytes], audio: bytes, seconds: float) -> dict:
    """One simultaneous generation per face; wall time, gateway CPU and GPU inference per frame."""
    frames = round(seconds * 25) * len(faces)
    before, cpu_before = stages.snapshot(stack.metrics_port), cpu_seconds(stack.gateway_pid())
    wall = throughput.run_clients(stack.address, faces, audio)
    after, cpu_after = stages.snapshot(stack.metrics_port), cpu_seconds(stack.gateway_pid())
    gpu = inference_seconds(after, ("detector", "lipsync")) - inference_seconds(before, ("detector", "lipsync"))
    return {"clients": len(faces), "wall_s": wall, "requests_per_s": len(faces) / wall,
            "real_time_factor": len(faces) * seconds / wall, "gateway_cpu_s_per_frame": (cpu_after - cpu_before) / frames,
            "gpu_inference_s_per_frame": gpu / frames}


def replica_ratio(run: dict) -> dict:
    """How many gateway cores (and GATEWAY_CORES-core replicas) one GPU keeps busy, from a batched run."""
    gpu_frames_per_s = 1 / run["gpu_inference_s_per_frame"] if run["gpu_inference_s_per_frame"] > 0 else math.inf
    cores = gpu_frames_per_s * run["gateway_cpu_s_per_frame"]
    return {"from_clients": run["clients"], "gpu_frames_per_s": gpu_frames_per_s, "gateway_cores_per_gpu": cores,
            "gateway_cores_per_replica": GATEWAY_CORES,
            "gateway_replicas_per_gpu": math.ceil(cores / GATEWAY_CORES) if math.isfinite(cores) else None}


def clients_step(work: Path, env: dict, faces: Faces, audio: bytes, seconds: float, counts: list[int],
                 recorder: Recorder, deadline: float, first: throughput.Stack) -> None:
    """Batched (the stack already started) then the seed's lock, the same fresh faces for both."""
    batches = [faces.take(n) for n in counts]
    runs: dict[str, list[dict]] = {}
    for mode in ("batched", "seed lock"):
        stack = first if mode == "batched" else throughput.Stack(work, work / "logs-seed-lock",
                                                                 {**env, **throughput.SEED_ENV})
        try:
            if mode != "batched":
                throughput.run_clients(stack.address, faces.take(1), audio)  # its first request warms it
            runs[mode] = []
            for batch in batches:
                if time.monotonic() > deadline:
                    recorder.skip(f"clients: {mode} at {len(batch)} clients, past the budget")
                    continue
                runs[mode].append(clients_run(stack, batch, audio, seconds))
                recorder.add("clients", clients_summary(runs))
        finally:
            stack.stop()


def clients_summary(runs: dict[str, list[dict]]) -> dict:
    summary = {"runs": runs}
    batched = runs.get("batched", [])
    if batched:
        summary["replica_ratio"] = replica_ratio(batched[-1])
    locked = {r["clients"]: r for r in runs.get("seed lock", [])}
    summary["batched_over_lock"] = {str(r["clients"]): locked[r["clients"]]["wall_s"] / r["wall_s"]
                                    for r in batched if r["clients"] in locked}
    return summary


def seed_step(models: Path, seconds: float, enhance_seconds: float, work: Path) -> list[dict]:
    rows = [seed.measure(models, length, enhance, 2, 1, work)
            for length, enhance in ((seconds, False), (enhance_seconds, True)) if length > 0]
    return [{"enhance": r.enhance, "seconds": r.seconds, "process_s": r.process_median,
             "process_startup_s": r.process_startup_median, "resident_startup_s": r.resident_startup,
             "resident_first_s": r.resident_first, "resident_steady_s": r.steady_median, "ratio": r.ratio}
            for r in rows]


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"Stack end to end: model services on {env['provider']}, gateway on {env['cores']} cores; "
             f"GPU: {env['gpu']}; models: {env['models']}; clip {env['seconds']:g} s 1280x720 25 fps.", ""]
    if "fresh" in result:
        f = result["fresh"]
        lines += ["| fresh clip | seconds | x real time |", "| --- | ---: | ---: |",
                  f"| no enhancer | {f['wall_s']:.2f} | {f['real_time_factor']:.2f} |",
                  f"| GFPGAN v1.4 | {f['wall_enhanced_s']:.2f} | {f['real_time_factor_enhanced']:.2f} |", "",
                  "| gateway stage (no enhancer) | busy ms per frame |", "| --- | ---: |"]
        lines += [f"| {stage} | {1000 * s:.2f} |" for stage, s in f["gateway_stage_busy_s_per_frame"].items()]
        lines += [f"| gateway process CPU | {1000 * f['gateway_cpu_s_per_frame']:.2f} |", ""]
    if "clients" in result:
        c = result["clients"]
        lines += ["| mode | clients | seconds | req/s | x real time | gateway CPU ms/frame | GPU inference ms/frame |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {mode} | {r['clients']} | {r['wall_s']:.2f} | {r['requests_per_s']:.2f} | "
                  f"{r['real_time_factor']:.2f} | {1000 * r['gateway_cpu_s_per_frame']:.2f} | "
                  f"{1000 * r['gpu_inference_s_per_frame']:.2f} |" for mode, runs in c["runs"].items() for r in runs]
        lines += [f"- batched over the lock at {n} clients: {x:.2f}x" for n, x in c["batched_over_lock"].items()]
        if "replica_ratio" in c:
            r = c["replica_ratio"]
            replicas = r["gateway_replicas_per_gpu"]
            lines += [f"- replica ratio (from {r['from_clients']} clients): one GPU does {r['gpu_frames_per_s']:.0f} "
                      f"frames/s of detection and lip-sync, which keeps {r['gateway_cores_per_gpu']:.1f} gateway "
                      f"cores busy: {replicas} gateway replica(s) of {r['gateway_cores_per_replica']} cores per GPU"]
        lines.append("")
    if "seed" in result:
        lines += ["| enhancer | clip s | process per request s | of which start-up | resident first s | "
                  "resident steady s | process / resident |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {'GFPGAN v1.4' if r['enhance'] else 'none'} | {r['seconds']:g} | {r['process_s']:.2f} | "
                  f"{r['process_startup_s']:.2f} | {r['resident_first_s']:.2f} | {r['resident_steady_s']:.2f} | "
                  f"{r['ratio']:.2f} |" for r in result["seed"]]
        lines.append("")
    lines += [f"- skipped: {s}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def measure(args) -> Recorder:
    from tools.device.measure import gpu_name

    started = time.monotonic()
    deadline = started + args.budget_s
    env = service_env(args.providers)
    os.environ.update(env)  # the stacks and the seed's one-request processes inherit it
    work = args.work / "stack"
    work.mkdir(parents=True, exist_ok=True)
    full_size = () if args.dev_models else FULL_SIZE
    # measure.py's stand-ins (same file names) are reused when the models phase ran first in this --work
    detector = throughput.prepare_models(work, full_size, cache=args.work / "models")
    counts = [int(c) for c in args.clients.split(",")]
    recorder = Recorder(args.out, {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
        "provider": args.providers, "gpu": gpu_name(), "seconds": args.seconds, "service_env": env,
        "models": ("generated small models" if args.dev_models else "Wav2Lip, GFPGAN v1.4 and ArcFace stand-ins "
                   "at full cost") + f"; detector {detector}"})
    audio = throughput.speech(args.seconds)
    faces = Faces(args.seconds)
    stack = throughput.Stack(work, work / "logs-batched", env)
    try:
        recorder.add("fresh", fresh_step(stack, faces, audio, args.seconds))
    except BaseException:
        stack.stop()
        raise
    steps = set(args.steps.split(","))
    if "clients" in steps:
        clients_step(work, env, faces, audio, args.seconds, counts, recorder, deadline, stack)
    else:
        stack.stop()
    if "seed" not in steps:
        recorder.skip("seed: not asked for (--steps)")
    elif time.monotonic() > deadline:
        recorder.skip("seed: past the budget")
    else:
        recorder.add("seed", seed_step(work, args.seconds, args.enhance_seconds, work))
    recorder.result["seconds"] = round(time.monotonic() - started, 1)
    recorder.save()
    return recorder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/swl-measure"))
    parser.add_argument("--seconds", type=float, default=5.0, help="each clip's length")
    parser.add_argument("--enhance-seconds", type=float, default=5.0, help="the seed comparison's enhanced clip")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--dev-models", action="store_true", help="small generated models (the CPU test)")
    parser.add_argument("--budget-s", type=float, default=300, help="no new client run or step starts past this")
    parser.add_argument("--steps", default="fresh,clients,seed", help="fresh always runs; clients and seed may be "
                        "left out (the CPU test leaves out seed, which tests/tools/test_bench.py runs)")
    args = parser.parse_args(argv)
    recorder = measure(args)
    print(markdown(recorder.result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
