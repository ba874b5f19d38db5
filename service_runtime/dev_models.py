"""Writes small random-weight ONNX models with the real models' tensor names and shapes (tests, demos)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from .manifest import BATCH_DIM, ModelSpec, TensorSpec, load_manifest

OPSET = 18
# Generated detectors find nothing in ordinary pictures. The SCRFD one "sees" one face at the top-left corner
# of a pure green marker (which tests draw), so the whole pipeline can run without real weights.
NO_FACE_BIAS = -12.0
MARKER_GAIN, MARKER_BIAS = 20.0, -8.0
# "Is green" = clip(4 * (G - (R + B) / 2 - 0.8), 0, 1): G - (R + B) / 2 is 1.99 for pure green on SCRFD's
# scale, so a cell at least 60% covered by the marker counts fully; muted colours stay at 0.
GREEN_SLOPE, GREEN_FLOOR = 4.0, 0.8
MARKER_BOX = [0.5, 0.5, 4.0, 4.0]  # left, top, right, bottom distances from the corner anchor, in strides
MARKER_KPS = [1.2, 1.4, 2.8, 1.4, 2.0, 2.2, 1.4, 3.0, 2.6, 3.0]  # eyes, nose, mouth corners, in strides


def _onnx():
    try:
        import onnx
        from onnx import helper
    except ImportError as exc:  # onnx is a dev dependency only
        raise SystemExit("generating dev models needs the onnx package: pip install -e .[dev]") from exc
    return onnx, helper


class _Graph:
    """A tiny builder over onnx.helper that names nodes and weights uniquely."""

    def __init__(self, seed: int) -> None:
        self.onnx, self.helper = _onnx()
        self.nodes: list = []
        self.weights: list = []
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, value: np.ndarray, prefix: str = "w") -> str:
        name = self.name(prefix)
        self.weights.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        output = output or self.name(op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, inputs, [output], **attrs))
        return output

    def conv(self, x: str, c_in: int, c_out: int, k: int = 1, bias: float | np.ndarray = 0.0, scale=0.05) -> str:
        w = (self.rng.standard_normal((c_out, c_in, k, k)) * scale).astype(np.float32)
        b = np.broadcast_to(np.asarray(bias, np.float32), (c_out,)).copy()
        return self.op("Conv", [x, self.const(w), self.const(b)], pads=[k // 2] * 4)

    def model(self, spec: ModelSpec, outputs: list[str], input_shapes: dict[str, list]) -> object:
        def value_info(name, shape):
            dims = [d if isinstance(d, int) else (None if d == BATCH_DIM else d) for d in shape]
            return self.helper.make_tensor_value_info(name, self.onnx.TensorProto.FLOAT, dims)

        out_specs = {t.name: t for t in spec.outputs}
        graph = self.helper.make_graph(
            self.nodes, spec.name,
            [value_info(t.name, input_shapes.get(t.name, t.shape)) for t in spec.inputs],
            [value_info(o, [d if not isinstance(d, str) else None for d in out_specs[o].shape]) for o in outputs],
            self.weights,
        )
        model = self.helper.make_model(graph, opset_imports=[self.helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        self.onnx.checker.check_model(model)
        return model


def _output_names(spec: ModelSpec) -> list[str]:
    return [t.name if t.name != "*" else f"output_{i}" for i, t in enumerate(spec.outputs)]


def _fix_wildcards(spec: ModelSpec) -> ModelSpec:
    """Gives "*" outputs a concrete name so that the generated file can declare them."""
    outs = tuple(TensorSpec(n, t.shape) for n, t in zip(_output_names(spec), spec.outputs))
    return dataclasses.replace(spec, outputs=outs)


def _detector(spec: ModelSpec, g: _Graph) -> list[str]:
    x = spec.input().name
    decoder = spec.options["decoder"]
    names = _output_names(spec)
    per_cell = spec.options.get("anchors_per_cell", 1 if decoder == "yunet" else 2)
    kinds = {"scrfd": (1, 4, 10), "yunet": (1, 1, 4, 10), "retinaface": (4, 2, 10)}[decoder]
    if decoder == "retinaface":
        per_stride: dict[int, list] = {k: [] for k in range(3)}
        for stride in (8, 16, 32):
            pooled = g.op("AveragePool", [x], kernel_shape=[stride, stride], strides=[stride, stride])
            for slot, k in enumerate(kinds):
                bias = np.tile([2.0, NO_FACE_BIAS], per_cell) if k == 2 else 0.0
                y = g.op("Transpose", [g.conv(pooled, 3, per_cell * k, bias=bias)], perm=[0, 2, 3, 1])
                per_stride[slot].append(g.op("Reshape", [y, g.const(np.array([0, -1, k], np.int64))]))
        for slot, name in enumerate(names):
            joined = g.op("Concat", per_stride[slot], axis=1)
            g.op("Softmax" if kinds[slot] == 2 else "Identity", [joined], name, **({"axis": 2} if kinds[slot] == 2 else {}))
        return names
    shape = (lambda k: [-1, k]) if decoder == "scrfd" else (lambda k: [1, -1, k])
    for index, name in enumerate(names):
        stride = (8, 16, 32)[index % 3]
        k = kinds[index // 3]
        is_score = index // 3 < (2 if decoder == "yunet" else 1)
        pooled = g.op("AveragePool", [x], kernel_shape=[stride, stride], strides=[stride, stride])
        if decoder == "scrfd" and stride == 32:
            y = _green_marker(g, pooled, per_cell, k)
        else:
            y = g.conv(pooled, 3, per_cell * k, bias=NO_FACE_BIAS if is_score else 0.0)
        y = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 3, 1]), g.const(np.array(shape(k), np.int64))])
        g.op("Sigmoid" if is_score else "Identity", [y], name)
    return names


def _green_marker(g: _Graph, pooled: str, per_cell: int, k: int) -> str:
    """Stride-32 SCRFD head of the marker detector: a score at the marker's top-left cell, fixed box and points."""
    if k == 1:
        # greenness = G - (R + B) / 2 per cell; the score fires where a cell is green but the cells to its
        # left and above are not, so each marker gives one corner (neighbours of it are removed by NMS).
        greenness = g.op("Clip", [g.op("Conv", [
            pooled, g.const(np.array([-0.5, 1.0, -0.5], np.float32).reshape(1, 3, 1, 1) * GREEN_SLOPE),
            g.const(np.full(1, -GREEN_FLOOR * GREEN_SLOPE, np.float32))]),
            g.const(np.array(0.0, np.float32)), g.const(np.array(1.0, np.float32))])
        corner = np.zeros((per_cell, 1, 3, 3), np.float32)
        corner[:, 0, 1, 1], corner[:, 0, 1, 0], corner[:, 0, 0, 1] = 1.0, -1.0, -1.0
        return g.op("Conv", [greenness, g.const(corner * MARKER_GAIN), g.const(np.full(per_cell, MARKER_BIAS,
                                                                                        np.float32))], pads=[1] * 4)
    values = MARKER_BOX if k == 4 else MARKER_KPS
    bias = np.tile(np.array(values, np.float32), per_cell)
    return g.op("Conv", [pooled, g.const(np.zeros((per_cell * k, 3, 1, 1), np.float32)), g.const(bias)])


