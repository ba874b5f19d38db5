"""Live sessions on this machine: sustained fps, chunk-to-frame latency and first frame, against Wav2Lip alone.

Starts `make run`'s stack as real processes (full-size Wav2Lip stand-in, the real SCRFD-2.5G when ../shared/models
has it), makes a 720p avatar, measures the stand-in alone through the lip-sync service, then runs 1, 2 and 4
concurrent sessions at 1280x720 and 512x512 (JPEG), each streaming real speech at real-time pace in 100 ms
chunks, and writes the table into bench/RESULTS.md. `--quick`: one short session on generated models.

    python -m bench.live [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import av
import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from bench.results import publish  # noqa: E402
from bench.throughput import SHARED, Stack, clip, prepare_models  # noqa: E402
from service_runtime import registry  # noqa: E402
from superwav2lip.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc  # noqa: E402
from superwav2lip.live.v1 import live_pb2  # noqa: E402
from superwav2lip_client import Client  # noqa: E402
from tests.support.live import LiveCall, Received  # noqa: E402  (the live test client: paced chunks, timed frames)

RATE = 16000
CHUNK_S = 0.1
WINDOW_S = 0.2  # Wav2Lip's window: the speech a frame needs beyond its own time (the figure)
LIVE_BATCH = 4  # gateway/live/session.py MAX_BATCH_FRAMES: the most frames one session sends per model call
Event = live_pb2.LiveEvent

# The acceptance goals for one session at 512x512 from the 720p avatar.
GOAL_SHARE, GOAL_P95_MS, GOAL_FIRST_MS, GOAL_DROPPED = 0.85, 150.0, 400.0, 0.01


@dataclasses.dataclass
class Plan:
    sizes: tuple[tuple[int, int], ...] = ((1280, 720), (512, 512))
    sessions: tuple[int, ...] = (1, 2, 4)
    speech_s: float = 9.0
    clip_s: float = 5.0
    alone_batches: tuple[int, ...] = (1, LIVE_BATCH, 16)
    alone_s: float = 4.0
    full_size: tuple[str, ...] = ("wav2lip_gan",)
    unlimited: tuple[tuple[int, int], ...] = ((1280, 720), (512, 512))  # one session each with admission off


QUICK = Plan(sizes=((512, 512),), sessions=(1,), speech_s=2.0, clip_s=1.0, alone_batches=(LIVE_BATCH,), alone_s=0.5,
             full_size=(), unlimited=())
# Admission as shipped, except that a session is served at whatever rate it computes instead of refused below
# live_min_fps (10), so every row has figures; and with admission off, every session is asked the avatar's rate.
ADMITTED = {"SWL_GATEWAY_LIVE_MIN_FPS": "1"}
UNLIMITED = {"SWL_GATEWAY_LIVE_MIN_FPS": "1", "SWL_GATEWAY_LIVE_CAPACITY": "1024"}


@dataclasses.dataclass
class SessionResult:
    """What one session was granted and what it delivered, from the client's side."""

    size: tuple[int, int]
    sessions: int  # running at once
    admission: str  # "on" or "off" (SWL_GATEWAY_LIVE_CAPACITY at its largest)
    asked_fps: float
    fps: float = 0.0  # granted (ready.fps)
    reduced_because: str = ""
    refused: str = ""  # the status of a refused open
    ended: str = ""  # the status of a session that ended with an error midway
    expected: int = 0  # frames between speaking started and playback finished
    shown: int = 0  # of those, frames with a picture
    drops: Counter = dataclasses.field(default_factory=Counter)  # reason -> frames, over the whole session
    latencies_ms: list[float] = dataclasses.field(default_factory=list)  # per chunk, less the window
    unshown_chunks: int = 0  # chunks no frame with a picture ever used
    first_frame_ms: float = float("nan")

    @property
    def sustained_fps(self) -> float:
        return self.shown / (self.expected / self.fps) if self.expected else 0.0

    @property
    def dropped(self) -> float:
        return 1 - self.shown / self.expected if self.expected else 1.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def speech_pcm(seconds: float) -> np.ndarray:
    """`seconds` of the shared real speech (9 s file, else the 60 s one) at 16 kHz mono PCM16, or a voiced
    tone sweep without them."""
    for name in ("speech_en_9s.wav", "speech_en_60s_16k.wav"):
        source = SHARED / "media" / name
        if source.is_file():
            with av.open(str(source)) as container:
                resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
                parts = [f.to_ndarray().reshape(-1) for frame in container.decode(audio=0)
                         for f in resampler.resample(frame)]
            pcm = np.concatenate(parts).astype(np.int16)
            if len(pcm) >= seconds * RATE * 0.95:
                return pcm[: int(seconds * RATE)]
    t = np.arange(int(seconds * RATE)) / RATE
    return (np.sin(2 * np.pi * (150 + 100 * t / seconds) * t) * 8000 * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
            ).astype(np.int16)


