"""Detection cost and agreement by input size, on the real talking-head clips in ../shared/media, with the real
SCRFD-2.5G: the seed's 640 square against the frame's own aspect at 640 and smaller longest sides.

For each clip and size it reports milliseconds per frame and how the main face's box agrees with the 640-square
reference (mean and worst IoU, frames where it was missed). The recommended default for the gateway's
max_detection_size is the smallest size that, on every clip, misses no face and keeps a mean IoU of 0.93 and a
worst of 0.85: two equally valid inputs (the 640 square and a 512 clip's own 512 pixels) already disagree at
about IoU 0.95, so that is the noise floor, not an error.

    python -m bench.detection [--frames 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from bench.results import publish  # noqa: E402
from gateway.faces import Face  # noqa: E402
from gateway.tracking import detection_indices, drifted, interpolate, iou  # noqa: E402
from service_runtime.manifest import load_manifest  # noqa: E402
from service_runtime.onnx_session import load_model  # noqa: E402
from services.detector.model import FaceDetector  # noqa: E402

SHARED = ROOT.parent / "shared"
CLIPS = ("face_astronaut_moving_720p25_5s.mp4", "talking_mpeg4_512_25fps_8s.mp4", "talking_sun_576x768_25fps_22s.mp4")
SIZES = (("square 640", 640, True), ("aspect 640", 640, False), ("aspect 480", 480, False),
         ("aspect 384", 384, False), ("aspect 320", 320, False), ("aspect 256", 256, False))
GOOD_MEAN_IOU, GOOD_WORST_IOU = 0.93, 0.85


def frames_of(path: Path, count: int) -> list[np.ndarray]:
    """`count` frames spread over the clip."""
    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="bgr24") for frame in container.decode(video=0)]
    step = max(1, len(frames) // count)
    return frames[::step][:count]


def all_faces(detector: FaceDetector, frames: list[np.ndarray]) -> list[list[Face]]:
    """Every face per frame, one frame per call as the batching queue sees a single client."""
    faces = []
    for frame in frames:
        found = detector.run_batch([detector.prepare(frame)])[0]
        faces.append([Face(box, float(score), marks) for box, score, marks in
                      zip(found.boxes, found.scores, found.landmarks)])
    return faces


def main_face(faces: list[Face]) -> Face | None:
    return max(faces, key=lambda f: f.area) if faces else None


def main_faces(detector: FaceDetector, frames: list[np.ndarray]) -> tuple[list[Face | None], float]:
    """The largest face per frame (None when none) and milliseconds per frame."""
    started = time.perf_counter()
    faces = all_faces(detector, frames)
    return [main_face(f) for f in faces], (time.perf_counter() - started) * 1000 / len(frames)


def measure(models_dir: Path, extra_dirs: tuple[str, ...], clips: list[Path], frames_per_clip: int,
            allow_dev: bool = False) -> list[dict]:
    """One row per clip and input size; `allow_dev` lets the smoke test run on generated weights."""
    spec = load_manifest(models_dir).get("scrfd_2.5g")
    model = load_model(spec, models_dir, extra_dirs=extra_dirs, allow_dev=allow_dev)
    rows = []
    for clip in clips:
        frames = frames_of(clip, frames_per_clip)
        reference = None
        for label, size, square in SIZES:
            detector = FaceDetector(spec, size, square=square)
            detector.model = model
            main_faces(detector, frames[:2])  # warm this input shape
            boxes, ms = main_faces(detector, frames)
            if reference is None:
                reference = boxes
            pairs = [(b, r) for b, r in zip(boxes, reference) if r is not None]
            ious = [iou(b.box, r.box) if b is not None else 0.0 for b, r in pairs]
            height, width = frames[0].shape[:2]
            rows.append({"clip": clip.name, "frame": f"{width}x{height}", "input": label,
                         "shape": "x".join(map(str, detector.prepare(frames[0]).tensor.shape[-1:-3:-1])),
                         "ms": ms, "mean_iou": statistics.mean(ious), "worst_iou": min(ious),
                         "missed": sum(b is None for b, _ in pairs), "frames": len(frames)})
    return rows


EVERY = (1, 2, 3, 5, 8)


def sweep_every(detector: FaceDetector, frames: list[np.ndarray]) -> list[dict]:
    """detect_every k replayed offline on consecutive frames with the gateway's own drift check and interpolation,
    against detection on every frame: the share of frames detected, and the main face's IoU with the truth."""
    truth = all_faces(detector, frames)
    rows = []
    for every in EVERY:
        picks = detection_indices(len(frames), every)
        detected = set(picks)
        for left, right in zip(picks, picks[1:]):
            if right - left > 1 and drifted(truth[left], truth[right]):
                detected.update(range(left + 1, right))
        chosen = {i: main_face(truth[i]) for i in detected if truth[i]}
        faces = interpolate(chosen, sorted(detected), len(frames))
        ious = [iou(f.box, main_face(t).box) if f is not None else 0.0 for f, t in zip(faces, truth) if t]
        rows.append({"every": every, "detected": len(detected) / len(frames), "mean_iou": statistics.mean(ious),
                     "worst_iou": min(ious)})
    return rows


