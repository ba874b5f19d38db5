"""The README settings tables, from the settings classes: `python tools/settings_tables.py` prints them,
`--write` replaces each table under its `#### <title>` heading in README.md."""

import sys
from pathlib import Path

from deploy.settings_catalog import SETTINGS as TABLES

README = Path(__file__).resolve().parent.parent / "README.md"


def rewrite(text: str) -> str:
    lines = text.split("\n")
    for title, settings_cls in TABLES:
        start = lines.index(f"#### {title}") + 2
        end = start
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        lines[start:end] = settings_cls.markdown_table().split("\n")
    return "\n".join(lines)


if "--write" in sys.argv:
    README.write_text(rewrite(README.read_text()))
else:
    for title, settings_cls in TABLES:
        print(f"#### {title}\n\n{settings_cls.markdown_table()}\n")
