"""Settings come from prefixed environment variables, fail clearly, and are all documented."""


import pytest

from service_runtime.settings import SettingsError
from services.detector.service import DetectorSettings
from services.enhancer.service import EnhancerSettings

from tests.support.paths import ROOT
from services.lipsync.service import LipSyncSettings
from deploy.settings_catalog import SETTINGS

ALL = [cls for _, cls in SETTINGS]


def test_values_are_parsed_by_type_with_the_service_prefix():
    settings = LipSyncSettings.from_env({
        "SWL_LIPSYNC_PORT": "6000", "SWL_LIPSYNC_MAX_BATCH_DELAY_MS": "2.5", "SWL_LIPSYNC_REQUIRE_GPU": "yes",
        "SWL_LIPSYNC_WARMUP_BATCH_SIZES": "1, 4,16", "SWL_DETECTOR_PORT": "7000",
    })
    assert (settings.port, settings.max_batch_delay_ms, settings.require_gpu) == (6000, 2.5, True)
    assert settings.warmup_batch_sizes == (1, 4, 16)
    assert LipSyncSettings.from_env({}).port == 50053  # another service's variable is not read


def test_bad_value_names_the_variable():
    with pytest.raises(SettingsError, match="SWL_ENHANCER_MAX_QUEUE_SIZE='lots'"):
        EnhancerSettings.from_env({"SWL_ENHANCER_MAX_QUEUE_SIZE": "lots"})


def test_default_warmup_covers_one_and_the_max_batch():
    assert DetectorSettings.from_env({}, max_batch_size=8).effective_warmup_batch_sizes() == (1, 8)


SETTINGS_DOC = ROOT / "docs" / "settings.md"


@pytest.mark.parametrize("settings_cls", ALL)
def test_every_setting_is_in_the_settings_reference(settings_cls):
    reference = SETTINGS_DOC.read_text()
    missing = [line for line in settings_cls.markdown_table().splitlines()[2:] if line not in reference]
    assert not missing, f"docs/settings.md is out of date (python tools/settings_tables.py --write): {missing}"


def test_the_settings_reference_is_exactly_what_the_tool_writes():
    from tools.settings_tables import rewrite

    text = SETTINGS_DOC.read_text()
    assert rewrite(text) == text, "docs/settings.md is out of date (python tools/settings_tables.py --write)"
