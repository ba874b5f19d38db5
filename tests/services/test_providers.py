"""The GPU path's CPU-testable parts: provider choice and fallback with the provider list injected, device ids,
TensorRT and CUDA options, batch padding to engine profile sizes, and the fp16 conversion's error. No GPU
exists on these machines; what only a GPU can show (the sessions really running there, speed) is `make
gpu-check`'s job."""

import dataclasses
import logging

import numpy as np
import pytest

from service_runtime.errors import ModelLoadError
from service_runtime.fp16 import convert, largest_relative_error
from service_runtime.manifest import load_manifest
from service_runtime.onnx_session import OnnxModel, load_model, pad_batch
from service_runtime.providers import (ProviderConfig, padded_batch_size, profile_batch_sizes, provider_options,
                                       resolve_providers)
from service_runtime.settings import SettingsError
from services.lipsync.service import LipSyncSettings

from tests.support.paths import ROOT

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_ONLY = ["CPUExecutionProvider"]


@pytest.fixture
def wav2lip():
    return load_manifest(ROOT / "models").get("wav2lip_gan")


def names(chosen):
    return [name for name, _ in chosen]


def test_the_order_is_a_setting_and_every_available_provider_is_kept_in_it(wav2lip):
    assert names(resolve_providers(ProviderConfig("auto"), ALL, wav2lip)) == ALL
    assert names(resolve_providers(ProviderConfig("cuda,tensorrt,cpu"), ALL, wav2lip)) == [ALL[1], ALL[0], ALL[2]]
    assert names(resolve_providers(ProviderConfig("cpu"), ALL, wav2lip)) == CPU_ONLY


def test_a_missing_provider_is_logged_once_and_the_next_one_serves(wav2lip, caplog):
    wav2lip = dataclasses.replace(wav2lip, name="wav2lip_logged_once")  # no other test has logged this model yet
    config = ProviderConfig("tensorrt,cuda,cpu")
    with caplog.at_level(logging.WARNING, logger="service_runtime.providers"):
        first = resolve_providers(config, ["CUDAExecutionProvider", "CPUExecutionProvider"], wav2lip)
        again = resolve_providers(config, ["CUDAExecutionProvider", "CPUExecutionProvider"], wav2lip)
    assert names(first) == names(again) == ALL[1:]
    warnings = [r for r in caplog.records if r.message == "provider unavailable; using the next one"]
    assert len(warnings) == 1 and warnings[0].provider == "tensorrt"


def test_strict_providers_make_a_missing_one_an_error(wav2lip):
    with pytest.raises(ModelLoadError, match="provider cuda was requested"):
        resolve_providers(ProviderConfig("cuda,cpu", strict=True), CPU_ONLY, wav2lip)
    with pytest.raises(ModelLoadError, match="none of the providers"):
        resolve_providers(ProviderConfig("tensorrt,cuda"), CPU_ONLY, wav2lip)
    with pytest.raises(ModelLoadError, match="unknown provider"):
        resolve_providers(ProviderConfig("tpu"), ALL, wav2lip)
    with pytest.raises(ModelLoadError, match="cuDNN convolution search"):
        resolve_providers(ProviderConfig("cuda", cudnn_conv_algo_search="FASTEST"), ALL, wav2lip)


def test_device_ids_reach_both_gpu_providers_and_are_range_checked(wav2lip):
    settings = LipSyncSettings.from_env({"SWL_LIPSYNC_DEVICE_ID": "3", "SWL_LIPSYNC_PROVIDERS": "tensorrt,cuda"})
    chosen = dict(resolve_providers(ProviderConfig.from_settings(settings), ALL, wav2lip))
    assert chosen["TensorrtExecutionProvider"]["device_id"] == chosen["CUDAExecutionProvider"]["device_id"] == "3"
    with pytest.raises(SettingsError, match="SWL_LIPSYNC_DEVICE_ID=64 is out of range"):
        LipSyncSettings.from_env({"SWL_LIPSYNC_DEVICE_ID": "64"})


def test_tensorrt_options_carry_fp16_the_cache_the_workspace_and_a_profile_for_every_queue_batch(wav2lip):
    config = ProviderConfig(trt_fp16=False, trt_engine_cache_dir="/cache", trt_workspace_mb=2048, max_batch_size=8)
    options = provider_options("tensorrt", config, wav2lip)
    assert options["trt_fp16_enable"] == "False" and options["trt_max_workspace_size"] == str(2048 << 20)
    assert options["trt_engine_cache_enable"] == "True" and options["trt_engine_cache_path"] == "/cache"
    assert options["trt_profile_min_shapes"] == "mel_spectrogram:1x1x80x16,video_frames:1x6x96x96"
    assert options["trt_profile_opt_shapes"] == options["trt_profile_max_shapes"] == \
        "mel_spectrogram:8x1x80x16,video_frames:8x6x96x96"
    cuda = provider_options("cuda", ProviderConfig(cudnn_conv_algo_search="EXHAUSTIVE", gpu_mem_limit_mb=512), wav2lip)
    assert cuda["cudnn_conv_algo_search"] == "EXHAUSTIVE" and cuda["gpu_mem_limit"] == str(512 << 20)
    assert provider_options("cpu", config, wav2lip) == {}


