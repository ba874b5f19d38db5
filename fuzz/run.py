"""Runs one fuzz target under atheris (libFuzzer) with the project's modules instrumented.

    python -m fuzz.run TARGET [libFuzzer flags...]    e.g. -max_total_time=15
The corpus is fuzz/corpus/TARGET (checked in: the seeds, plus what a run adds); a crash is written to
fuzz/crashes/ and becomes a regression test (tests/gateway/test_fuzz_regressions.py replays that folder)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    import atheris

    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        raise SystemExit(__doc__)
    name = sys.argv[1]
    with atheris.instrument_imports(include=["gateway", "services", "service_runtime", "fuzz"]):
        from fuzz.targets import TARGETS

        import gateway.audio, gateway.face_source, gateway.options, services.detector.decoders  # noqa: E401,F401
    if name not in TARGETS:
        raise SystemExit(f"unknown target {name!r}; one of {', '.join(TARGETS)}")
    corpus = ROOT / "fuzz" / "corpus" / name
    crashes = ROOT / "fuzz" / "crashes"
    crashes.mkdir(exist_ok=True)
    argv = [sys.argv[0], *sys.argv[2:], f"-artifact_prefix={crashes}/{name}-", "-rss_limit_mb=4096",
            "-timeout=20", str(corpus)]
    atheris.Setup(argv, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
