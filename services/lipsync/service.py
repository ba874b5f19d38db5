"""Lip-sync service start-up: settings, model loading and servicer registration."""

from __future__ import annotations

import dataclasses

from superwav2lip.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc

from service_runtime.manifest import load_manifest
from service_runtime.metrics import ServiceMetrics
from service_runtime.onnx_session import OnnxModel
from service_runtime.quantize import int8_spec
from service_runtime.server import ModelService, run_service
from service_runtime.settings import ServiceSettings, metrics_port_setting, port_setting, setting

from .model import LipSyncGenerator
from .servicer import LipSyncServicer


@dataclasses.dataclass(frozen=True)
class LipSyncSettings(ServiceSettings):
    ENV_PREFIX = "SWL_LIPSYNC_"
    port: int = port_setting(50053)
    metrics_port: int = metrics_port_setting(9103)
    model: str = setting("wav2lip_gan", "Manifest name of the Wav2Lip generator (wav2lip or wav2lip_gan).")
    max_batch_size: int = setting(32, "Most items one model call takes from the batching queue.", ge=1, le=1024)
    int8: bool = setting(False, "Serve the int8 copy of the model (`<file>.int8.onnx`, made by "
                         "`superwav2lip-quantize`): faster on CPU; off until validated with the real weights.")


class LipSyncService(ModelService):
    name = "lipsync"
    grpc_service_names = (lipsync_pb2.DESCRIPTOR.services_by_name["LipSync"].full_name,)

    def __init__(self, settings: LipSyncSettings, metrics: ServiceMetrics | None = None) -> None:
        super().__init__(settings, metrics or ServiceMetrics())
        spec = load_manifest(settings.models_dir).get(settings.model)
        self.generator = LipSyncGenerator(int8_spec(spec) if settings.int8 else spec)
        self.servicer = LipSyncServicer(self.generator, self.new_queue(settings.model, self.generator.run_batch))

    def load_models(self) -> dict[str, OnnxModel]:
        self.generator.model = self.load(self.generator.spec)
        return {self.generator.spec.name: self.generator.model}

    def register(self, server) -> None:
        lipsync_pb2_grpc.add_LipSyncServicer_to_server(self.servicer, server)


def main() -> None:
    run_service(LipSyncService(LipSyncSettings.from_env()))
