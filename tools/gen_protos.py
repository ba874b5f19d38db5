"""Generates the Python stubs, mypy stubs and Envoy descriptor set from protos/ (run by `make protos`)."""

import shutil
import sys
from pathlib import Path

from google.api import annotations_pb2
import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
STUBS_OUT = ROOT / "client"  # the SDK distribution carries the stubs
DESCRIPTOR_OUT = ROOT / "generated"


def _plugin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        sys.exit(f"{name} not found next to {sys.executable}: install mypy-protobuf (pip install -e .[dev])")
    return f"--plugin={name}={path}"


def generate(out: Path, descriptor_out: Path | None = None) -> None:
    """Writes the `superwav2lip` stub package into `out` and `superwav2lip_descriptor.pb` into `descriptor_out`
    (default: `out`)."""
    package = out / "superwav2lip"
    descriptor = (descriptor_out or out) / "superwav2lip_descriptor.pb"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    shutil.rmtree(package, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    googleapis = Path(annotations_pb2.__file__).parent.parent.parent
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{googleapis}",
        f"-I{well_known}",
        _plugin("protoc-gen-mypy"),
        _plugin("protoc-gen-mypy_grpc"),
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        "--include_imports",
        f"--descriptor_set_out={descriptor}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    for folder in [package, *[p for p in package.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").write_text('"""Generated from protos/ by `make protos`; do not edit."""\n')
    (package / "py.typed").write_text("")
    print(f"generated {len(protos)} protos into {out}")


def main() -> None:
    if len(sys.argv) > 1:
        generate(Path(sys.argv[1]))
    else:
        generate(STUBS_OUT, DESCRIPTOR_OUT)


if __name__ == "__main__":
    main()
