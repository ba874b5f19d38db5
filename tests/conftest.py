"""Shared fixtures: generated models (helpers the tests import live in tests/support/)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service_runtime.dev_models import write_dev_model
from service_runtime.manifest import load_manifest

from tests.support.paths import ROOT


def _models_folder(folder: Path, identity_roles: frozenset[str] = frozenset()) -> Path:
    shutil.copy(ROOT / "models" / "manifest.json", folder / "manifest.json")
    for spec in load_manifest(folder).models.values():
        write_dev_model(spec, folder / "dev", identity=spec.role in identity_roles)
    return folder


@pytest.fixture(scope="session")
def dev_models_dir(tmp_path_factory) -> Path:
    """A models folder with the project manifest and generated random-weight models in dev/."""
    return _models_folder(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def identity_models_dir(tmp_path_factory) -> Path:
    """Like dev_models_dir, but the lip-sync and enhancer models copy their (unmasked) input."""
    return _models_folder(tmp_path_factory.mktemp("identity_models"), frozenset({"lipsync", "enhancer"}))
