"""Every process's settings class, titled as in docs/settings.md: what a deployment may set through SWL_ variables."""

from __future__ import annotations

import dataclasses

from gateway.service import GatewaySettings
from services.detector.service import DetectorSettings
from services.enhancer.service import EnhancerSettings
from services.lipsync.service import LipSyncSettings
from webui.settings import WebUISettings

SETTINGS = (("gateway", GatewaySettings), ("detector", DetectorSettings), ("lipsync", LipSyncSettings),
            ("enhancer", EnhancerSettings), ("web UI", WebUISettings))


def variable_names() -> set[str]:
    """Every SWL_ variable a process of this project reads."""
    return {cls.env_name(f.name) for _, cls in SETTINGS for f in dataclasses.fields(cls)}
