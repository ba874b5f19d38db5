"""Random-weight models with the real layer structure and cost, for benchmarks (Wav2Lip: ~36 M params)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from service_runtime.dev_models import _Graph
from service_runtime.manifest import load_manifest


class _Net:
    """Conv + folded BatchNorm + ReLU blocks as Wav2Lip's `Conv2d` / `Conv2dTranspose` modules."""

    def __init__(self, g: _Graph) -> None:
        self.g = g
        self.params = 0

    def _weights(self, shape) -> str:
        fan_in = int(np.prod(shape[1:]))
        self.params += int(np.prod(shape)) + shape[0]
        return self.g.const((self.g.rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32))

    def conv(self, x, c_in, c_out, k, stride=1, pad=0, residual=False, act=True):
        strides = list(stride) if isinstance(stride, tuple) else [stride, stride]
        y = self.g.op("Conv", [x, self._weights((c_out, c_in, k, k)), self.g.const(np.zeros(c_out, np.float32))],
                      strides=strides, pads=[pad] * 4)
        if residual:
            y = self.g.op("Add", [y, x])
        return self.g.op("Relu", [y]) if act else y

    def up(self, x, c_in, c_out, k, stride, pad, output_padding=0):
        self.params += c_in * c_out * k * k + c_out
        w = self.g.const((self.g.rng.standard_normal((c_in, c_out, k, k)) * np.sqrt(2 / (c_in * k * k)))
                         .astype(np.float32))
        y = self.g.op("ConvTranspose", [x, w, self.g.const(np.zeros(c_out, np.float32))], strides=[stride] * 2,
                      pads=[pad] * 4, output_padding=[output_padding] * 2)
        return self.g.op("Relu", [y])

    def res(self, x, c, n):
        for _ in range(n):
            x = self.conv(x, c, c, 3, 1, 1, residual=True)
        return x


def wav2lip_graph(spec, seed: int = 0):
    """Rudrabha/Wav2Lip's generator: face encoder, audio encoder, decoder with skip connections."""
    g = _Graph(seed)
    n = _Net(g)
    mel, video = (t.name for t in spec.inputs)
    feats = []
    x = n.conv(video, 6, 16, 7, 1, 3)
    feats.append(x)
    for c_in, c_out, blocks in ((16, 32, 2), (32, 64, 3), (64, 128, 2), (128, 256, 2), (256, 512, 1)):
        x = n.res(n.conv(x, c_in, c_out, 3, 2, 1), c_out, blocks)
        feats.append(x)
    x = n.conv(n.conv(x, 512, 512, 3, 1, 0), 512, 512, 1, 1, 0)
    feats.append(x)
    a = n.res(n.conv(mel, 1, 32, 3, 1, 1), 32, 2)
    a = n.res(n.conv(a, 32, 64, 3, (3, 1), 1), 64, 2)
    a = n.res(n.conv(a, 64, 128, 3, 3, 1), 128, 2)
    a = n.res(n.conv(a, 128, 256, 3, (3, 2), 1), 256, 2)
    x = n.conv(n.conv(a, 256, 512, 3, 1, 0), 512, 512, 1, 1, 0)
    x = n.conv(x, 512, 512, 1, 1, 0)
    x = g.op("Concat", [x, feats.pop()], axis=1)
    for c_in, c_out, k, s, p, op, blocks in ((1024, 512, 3, 1, 0, 0, 1), (1024, 512, 3, 2, 1, 1, 2),
                                             (768, 384, 3, 2, 1, 1, 2), (512, 256, 3, 2, 1, 1, 2),
                                             (320, 128, 3, 2, 1, 1, 2), (160, 64, 3, 2, 1, 1, 2)):
        x = n.res(n.up(x, c_in, c_out, k, s, p, op), c_out, blocks)
        x = g.op("Concat", [x, feats.pop()], axis=1)
    x = n.conv(x, 80, 32, 3, 1, 1)
    x = n.conv(x, 32, 3, 1, 1, 0, act=False)
    (name,) = (t.name for t in spec.outputs)
    g.op("Sigmoid", [x], name)
    return g.model(spec, [name], {}), n.params


def write_wav2lip(models_dir: Path, out_dir: Path, name: str = "wav2lip_gan") -> tuple[Path, int]:
    import onnx

    spec = load_manifest(models_dir).get(name)
    model, params = wav2lip_graph(spec)
    path = out_dir / spec.file
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("bench/models"))
    args = parser.parse_args()
    path, params = write_wav2lip(args.models_dir, args.out)
    print(f"wrote {path}: {params / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
