"""Every process's settings class, titled as in docs/settings.md: what a deployment may set through SWL_ variables."""

from __future__ import annotations

import dataclasses

from service_runtime.registry import SERVICES
from webui.settings import WebUISettings

SETTINGS = (*((entry.name, entry.settings_class()) for entry in SERVICES), ("web UI", WebUISettings))


def variable_names() -> set[str]:
    """Every SWL_ variable a process of this project reads."""
    return {cls.env_name(f.name) for _, cls in SETTINGS for f in dataclasses.fields(cls)}
