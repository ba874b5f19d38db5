"""Each model of a service batches on its own terms: the detector's detection and recognition models take their
own max batch size, batch delay and queue size (SWL_DETECTOR_DETECTION_* / _RECOGNITION_*), each falling back to
the service-wide value when unset (-1); warm-up and the provider's batch profile follow each model's own size."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest
from superwav2lip.detector.v1 import detector_pb2, detector_pb2_grpc

from service_runtime import server as server_module
from service_runtime.batching import BatchPolicy
from service_runtime.images import encode_image
from service_runtime.settings import SERVICE_WIDE, SettingsError
from services.detector.service import DetectorService, DetectorSettings
from services.lipsync.service import LipSyncService, LipSyncSettings

from tests.support.inprocess import local_settings, started

RNG = np.random.default_rng(11)
PER_MODEL = dict(detection_max_batch_size=3, detection_max_batch_delay_ms=0.0, detection_max_queue_size=12,
                 recognition_max_batch_size=16, recognition_max_batch_delay_ms=20.0, recognition_max_queue_size=500)


def policies(service) -> dict[str, BatchPolicy]:
    return {name: queue.policy for name, queue in service.queues.items()}


async def test_each_detector_model_gets_its_own_batching(dev_models_dir, monkeypatch, caplog):
    loaded: dict[str, int] = {}
    real_load = server_module.load_model

    def load_model(spec, models_dir, **options):  # what the provider (TensorRT's batch profile) is told
        loaded[spec.name] = options["provider_config"].max_batch_size
        return real_load(spec, models_dir, **options)

    monkeypatch.setattr(server_module, "load_model", load_model)
    settings = local_settings(DetectorSettings, dev_models_dir, max_batch_size=8, max_batch_delay_ms=5.0,
                              max_queue_size=256, warmup_batch_sizes=(), **PER_MODEL)
    service = DetectorService(settings)
    detection, recognition = settings.detection_model, settings.recognition_model
    assert policies(service) == {detection: BatchPolicy(3, 0.0, 12), recognition: BatchPolicy(16, 0.02, 500)}

    caplog.set_level(logging.INFO, logger="service_runtime.server")
    async with started(service) as (_, channel):
        stub = detector_pb2_grpc.DetectorStub(channel)
        frames = [encode_image(RNG.integers(0, 256, (120, 160, 3), dtype=np.uint8)) for _ in range(7)]
        reply = await stub.Detect(detector_pb2.DetectRequest(frames=frames))
        faces = [encode_image(RNG.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(5)]
        embedded = await stub.Embed(detector_pb2.EmbedRequest(faces=faces))
    assert not any(f.HasField("error") for f in reply.frames) and len(embedded.embeddings) == 5

    # Both default models are fixed-batch-1 exports: the queue still gathers its own batch size, run one by one.
    batches = {s.labels["model"]: s.value for m in service.metrics.batch_size.collect() for s in m.samples
               if s.name == "swl_batch_size_count"}
    assert batches[detection] == 3  # 7 frames in batches of at most 3
    assert batches[recognition] == 1  # 5 faces in one batch of up to 16
    warmed = {r.model: tuple(r.batch_sizes) for r in caplog.records if r.getMessage() == "model warmed up"}
    assert warmed == {detection: (1, 3), recognition: (1, 16)}
    assert loaded == {detection: 3, recognition: 16}


async def test_a_full_detection_queue_refuses_at_its_own_size(dev_models_dir):
    settings = local_settings(DetectorSettings, dev_models_dir, detection_max_queue_size=2)
    async with started(DetectorService(settings)) as (_, channel):
        frames = [encode_image(RNG.integers(0, 256, (60, 80, 3), dtype=np.uint8)) for _ in range(3)]
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await detector_pb2_grpc.DetectorStub(channel).Detect(detector_pb2.DetectRequest(frames=frames))
    assert "queue is full (0 of 2 items waiting, 3 more asked)" in error.value.details()


def test_unset_per_model_values_fall_back_to_the_service_wide_ones(dev_models_dir):
    settings = DetectorSettings.from_env({"SWL_DETECTOR_MAX_BATCH_SIZE": "6", "SWL_DETECTOR_MAX_QUEUE_SIZE": "99",
                                          "SWL_DETECTOR_MAX_BATCH_DELAY_MS": "7",
                                          "SWL_DETECTOR_DETECTION_MAX_BATCH_SIZE": "2",
                                          "SWL_DETECTOR_RECOGNITION_MAX_QUEUE_SIZE": "-1"})
    assert settings.recognition_max_batch_size == settings.detection_max_queue_size == SERVICE_WIDE == -1
    assert settings.batch_policy("detection") == BatchPolicy(2, 0.007, 99)
    assert settings.batch_policy("recognition") == settings.batch_policy() == BatchPolicy(6, 0.007, 99)
    assert settings.effective_warmup_batch_sizes(2) == (1, 2)
    assert settings.effective_warmup_batch_sizes() == (1, 6)

    service = DetectorService(local_settings(DetectorSettings, dev_models_dir, max_batch_size=5,
                                             detection_max_batch_delay_ms=0.0))
    assert policies(service) == {service.settings.detection_model: BatchPolicy(5, 0.0, 256),
                                 service.settings.recognition_model: BatchPolicy(5, 0.005, 256)}
    lipsync = LipSyncService(local_settings(LipSyncSettings, dev_models_dir, batch_across_calls=False))
    assert policies(lipsync) == {"wav2lip_gan": BatchPolicy(32, 0.005, 256, across_calls=False)}


def test_explicit_warmup_sizes_are_capped_at_each_models_largest_batch():
    settings = DetectorSettings.from_env({}, warmup_batch_sizes=(1, 4, 16))
    assert settings.effective_warmup_batch_sizes(8) == (1, 4, 8)
    assert settings.effective_warmup_batch_sizes(2) == (1, 2)


@pytest.mark.parametrize(("variable", "value", "allowed"), [
    ("SWL_DETECTOR_DETECTION_MAX_BATCH_SIZE", "0", "1 to 1024, or -1"),
    ("SWL_DETECTOR_RECOGNITION_MAX_BATCH_SIZE", "1025", "1 to 1024, or -1"),
    ("SWL_DETECTOR_DETECTION_MAX_BATCH_DELAY_MS", "-2", "0 to 10000, or -1"),
    ("SWL_DETECTOR_RECOGNITION_MAX_QUEUE_SIZE", "0", "1 to 1000000, or -1"),
])
def test_an_out_of_range_per_model_value_is_refused_naming_the_variable(variable, value, allowed):
    with pytest.raises(SettingsError) as error:
        DetectorSettings.from_env({variable: value})
    assert str(error.value) == f"{variable}={float(value) if 'DELAY' in variable else int(value)!r} is out of " \
                               f"range: {allowed} (the service-wide value)"


def test_a_model_with_no_batching_settings_of_its_own_is_a_programming_error():
    with pytest.raises(TypeError, match="no setting detector_max_batch_size"):
        DetectorSettings.from_env({}).batch_policy("detector")
