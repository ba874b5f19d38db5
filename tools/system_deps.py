"""The system programs the tests and `make run` start for real, in one list; `make deps` installs the missing ones.

Standard library only: it runs before the virtual environment exists. With apt-get and root (or sudo without a
password) it installs what is missing; otherwise it stops at once with the exact command to run, so that nobody
waits through a test suite that would fail in its middle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class SystemBinary:
    name: str  # the command looked up on PATH
    package: str  # the Debian package that provides it
    why: str


BINARIES = (
    SystemBinary("redis-server", "redis-server", "the plan cache, avatars and jobs run on a real Redis"),
    SystemBinary("chromium", "chromium", "the web UI and playback tests drive Debian's Chromium (no browser "
                                         "download works on these machines)"),
    SystemBinary("ffprobe", "ffmpeg", "the A/V sync test reads outputs' timestamps as players do"),
    SystemBinary("ffmpeg", "ffmpeg", "the A/V sync test decodes outputs with the FFmpeg command line too"),
    SystemBinary("curl", "curl", "the HTTP edge tests call Envoy as a user's shell does"),
    SystemBinary("openssl", "openssl", "the TLS tests make their own certificates"),
    SystemBinary("turnserver", "coturn", "live WebRTC through TURN is tested against a real coturn"),
)
BY_NAME = {binary.name: binary for binary in BINARIES}


def missing() -> list[SystemBinary]:
    return [binary for binary in BINARIES if shutil.which(binary.name) is None]


def install_command(binaries: list[SystemBinary]) -> list[str]:
    """apt-get's command line for `binaries`, without the privilege prefix."""
    return ["apt-get", "install", "-y", "-q", "--no-install-recommends", *sorted({b.package for b in binaries})]


def _privilege_prefix() -> list[str] | None:
    """[] as root, ["sudo", "-n"] when sudo works without a password, None when neither."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


def require(name: str) -> str:
    """The path of a system binary a test needs, or an error that names the package and the fix."""
    path = shutil.which(name)
    if path is None:
        binary = BY_NAME[name]
        raise RuntimeError(f"{name} is not installed ({binary.why}): run `make deps`, or "
                           f"`sudo {' '.join(install_command([binary]))}`")
    return path


def main() -> int:
    absent = missing()
    if not absent:
        print("system packages: all present (" + ", ".join(b.name for b in BINARIES) + ")")
        return 0
    for binary in absent:
        print(f"system packages: {binary.name} is missing: {binary.why}", file=sys.stderr)
    command = install_command(absent)
    prefix = _privilege_prefix()
    if shutil.which("apt-get") is None or prefix is None:
        reason = "apt-get is not available" if shutil.which("apt-get") is None else "this needs root (or sudo -n)"
        print(f"system packages: cannot install them here ({reason}). Run:\n\n    sudo apt-get update && sudo "
              f"{' '.join(command)}\n\nor install the packages {', '.join(b.package for b in absent)} your "
              f"system's way, then run make test again.", file=sys.stderr)
        return 2
    environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"system packages: installing {', '.join(sorted({b.package for b in absent}))} with apt-get",
          file=sys.stderr)
    for step in (["apt-get", "update", "-q"], command):
        if subprocess.run([*prefix, *step], env=environment).returncode != 0:
            print(f"system packages: `{' '.join(prefix + step)}` failed", file=sys.stderr)
            return 2
    still = missing()
    if still:
        print(f"system packages: still missing after apt-get: {', '.join(b.name for b in still)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
