"""Random-weight models with the real layer structure and cost, for benchmarks: Wav2Lip (~36 M parameters,
~4 GMACs per 96x96 frame), GFPGAN v1.4 (~84 M, ~198 GMACs per 512x512 face) and ArcFace R50 (~44 M, ~6.3 GMACs)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from service_runtime.dev_models import _Graph, _fix_wildcards, _output_names
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

    def leaky(self, x):
        return self.g.op("LeakyRelu", [x], alpha=0.2)

    def resize(self, x, scale: float):
        return self.g.op("Resize", [x, "", self.g.const(np.array([1, 1, scale, scale], np.float32))], mode="linear")

    def linear(self, x, d_in, d_out):
        self.params += d_in * d_out + d_out
        w = self.g.const((self.g.rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32))
        return self.g.op("Gemm", [x, w, self.g.const(np.zeros(d_out, np.float32))])

    def channel_scale(self, x, c):
        """A per-channel affine (an unfolded BatchNorm at inference)."""
        self.params += 2 * c
        scale = self.g.const(np.ones((1, c, 1, 1), np.float32))
        return self.g.op("Add", [self.g.op("Mul", [x, scale]), self.g.const(np.zeros((1, c, 1, 1), np.float32))])

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


# GFPGANv1Clean at 512 px with channel_multiplier 2: the U-Net runs at half the decoder's width (unet_narrow 0.5).
GFPGAN_UNET = {4: 256, 8: 256, 16: 256, 32: 256, 64: 256, 128: 128, 256: 64, 512: 32}
GFPGAN_DECODER = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64}
STYLE_FEATURES, LATENTS = 512, 16


def _resblock(n: _Net, x, c_in, c_out, scale):
    """GFPGANv1Clean's ResBlock: conv, resample, conv, plus a resampled 1x1 skip."""
    out = n.resize(n.leaky(n.conv(x, c_in, c_in, 3, 1, 1, act=False)), scale)
    out = n.leaky(n.conv(out, c_in, c_out, 3, 1, 1, act=False))
    n.params += c_in * c_out
    skip_w = n.g.const((n.g.rng.standard_normal((c_out, c_in, 1, 1)) / np.sqrt(c_in)).astype(np.float32))
    return n.g.op("Add", [out, n.g.op("Conv", [n.resize(x, scale), skip_w])])


def _style_conv(n: _Net, x, c_in, c_out, latent, size, k=3, upsample=False, demodulate=True):
    """StyleGAN2's modulated convolution: the style scales the input channels (the same product as scaling the
    weights), the output is demodulated by the modulated weights' norm, then noise, bias and LeakyReLU."""
    g = n.g
    style = g.op("Reshape", [n.linear(latent, STYLE_FEATURES, c_in), g.const(np.array([1, c_in, 1, 1], np.int64))])
    if upsample:
        x = n.resize(x, 2.0)
    n.params += c_out * c_in * k * k
    weight = g.const((g.rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2 / (c_in * k * k))).astype(np.float32))
    out = g.op("Conv", [g.op("Mul", [x, style]), weight], pads=[k // 2] * 4)
    if demodulate:
        squared = g.op("ReduceSum", [g.op("Mul", [weight, weight]), g.const(np.array([2, 3], np.int64))], keepdims=0)
        style_sq = g.op("Reshape", [g.op("Mul", [style, style]), g.const(np.array([1, c_in], np.int64))])
        norm = g.op("MatMul", [style_sq, g.op("Transpose", [squared], perm=[1, 0])])
        demod = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [norm, g.const(np.array(1e-8, np.float32))])])])
        out = g.op("Mul", [out, g.op("Reshape", [demod, g.const(np.array([1, c_out, 1, 1], np.int64))])])
        noise = g.const((g.rng.standard_normal((1, 1, size, size)) * 0.01).astype(np.float32))
        n.params += size * size + 1
        out = g.op("Add", [out, noise])
    n.params += c_out
    out = g.op("Add", [out, g.const(np.zeros((1, c_out, 1, 1), np.float32))])
    return n.leaky(out) if demodulate else out


