"""The generated stubs and Envoy descriptor are exactly what `make protos` produces from protos/."""

import filecmp
import importlib.util
from pathlib import Path

from google.protobuf import descriptor_pb2

from tests.support.paths import ROOT


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    _load_generator().generate(tmp_path)
    stubs = ROOT / "client" / "superwav2lip"  # shipped with the SDK; the descriptor stays for Envoy
    committed = {f"superwav2lip/{f}": stubs / f for f in _files(stubs)}
    committed["superwav2lip_descriptor.pb"] = ROOT / "generated" / "superwav2lip_descriptor.pb"
    assert _files(tmp_path) == set(committed), "run `make protos` and commit the result"
    stale = [f for f in _files(tmp_path) if not filecmp.cmp(tmp_path / f, committed[f], shallow=False)]
    assert not stale, f"stale generated files (run `make protos`): {stale}"


def test_descriptor_set_has_every_service_and_the_http_annotation():
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(
        (ROOT / "generated" / "superwav2lip_descriptor.pb").read_bytes()
    )
    services = {f"{f.package}.{s.name}" for f in descriptors.file for s in f.service}
    assert {"superwav2lip.detector.v1.Detector", "superwav2lip.lipsync.v1.LipSync",
            "superwav2lip.enhancer.v1.Enhancer", "superwav2lip.gateway.v1.Gateway"} <= services
    # --include_imports: Envoy needs the google.api files inside the set.
    assert "google/api/annotations.proto" in {f.name for f in descriptors.file}
    gateway = next(f for f in descriptors.file if f.package == "superwav2lip.gateway.v1")
    method = next(m for m in gateway.service[0].method if m.name == "GenerateVideo")
    assert method.output_type == ".google.api.HttpBody"
    assert method.options.ByteSize() > 0  # carries the google.api.http rule