def wav2lip_alone(address: str, batch: int, seconds: float) -> float:
    """Frames per second of the lip-sync service alone: calls of `batch` items one after another, no gateway."""
    rng = np.random.default_rng(0)
    items = [lipsync_pb2.LipSyncItem(face=rng.integers(0, 256, (96, 96, 3), np.uint8).tobytes(),
                                     mel=rng.standard_normal((80, 16)).astype("<f4").tobytes()) for _ in range(batch)]
    request = lipsync_pb2.GenerateRequest(items=items)
    with grpc.insecure_channel(address) as channel:
        generate = lipsync_pb2_grpc.LipSyncStub(channel).Generate
        generate(request, timeout=600)  # warm
        frames, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            frames += len(generate(request, timeout=600).results)
        return frames / (time.perf_counter() - started)


def analyse(result: SessionResult, received: Received, sent_at: list[float]) -> SessionResult:
    """Fills `result` from one session's frames and events (arrival times in the client's monotonic clock)."""
    for _, event in received.events:
        if event.kind == Event.KIND_FRAMES_DROPPED:
            result.drops[event.reason or "?"] += event.count
    started = [e.frame_index for e in received.kinds(Event.KIND_SPEAKING_STARTED)]
    finished = [e.frame_index for e in received.kinds(Event.KIND_PLAYBACK_FINISHED)]
    if started and finished:
        first, last = started[0], finished[-1]
        result.expected = last - first + 1
        result.shown = len({f.index for _, f in received.frames if f.data and first <= f.index <= last})
    shown = [(t, f.speech_chunk) for t, f in received.frames if f.data and f.speaking]
    if shown and sent_at:
        result.first_frame_ms = (shown[0][0] - sent_at[0]) * 1000
    k = 0
    for chunk, sent in enumerate(sent_at, start=1):  # frames arrive in order, and their chunks never go back
        while k < len(shown) and shown[k][1] < chunk:
            k += 1
        if k == len(shown):
            result.unshown_chunks += 1
        else:
            result.latencies_ms.append((shown[k][0] - sent - WINDOW_S) * 1000)
    return result


async def one_session(address: str, avatar_id: str, size: tuple[int, int], sessions: int, pcm: np.ndarray,
                      avatar_fps: float, admission: str) -> SessionResult:
    result = SessionResult(size, sessions, admission, avatar_fps)
    async with grpc.aio.insecure_channel(address) as channel:
        live = LiveCall(channel)
        try:
            ready = await live.open(avatar_id=avatar_id, width=size[0], height=size[1],
                                    format=live_pb2.FRAME_FORMAT_JPEG, sample_rate=RATE, return_audio=True)
        except grpc.aio.AioRpcError as error:
            result.refused = f"{error.code().name}: {error.details()}"
            return result
        result.fps, result.reduced_because = ready.fps, ready.reduced_because
        try:
            await asyncio.sleep(0.5)  # idle frames first, as a conversation would have
            await live.speak(pcm, RATE, CHUNK_S)
            await live.control(live_pb2.CONTROL_END_OF_UTTERANCE)
            await live.wait_for(Event.KIND_PLAYBACK_FINISHED, timeout=60)
            await live.control(live_pb2.CONTROL_CLOSE)
            await live.finish(timeout=60)
        except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError) as error:
            # The session ended midway (its reader holds the status): what arrived until then is still measured.
            status = live._reader.exception() if live._reader and live._reader.done() else None
            result.ended = (f"{status.code().name}: {status.details()}" if isinstance(status, grpc.aio.AioRpcError)
                            else f"{type(error).__name__}: {error}")
    return analyse(result, live.received, live.sent_at)


def cpu_seconds(stack: Stack) -> dict[str, float]:
    """User + system CPU seconds so far of the gateway and lip-sync processes and of this (the client's) one."""
    tick = os.sysconf("SC_CLK_TCK")

    def of(pid: int | str) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    modules = {registry.get(name).module: name for name in ("gateway", "lipsync")}
    found = {"client": of("self")}
    for pid in Path(f"/proc/{stack.process.pid}/task/{stack.process.pid}/children").read_text().split():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
        if module in modules:
            found[modules[module]] = of(pid)
    return found


