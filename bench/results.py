"""bench/RESULTS.md: each benchmark script replaces its own section, so results are written by the scripts."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nWritten by the scripts in `bench/` (`make bench`, `make bench-avatar`); do not edit by hand.\n"


def write_section(key: str, title: str, body: str) -> None:
    """Replaces the section `key` (or appends it) with `title` and `body`."""
    text = RESULTS.read_text() if RESULTS.is_file() else HEADER
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    section = f"{start}\n## {title}\n\n{body.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)
