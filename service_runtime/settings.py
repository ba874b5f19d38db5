"""Typed settings parsed once from environment variables, with a documented default for every field."""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from .batching import BatchPolicy


class SettingsError(ValueError):
    """An environment variable holds a value its setting cannot take."""


def setting(default: Any, doc: str, *, ge: float | None = None, le: float | None = None,
            unset: tuple[float, str] | None = None) -> Any:
    """Declares one setting: its default, the one-line doc shown in docs/settings.md and its allowed range.
    `unset=(value, meaning)` names one value outside the range that is allowed too, and what it means."""
    return dataclasses.field(default=default, metadata={"doc": doc, "ge": ge, "le": le, "unset": unset})


def _number(value: float | None) -> float | None:
    return None if value is None else int(value) if float(value).is_integer() else value


def _range_text(metadata: Mapping[str, Any]) -> str:
    low, high = (_number(metadata.get(bound)) for bound in ("ge", "le"))
    if low is None and high is None:
        return ""
    allowed = f"at least {low}" if high is None else f"at most {high}" if low is None else f"{low} to {high}"
    if metadata.get("unset") is not None:
        value, meaning = metadata["unset"]
        allowed += f", or {_number(value)} ({meaning})"
    return allowed


def _parse(raw: str, kind: Any, variable: str) -> Any:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(raw)
            return lowered in {"1", "true", "yes", "on"}
        if kind in (int, float, str):
            return kind(raw.strip())
        if typing.get_origin(kind) is tuple:
            item_kind = typing.get_args(kind)[0]
            return tuple(item_kind(part.strip()) for part in raw.split(",") if part.strip())
    except ValueError:
        raise SettingsError(f"{variable}={raw!r} is not a valid {getattr(kind, '__name__', kind)}") from None
    raise TypeError(f"unsupported setting type {kind!r} for {variable}")


SERVICE_WIDE = -1  # a per-model batching setting at this value takes the service-wide one
_PER_MODEL_BATCHING = ("max_batch_size", "max_batch_delay_ms", "max_queue_size")


def model_max_batch_size_setting(model: str) -> Any:
    """`<model>_max_batch_size`: one model's own max_batch_size (SERVICE_WIDE: the service's)."""
    return setting(SERVICE_WIDE, f"Most items one call of the {model} model takes from its batching queue.", ge=1,
                   le=1024, unset=(SERVICE_WIDE, "the service-wide value"))


def model_max_batch_delay_ms_setting(model: str) -> Any:
    """`<model>_max_batch_delay_ms`: one model's own max_batch_delay_ms (SERVICE_WIDE: the service's)."""
    return setting(float(SERVICE_WIDE), f"Longest wait for more {model} items once a batch has its first one.",
                   ge=0, le=10000, unset=(SERVICE_WIDE, "the service-wide value"))


def model_max_queue_size_setting(model: str) -> Any:
    """`<model>_max_queue_size`: one model's own max_queue_size (SERVICE_WIDE: the service's)."""
    return setting(SERVICE_WIDE, f"Items waiting for the {model} model; beyond it calls get RESOURCE_EXHAUSTED.",
                   ge=1, le=1_000_000, unset=(SERVICE_WIDE, "the service-wide value"))


def port_setting(default: int) -> Any:
    return setting(default, "gRPC port (0 picks a free one).", ge=0, le=65535)


def metrics_port_setting(default: int) -> Any:
    return setting(default, "Port of the Prometheus `/metrics` endpoint (0 picks a free one, -1 disables).", ge=-1,
                   le=65535)


@dataclasses.dataclass(frozen=True)
class BaseSettings:
    """Base for every settings object; subclasses set ENV_PREFIX and declare fields with `setting`."""

    ENV_PREFIX: ClassVar[str] = ""

    def __post_init__(self) -> None:
        """Every value, from the environment or an override, must lie in its declared range."""
        for field in dataclasses.fields(self):
            value, allowed = getattr(self, field.name), _range_text(field.metadata)
            low, high, unset = (field.metadata.get(key) for key in ("ge", "le", "unset"))
            if unset is not None and value == unset[0]:
                continue
            if (low is not None and value < low) or (high is not None and value > high):
                raise SettingsError(f"{self.env_name(field.name)}={value!r} is out of range: {allowed}")

    @classmethod
    def env_name(cls, field_name: str) -> str:
        return f"{cls.ENV_PREFIX}{field_name.upper()}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Reads every field from `PREFIX_FIELD`; explicit keyword overrides win (tests use them)."""
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            variable = cls.env_name(field.name)
            if variable in environ:
                values[field.name] = _parse(environ[variable], hints[field.name], variable)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def markdown_table(cls) -> str:
        """The settings table for this class, as docs/settings.md shows it."""
        rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
        for field in dataclasses.fields(cls):
            default = field.default
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
            allowed = _range_text(field.metadata)
            doc = field.metadata["doc"] + (f" Range: {allowed}." if allowed else "")
            rows.append(f"| `{cls.env_name(field.name)}` | `{shown}` | {doc} |")
        return "\n".join(rows)