@dataclasses.dataclass
class LiveBench:
    alone: dict[int, float]  # batch -> Wav2Lip frames per second through the lip-sync service
    rows: list[SessionResult]
    cpu: dict[tuple[str, tuple[int, int], int], dict[str, float]]  # (admission, size, sessions) -> process -> cores
    avatar_fps: float
    avatar_size: tuple[int, int]
    create_s: float

    @property
    def reference(self) -> float:
        """Wav2Lip alone: the best of the batch sizes measured."""
        return max(self.alone.values())


def measure(models: Path, plan: Plan, work: Path) -> LiveBench:
    pcm = speech_pcm(plan.speech_s)
    face = clip(plan.clip_s)
    rows: list[SessionResult] = []
    cpu: dict = {}
    passes = [("on", ADMITTED, [(size, n) for size in plan.sizes for n in plan.sessions])]
    if plan.unlimited:
        passes.append(("off", UNLIMITED, [(size, 1) for size in plan.unlimited]))
    for admission, env, runs in passes:
        stack = Stack(models, work / f"logs-{admission}", env)
        try:
            if admission == "on":
                alone = {batch: wav2lip_alone(stack.config.address("lipsync"), batch, plan.alone_s)
                         for batch in plan.alone_batches}
            with Client(stack.address, timeout=600) as client:
                started = time.perf_counter()
                avatar = client.create_avatar(face)
                create_s = time.perf_counter() - started
            fps = avatar.fps or 25.0
            for size, n in runs:
                before, wall = cpu_seconds(stack), time.perf_counter()
                rows += asyncio.run(_together(stack.address, avatar.avatar_id, size, n, pcm, fps, admission))
                after, wall = cpu_seconds(stack), time.perf_counter() - wall
                cpu[(admission, size, n)] = {name: (after[name] - before.get(name, 0.0)) / wall for name in after}
        finally:
            stack.stop()
    return LiveBench(alone, rows, cpu, fps, (avatar.width, avatar.height), create_s)


async def _together(address, avatar_id, size, n, pcm, fps, admission) -> list[SessionResult]:
    return list(await asyncio.gather(*(one_session(address, avatar_id, size, n, pcm, fps, admission)
                                       for _ in range(n))))


def _ms(value: float) -> str:
    return "-" if value != value else f"{value:.0f}"


