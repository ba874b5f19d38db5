"""The int8 Wav2Lip against fp32 on real face crops: speed per item at batch 32, and how far the outputs move.

Crops come from the real talking-head clip (faces found by the real SCRFD, cut as the gateway's box mode cuts
them) with mel windows of real speech. The model is the full-size stand-in (Wav2Lip's layer structure, random
weights), so the speed-up is representative and the error is only an indication: the real weights must be
checked before SWL_LIPSYNC_INT8 is turned on by default.

    python -m bench.int8 [--items 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from bench.full_size_models import write_wav2lip  # noqa: E402
from bench.results import publish  # noqa: E402
from gateway.audio import decode_speech, mel_window, melspectrogram  # noqa: E402
from gateway.compositing import crop_face  # noqa: E402
from service_runtime.manifest import load_manifest  # noqa: E402
from service_runtime.onnx_session import load_model  # noqa: E402
from service_runtime.quantize import int8_spec, quantize  # noqa: E402
from services.detector.model import FaceDetector  # noqa: E402
from services.lipsync.model import LipSyncGenerator  # noqa: E402

SHARED = ROOT.parent / "shared"
CLIP, SPEECH = SHARED / "media" / "talking_mpeg4_512_25fps_8s.mp4", SHARED / "media" / "speech_en_9s.wav"


def real_items(count: int) -> list[tuple[bytes, bytes]]:
    """(96x96 BGR face crop, 80x16 mel window) pairs from the real clip and speech."""
    spec = load_manifest(ROOT / "models").get("scrfd_2.5g")
    detector = FaceDetector(spec, 480)
    detector.model = load_model(spec, ROOT / "models", extra_dirs=(str(SHARED / "models"),))
    mel = melspectrogram(decode_speech(SPEECH.read_bytes()).samples)
    items = []
    with av.open(str(CLIP)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            pixels = frame.to_ndarray(format="bgr24")
            found = detector.run_batch([detector.prepare(pixels)])[0]
            if not len(found.boxes):
                continue
            height, width = pixels.shape[:2]
            x1, y1, x2, y2 = np.clip(found.boxes[0].round().astype(int) + (0, 0, 0, 10), 0, (width, height) * 2)
            face = crop_face(pixels, (x1, y1, x2, y2))
            items.append((face.tobytes(), mel_window(mel, index, 25.0).astype("<f4").tobytes()))
            if len(items) == count:
                break
    return items


def outputs(generator: LipSyncGenerator, items: list[tuple[bytes, bytes]]) -> tuple[np.ndarray, float]:
    """All outputs and milliseconds per item, batches of 32 after one warm batch."""
    prepared = [generator.prepare(face, mel) for face, mel in items]
    generator.run_batch(prepared[:32])
    started = time.perf_counter()
    faces = [face for start in range(0, len(prepared), 32) for face in generator.run_batch(prepared[start:start + 32])]
    return np.stack(faces).astype(np.int16), (time.perf_counter() - started) * 1000 / len(prepared)


@dataclasses.dataclass
class Int8Result:
    items: int
    quantize_seconds: float
    fp32_ms: float  # per item
    int8_ms: float
    mean_error: float  # levels, 0-255
    max_error: int
    psnr: float  # dB of the int8 output against the fp32 output

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.int8_ms


def measure(work: Path, items: list[tuple[bytes, bytes]]) -> Int8Result:
    """Quantizes the Wav2Lip file in `work` (beside its manifest) and runs both on `items`."""
    spec = load_manifest(work).get("wav2lip_gan")
    started = time.perf_counter()
    quantize(spec, work / spec.file, work / int8_spec(spec).file)
    quantize_seconds = time.perf_counter() - started
    results = {}
    for label, model_spec in (("fp32", spec), ("int8", int8_spec(spec))):
        generator = LipSyncGenerator(model_spec)
        generator.model = load_model(model_spec, work)
        results[label] = outputs(generator, items)
    (fp32, fp32_ms), (int8, int8_ms) = results["fp32"], results["int8"]
    error = np.abs(fp32 - int8)
    mse = float(np.mean((fp32 - int8).astype(np.float64) ** 2))
    psnr = 10 * np.log10(255 ** 2 / mse) if mse else float("inf")
    return Int8Result(len(items), quantize_seconds, fp32_ms, int8_ms, float(error.mean()), int(error.max()), psnr)


def table(result: Int8Result) -> str:
    return ("| model | ms per item | speed-up | mean abs error (levels) | max error | PSNR vs fp32 |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: |\n"
            f"| fp32 | {result.fp32_ms:.1f} | 1.00 | - | - | - |\n"
            f"| int8 (QDQ, per-channel) | {result.int8_ms:.1f} | {result.speedup:.2f} | {result.mean_error:.2f} | "
            f"{result.max_error} | {result.psnr:.1f} dB |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if not (CLIP.is_file() and SPEECH.is_file() and (SHARED / "models" / "scrfd_2.5g_bnkps.onnx").is_file()):
        sys.exit("needs ../shared/media and the real SCRFD in ../shared/models: this benchmark uses real crops")
    items = real_items(args.items)
    work = Path(tempfile.mkdtemp(prefix="swl-bench-int8-"))
    try:
        shutil.copy(ROOT / "models" / "manifest.json", work / "manifest.json")
        write_wav2lip(work, work)
        result = measure(work, items)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = (f"Full-size Wav2Lip stand-in (random weights), {result.items} real face crops from {CLIP.name} with mel "
            f"windows of {SPEECH.name}, batches of 32, one CPU session each; quantizing took "
            f"{result.quantize_seconds:.1f} s.\n\n{table(result)}\n\nThe error is measured on random weights: "
            "SWL_LIPSYNC_INT8 stays off by default until it is measured with the real Wav2Lip weights.")
    publish("int8", "int8 Wav2Lip on CPU (`make bench-int8`)", text, write=not args.no_write)


if __name__ == "__main__":
    main()