def _embedder(spec: ModelSpec, g: _Graph) -> list[str]:
    width = spec.outputs[0].shape[-1]
    width = width if isinstance(width, int) else 512
    y = g.conv(spec.input().name, 3, width, k=3, scale=0.2)
    y = g.op("ReduceMean", [y, g.const(np.array([2, 3], np.int64))], keepdims=0)
    (name,) = _output_names(spec)
    g.op("Identity", [y], name)
    return [name]


def _lipsync(spec: ModelSpec, g: _Graph, identity: bool) -> list[str]:
    mel, video = (t.name for t in spec.inputs)
    mel_level = g.op("ReduceMean", [mel, g.const(np.array([1, 2, 3], np.int64))], keepdims=1)
    (name,) = _output_names(spec)
    if identity:
        unmasked = g.op("Slice", [video, g.const(np.array([3], np.int64)), g.const(np.array([6], np.int64)),
                                  g.const(np.array([1], np.int64))])
        # Touch the mel so it stays a live input, without changing the values.
        g.op("Add", [unmasked, g.op("Mul", [mel_level, g.const(np.zeros(1, np.float32))])], name)
    else:
        y = g.conv(video, 6, 3, k=3, scale=0.1)
        g.op("Sigmoid", [g.op("Add", [y, mel_level])], name)
    return [name]


def _enhancer(spec: ModelSpec, g: _Graph, identity: bool) -> list[str]:
    (name,) = _output_names(spec)
    x = spec.input().name
    if identity:
        g.op("Identity", [x], name)
    else:
        residual = g.op("Tanh", [g.conv(x, 3, 3, k=3, scale=0.02)])
        g.op("Clip", [g.op("Add", [x, residual]), g.const(np.array(-1, np.float32)), g.const(np.array(1, np.float32))], name)
    return [name]


def build_dev_model(spec: ModelSpec, identity: bool = False, seed: int = 0):
    """An onnx.ModelProto with the spec's input/output names and shapes and random weights."""
    g = _Graph(seed)
    if spec.role == "detector":
        _detector(spec, g)
    elif spec.role == "embedder":
        _embedder(spec, g)
    elif spec.role == "lipsync":
        _lipsync(spec, g, identity)
    elif spec.role == "enhancer":
        _enhancer(spec, g, identity)
    else:
        raise ValueError(f"{spec.name}: no dev model for role {spec.role!r}")
    return g.model(_fix_wildcards(spec), _output_names(spec), {})


def write_dev_model(spec: ModelSpec, out_dir: str | Path, identity: bool = False, file_name: str | None = None) -> Path:
    onnx, _ = _onnx()
    path = Path(out_dir) / (file_name or spec.file)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build_dev_model(spec, identity), str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write generated random-weight models for tests and demos.")
    parser.add_argument("--models-dir", default="models", help="folder with manifest.json")
    parser.add_argument("--out", default=None, help="output folder (default: <models-dir>/dev)")
    parser.add_argument("--identity", action="store_true", help="lip-sync and enhancer models that copy their input")
    parser.add_argument("names", nargs="*", help="manifest names (default: all)")
    args = parser.parse_args(argv)
    manifest = load_manifest(args.models_dir)
    out = args.out or str(Path(args.models_dir) / "dev")
    for name in args.names or sorted(manifest.models):
        path = write_dev_model(manifest.get(name), out, args.identity)
        print(f"wrote {path} ({path.stat().st_size} bytes, random weights: not for real use)")


if __name__ == "__main__":
    main()
