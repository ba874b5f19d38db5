"""I/O binding for one session: input buffers kept on the model's device per batch shape, outputs left on the
device until one copy back, and pinned host staging where onnxruntime offers it."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ModelLoadError
from .providers import GPU_PROVIDERS, ProviderConfig

log = logging.getLogger(__name__)

IO_BINDING_MODES = ("auto", "on", "off")
MAX_BOUND_SHAPES = 16  # padded batches and a few detector frame sizes; past it the least recent shape is freed


def binding_device(mode: str, session_providers: list[str]) -> str | None:
    """Where bound buffers live: `cuda` when the session runs on CUDA or TensorRT (auto or on), `cpu` only when
    asked for (on, without a GPU: the same code path, testable here), None when binding is off."""
    mode = mode.strip().lower()
    if mode not in IO_BINDING_MODES:
        raise ModelLoadError(f"io binding {mode!r}: use one of {', '.join(IO_BINDING_MODES)}")
    on_gpu = session_providers[0] in GPU_PROVIDERS
    if mode == "off" or (mode == "auto" and not on_gpu):
        return None
    return "cuda" if on_gpu else "cpu"


def pinned_memory_info(device_id: int):
    """onnxruntime's host-accessible (pinned) memory for the CUDA device, or None where it offers none: CPU-only
    builds, builds that do not list the CUDA provider among their EP devices, and releases before the EP-device
    memory API (1.23). Both GPU images have it: onnxruntime-gpu 1.31 (CUDA 13) and 1.26 (CUDA 12)."""
    import onnxruntime as ort

    if not hasattr(ort, "get_ep_devices") or not hasattr(ort, "OrtDeviceMemoryType"):
        return None
    cuda = [d for d in ort.get_ep_devices() if d.ep_name == "CUDAExecutionProvider"]
    if device_id >= len(cuda) or not hasattr(cuda[device_id], "memory_info"):
        return None
    return cuda[device_id].memory_info(ort.OrtDeviceMemoryType.HOST_ACCESSIBLE)


@dataclass
class _ShapeBuffers:
    """One batch shape's binding: an input buffer per tensor (on the device, or pinned host staging that
    onnxruntime copies to the device inside the run) and the outputs bound to the device."""

    binding: Any  # onnxruntime.IOBinding (onnxruntime ships no type information)
    inputs: dict[str, Any] = field(default_factory=dict)  # onnxruntime.OrtValue
    staging_views: dict[str, np.ndarray] = field(default_factory=dict)  # numpy views over pinned buffers


class BoundRunner:
    """Runs a session through I/O binding. Buffers are allocated once per input shape (the queue pads batches to a
    few sizes, so there are few) and refilled in place: no allocation per call, one copy in, one copy out."""

    def __init__(self, session, device: str, device_id: int = 0, pinned=None,
                 max_shapes: int = MAX_BOUND_SHAPES) -> None:
        self.session, self.device, self.device_id, self.pinned = session, device, device_id, pinned
        self.output_names = [o.name for o in session.get_outputs()]
        self.max_shapes = max_shapes
        self.allocations = 0  # shapes bound so far: a reader of metrics or tests can see buffers are reused
        self._buffers: OrderedDict[tuple, _ShapeBuffers] = OrderedDict()
        self._lock = threading.Lock()  # one inference stream per model; warm-up may come from another thread

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            buffers = self._buffers_for(feeds)
            for name, array in feeds.items():
                view = buffers.staging_views.get(name)
                if view is not None:
                    np.copyto(view, array)
                else:
                    buffers.inputs[name].update_inplace(np.ascontiguousarray(array))
            self.session.run_with_iobinding(buffers.binding)
            return buffers.binding.copy_outputs_to_cpu()

    def _buffers_for(self, feeds: dict[str, np.ndarray]) -> _ShapeBuffers:
        key = tuple((name, array.shape, array.dtype.str) for name, array in feeds.items())
        if key in self._buffers:
            self._buffers.move_to_end(key)
            return self._buffers[key]
        while len(self._buffers) >= self.max_shapes:
            self._buffers.popitem(last=False)
        self._buffers[key] = buffers = self._allocate(feeds)
        self.allocations += 1
        return buffers

    def _allocate(self, feeds: dict[str, np.ndarray]) -> _ShapeBuffers:
        import onnxruntime as ort

        buffers = _ShapeBuffers(self.session.io_binding())
        for name, array in feeds.items():
            staged = self._pinned_staging(array)
            if staged is not None:
                buffers.inputs[name], buffers.staging_views[name] = staged
            else:
                buffers.inputs[name] = ort.OrtValue.ortvalue_from_shape_and_type(
                    array.shape, array.dtype, self.device, self.device_id)
            buffers.binding.bind_ortvalue_input(name, buffers.inputs[name])
        for name in self.output_names:  # shapes may depend on the input (SCRFD): the device arena sizes them
            buffers.binding.bind_output(name, self.device, self.device_id)
        return buffers

    def _pinned_staging(self, array: np.ndarray):
        """A pinned host buffer and a numpy view over it, when onnxruntime hands out one numpy can write into;
        otherwise None and the input lives on the device (filled from pageable memory)."""
        if self.pinned is None:
            return None
        import onnxruntime as ort

        try:
            value = ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype, memory_info=self.pinned)
            view = value.numpy()
            # a copy, not a view, would take the writes without them ever reaching the buffer
            problem = "" if view.ctypes.data == value.data_ptr() else "numpy gets a copy of it, not a view"
        except (RuntimeError, TypeError) as error:  # no allocator registered for it, or an older signature
            problem = str(error)
        if problem:
            log.warning("pinned host memory unavailable; inputs go straight to the device", extra={"error": problem})
            self.pinned = None
            return None
        return value, view


def bound_runner(session, config: ProviderConfig, actual: list[str], model: str) -> BoundRunner | None:
    """The session's runner as `config` asks, for the providers it really runs on; None when binding is off."""
    device = binding_device(config.io_binding, actual)
    if device is None:
        return None
    pinned = pinned_memory_info(config.device_id) if device == "cuda" and config.pinned_host else None
    log.info("inputs and outputs bound to the device",
             extra={"model": model, "device": device, "device_id": config.device_id, "pinned_host": pinned is not None})
    return BoundRunner(session, device, config.device_id, pinned)
