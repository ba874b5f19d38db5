"""Splitting an archive into parts under a size limit, their manifest, and the checked join (no network, no pip)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

MIB = 1 << 20
PART_LIMIT = 60 * MIB  # one device call carries 64 MiB in all: the part, the manifest and the working tree
MANIFEST = "manifest.json"
_BLOCK = 1 << 20


class BundleError(RuntimeError):
    """A part is missing, altered or over the limit: the message names the file and what to do."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def part_name(archive: str, index: int) -> str:
    return f"{archive}.part{index:02d}"


def split(archive: Path, out_dir: Path, limit: int = PART_LIMIT) -> list[Path]:
    """Cuts `archive` into consecutive files of at most `limit` bytes in `out_dir`; returns them in order."""
    if limit < 1:
        raise ValueError("the part limit must be positive")
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    with open(archive, "rb") as source:
        while chunk := source.read(limit):
            path = out_dir / part_name(archive.name, len(parts))
            path.write_bytes(chunk)
            parts.append(path)
    return parts


def write_manifest(archive: Path, parts: list[Path], out_dir: Path, extra: dict | None = None) -> Path:
    """The JSON that the runner checks every part and the joined archive against."""
    manifest = {"archive": archive.name, "size": archive.stat().st_size, "sha256": sha256_file(archive),
                "parts": [{"name": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)} for p in parts],
                **(extra or {})}
    path = out_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def load_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise BundleError(f"cannot read the bundle manifest {path}: {error}") from error
    if not manifest.get("parts") or "sha256" not in manifest:
        raise BundleError(f"{path} is not a bundle manifest (no parts or no sha256)")
    return manifest


def entry(manifest: dict, name: str) -> dict:
    found = [p for p in manifest["parts"] if p["name"] == name]
    if not found:
        raise BundleError(f"{name} is not a part of bundle {manifest['archive']} (its parts: "
                          f"{', '.join(p['name'] for p in manifest['parts'])}); was it built by another bundle run?")
    return found[0]


def verify_part(manifest: dict, path: Path) -> None:
    """Refuses a part whose size or sha256 differs from the manifest's: altered, truncated or from another bundle."""
    expected = entry(manifest, path.name)
    size = path.stat().st_size
    if size != expected["size"]:
        raise BundleError(f"part {path.name} is {size} bytes, the manifest says {expected['size']}: "
                          "truncated or altered; carry it again from the bundle folder")
    actual = sha256_file(path)
    if actual != expected["sha256"]:
        raise BundleError(f"part {path.name} has sha256 {actual}, the manifest says {expected['sha256']}: "
                          "altered; carry it again from the bundle folder")


def missing_parts(manifest: dict, store: Path) -> list[str]:
    return [p["name"] for p in manifest["parts"] if not (store / p["name"]).is_file()]


def join(manifest: dict, store: Path, target: Path) -> Path:
    """Checks every part in `store`, concatenates them in order into `target` and checks the whole sha256."""
    missing = missing_parts(manifest, store)
    if missing:
        raise BundleError(f"cannot join {manifest['archive']}: missing part(s) {', '.join(missing)} in {store} "
                          "(each run call carries the next part; a machine that went cold lost the earlier ones)")
    for part in manifest["parts"]:
        verify_part(manifest, store / part["name"])
    with open(target, "wb") as out:
        for part in manifest["parts"]:
            with open(store / part["name"], "rb") as source:
                shutil.copyfileobj(source, out, _BLOCK)
    actual = sha256_file(target)
    if actual != manifest["sha256"]:
        target.unlink()
        raise BundleError(f"joined {manifest['archive']} has sha256 {actual}, the manifest says "
                          f"{manifest['sha256']}: the parts are not this bundle's; rebuild with make device-bundle")
    return target
