"""Whole-stack benchmark: cross-request batching vs the seed's lock, gateway memory, bytes on the wire.

Runs `tools/run_stack.py` as real processes with a full-size Wav2Lip (real layer structure, random
weights), the real SCRFD detector from ../shared/models when present, and prints markdown tables."""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from bench.full_size_models import write_full_size  # noqa: E402
from bench.results import publish  # noqa: E402
from superwav2lip_client import Client  # noqa: E402
from service_runtime.dev_models import write_dev_model  # noqa: E402
from service_runtime.manifest import load_manifest  # noqa: E402

# The shared photos, speech and real SCRFD weights; the device runner points this at the copies it carried.
SHARED = Path(os.environ.get("SWL_SHARED_DIR") or ROOT.parent / "shared")
FULL_SIZE_CACHE = ROOT / "bench" / "models"  # git-ignored; the stand-ins take seconds to write
SEED_ENV = {"SWL_GATEWAY_SERIAL_JOBS": "1", "SWL_DETECTOR_BATCH_ACROSS_CALLS": "0",
            "SWL_LIPSYNC_BATCH_ACROSS_CALLS": "0", "SWL_ENHANCER_BATCH_ACROSS_CALLS": "0"}


def prepare_models(folder: Path, full_size: tuple[str, ...] = ("wav2lip_gan",), cache: Path = FULL_SIZE_CACHE) -> str:
    """Manifest, the `full_size` stand-ins (written once into `cache`, then linked), the real SCRFD if
    available, and generated small models for the rest; returns what the detector is."""
    shutil.copy(ROOT / "models" / "manifest.json", folder / "manifest.json")
    manifest = load_manifest(folder)
    for spec in manifest.models.values():
        write_dev_model(spec, folder / "dev")
    for name in full_size:
        cached = cache / manifest.get(name).file
        if not cached.is_file():
            write_full_size(folder, cache, name)
        os.symlink(cached, folder / cached.name)
    scrfd = SHARED / "models" / "scrfd_2.5g_bnkps.onnx"
    if scrfd.is_file():
        os.symlink(scrfd, folder / scrfd.name)
        return "SCRFD-2.5G (real weights)"
    return "generated marker detector (cheaper than SCRFD-2.5G)"


def speech(seconds: float) -> bytes:
    """`seconds` of the shared 60 s speech (or a tone sweep without it), as a 16 kHz mono wav."""
    source = SHARED / "media" / "speech_en_60s_16k.wav"
    if source.is_file():
        with av.open(str(source)) as container:
            samples = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    else:
        t = np.arange(16000 * 60) / 16000
        samples = (np.sin(2 * np.pi * 200 * t) * 8000).astype(np.int16)
    samples = samples[: int(seconds * 16000)].astype(np.int16)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None], format="s16", layout="mono")
        frame.sample_rate = 16000
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def clip(seconds: float, crf: int = 23, variant: int = 0) -> bytes:
    """A 720p25 clip: the shared moving-astronaut video, ping-ponged to length (or a marker clip without it).
    A `variant` marks one 16x16 corner block of the first frame: new content (a plan-cache miss) at the same cost."""
    source = SHARED / "media" / "face_astronaut_moving_720p25_5s.mp4"
    if source.is_file():
        with av.open(str(source)) as container:
            frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    else:
        frames = []
        for i in range(125):
            frame = np.full((720, 1280, 3), 110, np.uint8)
            frame[200:400, 300 + 4 * i : 500 + 4 * i] = (0, 255, 0)
            frames.append(frame)
    if variant:
        frames[0] = frames[0].copy()
        frames[0][:16, :16] = (variant * 37 % 256, variant % 256, 255 - variant % 256)
    needed = int(seconds * 25)
    order = [i % (2 * len(frames) - 2) for i in range(needed)]
    order = [i if i < len(frames) else 2 * len(frames) - 2 - i for i in order]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for i in order:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frames[i], format="bgr24")))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def free_base_port() -> int:
    for _ in range(100):
        base = random.randint(21000, 39000)
        try:
            for offset in range(5):  # gateway, detector, lipsync, enhancer, redis
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


class Stack:
    """`tools/run_stack.py` in a subprocess, gRPC only (no Envoy, no UI: the clients call the gateway directly),
    started with `config`'s command line, with the gateway's process id for memory readings."""

    def __init__(self, models: Path, logs: Path, env: dict[str, str]) -> None:
        from tools.run_stack import StackConfig  # imports the gateway: only when a stack starts

        self.config = StackConfig(base_port=free_base_port(), metrics_base_port=free_base_port(), models_dir=models,
                                  logs=logs, extra_model_dirs=(), http_port=0, ui_port=0)
        self.metrics_port = self.config.metrics_port("gateway")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tools.run_stack", *self.config.argv()],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env}, cwd=ROOT)
        for line in self.process.stdout:
            if line.startswith("READY"):
                break
        else:
            raise RuntimeError("the stack did not start; see " + str(logs))
        threading.Thread(target=lambda: [None for _ in self.process.stdout], daemon=True).start()
        self.address = self.config.address("gateway")

    def gateway_pid(self) -> int:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        for pid in children:
            if "gateway" in Path(f"/proc/{pid}/cmdline").read_text():
                return int(pid)
        raise RuntimeError("gateway process not found")

    def gateway_peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.gateway_pid()}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def gateway_metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def timed(call) -> float:
    """Wall seconds of one call."""
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def run_clients(address: str, faces: list[bytes], audio: bytes) -> float:
    """Wall seconds for one simultaneous generation per face."""
    errors: list[BaseException] = []

    def one(face: bytes) -> None:
        try:
            with Client(address, timeout=1800) as client:
                client.generate(face, audio)
        except BaseException as error:  # reported after the run
            errors.append(error)

    threads = [threading.Thread(target=one, args=(face,)) for face in faces]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(faces)} generations failed: {errors[0]}")
    return time.perf_counter() - started


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name) and not line.startswith("#"))


