"""`superwav2lip`: generate lip-synced video, manage avatars and jobs, check health and models (built on the SDK).

Exit codes: 0 success; 2 usage error (bad arguments, a file that cannot be read); 3 the server refused the input
(INVALID_ARGUMENT, FAILED_PRECONDITION, NOT_FOUND, OUT_OF_RANGE, UNAUTHENTICATED, PERMISSION_DENIED; or a job
that failed so); 4 unavailable or out of time (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, or a health
check that is not SERVING); 1 anything else the server reported.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict
from superwav2lip.gateway.v1 import gateway_pb2

from . import services
from .core import NO_RETRY, RetryPolicy
from .sync import Client
from .sync import LiveSession
from .types import LiveEvent, LiveEventKind, LiveFrame, LiveReady, Options, Progress, SuperWav2LipError

EXIT_OK, EXIT_SERVER, EXIT_USAGE, EXIT_INPUT, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4
INPUT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
               grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                     grpc.StatusCode.RESOURCE_EXHAUSTED}


def exit_code_for(code: grpc.StatusCode | str) -> int:
    name = code if isinstance(code, str) else code.name
    if name in {c.name for c in INPUT_CODES}:
        return EXIT_INPUT
    return EXIT_UNAVAILABLE if name in {c.name for c in UNAVAILABLE_CODES} else EXIT_SERVER


@contextlib.contextmanager
def progress_bar(enabled: bool) -> Iterator[Callable[[Progress], None]]:
    """A rich progress bar on stderr, one task per stage; a no-op with --json or --quiet."""
    if not enabled:
        yield lambda progress: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    console = Console(stderr=True)
    tasks: dict[str, TaskID] = {}
    with RichProgress(TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=False) as bar:
        def update(progress: Progress) -> None:
            if progress.message:
                console.print(f"[yellow]{progress.message}")
            if progress.stage not in tasks:
                tasks[progress.stage] = bar.add_task(progress.stage, total=progress.total or None)
            bar.update(tasks[progress.stage], completed=progress.done, total=progress.total or None)

        yield update


def options_from(args: argparse.Namespace) -> Options:
    options: dict = {"crop_mode": args.crop_mode, "enhance": args.enhance, "enhance_region": args.enhance_region,
                     "no_face_policy": "keep_frame" if args.no_face == "keep" else "fail",
                     "loop_mode": args.loop.replace("-", "_"), "target_rule": args.target}
    for name, value in (("reference_face", args.reference_face), ("padding", args.pads),
                        ("mouth_padding", args.mouth_pads), ("smoothing_window", args.smooth),
                        ("max_detection_size", args.max_detection_size), ("still_fps", args.fps), ("crf", args.crf),
                        ("preset", args.preset), ("similarity_threshold", args.similarity),
                        ("detect_every", args.detect_every)):
        if value is not None:
            options[name] = tuple(value) if isinstance(value, list) else value
    return options  # type: ignore[return-value]


def client_for(args: argparse.Namespace) -> Client:
    retry = RetryPolicy(max_attempts=args.retries + 1) if args.retries else NO_RETRY
    return Client(args.server, api_key=args.api_key, timeout=args.timeout or 900, retry=retry)


def emit(args: argparse.Namespace, data: dict, text: str) -> None:
    """One JSON object on stdout with --json, else the human line."""
    print(json.dumps(data) if args.json else text)


def as_dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def reporting_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Errors become one line on stderr (a JSON object with --json) and the documented exit code."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except SuperWav2LipError as error:
            code, message = error.code.name, error.message
            exit_code, request_id = exit_code_for(error.code), error.request_id
        except (ValueError, TypeError, OSError) as error:  # the caller's own input, before any call
            code, message, exit_code, request_id = "USAGE", str(error), EXIT_USAGE, ""
        if args.json:
            print(json.dumps({"error": {"code": code, "message": message, "request_id": request_id}}))
        else:
            sys.stderr.write(f"error: {code}: {message}" + (f" (request id {request_id})" if request_id else "") + "\n")
        return exit_code

    return run


@reporting_errors
def generate(args: argparse.Namespace) -> int:
    warnings: list[str] = []  # the server's (demo weights, a CPU-only enhancer); the bar prints them as they come

    def on_progress(progress: Progress) -> None:
        if progress.message:
            warnings.append(progress.message)
        show(progress)

    with client_for(args) as client, progress_bar(not (args.json or args.quiet)) as show:
        result = client.generate(args.face, args.audio, avatar=args.avatar, output=args.output,
                                 on_progress=on_progress, **options_from(args))
    info = result.info
    emit(args, {"output": args.output, "request_id": result.request_id, **vars(info), "warnings": warnings},
         f"wrote {args.output}: {info.width}x{info.height}, {info.fps:g} fps, {info.frames} frames, "
         f"{info.audio_seconds:.2f} s, {info.size_bytes} bytes")
    return EXIT_OK


@reporting_errors
def avatar_command(args: argparse.Namespace) -> int:
    """create | list | delete."""
    with client_for(args) as client:
        if args.verb == "create":
            avatar = client.create_avatar(args.face, name=args.name or Path(args.face).name, **options_from(args))
            if not args.json:
                sys.stderr.write(f"avatar {avatar.name}: {avatar.width}x{avatar.height}, {avatar.fps:g} fps, "
                                 f"{avatar.frames} frames\n")
            emit(args, as_dict(avatar), avatar.avatar_id)
        elif args.verb == "list":
            avatars = client.list_avatars()
            lines = [f"{a.avatar_id}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(a.created_unix))}  "
                     f"{a.width}x{a.height}  {a.fps:g} fps  {a.frames:>6} frames  {a.name}" for a in avatars]
            emit(args, {"avatars": [as_dict(a) for a in avatars]}, "\n".join(lines) or "(no avatars)")
        else:
            client.delete_avatar(args.avatar_id)
            emit(args, {"deleted": args.avatar_id}, f"deleted {args.avatar_id}")
    return EXIT_OK


def state_name(job: gateway_pb2.Job) -> str:
    return gateway_pb2.Job.State.Name(job.state)


def job_line(job: gateway_pb2.Job) -> str:
    line = f"{job.job_id}  {state_name(job):<9}"
    if state_name(job) == "QUEUED":
        line += f"  position {job.queue_position}"
    elif state_name(job) == "RUNNING":
        line += f"  {job.progress.stage} {job.progress.done}/{job.progress.total}"
    elif state_name(job) == "FAILED":
        line += f"  {job.error_status}: {job.error_message}"
    return line


@reporting_errors
def jobs_command(args: argparse.Namespace) -> int:
    """submit | status | wait | download | cancel | list."""
    with client_for(args) as client:
        if args.verb == "submit":
            job = client.submit_job(args.face, args.audio, avatar=args.avatar, webhook_url=args.webhook or "",
                                    **options_from(args))
            emit(args, as_dict(job), job.job_id)
        elif args.verb == "wait":
            job = None
            with progress_bar(not (args.json or args.quiet)) as show:
                for job in client.watch_job(args.job_id):
                    if state_name(job) == "RUNNING" and job.progress.total:
                        show(Progress(job.progress.stage, job.progress.done, job.progress.total))
            job = job or client.get_job(args.job_id)
            emit(args, as_dict(job), job_line(job))
            return EXIT_OK if state_name(job) == "SUCCEEDED" else exit_code_for(job.error_status or "UNKNOWN")
        elif args.verb == "download":
            client.job_video(args.job_id, output=args.output)
            emit(args, {"output": args.output}, f"wrote {args.output}")
        elif args.verb in ("status", "cancel"):
            job = client.get_job(args.job_id) if args.verb == "status" else client.cancel_job(args.job_id)
            emit(args, as_dict(job), job_line(job))
        else:
            jobs = client.list_jobs()
            emit(args, {"jobs": [as_dict(j) for j in jobs]}, "\n".join(map(job_line, jobs)) or "(no jobs)")
    return EXIT_OK


LIVE_RATE = 16000  # the speech rate the CLI sends: the model's own, so the gateway resamples nothing
WINDOW_S = 0.2  # Wav2Lip's speech window, the part of the latency no server can remove


@reporting_errors
def live_command(args: argparse.Namespace) -> int:
    """Streams a speech file into a live session at real-time pace and records what comes back."""
    from .live_media import Recording, speech_pcm16

    if not 10 <= args.chunk_ms <= 200:
        raise ValueError(f"--chunk-ms {args.chunk_ms:g}: 10 to 200 ms")
    pcm = speech_pcm16(args.audio, LIVE_RATE)
    if not pcm:
        raise ValueError(f"the speech file {args.audio!r} holds no audio")
    frames: list[LiveFrame] = []
    events: list[LiveEvent] = []
    with client_for(args) as client:
        opened_at = time.monotonic()
        with client.live(args.avatar, width=args.width, height=args.height, format="h264", fps=args.fps,
                         sample_rate=LIVE_RATE, return_audio=True, quality=args.crf, timeout=args.timeout) as live:
            ready, ready_at = live.ready, time.monotonic()
            recording = Recording(ready.fps, ready.width, ready.height, LIVE_RATE)
            sender = threading.Thread(target=stream_speech, args=(live, pcm, args.chunk_ms / 1000, args.lead),
                                      name="live-sender", daemon=True)
            sender.start()
            for item in live:
                if isinstance(item, LiveFrame):
                    recording.add(item)
                    frames.append(item)
                else:
                    events.append(item)
            sender.join()
    if not recording.pictures:
        raise SuperWav2LipError(grpc.StatusCode.UNAVAILABLE, "the session ended without a frame", live.request_id)
    recording.write(args.out)
    figures = live_figures(ready, frames, events, live.sent_at, opened_at, ready_at)
    emit(args, {"output": args.out, "session_id": ready.session_id, "request_id": live.request_id,
                "fps": ready.fps, "width": ready.width, "height": ready.height,
                "reduced_because": ready.reduced_because, "audio_seconds": recording.audio_seconds, **figures},
         live_report(args.out, ready, figures, recording.audio_seconds))
    return EXIT_OK


def stream_speech(live: LiveSession, pcm: bytes, chunk_s: float, lead_s: float) -> None:
    """The sender thread: `lead_s` of idle first, then each chunk when its last sample would have been spoken;
    then close (the gateway plays what it has, then ends the session)."""
    step = 2 * int(LIVE_RATE * chunk_s)
    try:
        time.sleep(lead_s)
        started = time.monotonic()
        for i, start in enumerate(range(0, len(pcm), step)):
            time.sleep(max(0.0, started + (i + 1) * chunk_s - time.monotonic()))
            live.send(pcm[start : start + step])
        live.close()
    except (SuperWav2LipError, ValueError):
        pass  # the session ended; the reading side reports how


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else None


def live_figures(ready: LiveReady, frames: list[LiveFrame], events: list[LiveEvent], sent_at: list[float],
                 opened_at: float, ready_at: float) -> dict:
    """Frames and latency: the open, the first frame, the first speech frame after the first chunk, and for each
    chunk the time from its sending to the first frame whose mouth used it, less Wav2Lip's 200 ms window."""
    pictures = [f for f in frames if f.data]
    dropped = sum(e.count or 1 for e in events if e.kind == LiveEventKind.FRAMES_DROPPED)
    total = (max(f.index for f in frames) + 1) if frames else 0
    first_speech = next((f for f in pictures if f.speaking), None)
    delays, missed = [], 0
    for chunk, sent in enumerate(sent_at, 1):
        shown = next((f.received_at for f in pictures if f.speech_chunk >= chunk), None)
        if shown is None:
            missed += 1
        else:
            delays.append(shown - sent - WINDOW_S)
    return {"frames": len(pictures), "frames_dropped": dropped, "dropped_share": dropped / total if total else 0.0,
            "speaking_frames": sum(f.speaking for f in pictures), "lookahead_s": ready.lookahead_s,
            "open_s": ready_at - opened_at,
            "first_frame_s": pictures[0].received_at - ready_at if pictures else None,
            "first_speech_frame_s": first_speech.received_at - sent_at[0] if first_speech and sent_at else None,
            "chunks": len(sent_at), "chunks_never_shown": missed,
            "chunk_latency_p50_s": percentile(delays, 50), "chunk_latency_p95_s": percentile(delays, 95)}