def recommend(rows: list[dict]) -> str:
    """The smallest aspect size that is good on every clip."""
    good = [label for label, _, square in SIZES if not square
            and all(r["mean_iou"] >= GOOD_MEAN_IOU and r["worst_iou"] >= GOOD_WORST_IOU and not r["missed"]
                    for r in rows if r["input"] == label)]
    return good[-1] if good else "aspect 640"


def every_sweep(models_dir: Path, extra_dirs: tuple[str, ...], clips: list[Path], size: int, count: int,
                allow_dev: bool = False) -> list[dict]:
    spec = load_manifest(models_dir).get("scrfd_2.5g")
    detector = FaceDetector(spec, size)
    detector.model = load_model(spec, models_dir, extra_dirs=extra_dirs, allow_dev=allow_dev)
    rows = []
    for clip in clips:
        with av.open(str(clip)) as container:
            frames = [f.to_ndarray(format="bgr24") for _, f in zip(range(count), container.decode(video=0))]
        rows += [{"clip": clip.name, **row} for row in sweep_every(detector, frames)]
    return rows


# Interpolated boxes must agree with detection on every frame at least as well as two valid detector inputs agree
# with each other (about IoU 0.95): errors between detections show as a wobbling mouth.
EVERY_MEAN_IOU, EVERY_WORST_IOU = 0.95, 0.9


def recommend_every(rows: list[dict]) -> int:
    good = [k for k in EVERY if all(r["mean_iou"] >= EVERY_MEAN_IOU and r["worst_iou"] >= EVERY_WORST_IOU
                                    for r in rows if r["every"] == k)]
    return max(good, default=1)


def every_table(rows: list[dict]) -> str:
    lines = ["| clip | detect_every | frames detected | mean IoU | worst IoU |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['clip']} | {r['every']} | {r['detected']:.0%} | {r['mean_iou']:.3f} | {r['worst_iou']:.3f} |"
              for r in rows]
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| clip | frame | input | model input | ms/frame | vs square 640 | mean IoU | worst IoU | missed |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    square = {r["clip"]: r["ms"] for r in rows if r["input"] == "square 640"}
    for r in rows:
        lines.append(f"| {r['clip']} | {r['frame']} | {r['input']} | {r['shape']} | {r['ms']:.1f} | "
                     f"{r['ms'] / square[r['clip']]:.2f} | {r['mean_iou']:.3f} | {r['worst_iou']:.3f} | "
                     f"{r['missed']}/{r['frames']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50, help="frames sampled per clip")
    parser.add_argument("--every-frames", type=int, default=100, help="consecutive frames per clip for the k sweep")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--media", type=Path, default=SHARED / "media")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)
    clips = [args.media / name for name in CLIPS if (args.media / name).is_file()]
    if not clips:
        sys.exit(f"no talking-head clips in {args.media}: this benchmark measures real faces")
    rows = measure(args.models_dir, (str(SHARED / "models"),), clips, args.frames)
    size = int(recommend(rows).split()[-1])
    every_rows = every_sweep(args.models_dir, (str(SHARED / "models"),), clips, size, args.every_frames)
    text = (f"{table(rows)}\n\nRecommended max_detection_size: **{size}** (the smallest "
            f"longest side that, on every clip, misses no face and keeps the main face's box at a mean IoU of "
            f"{GOOD_MEAN_IOU} and a worst of {GOOD_WORST_IOU} against the 640 square).\n\n"
            f"detect_every k at {size}, on the first {args.every_frames} consecutive frames of each clip, against "
            f"detection on every frame (the drift check re-detects the frames between two detections that "
            f"disagree):\n\n{every_table(every_rows)}\n\nRecommended detect_every: **{recommend_every(every_rows)}** "
            f"(the largest k whose main-face box keeps a mean IoU of {EVERY_MEAN_IOU} and a worst of {EVERY_WORST_IOU} "
            f"against detection on every frame, on every clip).")
    publish("detection", "Detection input size on real clips (`make bench-detection`)", text, write=not args.no_write)


if __name__ == "__main__":
    main()
