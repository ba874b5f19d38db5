"""`superwav2lip`: generate a lip-synced mp4 through the gateway, manage avatars, or check the stack's health."""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

from superwav2lip.gateway.v1 import gateway_pb2

from .sdk import GatewayClient, GenerationError, health

DEFAULT_ADDRESSES = {"gateway": "localhost:50051", "detector": "localhost:50052", "lipsync": "localhost:50053",
                     "enhancer": "localhost:50054"}
BAR_WIDTH = 30


class ProgressBar:
    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.stage = ""

    def __call__(self, progress: gateway_pb2.Progress) -> None:
        if progress.message:
            self.stream.write(f"\n{progress.message}\n")
        if progress.stage != self.stage and self.stage:
            self.stream.write("\n")
        self.stage = progress.stage
        filled = BAR_WIDTH * progress.done // max(1, progress.total)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        self.stream.write(f"\r{progress.stage:<8} [{bar}] {progress.done}/{progress.total}")
        self.stream.flush()


def build_options(args: argparse.Namespace) -> gateway_pb2.GenerateOptions:
    options = gateway_pb2.GenerateOptions(
        avatar_id=getattr(args, "avatar", None) or "",
        enhance=args.enhance,
        no_face_policy=gateway_pb2.NO_FACE_POLICY_KEEP_FRAME if args.no_face == "keep" else gateway_pb2.NO_FACE_POLICY_FAIL,
        loop_mode=gateway_pb2.LOOP_MODE_LOOP if args.loop == "loop" else gateway_pb2.LOOP_MODE_PING_PONG,
        target_rule=gateway_pb2.TARGET_RULE_CENTER if args.target == "center" else gateway_pb2.TARGET_RULE_LARGEST,
        crop_mode=gateway_pb2.CROP_MODE_BOX if args.crop_mode == "box" else gateway_pb2.CROP_MODE_ALIGNED,
        enhance_region=(gateway_pb2.ENHANCE_REGION_MOUTH if args.enhance_region == "mouth"
                        else gateway_pb2.ENHANCE_REGION_FACE),
    )
    if args.reference_face:
        options.reference_face = Path(args.reference_face).read_bytes()
    if args.mouth_pads is not None:
        top, bottom, left, right = args.mouth_pads
        options.mouth_padding.CopyFrom(gateway_pb2.Padding(top=top, bottom=bottom, left=left, right=right))
    if args.pads is not None:
        top, bottom, left, right = args.pads
        options.padding.CopyFrom(gateway_pb2.Padding(top=top, bottom=bottom, left=left, right=right))
    for field, value in (("smoothing_window", args.smooth), ("max_detection_size", args.max_detection_size),
                         ("still_fps", args.fps), ("crf", args.crf), ("preset", args.preset),
                         ("similarity_threshold", args.similarity), ("detect_every", args.detect_every)):
        if value is not None:
            setattr(options, field, value)
    return options


def reporting_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The gateway's refusals and missing files become one line on stderr and exit code 1."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except GenerationError as error:
            sys.stderr.write(f"\nerror: {error.code.name}: {error.message}\n")
        except FileNotFoundError as error:
            sys.stderr.write(f"error: {error.filename} does not exist\n")
        return 1

    return run


@reporting_errors
def generate(args: argparse.Namespace) -> int:
    with GatewayClient(args.server) as client:
        result = client.generate(args.face, args.audio, build_options(args), on_progress=ProgressBar(),
                                 timeout=args.timeout)
    Path(args.output).write_bytes(result.mp4)
    info = result.info
    sys.stderr.write(f"\nwrote {args.output}: {info.width}x{info.height}, {info.fps:g} fps, {info.frames} frames, "
                     f"{info.audio_seconds:.2f} s, {info.size_bytes} bytes\n")
    return 0


@reporting_errors
def create_avatar(args: argparse.Namespace) -> int:
    with GatewayClient(args.server) as client:
        avatar = client.create_avatar(args.face, build_options(args), name=args.name or Path(args.face).name,
                                      on_progress=ProgressBar(), timeout=args.timeout)
    sys.stderr.write(f"\navatar {avatar.name}: {avatar.width}x{avatar.height}, {avatar.fps:g} fps, "
                     f"{avatar.frames} frames\n")
    print(avatar.avatar_id)
    return 0


@reporting_errors
def list_avatars(args: argparse.Namespace) -> int:
    with GatewayClient(args.server) as client:
        avatars = client.list_avatars()
    for avatar in avatars:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(avatar.created_unix))
        print(f"{avatar.avatar_id}  {created}  {avatar.width}x{avatar.height}  {avatar.fps:g} fps  "
              f"{avatar.frames:>6} frames  {avatar.name}")
    return 0


@reporting_errors
def delete_avatar(args: argparse.Namespace) -> int:
    with GatewayClient(args.server) as client:
        client.delete_avatar(args.avatar_id)
    sys.stderr.write(f"deleted {args.avatar_id}\n")
    return 0


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
    with GatewayClient(args.server) as client:
        if args.verb == "submit":
            print(client.submit_job(args.face, args.audio, build_options(args), webhook_url=args.webhook or "").job_id)
        elif args.verb == "status":
            print(job_line(client.get_job(args.job_id)))
        elif args.verb == "wait":
            bar, job = ProgressBar(), None
            for job in client.watch_job(args.job_id, timeout=args.timeout):
                if state_name(job) == "RUNNING" and job.progress.total:
                    bar(job.progress)
            sys.stderr.write("\n")
            print(job_line(job))
            return 0 if state_name(job) == "SUCCEEDED" else 1
        elif args.verb == "download":
            Path(args.output).write_bytes(client.job_video(args.job_id))
            sys.stderr.write(f"wrote {args.output}\n")
        elif args.verb == "cancel":
            print(job_line(client.cancel_job(args.job_id)))
        else:
            for job in client.list_jobs():
                print(job_line(job))
    return 0


