"""`superwav2lip-fp16`: an fp16 copy of an ONNX model for GPU serving, inputs and outputs kept in fp32 so that
the services feed it unchanged, and the largest relative error against fp32 on inputs in the service's ranges.

    python -m service_runtime.fp16 wav2lip_gan --models-dir models
The copy is written beside the source as `<name>.fp16.onnx`. (TensorRT needs no copy: `TRT_FP16` builds fp16
engines from the fp32 file.)"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .manifest import ModelSpec, load_manifest
from .onnx_session import resolve_model_path
from .quantize import calibration_feeds

FP16_SUFFIX = ".fp16.onnx"


def convert(source: Path, target: Path) -> Path:
    """Writes the fp16 copy. Inputs and outputs stay fp32 (casts are inserted at the edges); operators without
    an fp16 kernel in onnxruntime (Resize's scales, shapes) stay as they are."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True, disable_shape_infer=False)
    onnx.save(model, str(target))
    return target


def largest_relative_error(spec: ModelSpec, fp32: Path, fp16: Path, batches: int = 2, feeds=None) -> float:
    """max |fp16 - fp32| / max |fp32| over every output, on `feeds` or calibration-range random inputs, both
    models on onnxruntime's CPU provider (its fp16 kernels are emulated there: the numbers, not the speed)."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in (fp32, fp16)]
    worst = 0.0
    for batch in feeds if feeds is not None else calibration_feeds(spec, batches, batch_size=1 if _fixed(sessions[0])
                                                                     else 4):
        reference, halved = (s.run(None, batch) for s in sessions)
        for r, h in zip(reference, halved):
            if h.dtype != r.dtype:
                raise AssertionError(f"output type changed from {r.dtype} to {h.dtype}")
        worst = max(worst, relative_error(reference, halved))
    return worst


def relative_error(reference: list[np.ndarray], other: list[np.ndarray]) -> float:
    """The largest max |other - reference| / max |reference| over paired outputs."""
    worst = 0.0
    for r, o in zip(reference, other):
        scale = float(np.abs(r).max()) or 1.0
        worst = max(worst, float(np.abs(o.astype(np.float64) - r).max()) / scale)
    return worst


def _fixed(session) -> bool:
    return isinstance(session.get_inputs()[0].shape[0], int)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="manifest name, e.g. wav2lip_gan")
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--extra-model-dirs", default="", help="comma-separated folders searched after models-dir")
    parser.add_argument("--allow-dev-models", action="store_true", help="convert the generated dev file")
    parser.add_argument("-o", "--output", help="default: beside the source, <name>.fp16.onnx")
    args = parser.parse_args(argv)
    spec = load_manifest(args.models_dir).get(args.model)
    extra = tuple(d for d in args.extra_model_dirs.split(",") if d)
    source, _ = resolve_model_path(args.models_dir, spec, args.allow_dev_models, extra)
    target = Path(args.output) if args.output else source.parent / (Path(spec.file).stem + FP16_SUFFIX)
    convert(source, target)
    error = largest_relative_error(spec, source, target)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB, from {source.stat().st_size / 1e6:.1f} MB); "
          f"largest relative error against fp32: {error:.2e}")


if __name__ == "__main__":
    main()
