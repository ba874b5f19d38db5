"""Planning saved: the same clip as a fresh request, a cached request and an avatar request, side by side.

Starts `make run`'s stack as real processes (full-size Wav2Lip, the real SCRFD-2.5G when ../shared/models has
it), times each kind of request a few times (median), prints a table and writes it into bench/RESULTS.md."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "client")]

from bench.results import write_section  # noqa: E402
from bench.throughput import Stack, clip, prepare_models, speech, timed  # noqa: E402
from superwav2lip_client import Client  # noqa: E402
from superwav2lip.gateway.v1 import gateway_pb2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="swl-bench-avatar-"))
    try:
        detector = prepare_models(work)
        audio = speech(args.seconds)
        # Different encodings of the same clip: each is new content, so each misses the plan cache.
        fresh_faces = [clip(args.seconds, crf=20 + i) for i in range(args.repeats)]
        stack = Stack(work, work / "logs", {})
        try:
            with Client(stack.address, timeout=1800) as client:
                client.generate(clip(args.seconds, crf=30), audio)  # nothing left to warm
                fresh = [timed(lambda f=f: client.generate(f, audio)) for f in fresh_faces]
                cached = [timed(lambda: client.generate(fresh_faces[0], audio)) for _ in range(args.repeats)]
                created: list[gateway_pb2.Avatar] = []
                create = timed(lambda: created.append(client.create_avatar(fresh_faces[-1])))
                from_avatar = [timed(lambda: client.generate(None, audio, avatar=created[0].avatar_id))
                               for _ in range(args.repeats)]
        finally:
            stack.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [("fresh (face never seen)", statistics.median(fresh)), ("same face again (plan cache hit)",
            statistics.median(cached)), ("avatar id + speech", statistics.median(from_avatar))]
    base = rows[0][1]
    lines = [f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
             f"Wav2Lip full size (random weights); detector: {detector}; clip {args.seconds:g} s 1280x720 25 fps, "
             f"no enhancer; median of {args.repeats}; one stack, one run ({time.strftime('%Y-%m-%d')})", "",
             "| request | seconds | x real time | fresh / this |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {seconds:.2f} | {args.seconds / seconds:.2f} | {base / seconds:.2f} |"
              for name, seconds in rows]
    lines += ["", f"Creating the avatar (planning only) took {create:.2f} s."]
    text = "\n".join(lines)
    print(text)
    write_section("avatars", "Planning saved: fresh, cached and avatar requests (`make bench-avatar`)", text)


if __name__ == "__main__":
    main()