@dataclasses.dataclass(frozen=True)
class ServerSettings(BaseSettings):
    """What every gRPC process shares: where it listens, its metrics port, shutdown grace and log level."""

    host: str = setting("0.0.0.0", "Address the gRPC server binds.")
    port: int = port_setting(0)
    metrics_port: int = metrics_port_setting(0)
    grace_period_s: float = setting(10.0, "Seconds in-flight calls get to finish after SIGTERM.", ge=0, le=3600)
    log_level: str = setting("INFO", "Python log level.")
    max_connection_age_s: float = setting(
        0.0, "Seconds after which the server asks a client to reconnect, so clients balancing over a headless "
        "Service re-resolve and find new replicas (0 = never).", ge=0, le=86400)


@dataclasses.dataclass(frozen=True)
class ServiceSettings(ServerSettings):
    """What every model service shares; each service subclasses it with its prefix, ports and models."""

    models_dir: str = setting("models", "Folder holding the ONNX files and `manifest.json`.")
    extra_model_dirs: tuple[str, ...] = setting((), "More folders searched for real weight files, after models_dir.")
    allow_dev_models: bool = setting(
        False, "Fall back to generated random-weight models in `<models_dir>/dev/` when a real file is missing."
    )
    providers: str = setting(
        "auto", "onnxruntime providers in order of preference: `auto` or a list of `tensorrt`, `cuda`, `cpu`."
    )
    require_gpu: bool = setting(False, "Refuse to start unless a session really runs on CUDA or TensorRT.")
    strict_providers: bool = setting(
        False, "A requested provider this onnxruntime lacks is an error (default: logged once, the next one serves).")
    device_id: int = setting(0, "The GPU this process uses (one GPU per service process).", ge=0, le=63)
    trt_fp16: bool = setting(True, "TensorRT builds fp16 engines (inputs and outputs stay fp32).")
    trt_engine_cache_dir: str = setting(
        "", "Folder where TensorRT keeps built engines and timing caches (empty: rebuilt at every start).")
    trt_workspace_mb: int = setting(4096, "TensorRT's builder workspace, in MiB.", ge=64, le=262144)
    cudnn_conv_algo_search: str = setting(
        "HEURISTIC", "cuDNN convolution algorithm search: EXHAUSTIVE (slow start, fastest), HEURISTIC or DEFAULT.")
    gpu_mem_limit_mb: int = setting(0, "CUDA memory arena limit per model, in MiB (0 = no limit).", ge=0,
                                    le=1 << 20)
    io_binding: str = setting(
        "auto", "I/O binding: `auto` keeps each batch shape's buffers on the GPU when a session runs on CUDA or "
        "TensorRT, `on` binds on CPU too, `off` lets onnxruntime copy inputs and outputs on every run.")
    pinned_host: bool = setting(True, "Stage GPU inputs in pinned host memory where onnxruntime offers it.")
    intra_op_threads: int = setting(0, "onnxruntime threads inside one operator (0 = onnxruntime's choice).", ge=0,
                                   le=1024)
    inter_op_threads: int = setting(0, "onnxruntime threads across operators (0 = onnxruntime's choice).", ge=0,
                                   le=1024)
    spin_wait: bool = setting(
        False, "Let onnxruntime's threads busy-wait between operators (faster alone, wasteful when services share cores)."
    )
    max_batch_size: int = setting(8, "Most items one model call takes from the batching queue.", ge=1, le=1024)
    max_batch_delay_ms: float = setting(5.0, "Longest wait for more items once a batch has its first one.", ge=0,
                                        le=10000)
    batch_across_calls: bool = setting(
        True, "Gather items from concurrent calls into one model call (false = the seed's one call at a time)."
    )
    max_queue_size: int = setting(256, "Items waiting per model; beyond it calls get RESOURCE_EXHAUSTED.", ge=1,
                                   le=1_000_000)
    warmup_batch_sizes: tuple[int, ...] = setting(
        (), "Batch sizes run at warm-up (empty = 1 and each model's max batch size; a larger size is cut to it).")

    def batch_policy(self, model: str = "") -> BatchPolicy:
        """How one model's queue batches: the service-wide max_batch_size, max_batch_delay_ms and max_queue_size,
        each overridden by the model's own `<model>_max_batch_size`, ... (declared with the `model_*_setting`
        helpers) where that is not SERVICE_WIDE. No `model`: the service-wide policy."""
        values = {}
        for name in _PER_MODEL_BATCHING:
            value = getattr(self, name)
            if model:
                if not hasattr(self, f"{model}_{name}"):
                    raise TypeError(f"{type(self).__name__} has no setting {model}_{name}: declare "
                                    f"{model}_max_batch_size, {model}_max_batch_delay_ms and {model}_max_queue_size "
                                    "with the model_*_setting helpers")
                own = getattr(self, f"{model}_{name}")
                value = value if own == SERVICE_WIDE else own
            values[name] = value
        return BatchPolicy(max_batch_size=values["max_batch_size"], max_delay_s=values["max_batch_delay_ms"] / 1000,
                           max_queue_size=values["max_queue_size"], across_calls=self.batch_across_calls)

    def effective_warmup_batch_sizes(self, max_batch_size: int | None = None) -> tuple[int, ...]:
        """The batch sizes a model whose largest batch is `max_batch_size` (default: the service-wide one) is
        warmed up with: warmup_batch_sizes, none above that largest batch, or else 1 and that batch."""
        largest = self.max_batch_size if max_batch_size is None else max_batch_size
        if self.warmup_batch_sizes:
            return tuple(sorted({min(size, largest) for size in self.warmup_batch_sizes}))
        return tuple(sorted({1, largest}))
