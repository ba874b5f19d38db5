"""Writes a device measurement (measure.json or stack.json from $OUT) into bench/RESULTS.md's GPU sections, with the device's provenance.

    python -m tools.device.record <files_at>/measure.json <files_at>/stack.json"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from bench.results import HEADER, RESULTS  # noqa: E402
from tools.device import measure, stack  # noqa: E402

# (section key, title, table writer, runner option) for each kind of result, told apart by their keys
KINDS = {"models": ("gpu", "GPU: gpu-check and per-model items/s on the device machine (`tools/device`, docs/gpu.md)",
                    measure.markdown, "--measure models"),
         "stack": ("gpu-stack", "GPU: the stack end to end on the device machine (`tools/device/stack.py`, docs/gpu.md)",
                   stack.markdown, "--measure stack")}


def kind(result: dict) -> str:
    return "models" if "gpu_check" in result else "stack"


def section(result: dict) -> str:
    """The section in bench/results.py's marker format; the provenance is the device's, not this machine's."""
    key, title, markdown, option = KINDS[kind(result)]
    env = result["environment"]
    provenance = (f"Measured {env['measured_at']} on {env['cores']} cores, GPU: {env['gpu']}; command: "
                  f"`python3 -m tools.device.runner {option}` (docs/gpu.md), recorded by "
                  "`python -m tools.device.record`")
    return f"<!-- bench:{key} -->\n## {title}\n\n{provenance}\n\n{markdown(result).strip()}\n<!-- /bench:{key} -->"


def record(result_json: Path, results: Path = RESULTS) -> str:
    """Writes (or replaces) the result's section; returns its key."""
    result = json.loads(result_json.read_text())
    if "error" in result:
        raise SystemExit(f"{result_json} records a refused measurement, nothing to write: {result['error']}")
    key = KINDS[kind(result)][0]
    text = results.read_text() if results.is_file() else HEADER
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    if start in text and end in text:
        text = text[: text.index(start)] + section(result) + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section(result) + "\n"
    results.write_text(text)
    return key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result_json", type=Path, nargs="+", help="measure.json and/or stack.json")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for path in args.result_json:
        print(f"wrote section {record(path, args.results)!r} of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
