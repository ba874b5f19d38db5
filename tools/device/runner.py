"""On the device: keep each carried bundle part, and once all are there join, check, install to a private target and run a measurement.

    python3 -m tools.device.runner --manifest .run/device-bundle/manifest.json [--part PART...] [--measure models|stack]
Each `run` call carries the next part; the parts wait in --store (/tmp survives while the machine stays warm).
A call that completes the set installs the wheels with pip --no-index --no-deps --target, puts that target first
on PYTHONPATH (its onnxruntime-gpu shadows the image's CPU onnxruntime, which stays installed: the mixed-install
refusal looks per folder), puts the image's nvidia/*/lib folders on LD_LIBRARY_PATH and starts the measurement:
tools/device/measure.py (models: gpu-check and items/s per model) or, in the next call that carries no part,
tools/device/stack.py (stack: the services end to end). measure.py refuses to measure unless onnxruntime is imported
from the target. Exit codes: 0 done or waiting for parts, 3 a part missing or altered, 4 the measurement refused
its environment, 5 pip failed, 124 the measurement outran --timeout-s."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from tools.device import parts  # noqa: E402


def store_parts(manifest: dict, carried: list[Path], store: Path) -> list[str]:
    """Checks each carried part against the manifest before keeping it; returns the names still missing."""
    store.mkdir(parents=True, exist_ok=True)
    for path in carried:
        if not path.is_file():
            raise parts.BundleError(f"carried part {path} is not here: name it in the call's carry")
        parts.verify_part(manifest, path)
        shutil.copyfile(path, store / path.name)
    return parts.missing_parts(manifest, store)


def install(manifest: dict, store: Path, target: Path) -> Path:
    """Joins and checks the archive, unpacks it and installs its wheels into `target` once per bundle."""
    unpacked = store / "unpacked"
    marker = target / f".swl-bundle-{manifest['sha256'][:16]}"
    if marker.is_file():
        return unpacked
    archive = parts.join(manifest, store, store / manifest["archive"])
    shutil.rmtree(unpacked, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    archive.unlink()  # the parts stay; the joined copy would double the disk use
    wheels = sorted(str(w) for w in (unpacked / "wheels").glob("*.whl"))
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                          "--no-cache-dir", "--upgrade", "--target", str(target), *wheels],
                         capture_output=True, text=True)
    if pip.returncode:
        raise InstallError(f"pip install --target {target} failed:\n{pip.stdout[-2000:]}{pip.stderr[-4000:]}")
    marker.write_text(manifest["sha256"] + "\n")
    return unpacked


class InstallError(RuntimeError):
    """pip refused the wheels (another Python, a broken wheel): its output says which."""


def installed(target: Path) -> list[str]:
    return sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions(path=[str(target)]))


def nvidia_lib_dirs() -> list[str]:
    """The lib folders of the image's pip-installed NVIDIA wheels (nvidia/<pkg>/lib, and nvidia/cu13/lib for the
    CUDA 13 wheels), where libcudart, libcublas, libcudnn, libcufft and libcurand live."""
    found = []
    for base in [*site.getsitepackages(), site.getusersitepackages(), *sys.path]:
        nvidia = Path(base) / "nvidia"
        if nvidia.is_dir():
            for lib in sorted({*nvidia.glob("*/lib"), *nvidia.glob("*/*/lib")}):
                if any(lib.glob("*.so*")) and str(lib) not in found:
                    found.append(str(lib))
    return found


def measurement_env(target: Path, lib_dirs: list[str], unpacked: Path) -> dict[str, str]:
    """The private target first on PYTHONPATH (ahead of site-packages), then the project and its stubs; the
    bundle's copy of ../shared (models/, media/) as the benchmarks' shared folder."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", SWL_SHARED_DIR=str(unpacked))
    env["PYTHONPATH"] = os.pathsep.join([str(target), str(ROOT), str(ROOT / "client"),
                                         *filter(None, [os.environ.get("PYTHONPATH")])])
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*lib_dirs, *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])
    return env


def measure(args, unpacked: Path, env: dict[str, str]) -> int:
    common = ["--providers", args.providers, "--out", str(args.out), "--work", str(args.store / "work")]
    if args.measure == "stack":
        command = [sys.executable, "-m", "tools.device.stack", *common, *args.measure_args]
    else:
        require = args.require_from_target or ("onnxruntime" if args.providers == "cuda" else "")
        command = [sys.executable, "-m", "tools.device.measure", *common, "--target",
                   str(args.target), "--require-from-target", require, "--real-models", str(unpacked / "models"),
                   *args.measure_args]
    # its own process group: the stack measurement starts services, and a stop must take them down too
    process = subprocess.Popen(command, env=env, cwd=ROOT, start_new_session=True)
    try:
        return process.wait(timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        print(f"measurement stopped after {args.timeout_s} s", file=sys.stderr)
        stop_group(process)
        return 124


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the measurement's whole process group, SIGKILL to what is left 15 s later."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run(args) -> int:
    manifest = parts.load_manifest(args.manifest)
    missing = store_parts(manifest, args.part, args.store)
    status = {"bundle": manifest["sha256"], "stored": sorted(p.name for p in args.part), "missing": missing}
    if missing and not args.part:
        raise parts.BundleError(f"missing part(s) {', '.join(missing)}: the machine went cold since they were "
                                "carried (or never got them); carry them again, one per call")
    if missing:
        print(f"stored {', '.join(status['stored'])}; waiting for {', '.join(missing)} (next call, within 30 s)")
        return write_status(args.out, status, 0)
    unpacked = install(manifest, args.store, args.target)
    status["installed"] = installed(args.target)
    status["ld_library_path"] = nvidia_lib_dirs()
    print(f"installed {len(status['installed'])} distributions into {args.target}; "
          f"{len(status['ld_library_path'])} NVIDIA lib folders")
    if args.no_measure:
        return write_status(args.out, status, 0)
    status["measure"] = args.measure
    status["measure_rc"] = measure(args, unpacked, measurement_env(args.target, status["ld_library_path"], unpacked))
    return write_status(args.out, status, status["measure_rc"])


def write_status(out: Path, status: dict, rc: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (out / "runner.json").write_text(json.dumps({**status, "rc": rc}, indent=1) + "\n")
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--part", type=Path, nargs="*", default=[], help="the part(s) this call carries")
    parser.add_argument("--store", type=Path, default=Path("/tmp/swl-bundle"))
    parser.add_argument("--target", type=Path, default=Path("/tmp/swl-site"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/swl-out")))
    parser.add_argument("--providers", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--require-from-target", default="", help="default: onnxruntime on cuda, nothing on cpu")
    parser.add_argument("--timeout-s", type=float, default=420, help="the measurement's hard stop (8 min less margin)")
    parser.add_argument("--measure", choices=("models", "stack"), default="models",
                        help="models: tools/device/measure.py; stack: tools/device/stack.py (after models, no part)")
    parser.add_argument("--no-measure", action="store_true", help="install only")
    args, args.measure_args = parser.parse_known_args(argv)  # the rest goes to the measurement (--batches...)
    try:
        return run(args)
    except parts.BundleError as error:
        print(f"bundle refused: {error}", file=sys.stderr)
        return write_status(args.out, {"error": str(error)}, 3)
    except InstallError as error:
        print(str(error), file=sys.stderr)
        return write_status(args.out, {"error": str(error)}, 5)


if __name__ == "__main__":
    sys.exit(main())
