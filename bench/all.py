"""`make bench-all`: every benchmark in turn, each in its own process, then their durations and the total
written into bench/RESULTS.md (the budget is 15 minutes on 2 cores)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from bench.results import publish  # noqa: E402

BENCHMARKS = ("detection", "stages", "int8", "avatar", "live", "throughput", "seed")
BUDGET_S = 15 * 60


def run_all(names: tuple[str, ...]) -> list[tuple[str, float, int]]:
    """(benchmark, seconds, exit code) for each, in order; a failure does not stop the others."""
    results = []
    for name in names:
        print(f"== bench.{name}", flush=True)
        started = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", f"bench.{name}"], cwd=ROOT)
        results.append((name, time.perf_counter() - started, code))
    return results


def table(results: list[tuple[str, float, int]]) -> str:
    total = sum(seconds for _, seconds, _ in results)
    lines = ["| benchmark | minutes | exit |", "| --- | ---: | ---: |"]
    lines += [f"| `python -m bench.{name}` | {seconds / 60:.1f} | {code} |" for name, seconds, code in results]
    lines += [f"| **total** | **{total / 60:.1f}** | |", "",
              f"Budget: {BUDGET_S // 60} minutes on 2 cores; {'within' if total <= BUDGET_S else 'OVER'} it."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS))
    args = parser.parse_args(argv)
    results = run_all(tuple(n for n in args.only.split(",") if n))
    text = table(results)
    publish("durations", "How long the benchmarks take (`make bench-all`)", text)
    return max(code for _, _, code in results)


if __name__ == "__main__":
    sys.exit(main())
