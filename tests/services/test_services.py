"""The three model services, started in-process on free ports with generated models."""

import asyncio
import signal
import subprocess
import sys
import time
import urllib.request

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from superwav2lip.common.v1 import media_pb2
from superwav2lip.detector.v1 import detector_pb2, detector_pb2_grpc
from superwav2lip.enhancer.v1 import enhancer_pb2, enhancer_pb2_grpc
from superwav2lip.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc

from service_runtime.images import encode_image
from services.detector.service import DetectorService, DetectorSettings
from services.enhancer.service import EnhancerService, EnhancerSettings
from services.lipsync.service import LipSyncService, LipSyncSettings

from tests.support.paths import ROOT
from tests.support.inprocess import local_settings, started
from tests.support.processes import service_env

SERVICES = {
    "detector": (DetectorService, DetectorSettings, "superwav2lip.detector.v1.Detector"),
    "lipsync": (LipSyncService, LipSyncSettings, "superwav2lip.lipsync.v1.LipSync"),
    "enhancer": (EnhancerService, EnhancerSettings, "superwav2lip.enhancer.v1.Enhancer"),
}
RNG = np.random.default_rng(7)


def make(name, models_dir, **overrides):
    service_cls, settings_cls, _ = SERVICES[name]
    return service_cls(local_settings(settings_cls, models_dir, **overrides))


def lipsync_item(face=None, mel=None):
    face = RNG.integers(0, 256, (96, 96, 3), dtype=np.uint8) if face is None else face
    mel = RNG.uniform(-4, 4, (80, 16)).astype("<f4") if mel is None else mel
    return lipsync_pb2.LipSyncItem(face=face.tobytes(), mel=mel.tobytes())


async def health_of(channel, service_name):
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service_name))).status


