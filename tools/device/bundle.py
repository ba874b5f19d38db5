"""`make device-bundle`: the wheels the GPU machine's image lacks, for CPython 3.12 manylinux x86_64, as parts of at most 60 MiB with a sha256 manifest.

    python -m tools.device.bundle [--out .run/device-bundle] [--part-mib 60] [--also NAME,...]
The list comes from pyproject.toml (dependencies, the gpu extra with onnxruntime-gpu pinned to the CUDA 13 line,
onnx from dev), resolved by pip for the device's platform, minus what tools/device/image_packages.txt says the
image holds. The output folder is under .run/, which .gitignore already ignores."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

from tools.device import parts

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / ".run" / "device-bundle"
SHARED = ROOT.parent / "shared"
# PyPI's onnxruntime-gpu 1.31 is the CUDA 13 build (its `cuda` extra names nvidia-cuda-runtime~=13.0).
ORT_GPU = "onnxruntime-gpu==1.31.*"
# Carried even though the image has them: the generated stubs check grpcio >= 1.85.1 and protobuf >= 7.35 at import.
ALWAYS_CARRY = {"onnxruntime-gpu", "grpcio", "protobuf", "googleapis-common-protos"}
# What travels from ../shared (the same layout under the bundle, which the stack step reads as its shared folder):
# the real SCRFD-2.5G weights, and the 720p clip and speech the end-to-end benchmarks use (bench/throughput.py).
CARRIED_SHARED = ("models/scrfd_2.5g_bnkps.onnx", "media/face_astronaut_moving_720p25_5s.mp4",
                  "media/speech_en_60s_16k.wav")
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"] + [
    f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                                "manylinux2014_x86_64", "manylinux1_x86_64")]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.match(r"[A-Za-z0-9_.-]+", requirement.strip()).group(0))


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """What the services, gateway and benchmarks need at run time, from the project's own metadata."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project["optional-dependencies"]
    gpu = [ORT_GPU if requirement_name(r) == "onnxruntime-gpu" else r for r in extras["gpu"]]
    dev = [r for r in extras["dev"] if requirement_name(r) == "onnx"]  # the model generators import onnx
    return [*project["dependencies"], *gpu, *dev]


def pinned_to_local(requirements: list[str]) -> list[str]:
    """Each requirement pinned to the version this checkout's tests pass with, where one is installed."""
    pinned = []
    for requirement in requirements:
        name = requirement_name(requirement)
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        pinned.append(f"{name}=={version}" if version and name != "onnxruntime-gpu" else requirement)
    return pinned


def image_packages(path: Path = Path(__file__).with_name("image_packages.txt")) -> set[str]:
    return {canonical(line) for line in path.read_text().split("\n") if line.strip() and not line.startswith("#")}


def to_carry(resolved: list[dict], image: set[str], also: set[str] = frozenset()) -> list[dict]:
    """The resolved distributions the device lacks, plus those whose version the project needs."""
    keep = ALWAYS_CARRY | {canonical(n) for n in also}
    return [d for d in resolved if d["name"] not in image or d["name"] in keep]


def resolve(requirements: list[str], work: Path) -> list[dict]:
    """pip's resolution for the device's platform, without downloading: name, version, url and sha256 each."""
    report = work / "resolution.json"
    run_pip(["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
             "--target", str(work / "unused"), *PLATFORM, *requirements])
    return [{"name": canonical(item["metadata"]["name"]), "version": item["metadata"]["version"],
             "file": item["download_info"]["url"].rsplit("/", 1)[-1],
             "sha256": item["download_info"].get("archive_info", {}).get("hashes", {}).get("sha256")}
            for item in json.loads(report.read_text())["install"]]


def download(chosen: list[dict], wheels: Path) -> list[Path]:
    """Downloads exactly the chosen versions (no second resolution) and checks each against pip's sha256."""
    wheels.mkdir(parents=True, exist_ok=True)
    run_pip(["download", "--no-deps", "--quiet", "-d", str(wheels), *PLATFORM,
             *(f"{d['name']}=={d['version']}" for d in chosen)])
    files = []
    for d in chosen:
        path = wheels / d["file"]
        if not path.is_file():
            raise parts.BundleError(f"pip did not write {path.name}")
        if d["sha256"] and parts.sha256_file(path) != d["sha256"]:
            raise parts.BundleError(f"{path.name} differs from the sha256 the index gave; delete {wheels} and retry")
        files.append(path)
    return files


def run_pip(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if result.returncode:
        raise parts.BundleError(f"pip {args[0]} failed:\n{result.stdout[-2000:]}{result.stderr[-4000:]}")


def pack(archive: Path, wheels: list[Path], shared: list[str], lock: list[dict], shared_dir: Path = SHARED) -> Path:
    """An uncompressed tar (wheels are already compressed): wheels/, the `shared` files under their own relative
    paths (models/, media/) and the lock the runner reads."""
    lock_file = archive.with_name("lock.json")
    lock_file.write_text(json.dumps(lock, indent=1) + "\n")
    with tarfile.open(archive, "w") as tar:
        tar.add(lock_file, "lock.json")
        for path in wheels:
            tar.add(path, f"wheels/{path.name}")
        for name in shared:
            tar.add(shared_dir / name, name)
    return archive


def travelling_tree_bytes() -> int:
    """Bytes of the working tree that every device call sends besides the carried part."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True)
    return sum((ROOT / name).stat().st_size for name in listed.stdout.decode().split("\0")
               if name and (ROOT / name).is_file())


def build(out: Path, limit: int, also: set[str]) -> dict:
    work = out / "build"
    work.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.part*"):
        old.unlink()
    resolved = resolve(pinned_to_local(project_requirements()), work)
    chosen = sorted(to_carry(resolved, image_packages(), also), key=lambda d: d["name"])
    wheels = download(chosen, work / "wheels")
    shared = [name for name in CARRIED_SHARED if (SHARED / name).is_file()]
    archive = pack(work / "swl-device-bundle.tar", wheels, shared, chosen)
    written = parts.split(archive, out, limit)
    manifest = parts.write_manifest(archive, written, out, {"wheels": [d["file"] for d in chosen], "shared": shared})
    archive.unlink()
    return json.loads(manifest.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--part-mib", type=float, default=parts.PART_LIMIT / parts.MIB)
    parser.add_argument("--also", default="", help="carry these too although the image has them")
    args = parser.parse_args(argv)
    if args.part_mib * parts.MIB > parts.PART_LIMIT:
        parser.error("parts above 60 MiB leave no room for the working tree in a 64 MiB call")
    manifest = build(args.out, int(args.part_mib * parts.MIB), {n for n in args.also.split(",") if n})
    tree = travelling_tree_bytes()
    print(f"{len(manifest['wheels'])} wheels: {', '.join(manifest['wheels'])}")
    print(f"from ../shared: {', '.join(manifest['shared']) or 'nothing (../shared absent)'}")
    print(f"{manifest['archive']}: {manifest['size'] / parts.MIB:.1f} MiB, sha256 {manifest['sha256']}")
    for p in manifest["parts"]:
        call = (p["size"] + tree) / parts.MIB
        print(f"  {args.out / p['name']}: {p['size'] / parts.MIB:.1f} MiB (a call carrying it: {call:.1f} MiB "
              f"with the {tree / parts.MIB:.1f} MiB working tree; limit 64)")
    print(f"manifest: {args.out / parts.MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
