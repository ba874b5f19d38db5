"""Detector and embedder model wrappers: pixels in, faces / unit embeddings out, in batches."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from service_runtime.errors import InvalidArgument
from service_runtime.images import to_model_input
from service_runtime.manifest import ModelSpec
from service_runtime.onnx_session import OnnxModel

from .decoders import DECODERS, Detections

EMBED_SIZE = 112


STRIDE = 32  # the coarsest feature stride of SCRFD, YuNet and RetinaFace: input sides must be multiples of it


@dataclass(frozen=True)
class Letterboxed:
    """A frame resized into the model input; `scale` maps model pixels back to frame pixels."""

    tensor: np.ndarray
    scale: float
    threshold: float


def letterbox(frame: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Fits the frame into size x size keeping its aspect ratio, padding right and bottom with black."""
    height, width = frame.shape[:2]
    ratio = min(size / height, size / width)
    resized = cv2.resize(frame, (max(1, round(width * ratio)), max(1, round(height * ratio))),
                         interpolation=cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR)
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[: resized.shape[0], : resized.shape[1]] = resized
    return canvas, 1.0 / ratio


def fit_to_stride(frame: np.ndarray, longest: int, stride: int = STRIDE) -> tuple[np.ndarray, float]:
    """Keeps the frame's aspect: scales it down (never up) until its longest side is at most `longest`, then pads
    right and bottom to multiples of `stride`. A 640x360 frame costs 640x384, about 60% of 640x640."""
    height, width = frame.shape[:2]
    ratio = min(1.0, longest / max(height, width))
    size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
    resized = frame if ratio == 1.0 else cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
    canvas = np.zeros((-(-size[1] // stride) * stride, -(-size[0] // stride) * stride, 3), np.uint8)
    canvas[: size[1], : size[0]] = resized
    return canvas, 1.0 / ratio


class FaceDetector:
    """Fits frames to the detector's input (their own aspect by default, or the square letterbox) and decodes its
    outputs per frame."""

    def __init__(self, spec: ModelSpec, input_size: int, square: bool = False) -> None:
        if input_size % 32:
            raise ValueError(f"detection input size {input_size} must be a multiple of 32")
        decoder = spec.options.get("decoder")
        if decoder not in DECODERS:
            raise ValueError(f"{spec.name}: unknown decoder {decoder!r}; known: {sorted(DECODERS)}")
        self.spec = spec
        self.size = input_size
        self.square = square
        self.decode = DECODERS[decoder]
        self.default_threshold = float(spec.options.get("score_threshold", 0.5))
        self.iou = float(spec.options.get("nms_iou", 0.4))
        self.decoder_kwargs = {"per_cell": spec.options["anchors_per_cell"]} if decoder == "scrfd" else {}
        self.model: OnnxModel | None = None

    def prepare(self, frame: np.ndarray, threshold: float = 0.0) -> Letterboxed:
        canvas, scale = letterbox(frame, self.size) if self.square else fit_to_stride(frame, self.size)
        pre = self.spec.preprocess
        tensor = to_model_input(canvas, pre.channel_order, pre.mean, pre.std)
        return Letterboxed(tensor, scale, threshold or self.default_threshold)

    def run_batch(self, items: list[Letterboxed]) -> list[Detections]:
        """One model call per input shape in the batch (frames of different aspects cannot share a tensor)."""
        assert self.model is not None, "model not loaded"
        results: list[Detections | None] = [None] * len(items)
        shapes: dict[tuple[int, ...], list[int]] = {}
        for index, item in enumerate(items):
            shapes.setdefault(item.tensor.shape, []).append(index)
        for shape, indices in shapes.items():
            feeds = {self.spec.input().name: np.stack([items[i].tensor for i in indices])}
            height, width = shape[-2:]
            for index, outputs in zip(indices, self.model.run_per_item(feeds)):
                squeezed = [out[0] if out.ndim == 3 else out for out in outputs]
                found = self.decode(squeezed, height, width, threshold=items[index].threshold, iou=self.iou,
                                    **self.decoder_kwargs)
                results[index] = found.scaled(items[index].scale)
        return results  # type: ignore[return-value]


class FaceEmbedder:
    """Runs the recognition model on aligned 112x112 crops and returns unit-length embeddings."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model: OnnxModel | None = None

    def prepare(self, crop: np.ndarray) -> np.ndarray:
        if crop.shape[:2] != (EMBED_SIZE, EMBED_SIZE):
            raise InvalidArgument(
                f"face crop is {crop.shape[1]}x{crop.shape[0]}; the embedder takes 5-point-aligned "
                f"{EMBED_SIZE}x{EMBED_SIZE} crops"
            )
        pre = self.spec.preprocess
        return to_model_input(crop, pre.channel_order, pre.mean, pre.std)

    def run_batch(self, items: list[np.ndarray]) -> list[np.ndarray]:
        assert self.model is not None, "model not loaded"
        (embeddings,) = self.model.run({self.spec.input().name: np.stack(items)})[:1]
        embeddings = embeddings.reshape(len(items), -1).astype(np.float32)
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        return list(embeddings / np.maximum(norms, 1e-12))
