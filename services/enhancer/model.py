"""GFPGAN wrapper: 512x512 uint8 BGR aligned face -> restored 512x512 uint8 BGR face."""

from __future__ import annotations

import numpy as np

from service_runtime.errors import InvalidArgument
from service_runtime.images import from_model_output, to_model_input
from service_runtime.manifest import ModelSpec
from service_runtime.onnx_session import OnnxModel

FACE_SIZE = 512


class FaceRestorer:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model: OnnxModel | None = None

    def prepare(self, face: np.ndarray) -> np.ndarray:
        if face.shape[:2] != (FACE_SIZE, FACE_SIZE):
            raise InvalidArgument(
                f"face is {face.shape[1]}x{face.shape[0]}; the enhancer takes FFHQ-aligned {FACE_SIZE}x{FACE_SIZE} faces"
            )
        pre = self.spec.preprocess
        return to_model_input(face, pre.channel_order, pre.mean, pre.std)

    def run_batch(self, items: list[np.ndarray]) -> list[np.ndarray]:
        assert self.model is not None, "model not loaded"
        restored = self.model.run({self.spec.input().name: np.stack(items)})[0]
        pre = self.spec.preprocess
        return list(from_model_output(restored, pre.channel_order, pre.mean, pre.std))
