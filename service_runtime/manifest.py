"""The models manifest: each model's file, tensors, preprocessing, checksum and download address."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

MANIFEST_NAME = "manifest.json"
BATCH_DIM = "B"


@dataclass(frozen=True)
class TensorSpec:
    """Expected name and shape; an int dim must match exactly, a string dim is dynamic ("B" = batch).

    The name "*" accepts whatever the exporter called the tensor at that position.
    """

    name: str
    shape: tuple[int | str, ...]

    def describe(self) -> str:
        return f"{self.name}{list(self.shape)}"


@dataclass(frozen=True)
class Preprocess:
    """How pixels become the model's input: channel order and (x - mean) / std."""

    channel_order: str = "RGB"
    mean: float | tuple[float, ...] = 0.0
    std: float | tuple[float, ...] = 1.0


@dataclass(frozen=True)
class ModelSpec:
    name: str
    file: str
    role: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    preprocess: Preprocess = Preprocess()
    sha256: str = ""
    size_bytes: int = 0
    url: str = ""
    license: str = ""
    source: str = ""
    # Values for dynamic dims other than the batch when warming up, e.g. {"H": 640, "W": 640}.
    warmup_dims: dict[str, int] = field(default_factory=dict)
    # Role-specific options, e.g. a detector's decoder, strides and thresholds.
    options: dict[str, Any] = field(default_factory=dict)

    def input(self, index: int = 0) -> TensorSpec:
        return self.inputs[index]


def _tensor(raw: dict[str, Any]) -> TensorSpec:
    return TensorSpec(name=raw["name"], shape=tuple(raw["shape"]))


def _model(name: str, raw: dict[str, Any]) -> ModelSpec:
    return ModelSpec(
        name=name,
        file=raw["file"],
        role=raw["role"],
        inputs=tuple(_tensor(t) for t in raw["inputs"]),
        outputs=tuple(_tensor(t) for t in raw["outputs"]),
        preprocess=Preprocess(**{k: tuple(v) if isinstance(v, list) else v  # type: ignore[arg-type]
                                 for k, v in raw.get("preprocess", {}).items()}),  # JSON: this project's own file
        sha256=raw.get("sha256", ""),
        size_bytes=raw.get("bytes", 0),
        url=raw.get("url", ""),
        license=raw.get("license", ""),
        source=raw.get("source", ""),
        warmup_dims=raw.get("warmup_dims", {}),
        options=raw.get("options", {}),
    )


@dataclass(frozen=True)
class Manifest:
    models: dict[str, ModelSpec]

    def get(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models))
            raise ModelLoadError(f"model {name!r} is not in the manifest (known: {known})") from None


def load_manifest(models_dir: str | Path) -> Manifest:
    path = Path(models_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ModelLoadError(f"models manifest {path} not found: set *_MODELS_DIR to the project's models/ folder")
    raw = json.loads(path.read_text())
    return Manifest({name: _model(name, spec) for name, spec in raw["models"].items()})
