"""Wav2Lip wrapper: 96x96 uint8 crop + mel window -> 6-channel model input -> 96x96 uint8 face."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service_runtime.errors import InvalidArgument
from service_runtime.images import from_model_output, to_model_input
from service_runtime.manifest import ModelSpec
from service_runtime.onnx_session import OnnxModel

FACE_SIZE = 96
MEL_BINS, MEL_STEPS = 80, 16
FACE_BYTES = FACE_SIZE * FACE_SIZE * 3
MEL_BYTES = MEL_BINS * MEL_STEPS * 4


@dataclass(frozen=True)
class LipSyncInput:
    window: np.ndarray  # 6x96x96 float32: masked crop then unmasked crop
    mel: np.ndarray  # 1x80x16 float32


def masked_window(face: np.ndarray, channel_order: str, mean, std) -> np.ndarray:
    """Wav2Lip's input: the crop with rows 48..95 zeroed, stacked on channels with the unmasked crop."""
    masked = face.copy()
    masked[FACE_SIZE // 2 :] = 0
    return np.concatenate([to_model_input(masked, channel_order, mean, std),
                           to_model_input(face, channel_order, mean, std)])


class LipSyncGenerator:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.mel_input, self.face_input = (t.name for t in spec.inputs)
        self.model: OnnxModel | None = None

    def prepare(self, face_bytes: bytes, mel_bytes: bytes) -> LipSyncInput:
        if len(face_bytes) != FACE_BYTES:
            raise InvalidArgument(
                f"face has {len(face_bytes)} bytes; expected a {FACE_SIZE}x{FACE_SIZE} BGR24 crop ({FACE_BYTES} bytes)"
            )
        if len(mel_bytes) != MEL_BYTES:
            raise InvalidArgument(
                f"mel has {len(mel_bytes)} bytes; expected {MEL_BINS}x{MEL_STEPS} float32 ({MEL_BYTES} bytes)"
            )
        mel = np.frombuffer(mel_bytes, "<f4").reshape(1, MEL_BINS, MEL_STEPS)
        if not np.isfinite(mel).all():
            raise InvalidArgument("mel window holds NaN or infinite values")
        face = np.frombuffer(face_bytes, np.uint8).reshape(FACE_SIZE, FACE_SIZE, 3)
        pre = self.spec.preprocess
        return LipSyncInput(masked_window(face, pre.channel_order, pre.mean, pre.std), mel.astype(np.float32))

    def run_batch(self, items: list[LipSyncInput]) -> list[np.ndarray]:
        assert self.model is not None, "model not loaded"
        feeds = {self.mel_input: np.stack([i.mel for i in items]), self.face_input: np.stack([i.window for i in items])}
        predicted = self.model.run(feeds)[0]
        pre = self.spec.preprocess
        return list(from_model_output(predicted, pre.channel_order, pre.mean, pre.std))