def live_report(output: str, ready: LiveReady, figures: dict, audio_seconds: float) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f} ms"

    reduced = f" (reduced: {ready.reduced_because})" if ready.reduced_because else ""
    return "\n".join([
        f"wrote {output}: {ready.width}x{ready.height}, {ready.fps:g} fps{reduced}, {figures['frames']} frames "
        f"({figures['speaking_frames']} speaking), {audio_seconds:.2f} s of audio",
        f"frames dropped: {figures['frames_dropped']} ({figures['dropped_share']:.1%})",
        f"ready {ms(figures['open_s'])} after opening; first frame {ms(figures['first_frame_s'])} after ready; "
        f"first speech frame {ms(figures['first_speech_frame_s'])} after the first chunk "
        f"(lookahead {ms(ready.lookahead_s)})",
        f"chunk to its first frame, less the 200 ms window: p50 {ms(figures['chunk_latency_p50_s'])}, "
        f"p95 {ms(figures['chunk_latency_p95_s'])} ({figures['chunks']} chunks, "
        f"{figures['chunks_never_shown']} never shown)"])


def addresses_of(args: argparse.Namespace) -> dict[str, str]:
    return {"gateway": args.server, **{name: getattr(args, name) for name in ("detector", "lipsync", "enhancer")}}


