"""`make gpu-check`: on a machine with CUDA, loads each service's models on CUDA and on TensorRT (where this
onnxruntime has it), runs warm-up, compares outputs with the CPU provider within tolerance and prints latency
and throughput for batch 1, 8 and 32, with I/O binding (the services' default on a GPU) and without it.

    python -m tools.gpu_check [--models-dir models] [--providers cuda,tensorrt] [--batches 1,8,32]
Exit codes: 0 every check passed, 1 an output differed beyond tolerance, 2 no GPU provider to check."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent

from service_runtime.fp16 import relative_error  # noqa: E402
from service_runtime.manifest import load_manifest  # noqa: E402
from service_runtime.onnx_session import load_model  # noqa: E402
from service_runtime.providers import PROVIDER_NAMES, ProviderConfig  # noqa: E402
from service_runtime.quantize import calibration_feeds  # noqa: E402
from service_runtime import registry  # noqa: E402

# Largest relative difference from the CPU outputs: fp32 kernels differ in summation order; fp16 engines more.
TOLERANCE = {"cuda": 1e-3, "tensorrt": 2e-2, "cpu": 1e-6}  # cpu: the check checking itself


def service_models() -> list[str]:
    """The models each model service of the registry loads with this environment's settings."""
    return [model for entry in registry.model_services() for model in entry.configured_models()]


def timed(model, feeds: dict, repeats: int = 5) -> float:
    model.run(feeds)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.run(feeds)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def check(name: str, models_dir: Path, provider: str, batches: list[int], allow_dev: bool) -> list[dict]:
    spec = load_manifest(models_dir).get(name)
    reference = load_model(spec, models_dir, provider_config=ProviderConfig("cpu"), allow_dev=allow_dev)
    model = load_model(spec, models_dir, provider_config=ProviderConfig(provider, strict=True,
                                                                         max_batch_size=max(batches)),
                       allow_dev=allow_dev)
    model.warm_up((1, max(batches)))
    unbound = load_model(spec, models_dir, provider_config=ProviderConfig(provider, strict=True, io_binding="off",
                                                                           max_batch_size=max(batches)),
                         allow_dev=allow_dev)
    unbound.warm_up((1, max(batches)))
    rows = []
    # An export with a fixed batch of 1 (SCRFD, recognition, GFPGAN) gets batch-1 feeds whatever is asked: a larger
    # batch is consecutive calls at the same rate, so only batch 1 is measured and the row says so.
    for batch in [1] if model.fixed_batch else batches:
        feeds = next(calibration_feeds(spec, 1, batch_size=batch))
        error = relative_error(reference.run(feeds), model.run(feeds))
        seconds = timed(model, feeds)
        rows.append({"model": name, "provider": model.providers[0], "batch": batch, "ms": seconds * 1000,
                     "fixed_batch": model.fixed_batch,
                     "bound": model.runner is not None, "unbound_ms": timed(unbound, feeds) * 1000,
                     "items_per_s": batch / seconds, "error": error, "ok": error <= TOLERANCE[provider]})
    return rows


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--providers", default="cuda,tensorrt")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--models", default="", help="manifest names (default: what each service loads)")
    parser.add_argument("--allow-dev-models", action="store_true")
    args = parser.parse_args(argv)
    available = ort.get_available_providers()
    wanted = [p for p in args.providers.split(",") if p]
    present = [p for p in wanted if PROVIDER_NAMES[p] in available]
    if not present:
        print(f"no GPU provider to check: this onnxruntime ({ort.__version__}) offers {available}. Install "
              "onnxruntime-gpu (pip install -e .[gpu]) on a machine with an NVIDIA GPU and its driver.")
        return 2
    for missing in sorted(set(wanted) - set(present)):
        print(f"note: {missing} is not in this onnxruntime; skipped")
    batches = [int(b) for b in args.batches.split(",")]
    names = [n for n in args.models.split(",") if n] or service_models()
    rows = [row for provider in present for name in names
            for row in check(name, args.models_dir, provider, batches, args.allow_dev_models)]
    print("| model | provider | batch | ms per batch | items/s | I/O bound | ms without binding | "
          "largest relative error vs CPU | ok |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['provider']} | {r['batch']}{' (fixed)' if r['fixed_batch'] else ''} | {r['ms']:.2f} | {r['items_per_s']:.1f} | "
              f"{'yes' if r['bound'] else 'no'} | {r['unbound_ms']:.2f} | "
              f"{r['error']:.2e} | {'yes' if r['ok'] else 'NO'} |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
