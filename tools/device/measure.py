"""The one prepared measurement on the device: gpu-check against CPU and per-model items/s by batch, precision and I/O binding.

Started by tools/device/runner.py with the private target first on PYTHONPATH and the image's CUDA libraries on
LD_LIBRARY_PATH; writes measure.json and measure.md under --out. With --providers cpu the same path runs here."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

from service_runtime.manifest import load_manifest  # noqa: E402
from service_runtime.providers import PROVIDER_NAMES, ProviderConfig  # noqa: E402
from service_runtime.quantize import calibration_feeds  # noqa: E402

MODELS = "wav2lip_gan,scrfd_2.5g,arcface_r50,gfpgan_v1.4"  # most important first: the deadline skips the tail
FULL_SIZE = {"wav2lip_gan", "gfpgan_v1.4", "arcface_r50"}  # bench/full_size_models.py writes stand-ins for these
TENSORRT_NOTE = ("TensorRT is not installed on this machine (no TensorRT libraries in the image, none carried): "
                 "the TensorRT rows of gpu-check stay open for a machine that has it")


class MeasureError(RuntimeError):
    """The environment is not the one asked for (wrong onnxruntime, no CUDA provider): nothing was measured."""


def environment(target: Path | None, required: list[str], provider: str) -> dict:
    """What ran: onnxruntime's origin, device and providers, the GPU, and the shadowing checks."""
    import onnxruntime as ort

    env = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
           "python": sys.version.split()[0], "onnxruntime": ort.__version__, "onnxruntime_file": ort.__file__,
           "device": ort.get_device(), "providers": ort.get_available_providers(), "gpu": gpu_name(),
           "preloaded": preload(ort) if provider == "cuda" else "not asked (cpu)"}
    env["tensorrt"] = "available" if PROVIDER_NAMES["tensorrt"] in env["providers"] else TENSORRT_NOTE
    env["from_target"] = {name: module_file(name) for name in required}
    outside = [f"{n} ({f})" for n, f in env["from_target"].items() if target is None or not under(f, target)]
    if outside:
        raise MeasureError(f"not imported from the private target {target}: {', '.join(outside)}; put the target "
                           "first on PYTHONPATH (the runner does) or remove the image's copy")
    if PROVIDER_NAMES[provider] not in env["providers"]:
        raise MeasureError(f"{PROVIDER_NAMES[provider]} is not offered by onnxruntime {ort.__version__} at "
                           f"{ort.__file__} (device {env['device']}, providers {env['providers']}): the CPU build "
                           "shadows the GPU one, or CUDA 13 / cuDNN 9 libraries are not on LD_LIBRARY_PATH")
    return env


def preload(ort) -> str:
    """onnxruntime-gpu >= 1.21 can load CUDA and cuDNN from the nvidia wheels itself; LD_LIBRARY_PATH is the fallback."""
    if not hasattr(ort, "preload_dlls"):
        return "no preload_dlls in this onnxruntime; LD_LIBRARY_PATH only"
    try:
        ort.preload_dlls()
        return "preload_dlls() ran"
    except Exception as error:  # a missing library is reported, then the session shows whether CUDA works
        return f"preload_dlls() failed: {error}"


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "none (nvidia-smi printed nothing)"
    except (OSError, subprocess.TimeoutExpired):
        return "none (no nvidia-smi)"


def module_file(name: str) -> str:
    module = __import__(name)
    return str(Path(module.__file__).resolve())


def under(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def prepare_models(work: Path, names: list[str], real_models: Path | None) -> Path:
    """A models folder for the device: full-size stand-ins, carried real weights, generated ones for the rest."""
    from bench.full_size_models import write_full_size
    from service_runtime.dev_models import write_dev_model

    folder = work / "models"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "models" / "manifest.json", folder / "manifest.json")
    manifest = load_manifest(folder)
    for name in names:
        spec = manifest.get(name)
        carried = real_models / spec.file if real_models else None
        if carried and carried.is_file():
            shutil.copy(carried, folder / spec.file)
        elif name in FULL_SIZE:
            write_full_size(folder, folder, name)
        else:
            write_dev_model(spec, folder / "dev")
    return folder


def fp16_models(models_dir: Path, names: list[str], allow_dev: bool, work: Path) -> Path:
    """fp16 copies under the manifest's file names (inputs and outputs stay fp32), so load_model takes them as they are."""
    from service_runtime.fp16 import convert
    from service_runtime.onnx_session import resolve_model_path

    folder = work / "fp16"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(models_dir / "manifest.json", folder / "manifest.json")
    manifest = load_manifest(models_dir)
    for name in names:
        spec = manifest.get(name)
        source, _ = resolve_model_path(models_dir, spec, allow_dev)
        convert(source, folder / spec.file)
    return folder


def batch_feeds(spec, batch: int) -> dict[str, np.ndarray]:
    feeds = next(calibration_feeds(spec, 1, batch_size=batch))
    return {k: v if len(v) == batch else np.repeat(v, batch, axis=0) for k, v in feeds.items()}


