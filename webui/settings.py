"""The web UI's settings, from SWL_WEBUI_* environment variables."""

from __future__ import annotations

import dataclasses

from service_runtime.settings import BaseSettings, setting


@dataclasses.dataclass(frozen=True)
class WebUISettings(BaseSettings):
    ENV_PREFIX = "SWL_WEBUI_"

    host: str = setting("0.0.0.0", "Address the web UI binds.")
    port: int = setting(7860, "Port of the web UI.", ge=1, le=65535)
    gateway_address: str = setting("localhost:50051", "host:port of the gateway (or Envoy's gRPC port).")
    api_key: str = setting("", "API key the UI's server sends to the gateway; it never reaches the browser.")
    timeout_s: float = setting(1800.0, "Longest wait for one generation.", ge=1, le=86400)
    max_upload_mb: int = setting(512, "Largest file the page accepts, in MiB (the gateway's limit).", ge=1, le=16384)
