"""Prints the README settings tables from the settings classes (`python tools/settings_tables.py`)."""

from gateway.service import GatewaySettings
from services.detector.service import DetectorSettings
from services.enhancer.service import EnhancerSettings
from services.lipsync.service import LipSyncSettings
from webui.settings import WebUISettings

for title, settings_cls in (("gateway", GatewaySettings), ("detector", DetectorSettings), ("lipsync", LipSyncSettings),
                            ("enhancer", EnhancerSettings), ("web UI", WebUISettings)):
    print(f"#### {title}\n\n{settings_cls.markdown_table()}\n")