def test_batches_are_padded_to_the_next_profile_size():
    assert profile_batch_sizes(8) == (1, 2, 4, 8) and profile_batch_sizes(6) == (1, 2, 4, 6)
    assert profile_batch_sizes(1) == (1,)
    sizes = profile_batch_sizes(32)
    assert [padded_batch_size(n, sizes) for n in (1, 2, 3, 5, 9, 17, 32, 40)] == [1, 2, 4, 8, 16, 32, 32, 40]
    padded = pad_batch(np.arange(6, dtype=np.float32).reshape(3, 2), 4)
    assert padded.tolist() == [[0, 1], [2, 3], [4, 5], [4, 5]]


class RecordingSession:
    """Stands in for a TensorRT session (no GPU here): records the batch sizes it is given."""

    def __init__(self) -> None:
        self.batches = []

    def run(self, _, feeds):
        batch = next(iter(feeds.values()))
        self.batches.append(len(batch))
        return [batch * 2]


def test_a_padded_run_returns_exactly_the_real_items(wav2lip):
    session = RecordingSession()
    model = OnnxModel(wav2lip, session, ROOT, False, False, ["TensorrtExecutionProvider"], 0.0, (1, 2, 4, 8))
    items = np.arange(5, dtype=np.float32)[:, None]
    (out,) = model.run({"x": items})
    assert session.batches == [8] and out.tolist() == (items * 2).tolist()
    unpadded = OnnxModel(wav2lip, RecordingSession(), ROOT, False, False, CPU_ONLY, 0.0)
    unpadded.run({"x": items})
    assert unpadded.session.batches == [5]


def test_cpu_sessions_report_their_provider_and_are_never_padded(dev_models_dir, wav2lip):
    model = load_model(wav2lip, dev_models_dir, allow_dev=True, provider_config=ProviderConfig("cuda,cpu"))
    assert model.providers == CPU_ONLY and model.pad_to == ()


@pytest.mark.parametrize("name,bound", [("wav2lip_gan", 1e-3), ("gfpgan_v1.4", 1e-3), ("arcface_seed", 1e-3)])
def test_fp16_copies_keep_fp32_inputs_and_outputs_within_a_bounded_error(dev_models_dir, tmp_path, name, bound):
    import onnx

    spec = load_manifest(dev_models_dir).get(name)
    source = dev_models_dir / "dev" / spec.file
    target = convert(source, tmp_path / "half.onnx")
    model = onnx.load(str(target))
    float32 = onnx.TensorProto.FLOAT
    assert all(t.type.tensor_type.elem_type == float32 for t in (*model.graph.input, *model.graph.output))
    assert any(w.data_type == onnx.TensorProto.FLOAT16 for w in model.graph.initializer)  # really halved
    error = largest_relative_error(spec, source, target)
    assert 0 < error < bound, error  # fp16 changes the numbers, a little


def test_fp16_error_of_the_real_detector_on_a_real_photo(tmp_path):
    """The real SCRFD-2.5G from ../shared/models on the shared astronaut photo (skipped without them)."""
    import cv2

    shared = ROOT.parent / "shared"
    source, photo = shared / "models" / "scrfd_2.5g_bnkps.onnx", shared / "media" / "face_astronaut.png"
    if not (source.is_file() and photo.is_file()):
        pytest.skip("needs ../shared/models and ../shared/media")
    spec = load_manifest(ROOT / "models").get("scrfd_2.5g")
    image = cv2.resize(cv2.imread(str(photo)), (640, 640)).astype(np.float32)
    feeds = [{"input.1": ((image - 127.5) / 128.0).transpose(2, 0, 1)[None].copy()}]
    error = largest_relative_error(spec, source, convert(source, tmp_path / "scrfd.fp16.onnx"), feeds=feeds)
    print(f"SCRFD-2.5G fp16 largest relative error on a real photo: {error:.2e}")
    assert 0 < error < 1e-2, error


def test_gpu_check_refuses_without_a_gpu_and_its_comparison_runs_on_cpu(dev_models_dir, capsys):
    """`make gpu-check` itself: exit 2 and a plain reason here; with `--providers cpu` its whole path runs (CPU
    against CPU, so every error must be exactly the same numbers)."""
    from tools import gpu_check

    assert gpu_check.main(["--providers", "cuda,tensorrt"]) == 2
    assert "no GPU provider to check" in capsys.readouterr().out
    code = gpu_check.main(["--providers", "cpu", "--models-dir", str(dev_models_dir), "--allow-dev-models",
                           "--batches", "1,3"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    # Wav2Lip at both batch sizes; the detector, recognition and GFPGAN exports take a batch of 1 only, so a
    # larger batch is consecutive calls at the batch-1 rate: one row, not a batch-3 row that timed one item.
    rows = {(line.split("|")[1].strip(), line.split("|")[3].strip()) for line in table}
    assert code == 0 and rows == {("wav2lip_gan", "1"), ("wav2lip_gan", "3"), ("scrfd_2.5g", "1 (fixed)"),
                                  ("arcface_seed", "1 (fixed)"), ("gfpgan_v1.4", "1 (fixed)")}, rows
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        cells[2] = cells[2].removesuffix(" (fixed)")
        assert cells[1] == "CPUExecutionProvider" and float(cells[7]) == 0.0 and cells[8] == "yes"
        assert cells[5] == "no" and float(cells[6]) > 0  # binding is a GPU default; the unbound time is measured
        batch, ms = int(cells[2]), float(cells[3])  # ms is printed to 0.01: items/s lies within that rounding
        assert batch * 1000 / (ms + 0.005) - 0.05 <= float(cells[4]) <= batch * 1000 / max(ms - 0.005, 1e-9) + 0.05