@dataclasses.dataclass
class Throughput:
    """Everything `make bench` measures, in seconds, bytes and MiB."""

    seconds: float  # of each clip
    wall: dict[str, dict[int, float]]  # mode -> clients -> wall seconds for that many simultaneous requests
    wire: dict[str, float]  # bytes sent per output frame, by service
    peak_rss_mb: dict[float, float]  # clip seconds -> gateway peak RSS after one request on a fresh stack
    plan_cache_hits: float  # in the batched stack: 0 when every request planned afresh, as intended

    def ratio(self, clients: int) -> float:
        """Batched against the seed's lock: how much sooner the same requests finish."""
        return self.wall["seed lock"][clients] / self.wall["batched"][clients]


def measure(models: Path, seconds: float, counts: list[int], long_seconds: float, work: Path) -> Throughput:
    """Every request sends new content, so each plans afresh (detection included) as a new user's would; each
    stack has its own Redis, so the two modes see the same faces in the same order."""
    audio = speech(seconds)
    faces = [clip(seconds, variant=i) for i in range(1 + sum(counts))]
    wall: dict[str, dict[int, float]] = {}
    wire: dict[str, float] = {}
    hits = 0.0
    for mode, env in (("batched", {}), ("seed lock", SEED_ENV)):
        stack = Stack(models, work / f"logs-{mode.replace(' ', '-')}", env)
        try:
            unused = iter(faces)
            run_clients(stack.address, [next(unused)], audio)  # first request: nothing left to warm
            wall[mode] = {n: run_clients(stack.address, [next(unused) for _ in range(n)], audio) for n in counts}
            if mode == "batched":
                text = stack.gateway_metrics()
                frames = metric(text, "swl_gateway_frames_total")
                wire = {s: metric(text, f'swl_gateway_sent_bytes_total{{service="{s}"}}') / frames
                        for s in ("detector", "lipsync", "enhancer")}
                hits = sum(float(line.split()[-1]) for line in text.splitlines()
                           if line.startswith("swl_gateway_plan_cache_lookups_total") and 'result="hit"' in line)
        finally:
            stack.stop()
    peaks = {}
    for length in (seconds, long_seconds):
        stack = Stack(models, work / "logs-rss", {})
        try:
            run_clients(stack.address, [clip(length)], speech(length))
            peaks[length] = stack.gateway_peak_rss_mb()
        finally:
            stack.stop()
    return Throughput(seconds, wall, wire, peaks, hits)


def tables(result: Throughput) -> str:
    seconds = result.seconds
    lines = [f"Every request sends a new face clip (plan-cache hits: {result.plan_cache_hits:.0f}), so each one "
             "detects and plans as a new user's would.", "",
             "| clients | batched req/s | batched x real time | seed-lock req/s | seed-lock x real time | batched / seed |",
             "| --- | --- | --- | --- | --- | --- |"]
    for n in result.wall["batched"]:
        fast, slow = result.wall["batched"][n], result.wall["seed lock"][n]
        lines.append(f"| {n} | {n / fast:.3f} | {n * seconds / fast:.2f} | {n / slow:.3f} | {n * seconds / slow:.2f} | "
                     f"{result.ratio(n):.2f} |")
    raw = 1280 * 720 * 3
    wire = result.wire
    total = sum(wire.values())
    lines += ["", "| bytes sent per output frame | detector | lipsync | enhancer | all | raw 720p frame | ratio |",
              "| --- | --- | --- | --- | --- | --- | --- |",
              f"| gateway -> services | {wire['detector']:.0f} | {wire['lipsync']:.0f} | {wire['enhancer']:.0f} | "
              f"{total:.0f} | {raw} | {total / raw:.3f} |"]
    (short, short_mb), (long, long_mb) = result.peak_rss_mb.items()
    lines += ["", f"| gateway peak RSS | {short:g} s clip | {long:g} s clip | ratio |", "| --- | --- | --- | --- |",
              f"| MiB | {short_mb:.0f} | {long_mb:.0f} | {long_mb / short_mb:.2f} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--long-seconds", type=float, default=30.0, help="clip for the gateway memory bound")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="swl-bench-"))
    try:
        detector = prepare_models(work)
        result = measure(work, args.seconds, counts, args.long_seconds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = (f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; Wav2Lip full size "
            f"(36.9 M params, random weights); detector: {detector}; clip {args.seconds:g} s 1280x720 25 fps\n\n"
            + tables(result))
    publish("throughput", "Throughput, wire bytes and gateway memory (`make bench`)", text, write=not args.no_write)


if __name__ == "__main__":
    main()
