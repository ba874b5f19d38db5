"""Writes the device measurement (measure.json from $OUT) into bench/RESULTS.md's GPU section, with the device's provenance.

    python -m tools.device.record /work/.device/<files_at>/measure.json"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]

from bench.results import HEADER, RESULTS  # noqa: E402
from tools.device.measure import markdown  # noqa: E402

KEY, TITLE = "gpu", "GPU: gpu-check and per-model items/s on the device machine (`tools/device`, docs/gpu.md)"


def section(result: dict) -> str:
    """The section in bench/results.py's marker format; the provenance is the device's, not this machine's."""
    env = result["environment"]
    provenance = (f"Measured {env['measured_at']} on {env['cores']} cores, GPU: {env['gpu']}; command: "
                  "`python3 -m tools.device.runner` (docs/gpu.md), recorded by `python -m tools.device.record`")
    return f"<!-- bench:{KEY} -->\n## {TITLE}\n\n{provenance}\n\n{markdown(result).strip()}\n<!-- /bench:{KEY} -->"


def record(measure_json: Path, results: Path = RESULTS) -> None:
    result = json.loads(measure_json.read_text())
    if "error" in result:
        raise SystemExit(f"{measure_json} records a refused measurement, nothing to write: {result['error']}")
    text = results.read_text() if results.is_file() else HEADER
    start, end = f"<!-- bench:{KEY} -->", f"<!-- /bench:{KEY} -->"
    if start in text and end in text:
        text = text[: text.index(start)] + section(result) + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section(result) + "\n"
    results.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measure_json", type=Path)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    record(args.measure_json, args.results)
    print(f"wrote section {KEY!r} of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
