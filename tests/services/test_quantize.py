"""The int8 copy of Wav2Lip: made by `superwav2lip-quantize`, served with SWL_LIPSYNC_INT8, close to fp32."""

import shutil

import numpy as np
import pytest
from superwav2lip.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc

from service_runtime.errors import ModelLoadError
from service_runtime.quantize import main as quantize_main
from services.lipsync.service import LipSyncService, LipSyncSettings

from tests.support.inprocess import local_settings, started


def lipsync_request(count: int, seed: int = 3) -> lipsync_pb2.GenerateRequest:
    rng = np.random.default_rng(seed)
    return lipsync_pb2.GenerateRequest(items=[
        lipsync_pb2.LipSyncItem(face=rng.integers(0, 256, (96, 96, 3), np.uint8).tobytes(),
                                mel=rng.uniform(-4, 4, (80, 16)).astype("<f4").tobytes()) for _ in range(count)])


async def faces_from(settings, request):
    async with started(LipSyncService(settings)) as (_, channel):
        stub = lipsync_pb2_grpc.LipSyncStub(channel)
        reply = await stub.Generate(request)
        described = await stub.Describe(lipsync_pb2.DescribeRequest())
    return [np.frombuffer(r.face, np.uint8).astype(int) for r in reply.results], described


async def test_the_quantized_copy_is_served_and_stays_close_to_fp32(dev_models_dir, tmp_path, capsys):
    models = tmp_path / "models"
    shutil.copytree(dev_models_dir, models)
    with pytest.raises(ModelLoadError, match="superwav2lip-quantize wav2lip_gan"):
        LipSyncService(local_settings(LipSyncSettings, models, int8=True)).load_models()
    quantize_main(["wav2lip_gan", "--models-dir", str(models), "--allow-dev-models"])
    assert "wav2lip_gan.int8.onnx" in capsys.readouterr().out and (models / "dev" / "wav2lip_gan.int8.onnx").is_file()
    request = lipsync_request(8)
    fp32, _ = await faces_from(local_settings(LipSyncSettings, models), request)
    int8, described = await faces_from(local_settings(LipSyncSettings, models, int8=True), request)
    assert described.model == "wav2lip_gan.int8"
    differences = np.abs(np.stack(fp32) - np.stack(int8))
    assert differences.mean() <= 2.0 and differences.any()  # a different, quantized model, near the original