def table(bench: LiveBench) -> str:
    ref = bench.reference
    lines = ["| admission | output | sessions | session | granted fps | sustained fps | x Wav2Lip alone | "
             "dropped (speech) | latency p50 ms | latency p95 ms | first frame ms | "
             "CPU cores: gateway / lipsync / client |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    notes = []
    for key, group in _groups(bench.rows):
        admission, size, n = key
        cpu = bench.cpu.get(key, {})
        use = " / ".join(f"{cpu.get(name, float('nan')):.2f}" for name in ("gateway", "lipsync", "client"))
        label = f"{size[0]}x{size[1]}"
        for i, row in enumerate(group, start=1):
            head, who = f"| {admission} | {label} | {n} | {i} |", f"admission {admission}, {label}, {n} sessions, #{i}"
            if row.refused:
                lines.append(f"{head} refused | - | - | - | - | - | - | {use} |")
                notes.append(f"{who}: refused, {row.refused}")
                continue
            lines.append(f"{head} {row.fps:g} | {row.sustained_fps:.1f} | {row.sustained_fps / ref:.2f} | "
                         f"{row.dropped:.1%} | {_ms(row.percentile(50))} | {_ms(row.percentile(95))} | "
                         f"{_ms(row.first_frame_ms)} | {use} |")
            if row.ended:
                notes.append(f"{who}: ended midway, {row.ended}")
            if row.reduced_because:
                notes.append(f"{who}: {row.fps:g} fps granted, because {row.reduced_because}")
            if row.drops:
                reasons = ", ".join(f"{count} {why}" for why, count in sorted(row.drops.items()))
                notes.append(f"{who}: frames dropped over the whole session: {reasons}")
            if row.unshown_chunks:
                notes.append(f"{who}: {row.unshown_chunks} chunks never reached a shown frame (not in the latency)")
    alone = ", ".join(f"batch {b}: {fps:.1f}" for b, fps in sorted(bench.alone.items()))
    text = [f"Wav2Lip alone through the lip-sync service (frames/s): {alone}; the reference is the best, "
            f"{ref:.1f} fps.", "", *lines]
    if notes:
        text += ["", *[f"- {note}" for note in notes]]
    return "\n".join(text)


def _groups(rows: list[SessionResult]):
    keys: dict[tuple[str, tuple[int, int], int], list[SessionResult]] = {}
    for row in rows:
        keys.setdefault((row.admission, row.size, row.sessions), []).append(row)
    return keys.items()


def goals(bench: LiveBench) -> str:
    """The issue's acceptance goals against each one-session 512x512 row (admission on, then off)."""
    ref, fps = bench.reference, bench.avatar_fps
    text = []
    for row in (r for r in bench.rows if r.size == (512, 512) and r.sessions == 1):
        if row.refused:
            text.append(f"Goals, admission {row.admission}: the session was refused.")
            continue
        if ref > 30:
            want = f"{fps:g} fps with under {GOAL_DROPPED:.0%} dropped (Wav2Lip alone {ref:.1f} > 30 fps)"
            met = row.sustained_fps >= fps * (1 - GOAL_DROPPED) and row.dropped < GOAL_DROPPED
        else:
            target = GOAL_SHARE * min(ref, fps)
            want = f">= {target:.1f} fps ({GOAL_SHARE:.0%} of min(Wav2Lip alone {ref:.1f}, avatar {fps:g}))"
            met = row.sustained_fps >= target
        p95, first = row.percentile(95), row.first_frame_ms
        checks = [(f"sustained fps {row.sustained_fps:.1f}, goal {want}", met),
                  (f"p95 latency beyond the window {_ms(p95)} ms, goal < {GOAL_P95_MS:.0f} ms", p95 < GOAL_P95_MS),
                  (f"first frame {_ms(first)} ms after the first chunk, goal < {GOAL_FIRST_MS:.0f} ms",
                   first < GOAL_FIRST_MS)]
        text += [f"Goals (one session, 512x512 from the 720p avatar, admission {row.admission}):", "",
                 *[f"- {'met' if ok else 'MISSED'}: {what}" for what, ok in checks], ""]
    return "\n".join(text).strip() or "Goals: no one-session 512x512 session ran."


def main(argv: list[str] | None = None) -> LiveBench:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one 2 s session at 512x512 on generated models (the test's check); writes its own "
                             "section, live-quick")
    parser.add_argument("--note", default="", help="a line added under the table (for example, the machine was busy)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    work = Path(tempfile.mkdtemp(prefix="swl-bench-live-"))
    load_before = os.getloadavg()[0]
    try:
        detector = prepare_models(work, full_size=plan.full_size)
        bench = measure(work, plan, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    model = "Wav2Lip full size (random weights)" if plan.full_size else "generated Wav2Lip (dev, tiny)"
    width, height = bench.avatar_size
    text = "\n".join([
        f"{model}; detector: {detector}; avatar {width}x{height} at {bench.avatar_fps:g} fps from a "
        f"{plan.clip_s:g} s clip (created in {bench.create_s:.2f} s); speech {plan.speech_s:g} s at real-time pace in "
        f"{CHUNK_S * 1000:.0f} ms chunks, JPEG frames, audio returned. Admission on: live settings at their "
        "defaults but SWL_GATEWAY_LIVE_MIN_FPS=1 (a session gets the rate admission computes instead of a refusal "
        "below 10 fps); admission off: also SWL_GATEWAY_LIVE_CAPACITY=1024 (every session is asked the avatar's "
        "rate and drops what it cannot make), a stack of its own. "
        "Sustained fps and dropped: frames from speaking started to playback finished; latency: a chunk's send to "
        f"the first frame received whose speech_chunk reaches it, less {WINDOW_S * 1000:.0f} ms; first frame: first "
        "chunk sent to the first speaking frame received; CPU: cores used by each process over the run of that row "
        f"(shared with the client). Load average (1 min) {load_before:.1f} before and {os.getloadavg()[0]:.1f} "
        f"after the run on {os.cpu_count()} cores: above the core count, other work competed.", "", table(bench), "",
        goals(bench),
        *(["", args.note] if args.note else [])])
    key, title = (("live-quick", "Live sessions, quick check on generated models (`python -m bench.live --quick`)")
                  if args.quick else ("live", "Live sessions (`make bench-live`)"))
    publish(key, title, text, write=not args.no_write)
    return bench


if __name__ == "__main__":
    main()
