"""The one list of this project's services: name, entry module, settings class, the models each loads. `make run`'s
launcher, the test stacks, the benchmarks, gpu-check, the image list and the settings catalog read it."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .settings import ServerSettings


@dataclass(frozen=True)
class ServiceEntry:
    name: str  # also its settings prefix (SWL_<NAME>_), its log file and its image name
    module: str  # started as `python -m <module>`
    settings: str  # "<module>:<class>" of its ServerSettings subclass, imported only when asked for
    model_settings: tuple[str, ...] = ()  # its settings fields that name manifest models; empty for the gateway

    @property
    def is_model_service(self) -> bool:
        return bool(self.model_settings)

    @property
    def prefix(self) -> str:
        return f"SWL_{self.name.upper()}_"

    def settings_class(self) -> type[ServerSettings]:
        module, _, name = self.settings.partition(":")
        return getattr(importlib.import_module(module), name)

    def configured_models(self) -> list[str]:
        """The manifest names this service loads with the current environment's settings."""
        settings = self.settings_class().from_env()
        return [getattr(settings, field) for field in self.model_settings]


# In start order: the gateway first, and the ports of `make run` follow this order from its base port.
SERVICES: tuple[ServiceEntry, ...] = (
    ServiceEntry("gateway", "gateway", "gateway.service:GatewaySettings"),
    ServiceEntry("detector", "services.detector", "services.detector.service:DetectorSettings",
                 ("detection_model", "recognition_model")),
    ServiceEntry("lipsync", "services.lipsync", "services.lipsync.service:LipSyncSettings", ("model",)),
    ServiceEntry("enhancer", "services.enhancer", "services.enhancer.service:EnhancerSettings", ("model",)),
)


def names() -> tuple[str, ...]:
    return tuple(entry.name for entry in SERVICES)


def model_services() -> tuple[ServiceEntry, ...]:
    return tuple(entry for entry in SERVICES if entry.is_model_service)


def get(name: str) -> ServiceEntry:
    for entry in SERVICES:
        if entry.name == name:
            return entry
    raise KeyError(f"no service {name!r} in service_runtime/registry.py (known: {', '.join(names())})")
