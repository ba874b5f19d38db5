"""Where the checkout and the optional shared material are, and the system programs tests start for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import system_deps

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
SHARED_MODELS = SHARED / "models"
SHARED_MEDIA = SHARED / "media"


def shared_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        pytest.skip(f"{path} not present (real models and media are optional)")
    return path


def system_binary(name: str) -> str:
    """The path of a system program a test starts for real; `tools/system_deps.py` lists them all and `make deps`
    (a step of `make test`) installs them, so a missing one fails the test with the fix."""
    try:
        return system_deps.require(name)
    except RuntimeError as error:
        pytest.fail(str(error))
