"""Execution providers: the preference order, each provider's options (TensorRT, CUDA, CPU), the fallback when
one is missing, and the batch sizes a TensorRT engine is built for."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .errors import ModelLoadError
from .manifest import BATCH_DIM, ModelSpec

log = logging.getLogger(__name__)

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
GPU_PROVIDERS = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}
CUDNN_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
_warned: set[tuple[str, str]] = set()  # (model, provider) fallbacks already logged: once per process


@dataclass(frozen=True)
class ProviderConfig:
    """What a service asks of onnxruntime's providers (from its settings)."""

    order: str = "auto"  # `auto` or a list of tensorrt, cuda, cpu
    strict: bool = False  # a requested provider that is missing is an error, not a fallback
    device_id: int = 0
    trt_fp16: bool = True
    trt_engine_cache_dir: str = ""
    trt_workspace_mb: int = 4096
    cudnn_conv_algo_search: str = "HEURISTIC"
    gpu_mem_limit_mb: int = 0  # 0: no limit
    max_batch_size: int = 8
    io_binding: str = "auto"  # auto: bound buffers on CUDA/TensorRT; on: also on CPU; off: onnxruntime copies
    pinned_host: bool = True  # stage inputs in pinned host memory when onnxruntime offers it

    @classmethod
    def from_settings(cls, settings) -> "ProviderConfig":
        return cls(order=settings.providers, strict=settings.strict_providers, device_id=settings.device_id,
                   trt_fp16=settings.trt_fp16, trt_engine_cache_dir=settings.trt_engine_cache_dir,
                   trt_workspace_mb=settings.trt_workspace_mb,
                   cudnn_conv_algo_search=settings.cudnn_conv_algo_search.upper(),
                   gpu_mem_limit_mb=settings.gpu_mem_limit_mb, max_batch_size=settings.max_batch_size,
                   io_binding=settings.io_binding, pinned_host=settings.pinned_host)

    def wanted(self) -> list[str]:
        names = ["tensorrt", "cuda", "cpu"] if self.order.strip().lower() == "auto" else [
            p.strip().lower() for p in self.order.split(",") if p.strip()]
        unknown = [p for p in names if p not in PROVIDER_NAMES]
        if unknown:
            raise ModelLoadError(f"unknown provider(s) {unknown}: use auto or a list of tensorrt, cuda, cpu")
        if self.cudnn_conv_algo_search not in CUDNN_SEARCH:
            raise ModelLoadError(f"cuDNN convolution search {self.cudnn_conv_algo_search!r}: use one of "
                                 f"{', '.join(CUDNN_SEARCH)}")
        return names


def profile_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes batches are padded to: powers of two up to the queue's largest batch, and that batch.
    A few fixed shapes let TensorRT keep one engine and a context per shape instead of re-tuning for each."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch_size)


def padded_batch_size(batch: int, sizes: tuple[int, ...]) -> int:
    """The smallest profile size that holds `batch` (the batch itself past the largest)."""
    return next((size for size in sizes if size >= batch), batch)


def trt_profile_shapes(spec: ModelSpec, sizes: tuple[int, ...]) -> dict[str, str]:
    """TensorRT's explicit optimisation profile: each input from the smallest to the largest padded batch,
    tuned for the largest, so no batch the queue produces rebuilds the engine."""
    def shapes(batch: int) -> str:
        parts = []
        for tensor in spec.inputs:
            dims = [batch if d == BATCH_DIM or (i == 0 and isinstance(d, str)) else
                    spec.warmup_dims.get(d, 1) if isinstance(d, str) else d for i, d in enumerate(tensor.shape)]
            parts.append(f"{tensor.name}:{'x'.join(map(str, dims))}")
        return ",".join(parts)

    batched = any(t.shape and isinstance(t.shape[0], str) for t in spec.inputs)
    low, high = (min(sizes), max(sizes)) if batched else (1, 1)
    return {"trt_profile_min_shapes": shapes(low), "trt_profile_opt_shapes": shapes(high),
            "trt_profile_max_shapes": shapes(high)}


def provider_options(name: str, config: ProviderConfig, spec: ModelSpec) -> dict[str, str]:
    """onnxruntime's options for one provider (strings, as its C API takes them)."""
    if name == "tensorrt":
        options = {"device_id": str(config.device_id), "trt_fp16_enable": str(config.trt_fp16),
                   "trt_max_workspace_size": str(config.trt_workspace_mb << 20)}
        if config.trt_engine_cache_dir:
            options.update(trt_engine_cache_enable="True", trt_engine_cache_path=config.trt_engine_cache_dir,
                           trt_timing_cache_enable="True", trt_timing_cache_path=config.trt_engine_cache_dir)
        if any(isinstance(d, str) for t in spec.inputs for d in t.shape):
            options.update(trt_profile_shapes(spec, profile_batch_sizes(config.max_batch_size)))
        return options
    if name == "cuda":
        options = {"device_id": str(config.device_id), "cudnn_conv_algo_search": config.cudnn_conv_algo_search,
                   "arena_extend_strategy": "kSameAsRequested", "do_copy_in_default_stream": "True"}
        if config.gpu_mem_limit_mb:
            options["gpu_mem_limit"] = str(config.gpu_mem_limit_mb << 20)
        return options
    return {}


def resolve_providers(config: ProviderConfig, available: list[str], spec: ModelSpec) -> list[tuple[str, dict]]:
    """The (provider, options) list for a session, in preference order. A requested provider this onnxruntime
    lacks is logged once and skipped (the next one serves), or with `strict` refused."""
    chosen = []
    for short in config.wanted():
        name = PROVIDER_NAMES[short]
        if name in available:
            chosen.append((name, provider_options(short, config, spec)))
        elif config.strict:
            raise ModelLoadError(f"{spec.name}: provider {short} was requested but this onnxruntime offers only "
                                 f"{available} (unset STRICT_PROVIDERS to fall back, or install onnxruntime-gpu)")
        elif (spec.name, name) not in _warned and config.order.strip().lower() != "auto":
            _warned.add((spec.name, name))
            log.warning("provider unavailable; using the next one",
                        extra={"model": spec.name, "provider": short, "available": available})
    if not chosen:
        raise ModelLoadError(f"none of the providers {config.wanted()} is available (onnxruntime offers {available})")
    return chosen
