"""`make models`: downloads the real weights listed in the manifest and verifies their sha256."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import urllib.error
import urllib.request
from pathlib import Path

from .manifest import ModelSpec, load_manifest

CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verify(spec: ModelSpec, path: Path) -> str | None:
    """None when the file matches the manifest, else what is wrong."""
    if not path.is_file():
        return "missing"
    if spec.sha256 and (actual := sha256_of(path)) != spec.sha256:
        return f"sha256 {actual} does not match the manifest's {spec.sha256}"
    return None


def download(spec: ModelSpec, path: Path, timeout: float = 30.0) -> None:
    """Streams the file to `path.part`, checks it, then renames it into place."""
    partial = path.with_suffix(path.suffix + ".part")
    with urllib.request.urlopen(spec.url, timeout=timeout) as response, partial.open("wb") as handle:
        total = int(response.headers.get("Content-Length") or spec.size_bytes or 0)
        done = 0
        while block := response.read(CHUNK):
            handle.write(block)
            done += len(block)
            if total:
                print(f"\r  {spec.file}: {done * 100 // total}% of {total / 1e6:.0f} MB", end="", flush=True)
    print()
    problem = verify(spec, partial)
    if problem:
        partial.unlink()
        raise ValueError(f"{spec.file}: {problem}")
    partial.rename(path)


def source_url(spec: ModelSpec, mirror: str | None) -> str:
    """Where a model is fetched from: `<mirror>/<file>` when a mirror is given (a bucket or web server that
    holds copies), else the manifest's own address (empty when none is public)."""
    return f"{mirror.rstrip('/')}/{spec.file}" if mirror else spec.url


def fetch_all(models_dir: Path, names: list[str], manifest_dir: Path | None = None, mirror: str | None = None) -> int:
    """Verifies or downloads each model into `models_dir`; returns the number that are still not usable.
    The manifest is read from `manifest_dir` (default: `models_dir`)."""
    manifest = load_manifest(manifest_dir or models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    missing = 0
    for name in names or sorted(manifest.models):
        spec = manifest.get(name)
        path = models_dir / spec.file
        problem = verify(spec, path)
        if problem is None:
            print(f"ok       {spec.file}")
            continue
        spec = dataclasses.replace(spec, url=source_url(spec, mirror))
        if not spec.url:
            print(f"manual   {spec.file}: no public download address is recorded ({spec.source}); "
                  f"place it at {path} (sha256 {spec.sha256 or 'not recorded'})")
            missing += 1
            continue
        try:
            print(f"download {spec.file} from {spec.url}")
            download(spec, path)
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as error:
            print(f"failed   {spec.file}: {error} (no internet here? copy the file to {path} by hand)")
            missing += 1
    return missing


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Download and verify the real model weights.")
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--manifest-dir", help="folder of manifest.json (default: --models-dir)")
    parser.add_argument("--mirror", help="base URL holding copies of the files (<mirror>/<file>); checked against "
                                         "the manifest's sha256 like any download")
    parser.add_argument("names", nargs="*", help="manifest names (default: all)")
    args = parser.parse_args(argv)
    missing = fetch_all(Path(args.models_dir), args.names, args.manifest_dir and Path(args.manifest_dir),
                        args.mirror)
    if missing:
        print(f"{missing} model(s) not available; services can still run on generated weights "
              "with *_ALLOW_DEV_MODELS=1 (make models-dev)")
        sys.exit(1)


if __name__ == "__main__":
    main()