def gfpgan_graph(spec, seed: int = 0):
    """TencentARC GFPGANv1Clean (v1.4): a U-Net whose bottleneck gives the style codes and whose decoder
    features give SFT scale and shift maps to a StyleGAN2 decoder (sft_half), as exported for inference."""
    spec = _fix_wildcards(spec)
    g = _Graph(seed)
    n = _Net(g)
    (x,) = (t.name for t in spec.inputs)
    unet, dec = GFPGAN_UNET, GFPGAN_DECODER
    feat = n.leaky(n.conv(x, 3, unet[512], 1, act=False))
    skips, c = [], unet[512]
    for size in (256, 128, 64, 32, 16, 8, 4):
        feat = _resblock(n, feat, c, unet[size], 0.5)
        skips.insert(0, feat)
        c = unet[size]
    feat = n.leaky(n.conv(feat, c, unet[4], 3, 1, 1, act=False))
    flat = g.op("Reshape", [feat, g.const(np.array([1, unet[4] * 16], np.int64))])
    codes = g.op("Reshape", [n.linear(flat, unet[4] * 16, LATENTS * STYLE_FEATURES),
                             g.const(np.array([1, LATENTS, STYLE_FEATURES], np.int64))])
    latents = [g.op("Gather", [codes, g.const(np.array(i, np.int64))], axis=1) for i in range(LATENTS)]
    conditions = []
    for i, size in enumerate((8, 16, 32, 64, 128, 256, 512)):
        feat = _resblock(n, g.op("Add", [feat, skips[i]]), c, unet[size], 2.0)
        c = unet[size]
        for _ in ("scale", "shift"):
            conditions.append(n.conv(n.leaky(n.conv(feat, c, c, 3, 1, 1, act=False)), c, c, 3, 1, 1, act=False))
    n.params += dec[4] * 16
    out = g.const((g.rng.standard_normal((1, dec[4], 4, 4))).astype(np.float32))  # the constant input
    out = _style_conv(n, out, dec[4], dec[4], latents[0], 4)
    skip = _style_conv(n, out, dec[4], 3, latents[1], 4, k=1, demodulate=False)
    c, i = dec[4], 1
    for size in (8, 16, 32, 64, 128, 256, 512):
        out = _style_conv(n, out, c, dec[size], latents[i], size, upsample=True)
        same, sft = g.name("same"), g.name("sft")
        g.nodes.append(g.helper.make_node("Split", [out, g.const(np.array([dec[size] // 2] * 2, np.int64))],
                                          [same, sft], axis=1))
        sft = g.op("Add", [g.op("Mul", [sft, conditions[i - 1]]), conditions[i]])
        out = g.op("Concat", [same, sft], axis=1)
        out = _style_conv(n, out, dec[size], dec[size], latents[i + 1], size)
        rgb = _style_conv(n, out, dec[size], 3, latents[i + 2], size, k=1, demodulate=False)
        skip = g.op("Add", [rgb, n.resize(skip, 2.0)])
        c, i = dec[size], i + 2
    (name,) = _output_names(spec)
    g.op("Identity", [skip], name)
    return g.model(spec, [name], {}), n.params


def _ibasic_block(n: _Net, x, c_in, c_out, stride):
    """insightface IResNet's block: BN, conv, BN, PReLU, strided conv, BN, plus a strided 1x1 projection."""
    out = n.conv(n.channel_scale(x, c_in), c_in, c_out, 3, 1, 1, act=False)
    n.params += c_out
    out = n.g.op("PRelu", [n.channel_scale(out, c_out), n.g.const(np.full((c_out, 1, 1), 0.25, np.float32))])
    out = n.channel_scale(n.conv(out, c_out, c_out, 3, stride, 1, act=False), c_out)
    identity = x if stride == 1 and c_in == c_out else n.channel_scale(n.conv(x, c_in, c_out, 1, stride, 0, act=False), c_out)
    return n.g.op("Add", [out, identity])


def arcface_r50_graph(spec, seed: int = 0):
    """insightface's IResNet-50 (ArcFace R50): layers of 3, 4, 14 and 3 blocks, then a 512-d embedding."""
    spec = _fix_wildcards(spec)
    g = _Graph(seed)
    n = _Net(g)
    (x,) = (t.name for t in spec.inputs)
    n.params += 64
    x = g.op("PRelu", [n.channel_scale(n.conv(x, 3, 64, 3, 1, 1, act=False), 64),
                       g.const(np.full((64, 1, 1), 0.25, np.float32))])
    c = 64
    for width, blocks in ((64, 3), (128, 4), (256, 14), (512, 3)):
        for b in range(blocks):
            x = _ibasic_block(n, x, c, width, 2 if b == 0 else 1)
            c = width
    x = n.channel_scale(x, 512)
    flat = g.op("Flatten", [x], axis=1)
    (name,) = _output_names(spec)
    g.op("Identity", [n.linear(flat, 512 * 7 * 7, 512)], name)
    return g.model(spec, [name], {}), n.params


def count_macs(model, dims: dict[str, int] | None = None) -> int:
    """Multiply-accumulates of one run of `model` (Conv, ConvTranspose, Gemm, MatMul), with symbolic input
    dimensions set from `dims` (anything else: 1)."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for tensor in model.graph.input:
        for dim in tensor.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = (dims or {}).get(dim.dim_param, 1)
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    shapes.update({w.name: list(w.dims) for w in model.graph.initializer})
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            out, weight = shapes[node.output[0]], shapes[node.input[1]]
            total += int(np.prod(out)) * int(np.prod(weight[1:]))
        elif node.op_type == "ConvTranspose":
            inp, weight = shapes[node.input[0]], shapes[node.input[1]]
            total += int(np.prod(inp)) * int(np.prod(weight[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a, out = shapes[node.input[0]], shapes[node.output[0]]
            total += int(np.prod(out)) * a[-1]
    return total


BUILDERS = {"lipsync": wav2lip_graph, "enhancer": gfpgan_graph, "embedder": arcface_r50_graph}


def build_full_size(models_dir: Path, name: str):
    """The stand-in for manifest model `name` (its role picks the structure), in memory: (ModelProto, parameters)."""
    spec = load_manifest(models_dir).get(name)
    return BUILDERS[spec.role](spec)


def write_full_size(models_dir: Path, out_dir: Path, name: str) -> tuple[Path, int]:
    """Writes the stand-in for manifest model `name`; returns (path, parameters)."""
    import onnx

    spec = load_manifest(models_dir).get(name)
    model, params = build_full_size(models_dir, name)
    path = out_dir / spec.file
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path, params


def write_wav2lip(models_dir: Path, out_dir: Path, name: str = "wav2lip_gan") -> tuple[Path, int]:
    return write_full_size(models_dir, out_dir, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("bench/models"))
    parser.add_argument("--models", default="wav2lip_gan,gfpgan_v1.4,arcface_seed",
                        help="manifest names; the role picks the structure")
    args = parser.parse_args()
    for name in args.models.split(","):
        path, params = write_full_size(args.models_dir, args.out, name)
        import onnx

        macs = count_macs(onnx.load(str(path)))
        print(f"wrote {path}: {params / 1e6:.1f} M parameters, {macs / 1e9:.2f} GMACs per item")


if __name__ == "__main__":
    main()
