"""Session creation refuses wrong files and installs clearly, and runs fixed-batch models correctly."""

import dataclasses

import numpy as np
import pytest

from service_runtime.dev_models import write_dev_model
from service_runtime.errors import ModelLoadError
from service_runtime.manifest import TensorSpec, load_manifest
from service_runtime.onnx_session import check_onnxruntime_install, load_model
from service_runtime.providers import ProviderConfig, resolve_providers

from tests.support.paths import ROOT


def test_wrong_shape_is_refused_naming_the_tensor(dev_models_dir, tmp_path):
    spec = load_manifest(dev_models_dir).get("wav2lip")
    wrong = dataclasses.replace(spec, inputs=(spec.inputs[0], TensorSpec("video_frames", ("B", 6, 64, 64))))
    write_dev_model(wrong, tmp_path)
    with pytest.raises(ModelLoadError, match=r"input tensor 'video_frames' has shape \[.*64, 64\], expected .*96, 96"):
        load_model(spec, tmp_path)


def test_wrong_name_is_refused_listing_what_the_model_has(dev_models_dir, tmp_path):
    spec = load_manifest(dev_models_dir).get("gfpgan_v1.4")
    write_dev_model(dataclasses.replace(spec, inputs=(TensorSpec("image", (1, 3, 512, 512)),)), tmp_path)
    with pytest.raises(ModelLoadError, match=r"expected input tensor 'input', the model has \['image'\]"):
        load_model(spec, tmp_path)


def test_missing_file_says_how_to_get_it(dev_models_dir, tmp_path):
    spec = load_manifest(dev_models_dir).get("wav2lip")
    with pytest.raises(ModelLoadError, match="make models"):
        load_model(spec, tmp_path)


def test_corrupt_file_is_refused(dev_models_dir, tmp_path):
    spec = load_manifest(dev_models_dir).get("wav2lip")
    (tmp_path / spec.file).write_bytes(b"not an onnx file")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load it"):
        load_model(spec, tmp_path)


def test_mixed_cpu_and_gpu_install_is_refused_in_one_folder_and_allowed_when_one_shadows_the_other():
    site = "/usr/lib/python3/site-packages"
    with pytest.raises(ModelLoadError, match="both onnxruntime and onnxruntime-gpu are installed in " + site):
        check_onnxruntime_install([("onnxruntime", site), ("onnxruntime-gpu", site), ("numpy", site)])
    check_onnxruntime_install([("onnxruntime", site), ("numpy", site)])
    # The device runner's way: onnxruntime-gpu in a private --target put first on the path, the image's CPU
    # build left where it is; no file of one overwrites the other, and the first on sys.path is imported.
    check_onnxruntime_install([("onnxruntime", site), ("onnxruntime-gpu", "/tmp/swl-site")])


def choose_providers(order: str, available: list[str]) -> list[str]:
    spec = load_manifest(ROOT / "models").get("wav2lip_gan")
    return [name for name, _ in resolve_providers(ProviderConfig(order), available, spec)]


def test_provider_chain_keeps_only_available_ones_in_order():
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("auto", available) == available
    assert choose_providers("tensorrt,cpu", available) == ["CPUExecutionProvider"]
    with pytest.raises(ModelLoadError, match="none of the providers"):
        choose_providers("tensorrt", available)
    with pytest.raises(ModelLoadError, match="unknown provider"):
        choose_providers("tpu", available)


def test_require_gpu_fails_fast_on_a_cpu_session(dev_models_dir):
    """This machine has no GPU, so the real CPU session is exactly the silent-fallback case to refuse."""
    spec = load_manifest(dev_models_dir).get("wav2lip")
    with pytest.raises(ModelLoadError, match="GPU provider is required but the session runs on"):
        load_model(spec, dev_models_dir, require_gpu=True, allow_dev=True)


def test_fixed_batch_model_runs_a_batch_as_single_calls(dev_models_dir):
    spec = load_manifest(dev_models_dir).get("gfpgan_v1.4")  # batch fixed at 1, like the real export
    model = load_model(spec, dev_models_dir, allow_dev=True)
    assert model.fixed_batch
    batch = np.random.default_rng(1).uniform(-1, 1, (3, 3, 512, 512)).astype(np.float32)
    (out,) = model.run({"input": batch})
    assert out.shape == (3, 3, 512, 512)
    np.testing.assert_allclose(out[2:3], model.run({"input": batch[2:3]})[0], atol=1e-6)
    assert not np.allclose(out[0], out[1])
