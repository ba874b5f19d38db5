"""The seed's comparison on our own code: a fresh process per request against the resident services.

(a) The old way: for each request a new Python process loads every model (detector, recognition, Wav2Lip,
GFPGAN), serves that one request through the same pipeline and exits; the time runs from spawning it to its exit.
(b) The running stack (`make run`'s processes): the first request after start-up, then the steady state (median).
Every request sends a new encoding of the clip, so no plan cache flatters the resident services. The models are
stand-ins that cost what the real ones cost (bench/full_size_models.py) and the real SCRFD-2.5G when present.

    python -m bench.seed [--seconds 5] [--enhance-seconds 0.4] [--repeats 5] [--process-repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from bench.results import publish  # noqa: E402
from bench.throughput import Stack, clip, prepare_models, speech, timed  # noqa: E402
from superwav2lip_client import Client  # noqa: E402

FULL_SIZE = ("wav2lip_gan", "gfpgan_v1.4", "arcface_seed")


@dataclasses.dataclass
class Row:
    """One mode (with or without the enhancer), every time measured in seconds."""

    enhance: bool
    seconds: float  # of speech, so of video
    process: list[dict[str, float]]  # per fresh process: total, startup (spawn to ready), request
    resident_startup: float
    resident_first: float
    resident_steady: list[float]

    @property
    def process_median(self) -> float:
        return statistics.median(p["total"] for p in self.process)

    @property
    def process_startup_median(self) -> float:
        return statistics.median(p["startup"] for p in self.process)

    @property
    def steady_median(self) -> float:
        return statistics.median(self.resident_steady)

    @property
    def ratio(self) -> float:
        """Process per request / resident steady state: the seed's headline, measured here."""
        return self.process_median / self.steady_median


async def _serve_one(models: Path, face: Path, audio: Path, out: Path, enhance: bool) -> dict[str, float]:
    """In this process: start every service (models loaded, no warm-up runs), generate once, stop."""
    from gateway.service import GatewayService, GatewaySettings
    from service_runtime.server import ServiceServer
    from services.detector.service import DetectorService, DetectorSettings
    from services.enhancer.service import EnhancerService, EnhancerSettings
    from services.lipsync.service import LipSyncService, LipSyncSettings

    servers, addresses = [], {}
    common = dict(host="127.0.0.1", port=0, metrics_port=-1, grace_period_s=0.0, log_level="WARNING")
    try:
        for name, service_cls, settings_cls in (("detector", DetectorService, DetectorSettings),
                                                ("lipsync", LipSyncService, LipSyncSettings),
                                                ("enhancer", EnhancerService, EnhancerSettings)):
            settings = settings_cls.from_env(None, models_dir=str(models), allow_dev_models=True, **common)
            servers.append(ServiceServer(service_cls(settings)))
            addresses[f"{name}_address"] = f"127.0.0.1:{await servers[-1].start()}"
            await servers[-1].warm_up(run_models=False)
        with tempfile.TemporaryDirectory(prefix="swl-seed-data-") as data:
            settings = GatewaySettings.from_env(None, data_dir=data, allow_anonymous=True, **addresses, **common)
            servers.append(ServiceServer(GatewayService(settings)))
            port = await servers[-1].start()
            await servers[-1].warm_up()
            ready = time.time()

            def call() -> None:
                with Client(f"127.0.0.1:{port}", timeout=3600) as client:
                    client.generate(face.read_bytes(), audio.read_bytes(), output=out, enhance=enhance)

            await asyncio.to_thread(call)
            return {"ready": ready, "done": time.time()}
    finally:
        for server in reversed(servers):
            await server.stop(0)


