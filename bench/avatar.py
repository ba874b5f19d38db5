"""Planning saved: the same clip as a fresh request, a cached request and an avatar request, side by side.

Starts `make run`'s stack as real processes (full-size Wav2Lip, the real SCRFD-2.5G when ../shared/models has
it), times each kind of request a few times (median), prints a table and writes it into bench/RESULTS.md."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from bench.results import publish  # noqa: E402
from bench.throughput import Stack, clip, prepare_models, speech, timed  # noqa: E402
from superwav2lip_client import Client  # noqa: E402
from superwav2lip.gateway.v1 import gateway_pb2  # noqa: E402


@dataclasses.dataclass
class AvatarTimes:
    """Seconds per request of each kind (one per repeat) and for creating the avatar."""

    fresh: list[float]
    cached: list[float]
    from_avatar: list[float]
    create: float

    def rows(self) -> list[tuple[str, float]]:
        return [("fresh (face never seen)", statistics.median(self.fresh)),
                ("same face again (plan cache hit)", statistics.median(self.cached)),
                ("avatar id + speech", statistics.median(self.from_avatar))]


def measure(models: Path, seconds: float, repeats: int, work: Path) -> AvatarTimes:
    audio = speech(seconds)
    # Different encodings of the same clip: each is new content, so each misses the plan cache.
    fresh_faces = [clip(seconds, crf=20 + i) for i in range(repeats)]
    stack = Stack(models, work / "logs", {})
    try:
        with Client(stack.address, timeout=1800) as client:
            client.generate(clip(seconds, crf=30), audio)  # nothing left to warm
            fresh = [timed(lambda f=f: client.generate(f, audio)) for f in fresh_faces]
            cached = [timed(lambda: client.generate(fresh_faces[0], audio)) for _ in range(repeats)]
            created: list[gateway_pb2.Avatar] = []
            create = timed(lambda: created.append(client.create_avatar(fresh_faces[-1])))
            from_avatar = [timed(lambda: client.generate(None, audio, avatar=created[0].avatar_id))
                           for _ in range(repeats)]
    finally:
        stack.stop()
    return AvatarTimes(fresh, cached, from_avatar, create)


def table(times: AvatarTimes, seconds: float) -> str:
    rows = times.rows()
    base = rows[0][1]
    lines = ["| request | seconds | x real time | fresh / this |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {spent:.2f} | {seconds / spent:.2f} | {base / spent:.2f} |" for name, spent in rows]
    return "\n".join([*lines, "", f"Creating the avatar (planning only) took {times.create:.2f} s."])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="swl-bench-avatar-"))
    try:
        detector = prepare_models(work)
        times = measure(work, args.seconds, args.repeats, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = (f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"Wav2Lip full size (random weights); detector: {detector}; clip {args.seconds:g} s 1280x720 25 fps, "
            f"no enhancer; median of {args.repeats}; one stack, one run ({time.strftime('%Y-%m-%d')})\n\n"
            + table(times, args.seconds))
    publish("avatars", "Planning saved: fresh, cached and avatar requests (`make bench-avatar`)", text,
            write=not args.no_write)


if __name__ == "__main__":
    main()
