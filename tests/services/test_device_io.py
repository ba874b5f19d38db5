"""I/O binding, run on CPU: the same BoundRunner code the GPU path uses, bound to CPU buffers (no GPU exists on
these machines, so `cuda` buffers and real pinned memory are exercised only by `make gpu-check`). The staging
path is driven by a CPU memory info registered as a shared allocator, standing in for CUDA's pinned memory."""

import numpy as np
import pytest

from service_runtime.device_io import BoundRunner, binding_device
from service_runtime.errors import ModelLoadError
from service_runtime.manifest import load_manifest
from service_runtime.onnx_session import load_model
from service_runtime.providers import ProviderConfig
from services.lipsync.service import LipSyncSettings

CPU = ["CPUExecutionProvider"]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
TRT = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_binding_follows_the_provider_the_session_really_runs_on():
    assert binding_device("auto", CUDA) == binding_device("auto", TRT) == "cuda"
    assert binding_device("auto", CPU) is None  # on CPU a plain run copies nothing anyway
    assert binding_device("on", CPU) == "cpu" and binding_device("On", CUDA) == "cuda"
    assert binding_device("off", TRT) is None
    with pytest.raises(ModelLoadError, match="use one of auto, on, off"):
        binding_device("always", CPU)


def test_the_setting_reaches_the_session(dev_models_dir):
    settings = LipSyncSettings.from_env({"SWL_LIPSYNC_IO_BINDING": "on", "SWL_LIPSYNC_PINNED_HOST": "false"})
    config = ProviderConfig.from_settings(settings)
    assert (config.io_binding, config.pinned_host) == ("on", False)
    spec = load_manifest(dev_models_dir).get("wav2lip_gan")
    bound = load_model(spec, dev_models_dir, allow_dev=True, provider_config=config)
    plain = load_model(spec, dev_models_dir, allow_dev=True, provider_config=ProviderConfig("cpu"))
    assert bound.runner is not None and bound.runner.device == "cpu" and plain.runner is None


@pytest.mark.parametrize("name,batches", [("wav2lip_gan", (1, 4, 4, 2)), ("gfpgan_v1.4", (1, 2, 1)),
                                          ("arcface_seed", (3, 3))])
def test_bound_runs_equal_plain_runs_and_reuse_one_buffer_per_shape(dev_models_dir, name, batches):
    spec = load_manifest(dev_models_dir).get(name)
    plain = load_model(spec, dev_models_dir, allow_dev=True, provider_config=ProviderConfig("cpu"))
    bound = load_model(spec, dev_models_dir, allow_dev=True, provider_config=ProviderConfig("cpu", io_binding="on"))
    rng = np.random.default_rng(7)
    for batch in batches:
        feeds = plain.random_feeds(batch, rng)
        expected, got = plain.run(feeds), bound.run(feeds)
        assert [o.shape for o in got] == [o.shape for o in expected]
        assert all(np.array_equal(a, b) for a, b in zip(expected, got))  # same kernels, same numbers
    shapes = {1} if bound.fixed_batch else set(batches)  # a fixed batch of 1 runs item by item
    assert bound.runner.allocations == len(shapes)


def test_input_dependent_output_shapes_are_sized_per_run(dev_models_dir):
    """SCRFD's outputs grow with the frame: outputs are bound to the device, not to a preallocated shape."""
    spec = load_manifest(dev_models_dir).get("scrfd_2.5g")
    plain = load_model(spec, dev_models_dir, allow_dev=True, provider_config=ProviderConfig("cpu"))
    bound = load_model(spec, dev_models_dir, allow_dev=True, provider_config=ProviderConfig("cpu", io_binding="on"))
    rng = np.random.default_rng(3)
    for height, width in ((384, 640), (640, 640), (384, 640)):
        feeds = {spec.inputs[0].name: rng.standard_normal((1, 3, height, width)).astype(np.float32)}
        expected, got = plain.run_per_item(feeds), bound.run_per_item(feeds)
        assert all(np.array_equal(a, b) for a, b in zip(expected[0], got[0]))
    assert bound.runner.allocations == 2


def test_the_least_recent_shape_is_freed_past_the_bound(dev_models_dir):
    spec = load_manifest(dev_models_dir).get("wav2lip_gan")
    model = load_model(spec, dev_models_dir, allow_dev=True, provider_config=ProviderConfig("cpu"))
    runner = BoundRunner(model.session, "cpu", max_shapes=2)
    rng = np.random.default_rng(1)
    for batch in (1, 2, 1, 3, 2):  # 3 evicts 2 (1 was used since), then 2 is bound again
        runner.run(model.random_feeds(batch, rng))
    assert runner.allocations == 4 and len(runner._buffers) == 2


@pytest.fixture(scope="module")
def host_staging_memory():
    """A CPU memory info with a shared allocator: what `pinned_memory_info` returns on CUDA, made testable."""
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state as C

    info = ort.OrtMemoryInfo("Cpu", C.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    C.create_and_register_allocator(info, None)
    return info


def test_staged_inputs_are_written_into_the_bound_buffer_every_run(dev_models_dir, host_staging_memory):
    spec = load_manifest(dev_models_dir).get("wav2lip_gan")
    model = load_model(spec, dev_models_dir, allow_dev=True, provider_config=ProviderConfig("cpu"))
    runner = BoundRunner(model.session, "cpu", pinned=host_staging_memory)
    rng = np.random.default_rng(5)
    first, second = model.random_feeds(2, rng), model.random_feeds(2, rng)
    assert all(np.array_equal(a, b) for a, b in zip(model.run(first), runner.run(first)))
    assert all(np.array_equal(a, b) for a, b in zip(model.run(second), runner.run(second)))  # refilled, not stale
    buffers = next(iter(runner._buffers.values()))
    assert set(buffers.staging_views) == {t.name for t in spec.inputs} and runner.allocations == 1


def test_pinned_memory_that_cannot_be_allocated_falls_back_to_device_buffers(dev_models_dir, caplog):
    """A CUDA memory info with no allocator behind it (as on a build without pinned CUDA memory): the run still
    gives plain-run outputs, from device-side buffers, and the fallback is logged once."""
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state as C

    spec = load_manifest(dev_models_dir).get("wav2lip_gan")
    model = load_model(spec, dev_models_dir, allow_dev=True, provider_config=ProviderConfig("cpu"))
    unregistered = ort.OrtMemoryInfo("Cuda", C.OrtAllocatorType.ORT_DEVICE_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    runner = BoundRunner(model.session, "cpu", pinned=unregistered)
    rng = np.random.default_rng(9)
    for batch in (1, 2):
        feeds = model.random_feeds(batch, rng)
        assert all(np.array_equal(a, b) for a, b in zip(model.run(feeds), runner.run(feeds)))
    assert runner.pinned is None and all(not b.staging_views for b in runner._buffers.values())
    assert [r.message for r in caplog.records].count("pinned host memory unavailable; inputs go straight to the "
                                                     "device") == 1


def test_no_pinned_memory_without_a_cuda_provider():
    from service_runtime.device_io import pinned_memory_info

    assert pinned_memory_info(0) is None  # this onnxruntime lists only the CPU provider's device
