"""`make fuzz`: every target for an equal share of --seconds, one process each; prints a table, fails on a crash.

    python -m fuzz [--seconds 60] [--keep-corpus]
New corpus entries a run finds go to a temporary folder unless --keep-corpus (then fuzz/corpus grows)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from fuzz.targets import TARGETS  # noqa: E402  (the heavy modules load only inside each target)


def run_target(name: str, seconds: int, keep: bool) -> dict[str, str]:
    crashes = ROOT / "fuzz" / "crashes"
    before = set(crashes.glob(f"{name}-*")) if crashes.is_dir() else set()
    with tempfile.TemporaryDirectory(prefix=f"swl-fuzz-{name}-") as scratch:
        extra = [] if keep else [scratch]  # libFuzzer writes new inputs to the first corpus folder
        command = [sys.executable, "-m", "fuzz.run", name, f"-max_total_time={seconds}", "-print_final_stats=1",
                   *extra]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120)
    log = result.stdout + result.stderr
    found = sorted(set(crashes.glob(f"{name}-*")) - before) if crashes.is_dir() else []
    runs = re.findall(r"stat::number_of_executed_units: (\d+)", log)
    cov = re.findall(r"cov: (\d+)", log)
    return {"target": name, "runs": runs[-1] if runs else "?", "coverage": cov[-1] if cov else "?",
            "exit": str(result.returncode), "crashes": ", ".join(p.name for p in found) or "none",
            "log": log if result.returncode or found else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--keep-corpus", action="store_true")
    args = parser.parse_args()
    share = max(1, args.seconds // len(TARGETS))
    rows = [run_target(name, share, args.keep_corpus) for name in TARGETS]
    print("| target | seconds | inputs run | coverage | exit | crashes |\n| --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['target']} | {share} | {r['runs']} | {r['coverage']} | {r['exit']} | {r['crashes']} |")
    failed = [r for r in rows if r["exit"] != "0" or r["crashes"] != "none"]
    for r in failed:
        print(f"\n--- {r['target']} ---\n{r['log'][-4000:]}", file=sys.stderr)
    if failed:
        print("\nA crash becomes a regression test: copy it to fuzz/regressions/<target>/ and fix the cause.",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
