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

from service_runtime.registry import model_services

ROOT = Path(__file__).resolve().parent.parent.parent
REGISTRY = "ghcr.io/superwav2lip"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@dataclass(frozen=True)
class Image:
    name: str
    tag: str
    dockerfile: str
    target: str | None = None
    build_args: tuple[tuple[str, str], ...] = ()

    def reference(self, registry: str) -> str:
        return f"{registry}/{self.name}:{self.tag}"

    def build_command(self, registry: str) -> list[str]:
        arguments = [item for name, value in self.build_args for item in ("--build-arg", f"{name}={value}")]
        return ["docker", "build", "-f", self.dockerfile, *(["--target", self.target] if self.target else []),
                *arguments, "-t", self.reference(registry), "."]


# The GPU targets' defaults are the CUDA 13 line (driver 580 or newer); these arguments build the CUDA 12 line
# for older drivers, tagged "<version>-cuda12-gpu" (the GPU overlays' policy wants tags ending in "-gpu").
CUDA12_BUILD_ARGS = (("CUDA_IMAGE", "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04"),
                     ("GPU_EXTRA", "gpu-cuda12"), ("TENSORRT_LIBS", "tensorrt-cu12-libs==10.15.*"))


def images(version: str = VERSION) -> list[Image]:
    dockerfile = "deploy/docker/model-services.Dockerfile"
    model_images = []
    for service in (entry.name for entry in model_services()):  # each has -cpu/-gpu Dockerfile targets
        model_images += [Image(service, f"{version}-cpu", dockerfile, f"{service}-cpu"),
                         Image(service, f"{version}-gpu", dockerfile, f"{service}-gpu"),
                         Image(service, f"{version}-cuda12-gpu", dockerfile, f"{service}-gpu", CUDA12_BUILD_ARGS)]
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
