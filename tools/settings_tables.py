"""The settings reference tables in docs/settings.md, from the settings classes: `python tools/settings_tables.py`
prints them, `--write` replaces each table under its `## <title>` heading in docs/settings.md."""

import sys
from pathlib import Path

from deploy.settings_catalog import SETTINGS as TABLES

SETTINGS_DOC = Path(__file__).resolve().parent.parent / "docs" / "settings.md"


def rewrite(text: str) -> str:
    lines = text.split("\n")
    for title, settings_cls in TABLES:
        start = lines.index(f"## {title}") + 2
        end = start
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        lines[start:end] = settings_cls.markdown_table().split("\n")
    return "\n".join(lines)


def main() -> None:
    if "--write" in sys.argv:
        SETTINGS_DOC.write_text(rewrite(SETTINGS_DOC.read_text()))
    else:
        for title, settings_cls in TABLES:
            print(f"## {title}\n\n{settings_cls.markdown_table()}\n")


if __name__ == "__main__":
    main()
