"""bench/RESULTS.md: each benchmark script replaces its own section, so results are written by the scripts."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nWritten by the scripts in `bench/` (`make bench`, `make bench-avatar`); do not edit by hand.\n"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str:
    if not shutil.which("nvidia-smi"):
        return "none"
    result = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                            text=True)
    return result.stdout.strip().replace("\n", ", ") or "none"


def provenance() -> str:
    """When, where and how a section was measured."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    script = Path(sys.argv[0]).resolve()
    root = RESULTS.parent.parent
    module = ".".join(script.relative_to(root).with_suffix("").parts) if script.is_relative_to(root) else script.name
    command = shlex.join(["python", "-m", module, *sys.argv[1:]])
    return (f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {cores} cores "
            f"({cpu_model()}), GPU: {gpu_name()}; command: `{command}`")


def write_section(key: str, title: str, body: str) -> None:
    """Replaces the section `key` (or appends it) with `title`, the provenance line and `body`."""
    text = RESULTS.read_text() if RESULTS.is_file() else HEADER
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    section = f"{start}\n## {title}\n\n{provenance()}\n\n{body.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def publish(key: str, title: str, body: str, write: bool = True) -> None:
    """Prints a benchmark's text and, unless told not to (`--no-write`), writes it as section `key`."""
    print(body)
    if write:
        write_section(key, title, body)
