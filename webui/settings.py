"""The web UI's settings, from SWL_WEBUI_* environment variables."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Self

from service_runtime.settings import BaseSettings, SettingsError, setting

REMOVED_API_KEY = "SWL_WEBUI_API_KEY"
REMOVED_API_KEY_MESSAGE = (
    f"{REMOVED_API_KEY} was removed: the web UI no longer holds one shared API key, as anyone reaching the page "
    "would act with it. Each visitor now signs in on the page with their own key (docs/webui.md). Unset "
    f"{REMOVED_API_KEY} and give each person who uses the UI a key of their own.")


@dataclasses.dataclass(frozen=True)
class WebUISettings(BaseSettings):
    ENV_PREFIX = "SWL_WEBUI_"

    host: str = setting("127.0.0.1", "Address the web UI binds (0.0.0.0: every network; put TLS in front).")
    port: int = setting(7860, "Port of the web UI.", ge=1, le=65535)
    gateway_address: str = setting("localhost:50051", "host:port of the gateway (or Envoy's gRPC port).")
    timeout_s: float = setting(1800.0, "Longest wait for one generation.", ge=1, le=86400)
    max_upload_mb: int = setting(512, "Largest file the page accepts, in MiB (the gateway's limit).", ge=1, le=16384)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """As BaseSettings.from_env; refuses the removed SWL_WEBUI_API_KEY rather than ignore it silently."""
        environ = os.environ if environ is None else environ
        if environ.get(REMOVED_API_KEY, "").strip():
            raise SettingsError(REMOVED_API_KEY_MESSAGE)
        return super().from_env(environ, **overrides)