def health_command(args: argparse.Namespace) -> int:
    addresses = addresses_of(args)
    statuses = {name: services.health(address) for name, address in addresses.items()}
    emit(args, {name: {"address": addresses[name], "status": s} for name, s in statuses.items()},
         "\n".join(f"{name:<9} {addresses[name]:<22} {status}" for name, status in statuses.items()))
    return EXIT_OK if all(s == "SERVING" for s in statuses.values()) else EXIT_UNAVAILABLE


def models_command(args: argparse.Namespace) -> int:
    addresses = addresses_of(args)
    described = {role: services.describe(role, addresses[role]) for role in services.DESCRIBE}
    lines = []
    for role, info in described.items():
        if "error" in info:
            lines.append(f"{role:<9} {addresses[role]:<22} {info['error']}")
            continue
        names = [info[k] for k in ("detection_model", "recognition_model", "model") if info.get(k)]
        generated = info.get("generated_weights")
        lines.append(f"{role:<9} {', '.join(names):<28} {','.join(info.get('providers', []))}"
                     + ("  (generated weights)" if generated else ""))
    emit(args, described, "\n".join(lines))
    return EXIT_UNAVAILABLE if any("error" in info for info in described.values()) else EXIT_OK


def add_common_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--server", default=services.DEFAULT_ADDRESSES["gateway"], help="gateway (or Envoy) host:port")
    command.add_argument("--api-key", help="API key (default: $SUPERWAV2LIP_API_KEY)")
    command.add_argument("--timeout", type=float, help="give up after this many seconds (default 900)")
    command.add_argument("--retries", type=int, default=2, help="retries when the server is busy or restarting (2)")
    command.add_argument("--json", action="store_true", help="print one JSON object on stdout (for scripts)")
    command.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_service_addresses(command: argparse.ArgumentParser) -> None:
    command.add_argument("--server", default=services.DEFAULT_ADDRESSES["gateway"], help="gateway host:port")
    for name in ("detector", "lipsync", "enhancer"):
        command.add_argument(f"--{name}", default=services.DEFAULT_ADDRESSES[name], help=f"{name} host:port")
    command.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def add_planning_arguments(command: argparse.ArgumentParser) -> None:
    """Options that decide who is animated where (fixed in an avatar when it is made)."""
    command.add_argument("--pads", type=int, nargs=4, metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"),
                         help="face box padding in pixels (default 0 10 0 0)")
    command.add_argument("--smooth", type=int, help="box smoothing window in frames (default 5, 0 = off)")
    command.add_argument("--max-detection-size", type=int, help="longest side of frames sent to the detector (480)")
    command.add_argument("--fps", type=float, help="frame rate for a still image (default 25)")
    command.add_argument("--no-face", choices=("fail", "keep"), default="fail",
                         help="frames without a face: fail the job (default) or keep them untouched")
    command.add_argument("--reference-face", help="photo of the person to animate (default: pick by --target)")
    command.add_argument("--target", choices=("largest", "center"), default="largest",
                         help="who to animate without a reference photo")
    command.add_argument("--similarity", type=float, help="cosine threshold for the reference person (default 0.4)")
    command.add_argument("--detect-every", type=int, help="detect faces every k-th frame, interpolate between (5; 1 = every frame)")
    command.set_defaults(enhance=False, loop="ping-pong", crop_mode="aligned", enhance_region="face", crf=None,
                         preset=None, mouth_pads=None)