def check_health(args: argparse.Namespace) -> int:
    addresses = {name: getattr(args, name) for name in DEFAULT_ADDRESSES}
    statuses = {name: health(address) for name, address in addresses.items()}
    for name, status in statuses.items():
        print(f"{name:<9} {addresses[name]:<22} {status}")
    return 0 if all(s == "SERVING" for s in statuses.values()) else 1


def add_common_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--server", default=DEFAULT_ADDRESSES["gateway"], help="gateway host:port")
    command.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")


def add_planning_arguments(command: argparse.ArgumentParser) -> None:
    """Options that decide who is animated where (fixed in an avatar when it is made)."""
    command.add_argument("--pads", type=int, nargs=4, metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"),
                         help="face box padding in pixels (default 0 10 0 0)")
    command.add_argument("--smooth", type=int, help="box smoothing window in frames (default 5, 0 = off)")
    command.add_argument("--max-detection-size", type=int, help="longest side of frames sent to the detector (640)")
    command.add_argument("--fps", type=float, help="frame rate for a still image (default 25)")
    command.add_argument("--no-face", choices=("fail", "keep"), default="fail",
                         help="frames without a face: fail the job (default) or keep them untouched")
    command.add_argument("--reference-face", help="photo of the person to animate (default: pick by --target)")
    command.add_argument("--target", choices=("largest", "center"), default="largest",
                         help="who to animate without a reference photo")
    command.add_argument("--similarity", type=float, help="cosine threshold for the reference person (default 0.4)")
    command.add_argument("--detect-every", type=int, help="detect faces every k-th frame, interpolate between (1)")
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


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="superwav2lip", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="make a lip-synced mp4 from a face image/video (or an avatar) and speech")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--face", help="face image or video")
    source.add_argument("--avatar", help="an avatar id (from `avatar create`) instead of --face")
    gen.add_argument("--audio", required=True, help="speech (any format FFmpeg reads)")
    gen.add_argument("-o", "--output", required=True, help="mp4 to write")
    add_common_arguments(gen)
    add_planning_arguments(gen)
    add_synthesis_arguments(gen)
    gen.set_defaults(run=generate)

    avatar = commands.add_parser("avatar", help="avatars: face media planned once, then used with any speech")
    verbs = avatar.add_subparsers(dest="verb", required=True)
    create = verbs.add_parser("create", help="plan a face image or video once; prints the avatar id")
    create.add_argument("--face", required=True, help="face image or video")
    create.add_argument("--name", help="a label (default: the file name)")
    add_common_arguments(create)
    add_planning_arguments(create)
    create.set_defaults(run=create_avatar, avatar=None)
    listing = verbs.add_parser("list", help="the avatars, newest first")
    add_common_arguments(listing)
    listing.set_defaults(run=list_avatars)
    delete = verbs.add_parser("delete", help="delete an avatar and its media")
    delete.add_argument("avatar_id")
    add_common_arguments(delete)
    delete.set_defaults(run=delete_avatar)

    jobs = commands.add_parser("jobs", help="asynchronous jobs: submit, then status / wait, then download")
    job_verbs = jobs.add_subparsers(dest="verb", required=True)
    submit = job_verbs.add_parser("submit", help="queue a job; prints its id")
    submit_source = submit.add_mutually_exclusive_group(required=True)
    submit_source.add_argument("--face", help="face image or video")
    submit_source.add_argument("--avatar", help="an avatar id instead of --face")
    submit.add_argument("--audio", required=True, help="speech")
    submit.add_argument("--webhook", help="URL called (signed) when the job ends; its host must be allow-listed")
    add_common_arguments(submit)
    add_planning_arguments(submit)
    add_synthesis_arguments(submit)
    for verb, text in (("status", "print a job's state"), ("wait", "follow a job with a progress bar until it ends"),
                       ("download", "write a finished job's mp4"), ("cancel", "cancel a job, or remove a finished one")):
        command = job_verbs.add_parser(verb, help=text)
        command.add_argument("job_id")
        if verb == "download":
            command.add_argument("-o", "--output", required=True, help="mp4 to write")
        add_common_arguments(command)
    add_common_arguments(job_verbs.add_parser("list", help="recent jobs, newest first"))
    jobs.set_defaults(run=jobs_command)

    check = commands.add_parser("health", help="print each service's health; exit 0 only if all are SERVING")
    check.add_argument("--server", dest="gateway", default=DEFAULT_ADDRESSES["gateway"], help="gateway host:port")
    for name in ("detector", "lipsync", "enhancer"):
        check.add_argument(f"--{name}", default=DEFAULT_ADDRESSES[name], help=f"{name} host:port")
    check.set_defaults(run=check_health)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    sys.exit(args.run(args))


if __name__ == "__main__":
    main()
