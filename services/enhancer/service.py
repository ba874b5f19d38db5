"""Enhancer service start-up: settings, model loading and servicer registration."""

from __future__ import annotations

import dataclasses

from superwav2lip.enhancer.v1 import enhancer_pb2, enhancer_pb2_grpc

from service_runtime.manifest import load_manifest
from service_runtime.metrics import ServiceMetrics
from service_runtime.onnx_session import OnnxModel
from service_runtime.server import ModelService, run_service
from service_runtime.settings import ServiceSettings, metrics_port_setting, port_setting, setting

from .model import FaceRestorer
from .servicer import EnhancerServicer


@dataclasses.dataclass(frozen=True)
class EnhancerSettings(ServiceSettings):
    ENV_PREFIX = "SWL_ENHANCER_"
    port: int = port_setting(50054)
    metrics_port: int = metrics_port_setting(9104)
    model: str = setting("gfpgan_v1.4", "Manifest name of the face restorer.")
    max_batch_size: int = setting(4, "Most items one model call takes from the batching queue.", ge=1, le=1024)


class EnhancerService(ModelService):
    name = "enhancer"
    grpc_service_names = (enhancer_pb2.DESCRIPTOR.services_by_name["Enhancer"].full_name,)

    def __init__(self, settings: EnhancerSettings, metrics: ServiceMetrics | None = None) -> None:
        super().__init__(settings, metrics or ServiceMetrics())
        self.restorer = FaceRestorer(load_manifest(settings.models_dir).get(settings.model))
        self.servicer = EnhancerServicer(self.restorer, self.new_queue(settings.model, self.restorer.run_batch))

    def load_models(self) -> dict[str, OnnxModel]:
        self.restorer.model = self.load(self.restorer.spec)
        return {self.restorer.spec.name: self.restorer.model}

    def register(self, server) -> None:
        enhancer_pb2_grpc.add_EnhancerServicer_to_server(self.servicer, server)


def main() -> None:
    run_service(EnhancerService(EnhancerSettings.from_env()))
