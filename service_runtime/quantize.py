"""`superwav2lip-quantize`: an int8 copy of an ONNX model (onnxruntime static QDQ quantization) for CPU serving.

Weights are quantized per channel to int8 and activations to uint8, with ranges calibrated on inputs shaped and
scaled like the service's own (Wav2Lip: masked and unmasked face crops in [0, 1], mel windows in [-4, 4]). The
copy is written beside the source as `<name>.int8.onnx`; a service serves it with its `INT8` setting.

    python -m service_runtime.quantize wav2lip_gan --models-dir models
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .manifest import BATCH_DIM, ModelSpec, load_manifest
from .onnx_session import INT8_SUFFIX, resolve_model_path


def int8_spec(spec: ModelSpec) -> ModelSpec:
    """The spec of a model's int8 copy: same tensors, its own file and name, no published checksum."""
    return dataclasses.replace(spec, name=f"{spec.name}.int8", file=Path(spec.file).stem + INT8_SUFFIX, sha256="",
                               url="", size_bytes=0)


def calibration_feeds(spec: ModelSpec, batches: int, batch_size: int = 8, seed: int = 0) -> Iterator[dict]:
    """Inputs in the ranges the service feeds: images in [0, 1] (the face crops after normalisation), other
    inputs (mel windows) in Wav2Lip's [-4, 4]."""
    rng = np.random.default_rng(seed)
    for _ in range(batches):
        feeds = {}
        for tensor in spec.inputs:
            shape = [batch_size if d == BATCH_DIM else (spec.warmup_dims.get(d, 1) if isinstance(d, str) else d)
                     for d in tensor.shape]
            if len(shape) == 4 and shape[1] in (3, 6):  # image channels
                feeds[tensor.name] = rng.random(shape, dtype=np.float32)
            else:
                feeds[tensor.name] = rng.uniform(-4, 4, shape).astype(np.float32)
        yield feeds


def quantize(spec: ModelSpec, source: Path, target: Path, batches: int = 8) -> Path:
    """Writes the int8 QDQ copy of `source` to `target`."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = calibration_feeds(spec, batches)

        def get_next(self):
            return next(self._feeds, None)

    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="manifest name, e.g. wav2lip_gan")
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--extra-model-dirs", default="", help="comma-separated folders searched after models-dir")
    parser.add_argument("--allow-dev-models", action="store_true", help="quantize the generated dev file")
    parser.add_argument("--batches", type=int, default=8, help="calibration batches of 8")
    parser.add_argument("-o", "--output", help="default: beside the source, <name>.int8.onnx")
    args = parser.parse_args(argv)
    spec = load_manifest(args.models_dir).get(args.model)
    extra = tuple(d for d in args.extra_model_dirs.split(",") if d)
    source, _ = resolve_model_path(args.models_dir, spec, args.allow_dev_models, extra)
    target = Path(args.output) if args.output else source.parent / int8_spec(spec).file
    quantize(spec, source, target, args.batches)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB, from {source.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
