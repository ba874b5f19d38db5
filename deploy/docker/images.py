"""`make images`: the docker build (and push) commands for every image the Kubernetes manifests use.

    python -m deploy.docker.images                  # print the commands
    python -m deploy.docker.images --run [--push]   # run them with docker
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
REGISTRY = "ghcr.io/superwav2lip"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@dataclass(frozen=True)
class Image:
    name: str
    tag: str
    dockerfile: str
    target: str | None = None

    def reference(self, registry: str) -> str:
        return f"{registry}/{self.name}:{self.tag}"

    def build_command(self, registry: str) -> list[str]:
        return ["docker", "build", "-f", self.dockerfile, *(["--target", self.target] if self.target else []),
                "-t", self.reference(registry), "."]


def images(version: str = VERSION) -> list[Image]:
    model_images = [Image(service, f"{version}-{flavour}", "deploy/docker/model-services.Dockerfile",
                          f"{service}-{flavour}")
                    for service in ("detector", "lipsync", "enhancer") for flavour in ("cpu", "gpu")]
    return [Image("gateway", version, "deploy/docker/gateway.Dockerfile"), *model_images]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default=REGISTRY)
    parser.add_argument("--run", action="store_true", help="run the builds (needs docker)")
    parser.add_argument("--push", action="store_true", help="push each image after building it")
    args = parser.parse_args(argv)
    for image in images():
        commands = [image.build_command(args.registry)]
        if args.push:
            commands.append(["docker", "push", image.reference(args.registry)])
        for command in commands:
            print(shlex.join(command), flush=True)
            if args.run and subprocess.run(command, cwd=ROOT).returncode:
                sys.exit(f"failed: {shlex.join(command)}")


if __name__ == "__main__":
    main()