@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_health_is_not_serving_until_warm_up_then_serving(name, dev_models_dir):
    full_name = SERVICES[name][2]
    async with started(make(name, dev_models_dir), warm=False) as (server, channel):
        assert await health_of(channel, full_name) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await health_of(channel, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        await server.warm_up()
        assert await health_of(channel, full_name) == health_pb2.HealthCheckResponse.SERVING


async def test_calls_before_warm_up_are_unavailable(dev_models_dir):
    async with started(make("lipsync", dev_models_dir), warm=False) as (_, channel):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await lipsync_pb2_grpc.LipSyncStub(channel).Generate(lipsync_pb2.GenerateRequest(items=[lipsync_item()]))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_reflection_lists_the_service(name, dev_models_dir):
    async def listed():
        async with started(make(name, dev_models_dir), warm=False) as (server, _):
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                return await asyncio.to_thread(lambda: ProtoReflectionDescriptorDatabase(channel).get_services())

    services = asyncio.run(listed())
    assert SERVICES[name][2] in services and "grpc.health.v1.Health" in services


async def test_lipsync_identity_returns_the_crop_and_a_bad_item_fails_alone(identity_models_dir):
    face = RNG.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    bad = lipsync_pb2.LipSyncItem(face=b"\x00" * 100, mel=lipsync_item().mel)
    async with started(make("lipsync", identity_models_dir)) as (_, channel):
        reply = await lipsync_pb2_grpc.LipSyncStub(channel).Generate(
            lipsync_pb2.GenerateRequest(items=[lipsync_item(face), bad, lipsync_item(face[::-1].copy())])
        )
    assert len(reply.results) == 3
    assert np.array_equal(np.frombuffer(reply.results[0].face, np.uint8).reshape(96, 96, 3), face)
    assert np.array_equal(np.frombuffer(reply.results[2].face, np.uint8).reshape(96, 96, 3), face[::-1])
    assert reply.results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "expected a 96x96 BGR24 crop" in reply.results[1].error.message
    assert not reply.results[1].face


async def test_lipsync_rejects_nan_mel_per_item(dev_models_dir):
    nan_mel = np.full((80, 16), np.nan, "<f4")
    async with started(make("lipsync", dev_models_dir)) as (_, channel):
        reply = await lipsync_pb2_grpc.LipSyncStub(channel).Generate(
            lipsync_pb2.GenerateRequest(items=[lipsync_item(), lipsync_item(mel=nan_mel)])
        )
    assert len(reply.results[0].face) == 96 * 96 * 3
    assert "NaN" in reply.results[1].error.message


async def test_enhancer_identity_round_trips_and_wrong_size_fails_alone(identity_models_dir):
    face = RNG.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    async with started(make("enhancer", identity_models_dir)) as (_, channel):
        reply = await enhancer_pb2_grpc.EnhancerStub(channel).Enhance(enhancer_pb2.EnhanceRequest(
            faces=[encode_image(face), encode_image(face[:100, :100])]
        ))
    out = reply.faces[0].face
    assert (out.width, out.height) == (512, 512)
    assert np.array_equal(np.frombuffer(out.data, np.uint8).reshape(512, 512, 3), face)
    assert "the enhancer takes FFHQ-aligned 512x512 faces" in reply.faces[1].error.message


async def test_detector_answers_per_frame_and_a_corrupt_frame_fails_alone(dev_models_dir):
    frame = RNG.integers(0, 256, (360, 480, 3), dtype=np.uint8)
    corrupt = media_pb2.Image(data=b"garbage", format=media_pb2.PIXEL_FORMAT_ENCODED)
    png = media_pb2.Image(data=cv2.imencode(".png", frame)[1].tobytes(), format=media_pb2.PIXEL_FORMAT_ENCODED)
    async with started(make("detector", dev_models_dir)) as (_, channel):
        stub = detector_pb2_grpc.DetectorStub(channel)
        reply = await stub.Detect(detector_pb2.DetectRequest(frames=[encode_image(frame), corrupt, png]))
        embed = await stub.Embed(detector_pb2.EmbedRequest(faces=[
            encode_image(RNG.integers(0, 256, (112, 112, 3), dtype=np.uint8)), encode_image(frame),
        ]))
    assert len(reply.frames) == 3
    assert not reply.frames[0].HasField("error") and not reply.frames[2].HasField("error")
    assert reply.frames[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    vector = np.array(embed.embeddings[0].values)
    assert vector.shape == (512,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    assert "5-point-aligned 112x112" in embed.embeddings[1].error.message


async def test_full_queue_answers_resource_exhausted(dev_models_dir):
    async with started(make("lipsync", dev_models_dir, max_queue_size=2)) as (_, channel):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await lipsync_pb2_grpc.LipSyncStub(channel).Generate(
                lipsync_pb2.GenerateRequest(items=[lipsync_item() for _ in range(3)])
            )
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in error.value.details()


async def test_empty_request_is_invalid(dev_models_dir):
    async with started(make("enhancer", dev_models_dir)) as (_, channel):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await enhancer_pb2_grpc.EnhancerStub(channel).Enhance(enhancer_pb2.EnhanceRequest())
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_metrics_endpoint_exports_the_runtime_metrics(dev_models_dir):
    service = make("lipsync", dev_models_dir)
    async with started(service) as (server, channel):
        stub = lipsync_pb2_grpc.LipSyncStub(channel)
        await stub.Generate(lipsync_pb2.GenerateRequest(items=[lipsync_item(), lipsync_item()]))
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()
    for family in ("swl_inference_seconds_bucket", "swl_batch_size_bucket", "swl_queue_depth",
                   "swl_model_load_seconds", "swl_model_warmup_seconds", "swl_model_loads_total"):
        assert any(line.startswith(family + "{") and 'model="wav2lip_gan"' in line for line in text.splitlines()), family
    assert 'swl_grpc_requests_total{code="OK",method="Generate"} 1.0' in text
    assert 'swl_model_items_total{model="wav2lip_gan",outcome="ok"} 2.0' in text


def test_process_refuses_a_wrong_shape_model_naming_the_tensor(dev_models_dir, tmp_path):
    import dataclasses
    import shutil

    from service_runtime.dev_models import write_dev_model
    from service_runtime.manifest import TensorSpec, load_manifest

    shutil.copy(dev_models_dir / "manifest.json", tmp_path / "manifest.json")
    spec = load_manifest(tmp_path).get("wav2lip_gan")
    wrong = (spec.inputs[0], TensorSpec("video_frames", ("B", 6, 48, 48)))
    write_dev_model(dataclasses.replace(spec, inputs=wrong), tmp_path)
    done = subprocess.run([sys.executable, "-m", "services.lipsync"], env=service_env(tmp_path, "SWL_LIPSYNC_"),
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2
    assert "input tensor 'video_frames' has shape [None, 6, 48, 48], expected ['B', 6, 96, 96]" in done.stderr


def test_sigterm_drains_and_exits_cleanly(dev_models_dir):
    process = subprocess.Popen([sys.executable, "-m", "services.enhancer"], cwd=ROOT, stderr=subprocess.PIPE,
                               text=True, env=service_env(dev_models_dir, "SWL_ENHANCER_", ALLOW_DEV_MODELS="1"))
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        lines.append(line)
        if '"event": "serving"' in line:
            break
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=30)
    assert process.returncode == 0, "".join(lines) + rest
    assert '"event": "signal received; draining"' in rest and '"event": "stopped"' in rest