def add_synthesis_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--enhance", action="store_true", help="restore faces with GFPGAN (slow on CPU)")
    command.add_argument("--crf", type=int, help="x264 quality, lower is better (default 20)")
    command.add_argument("--preset", help="x264 preset (default veryfast)")
    command.add_argument("--loop", choices=("ping-pong", "loop"), default="ping-pong",
                         help="how a video shorter than the speech is reused")
    command.add_argument("--crop-mode", choices=("aligned", "box"), default="aligned",
                         help="aligned: 5-point alignment and feathered paste (default); box: Wav2Lip's reference")
    command.add_argument("--mouth-pads", type=int, nargs=4, metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"),
                         help="move the aligned mouth window's edges, in pixels of the 256 crop")
    command.add_argument("--enhance-region", choices=("face", "mouth"), default="face",
                         help="what --enhance restores")


def add_media_source(command: argparse.ArgumentParser) -> None:
    source = command.add_mutually_exclusive_group(required=True)
    source.add_argument("--face", help="face image or video")
    source.add_argument("--avatar", help="an avatar id (from `avatar create`) instead of --face")
    command.add_argument("--audio", required=True, help="speech (any format FFmpeg reads)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="superwav2lip", description=__doc__.split("\n\n")[0],
                                   epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    commands = root.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="make a lip-synced mp4 from a face image/video (or an avatar) and speech")
    add_media_source(gen)
    gen.add_argument("-o", "--output", required=True, help="mp4 to write")
    for add in (add_common_arguments, add_planning_arguments, add_synthesis_arguments):
        add(gen)
    gen.set_defaults(run=generate)

    avatar = commands.add_parser("avatar", help="avatars: face media planned once, then used with any speech")
    verbs = avatar.add_subparsers(dest="verb", required=True)
    create = verbs.add_parser("create", help="plan a face image or video once; prints the avatar id")
    create.add_argument("--face", required=True, help="face image or video")
    create.add_argument("--name", help="a label (default: the file name)")
    add_common_arguments(create)
    add_planning_arguments(create)
    add_common_arguments(verbs.add_parser("list", help="the avatars, newest first"))
    delete = verbs.add_parser("delete", help="delete an avatar and its media")
    delete.add_argument("avatar_id")
    add_common_arguments(delete)
    avatar.set_defaults(run=avatar_command)

    jobs = commands.add_parser("jobs", help="asynchronous jobs: submit, then status / wait, then download")
    job_verbs = jobs.add_subparsers(dest="verb", required=True)
    submit = job_verbs.add_parser("submit", help="queue a job; prints its id")
    add_media_source(submit)
    submit.add_argument("--webhook", help="URL called (signed) when the job ends; its host must be allow-listed")
    for add in (add_common_arguments, add_planning_arguments, add_synthesis_arguments):
        add(submit)
    for verb, text in (("status", "print a job's state"), ("wait", "follow a job with a progress bar until it ends"),
                       ("download", "write a finished job's mp4"), ("cancel", "cancel a job, or remove a finished one")):
        command = job_verbs.add_parser(verb, help=text)
        command.add_argument("job_id")
        if verb == "download":
            command.add_argument("-o", "--output", required=True, help="mp4 to write")
        add_common_arguments(command)
    add_common_arguments(job_verbs.add_parser("list", help="recent jobs, newest first"))
    jobs.set_defaults(run=jobs_command)

    live = commands.add_parser("live", help="stream speech into a live session at real-time pace, record the "
                                            "avatar's frames and audio into an mp4, print the latency")
    live.add_argument("--avatar", required=True, help="an avatar id (from `avatar create`)")
    live.add_argument("--audio", required=True, help="speech (any format FFmpeg reads; sent as 16 kHz mono)")
    live.add_argument("--out", "-o", required=True, help="mp4 to write (H.264 as received, the returned audio as AAC)")
    live.add_argument("--width", type=int, default=0, help="frame width (default: the avatar's)")
    live.add_argument("--height", type=int, default=0, help="frame height (default: the avatar's)")
    live.add_argument("--fps", type=float, default=0.0, help="frame rate (default: the avatar's)")
    live.add_argument("--crf", type=int, default=0, help="H.264 quality, lower is better (default: the server's, 23)")
    live.add_argument("--chunk-ms", type=float, default=100.0, help="speech per chunk, 10-200 ms (100)")
    live.add_argument("--lead", type=float, default=0.0, help="seconds of idle frames before the speech (0)")
    add_common_arguments(live)
    live.set_defaults(run=live_command)

    check = commands.add_parser("health", help="each service's health; exit 0 only if all are SERVING, else 4")
    add_service_addresses(check)
    check.set_defaults(run=health_command)
    models = commands.add_parser("models", help="the models each service has loaded, and their providers")
    add_service_addresses(models)
    models.set_defaults(run=models_command)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)  # usage errors exit 2 here
    sys.exit(args.run(args))


if __name__ == "__main__":
    main()
