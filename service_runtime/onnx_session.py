"""onnxruntime session creation: install check, provider choice, tensor checks, fixed-batch handling."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .device_io import BoundRunner, bound_runner
from .errors import ModelLoadError
from .manifest import BATCH_DIM, ModelSpec, TensorSpec
from .providers import GPU_PROVIDERS, PROVIDER_NAMES, ProviderConfig, padded_batch_size, profile_batch_sizes, \
    resolve_providers

log = logging.getLogger(__name__)

INT8_SUFFIX = ".int8.onnx"  # the int8 copy `superwav2lip-quantize` writes beside a model
DEV_SUBDIR = "dev"


def installed_distributions() -> list[tuple[str, str]]:
    """(lower-case name, the folder it is installed in) of every distribution on sys.path."""
    return [(d.metadata["Name"].lower(), str(d.locate_file(""))) for d in importlib.metadata.distributions()]


def check_onnxruntime_install(distributions: list[tuple[str, str]] | None = None) -> None:
    """Refuses onnxruntime and onnxruntime-gpu installed in one folder: they overwrite each other's files there.
    In two folders (a private `pip install --target` put first on the path, over an image's CPU build) nothing is
    overwritten and the first on sys.path is the one imported, so that is allowed."""
    names_by_folder: dict[str, set[str]] = {}
    for name, folder in installed_distributions() if distributions is None else distributions:
        names_by_folder.setdefault(folder, set()).add(name)
    for folder, names in names_by_folder.items():
        if {"onnxruntime", "onnxruntime-gpu"} <= names:
            raise ModelLoadError(
                f"both onnxruntime and onnxruntime-gpu are installed in {folder} and overwrite each other's files "
                "there: pip uninstall -y onnxruntime onnxruntime-gpu, then install exactly one "
                "(pip install -e .[cpu] or pip install -e .[gpu])"
            )


def resolve_model_path(models_dir: str | Path, spec: ModelSpec, allow_dev: bool,
                       extra_dirs: tuple[str, ...] = ()) -> tuple[Path, bool]:
    """The real file when present (models_dir first, then extra_dirs), else the generated dev file if allowed.

    Returns (path, is_dev)."""
    real = Path(models_dir) / spec.file
    for folder in (models_dir, *extra_dirs):
        if (Path(folder) / spec.file).is_file():
            return Path(folder) / spec.file, False
    dev = Path(models_dir) / DEV_SUBDIR / spec.file
    if allow_dev and dev.is_file():
        return dev, True
    hint = "run `make models` (downloads and verifies the real weights)"
    if spec.file.endswith(INT8_SUFFIX):  # a derived file: made here, never downloaded
        hint = f"make it with `superwav2lip-quantize {spec.name.removesuffix('.int8')}`"
    elif allow_dev:
        hint += " or `make models-dev` (generated demo weights)"
    raise ModelLoadError(f"model file {real} for {spec.name!r} not found: {hint}")


def _dims_match(expected: int | str, actual: object) -> bool:
    if isinstance(expected, str):
        return True
    return not isinstance(actual, int) or actual == expected


def _check_tensors(kind: str, expected: tuple[TensorSpec, ...], actual: list, path: Path) -> None:
    by_name = {t.name: t for t in actual}
    for position, spec in enumerate(expected):
        found = actual[position] if spec.name == "*" and position < len(actual) else by_name.get(spec.name)
        if found is None:
            names = [t.name for t in actual]
            raise ModelLoadError(f"{path.name}: expected {kind} tensor {spec.name!r}, the model has {names}")
        shape = list(found.shape)
        if len(shape) != len(spec.shape) or not all(map(_dims_match, spec.shape, shape)):
            raise ModelLoadError(
                f"{path.name}: {kind} tensor {spec.name!r} has shape {shape}, expected {list(spec.shape)}"
            )




def pad_batch(array: np.ndarray, size: int) -> np.ndarray:
    """The batch grown to `size` by repeating its last item (valid input, so the padding cannot fail)."""
    return np.concatenate([array, np.repeat(array[-1:], size - len(array), axis=0)])


@dataclass
class OnnxModel:
    """One resident session plus its spec. `run` takes stacked batches, looping when the batch is fixed at 1."""

    spec: ModelSpec
    session: Any  # onnxruntime.InferenceSession (onnxruntime ships no type information)
    path: Path
    is_dev: bool
    fixed_batch: bool
    providers: list[str]
    load_seconds: float
    pad_to: tuple[int, ...] = ()  # batch sizes batches are padded to (TensorRT profiles); empty: as they come
    runner: BoundRunner | None = None  # I/O binding (on GPUs by default); None: onnxruntime copies per run

    @functools.cached_property
    def weights_sha256(self) -> str:
        """The weights file's sha256: what identifies the model's behaviour (read once, on first use)."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as weights:
            for block in iter(lambda: weights.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    def _infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.runner.run(feeds) if self.runner else self.session.run(None, feeds)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        batch = len(next(iter(feeds.values())))
        if self.pad_to and (padded := padded_batch_size(batch, self.pad_to)) != batch:
            feeds = {k: pad_batch(v, padded) for k, v in feeds.items()}
            return [out[:batch] for out in self._infer(feeds)]
        if not self.fixed_batch or batch == 1:
            return self._infer(feeds)
        singles = [self._infer({k: v[i : i + 1] for k, v in feeds.items()}) for i in range(batch)]
        return [np.concatenate(parts) for parts in zip(*singles)]

    def run_per_item(self, feeds: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
        """Outputs per item, for models whose outputs have no batch axis (SCRFD) or a fixed one of 1."""
        batch = len(next(iter(feeds.values())))
        if self.fixed_batch:
            return [self._infer({k: v[i : i + 1] for k, v in feeds.items()})
                    for i in range(batch)]
        outputs = self._infer(feeds)
        return [[out[i : i + 1] for out in outputs] for i in range(batch)]

    def random_feeds(self, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        feeds = {}
        for tensor in self.spec.inputs:
            shape = [
                batch if d == BATCH_DIM else (self.spec.warmup_dims.get(d, 1) if isinstance(d, str) else d)
                for d in tensor.shape
            ]
            if self.fixed_batch:
                shape[0] = batch
            feeds[tensor.name] = rng.standard_normal(shape).astype(np.float32)
        return feeds

    def warm_up(self, batch_sizes: tuple[int, ...]) -> float:
        started = time.perf_counter()
        rng = np.random.default_rng(0)
        for batch in batch_sizes:
            self.run(self.random_feeds(batch, rng))
        return time.perf_counter() - started


def load_model(
    spec: ModelSpec,
    models_dir: str | Path,
    *,
    providers: str = "auto",
    require_gpu: bool = False,
    allow_dev: bool = False,
    extra_dirs: tuple[str, ...] = (),
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    spin_wait: bool = False,
    provider_config: ProviderConfig | None = None,
) -> OnnxModel:
    """Creates the session, checks its tensors against the manifest and logs what it runs on."""
    import onnxruntime as ort

    check_onnxruntime_install()
    path, is_dev = resolve_model_path(models_dir, spec, allow_dev, extra_dirs)
    config = provider_config or ProviderConfig(order=providers)
    chosen = resolve_providers(config, ort.get_available_providers(), spec)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin_wait else "0")
    started = time.perf_counter()
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=[n for n, _ in chosen],
                                       provider_options=[o for _, o in chosen])
    except Exception as exc:  # onnxruntime raises its own untyped errors for corrupt files
        raise ModelLoadError(f"{path}: onnxruntime cannot load it: {exc}") from exc
    load_seconds = time.perf_counter() - started
    _check_tensors("input", spec.inputs, session.get_inputs(), path)
    _check_tensors("output", spec.outputs, session.get_outputs(), path)
    actual = session.get_providers()
    if require_gpu and not GPU_PROVIDERS & set(actual):
        raise ModelLoadError(
            f"{spec.name}: a GPU provider is required but the session runs on {actual} "
            "(onnxruntime-gpu falls back to CPU when CUDA or cuDNN is missing; check the driver and libraries)"
        )
    batch_dim = session.get_inputs()[0].shape[0]
    fixed_batch = isinstance(batch_dim, int)
    log.info(
        "model loaded",
        extra={"model": spec.name, "path": str(path), "providers": actual, "dev_weights": is_dev,
               "load_seconds": round(load_seconds, 3), "fixed_batch": fixed_batch},
    )
    if fixed_batch:
        log.info("model batch dimension is fixed; batches run as consecutive single calls",
                 extra={"model": spec.name, "batch_dim": batch_dim})
    if is_dev:
        log.warning("running on generated demo weights: outputs are noise", extra={"model": spec.name})
    # TensorRT builds per input shape: batches are padded to a few profile sizes so that none triggers a rebuild.
    pad_to = profile_batch_sizes(config.max_batch_size) if actual[0] == PROVIDER_NAMES["tensorrt"] and not fixed_batch \
        else ()
    return OnnxModel(spec, session, path, is_dev, fixed_batch, actual, load_seconds, pad_to,
                     bound_runner(session, config, actual, spec.name))

