"""Detector service start-up: settings, model loading and servicer registration."""

from __future__ import annotations

import dataclasses

from superwav2lip.detector.v1 import detector_pb2, detector_pb2_grpc

from service_runtime.manifest import load_manifest
from service_runtime.metrics import ServiceMetrics
from service_runtime.onnx_session import OnnxModel
from service_runtime.server import ModelService, run_service
from service_runtime.settings import (ServiceSettings, metrics_port_setting, model_max_batch_delay_ms_setting,
                                      model_max_batch_size_setting, model_max_queue_size_setting, port_setting,
                                      setting)

from .model import FaceDetector, FaceEmbedder
from .servicer import DetectorServicer


@dataclasses.dataclass(frozen=True)
class DetectorSettings(ServiceSettings):
    ENV_PREFIX = "SWL_DETECTOR_"
    port: int = port_setting(50052)
    metrics_port: int = metrics_port_setting(9102)
    detection_model: str = setting("scrfd_2.5g", "Manifest name of the face detector (scrfd_2.5g, yunet, retinaface_r50).")
    recognition_model: str = setting("arcface_seed", "Manifest name of the face-recognition model.")
    detection_size: int = setting(640, "Longest side of the detector input in pixels (multiple of 32); larger frames "
                                  "are scaled down to it, keeping their aspect.", ge=64, le=4096)
    detection_square: bool = setting(False, "Letterbox every frame to a detection_size square instead (the seed's "
                                     "way: the same cost whatever the frame).")
    max_frame_pixels: int = setting(
        4096 * 4096, "Largest sent frame or face crop, in pixels (width x height); larger ones are refused with "
                     "INVALID_ARGUMENT, from the picture's header before it is decoded.", ge=1024, le=1 << 28)
    # Each model batches on its own terms (-1: the service-wide max_batch_size, max_batch_delay_ms, max_queue_size).
    detection_max_batch_size: int = model_max_batch_size_setting("detection")
    detection_max_batch_delay_ms: float = model_max_batch_delay_ms_setting("detection")
    detection_max_queue_size: int = model_max_queue_size_setting("detection")
    recognition_max_batch_size: int = model_max_batch_size_setting("recognition")
    recognition_max_batch_delay_ms: float = model_max_batch_delay_ms_setting("recognition")
    recognition_max_queue_size: int = model_max_queue_size_setting("recognition")


class DetectorService(ModelService):
    name = "detector"
    grpc_service_names = (detector_pb2.DESCRIPTOR.services_by_name["Detector"].full_name,)

    def __init__(self, settings: DetectorSettings, metrics: ServiceMetrics | None = None) -> None:
        super().__init__(settings, metrics or ServiceMetrics())
        manifest = load_manifest(settings.models_dir)
        self.detector = FaceDetector(manifest.get(settings.detection_model), settings.detection_size,
                                     square=settings.detection_square)
        self.embedder = FaceEmbedder(manifest.get(settings.recognition_model))
        self.servicer = DetectorServicer(
            self.detector, self.embedder,
            self.new_queue(settings.detection_model, self.detector.run_batch, settings.batch_policy("detection")),
            self.new_queue(settings.recognition_model, self.embedder.run_batch, settings.batch_policy("recognition")),
            max_pixels=settings.max_frame_pixels,
        )

    def load_models(self) -> dict[str, OnnxModel]:
        self.detector.model = self.load(self.detector.spec, {"H": self.detector.size, "W": self.detector.size})
        self.embedder.model = self.load(self.embedder.spec)
        return {self.detector.spec.name: self.detector.model, self.embedder.spec.name: self.embedder.model}

    def register(self, server) -> None:
        detector_pb2_grpc.add_DetectorServicer_to_server(self.servicer, server)


def main() -> None:
    run_service(DetectorService(DetectorSettings.from_env()))