def one_process(models: Path, face: bytes, audio: bytes, enhance: bool, work: Path) -> dict[str, float]:
    """Spawns the old way's process for one request; returns its total, start-up and request seconds."""
    (work / "face.mp4").write_bytes(face)
    (work / "audio.wav").write_bytes(audio)
    out = work / "out.mp4"
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "bench.seed", "--one-request", "--models", str(models), "--face",
               str(work / "face.mp4"), "--audio", str(work / "audio.wav"), "--out", str(out)]
    spawned = time.time()
    result = subprocess.run(command + (["--enhance"] if enhance else []), cwd=ROOT, capture_output=True, text=True)
    ended = time.time()
    if result.returncode != 0 or not out.is_file():
        raise RuntimeError(f"the one-request process failed ({result.returncode}):\n{result.stderr[-3000:]}")
    marks = json.loads(result.stdout.strip().splitlines()[-1])
    return {"total": ended - spawned, "startup": marks["ready"] - spawned, "request": marks["done"] - marks["ready"]}


def measure(models: Path, seconds: float, enhance: bool, repeats: int, process_repeats: int, work: Path) -> Row:
    """Both ways for one mode; each request gets a new encoding of the same clip (crf 18, 19, ...)."""
    audio = speech(seconds)
    faces = iter(clip(seconds, crf=18 + i) for i in range(process_repeats + repeats + 1))
    process = [one_process(models, next(faces), audio, enhance, work) for _ in range(process_repeats)]
    started = time.perf_counter()
    stack = Stack(models, work / f"logs-{'enhance' if enhance else 'plain'}", {})
    startup = time.perf_counter() - started
    try:
        with Client(stack.address, timeout=3600) as client:
            first = timed(lambda f=next(faces): client.generate(f, audio, enhance=enhance))
            steady = [timed(lambda f=face: client.generate(f, audio, enhance=enhance))
                      for face in [next(faces) for _ in range(repeats)]]
    finally:
        stack.stop()
    return Row(enhance, seconds, process, startup, first, steady)


def table(rows: list[Row], repeats: int, process_repeats: int) -> str:
    lines = [f"| enhancer | clip | process per request (median of {process_repeats}) | of which start-up | "
             f"resident: first request | resident: steady (median of {repeats}) | steady x real time | "
             "process / resident |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {'GFPGAN v1.4' if r.enhance else 'none'} | {r.seconds:g} s | {r.process_median:.2f} | "
                     f"{r.process_startup_median:.2f} | {r.resident_first:.2f} | {r.steady_median:.2f} | "
                     f"{r.seconds / r.steady_median:.2f} | {r.ratio:.2f} |")
    lines.append("")
    lines += [f"Starting the resident stack (every process SERVING, warm-up included) took "
              f"{', '.join(f'{r.resident_startup:.1f} s' for r in rows)}, once per start, not per request."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="clip length without the enhancer")
    parser.add_argument("--enhance-seconds", type=float, default=0.4,
                        help="clip length with the enhancer (GFPGAN costs about a second per frame on 2 cores)")
    parser.add_argument("--repeats", type=int, default=5, help="steady-state requests (the median is reported)")
    parser.add_argument("--process-repeats", type=int, default=3, help="fresh processes per mode")
    parser.add_argument("--dev-models", action="store_true", help="small generated models only (smoke tests)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--one-request", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--face", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--audio", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--enhance", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_request:
        print(json.dumps(asyncio.run(_serve_one(args.models, args.face, args.audio, args.out, args.enhance))))
        return
    work = Path(tempfile.mkdtemp(prefix="swl-bench-seed-"))
    try:
        detector = prepare_models(work, () if args.dev_models else FULL_SIZE)
        rows = [measure(work, length, enhance, args.repeats, args.process_repeats, work)
                for length, enhance in ((args.seconds, False), (args.enhance_seconds, True)) if length > 0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    models = ("generated small models" if args.dev_models else
              "Wav2Lip 36.9 M params / 3.97 GMACs per frame, GFPGAN v1.4 85.0 M / 198 GMACs per face, "
              "ArcFace R50 43.6 M / 6.31 GMACs (stand-ins with the real layer structure, random weights)")
    text = (f"1280x720 25 fps clip; {models}; detector {detector}. Times in seconds.\n\n"
            f"{table(rows, args.repeats, args.process_repeats)}")
    publish("seed", "The seed's comparison: a process per request against resident services (`make bench-seed`)",
            text, write=not args.no_write)


if __name__ == "__main__":
    main()
