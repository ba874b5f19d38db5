"""`make help` (the Makefile's default goal) lists every target the Makefile defines, with its `## comment`."""

import re
import shutil
import subprocess

import pytest

from tests.support.paths import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

TARGET = re.compile(r"^([a-zA-Z0-9_-]+):")


def makefile_targets() -> dict[str, str]:
    """Each target defined in the Makefile, with its `## comment` ('' when it has none)."""
    targets = {}
    for line in (ROOT / "Makefile").read_text().splitlines():
        if match := TARGET.match(line):
            targets[match.group(1)] = line.split("## ", 1)[1].strip() if "## " in line else ""
    return targets


def make(*args: str) -> str:
    done = subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_lists_every_target_with_its_comment():
    targets = makefile_targets()
    assert {"help", "run", "test", "models"} <= set(targets)
    listed = {}
    for line in make("help").splitlines():
        name, _, doc = line.strip().partition(" ")
        listed[name] = doc.strip()
    missing = sorted(set(targets) - set(listed))
    assert not missing, f"make help does not list: {missing}"
    wrong = {name: listed[name] for name, doc in targets.items() if doc and listed[name] != doc}
    assert not wrong, f"make help shows another text than the target's ## comment: {wrong}"


def test_help_is_the_default_goal():
    # -n: were the default goal another target (install), its commands would be printed, not run.
    assert make("-n") == make("-n", "help")