def items_per_s(model, feeds: dict, min_seconds: float) -> float:
    """Steady-state rate: two warm runs, then whole runs until min_seconds have passed (at least three)."""
    batch = len(next(iter(feeds.values())))
    model.run(feeds)
    model.run(feeds)
    runs, started = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - started < min_seconds:
        model.run(feeds)
        runs += 1
    return batch * runs / (time.perf_counter() - started)


def throughput(name: str, models_dir: Path, precision: str, provider: str, batches: list[int], allow_dev: bool,
               min_seconds: float) -> list[dict]:
    from service_runtime.onnx_session import load_model

    spec = load_manifest(models_dir).get(name)
    rows = []
    for binding in ("on", "off"):
        config = ProviderConfig(provider, strict=True, io_binding=binding, max_batch_size=max(batches))
        model = load_model(spec, models_dir, provider_config=config, allow_dev=allow_dev)
        sizes = [1] if model.fixed_batch else batches  # a fixed batch of 1: larger batches are consecutive calls
        for batch in sizes:
            rows.append({"model": name, "precision": precision, "io_binding": binding, "batch": batch,
                         "provider": model.providers[0], "bound": model.runner is not None,
                         "fixed_batch": model.fixed_batch,
                         "items_per_s": items_per_s(model, batch_feeds(spec, batch), min_seconds)})
    return rows


def gpu_check_rows(names: list[str], models_dir: Path, provider: str, allow_dev: bool) -> list[dict]:
    """tools/gpu_check.py's check, at batches 1 and 8 only: its CPU reference at 128 would outlast the lease."""
    from tools import gpu_check

    return [row for name in names for row in gpu_check.check(name, models_dir, provider, [1, 8], allow_dev)]


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"GPU: {env['gpu']}; onnxruntime {env['onnxruntime']} ({env['device']}), providers "
             f"{', '.join(env['providers'])}. {env['tensorrt']}.", "",
             "| model | provider | batch | ms per batch | ms without binding | largest relative error vs CPU | ok |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['model']} | {r['provider']} | {r['batch']}{' (fixed)' if r['fixed_batch'] else ''} | {r['ms']:.2f} | {r['unbound_ms']:.2f} | "
              f"{r['error']:.2e} | {'yes' if r['ok'] else 'NO'} |" for r in result["gpu_check"]]
    lines += ["", "| model | precision | I/O binding | batch | items/s |", "| --- | --- | --- | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['precision']} | {r['io_binding']} | {r['batch']}"
              f"{' (fixed 1)' if r['fixed_batch'] else ''} | {r['items_per_s']:.1f} |" for r in result["throughput"]]
    lines += [f"- skipped: {s}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def measure(args) -> dict:
    started = time.monotonic()
    deadline = started + args.budget_s
    names = [n for n in args.models.split(",") if n]
    env = environment(args.target, [n for n in args.require_from_target.split(",") if n], args.providers)
    work = args.work
    models_dir = args.models_dir or prepare_models(work, names, args.real_models)
    allow_dev = args.allow_dev_models or args.models_dir is None  # generated SCRFD when no real one travelled
    batches = [int(b) for b in args.batches.split(",")]
    result = {"environment": env, "gpu_check": [], "throughput": [], "skipped": []}
    result["gpu_check"] = gpu_check_rows(names, models_dir, args.providers, allow_dev)
    half = fp16_models(models_dir, names, allow_dev, work)
    for name in names:
        for precision, folder in (("fp32", models_dir), ("fp16", half)):
            if time.monotonic() > deadline:
                result["skipped"].append(f"{name} {precision}: past the {args.budget_s:.0f} s budget")
                continue
            result["throughput"] += throughput(name, folder, precision, args.providers, batches, allow_dev,
                                               args.min_seconds)
        save(args.out, result)  # a run stopped at its limit still leaves the models measured so far
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def save(out: Path, result: dict) -> None:
    (out / "measure.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "measure.md").write_text(markdown(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/swl-measure"))
    parser.add_argument("--target", type=Path, help="the private install target (checked with --require-from-target)")
    parser.add_argument("--require-from-target", default="", help="modules that must import from --target")
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--models-dir", type=Path, help="use these models (default: prepare full-size stand-ins)")
    parser.add_argument("--real-models", type=Path, help="carried real weights (SCRFD-2.5G)")
    parser.add_argument("--allow-dev-models", action="store_true")
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="timed time per row")
    parser.add_argument("--budget-s", type=float, default=360, help="no new model starts past this")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        result = measure(args)
    except MeasureError as error:
        (args.out / "measure.json").write_text(json.dumps({"error": str(error)}, indent=1) + "\n")
        print(f"measurement refused: {error}", file=sys.stderr)
        return 4
    save(args.out, result)
    print(markdown(result))
    return 0 if all(r["ok"] for r in result["gpu_check"]) else 1


if __name__ == "__main__":
    sys.exit(main())
