"""The device bundle (parts, manifest, checked join) and the device runner's whole path with --providers cpu."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tools.device import bundle, parts, runner

from tests.support.paths import ROOT


def make_archive(path: Path, size: int) -> Path:
    path.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    return path


def built(tmp_path: Path, size: int = 10_000, limit: int = 3_000) -> tuple[dict, Path]:
    archive = make_archive(tmp_path / "a.tar", size)
    out = tmp_path / "parts"
    written = parts.split(archive, out, limit)
    manifest = parts.write_manifest(archive, written, out)
    return json.loads(manifest.read_text()), out


def test_parts_stay_under_the_limit_and_the_manifest_describes_them(tmp_path):
    manifest, out = built(tmp_path)
    assert [p["size"] for p in manifest["parts"]] == [3000, 3000, 3000, 1000]
    assert manifest["size"] == 10_000
    for p in manifest["parts"]:
        assert parts.sha256_file(out / p["name"]) == p["sha256"]
    assert len({p["sha256"] for p in manifest["parts"]}) > 1


def test_join_restores_the_archive_byte_for_byte(tmp_path):
    manifest, out = built(tmp_path)
    joined = parts.join(manifest, out, tmp_path / "joined.tar")
    assert joined.read_bytes() == (tmp_path / "a.tar").read_bytes()
    assert parts.sha256_file(joined) == manifest["sha256"]


def test_a_missing_part_is_refused_by_name(tmp_path):
    manifest, out = built(tmp_path)
    (out / manifest["parts"][2]["name"]).unlink()
    with pytest.raises(parts.BundleError, match=r"missing part\(s\) a\.tar\.part02"):
        parts.join(manifest, out, tmp_path / "joined.tar")
    assert not (tmp_path / "joined.tar").exists()


def test_an_altered_part_is_refused_even_at_the_same_size(tmp_path):
    manifest, out = built(tmp_path)
    victim = out / manifest["parts"][1]["name"]
    data = bytearray(victim.read_bytes())
    data[100] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(parts.BundleError, match=r"part a\.tar\.part01 has sha256 .* altered"):
        parts.join(manifest, out, tmp_path / "joined.tar")
    victim.write_bytes(bytes(data[:-1]))
    with pytest.raises(parts.BundleError, match="truncated or altered"):
        parts.verify_part(manifest, victim)


def test_a_whole_archive_that_differs_is_refused(tmp_path):
    manifest, out = built(tmp_path)
    manifest["sha256"] = "0" * 64
    with pytest.raises(parts.BundleError, match="not this bundle's"):
        parts.join(manifest, out, tmp_path / "joined.tar")
    assert not (tmp_path / "joined.tar").exists()


def test_the_wheel_list_comes_from_pyproject_minus_the_image():
    requirements = bundle.project_requirements()
    names = {bundle.requirement_name(r) for r in requirements}
    assert {"onnxruntime-gpu", "av", "librosa", "redis", "soxr", "grpcio-reflection", "onnx"} <= names
    assert "onnxruntime" not in names  # the CPU build must never travel beside the GPU one
    assert bundle.ORT_GPU in requirements
    image = bundle.image_packages()
    assert {"numpy", "scipy", "torch", "onnxruntime"} <= image and "av" not in image
    resolved = [{"name": n} for n in ("numpy", "av", "grpcio", "onnxruntime-gpu", "scipy", "protobuf", "redis")]
    assert [d["name"] for d in bundle.to_carry(resolved, image)] == ["av", "grpcio", "onnxruntime-gpu", "protobuf",
                                                                      "redis"]
    assert "scipy" in [d["name"] for d in bundle.to_carry(resolved, image, {"scipy"})]


def probe_wheel(folder: Path) -> Path:
    """A minimal installable wheel whose module says where it was imported from."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "swl_probe-0.1-py3-none-any.whl"
    info = "swl_probe-0.1.dist-info"
    files = {"swl_probe/__init__.py": "WHERE = __file__\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: swl-probe\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return path


def tiny_bundle(tmp_path: Path) -> Path:
    """A real bundle (lock, wheel, model folder) cut into three parts, as make device-bundle writes them."""
    build = tmp_path / "build"
    wheel = probe_wheel(build / "wheels")
    archive = bundle.pack(build / "swl-device-bundle.tar", [wheel], [], [{"name": "swl-probe"}])
    out = tmp_path / "device-bundle"
    written = parts.split(archive, out, archive.stat().st_size // 3 + 1)
    assert len(written) == 3
    return parts.write_manifest(archive, written, out)


def run_runner(manifest: Path, part: Path | None, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """One device call: the runner with this part (None: a call that carries none, as the stack call does)."""
    carried = ["--part", str(part)] if part else []
    return subprocess.run([sys.executable, "-m", "tools.device.runner", "--manifest", str(manifest), *carried,
                           "--store", str(tmp_path / "store"), "--target", str(tmp_path / "site"),
                           "--out", str(tmp_path / "out"), *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)


def test_runner_refuses_an_altered_part_before_storing_it(tmp_path):
    manifest = tiny_bundle(tmp_path)
    part = sorted(manifest.parent.glob("*.part*"))[0]
    part.write_bytes(b"\0" + part.read_bytes()[1:])
    result = run_runner(manifest, part, tmp_path, "--providers", "cpu")
    assert result.returncode == 3, result.stderr
    assert "altered" in result.stderr and part.name in result.stderr
    assert not (tmp_path / "store" / part.name).exists()
    assert "altered" in json.loads((tmp_path / "out" / "runner.json").read_text())["error"]


def test_runner_whole_path_on_cpu(tmp_path, dev_models_dir):
    """Three calls, one part each: the first two wait, the third joins, installs privately and measures the
    models; a fourth call with no part measures the stack end to end (generated models, short clips)."""
    manifest = tiny_bundle(tmp_path)
    cpu = ("--providers", "cpu", "--require-from-target", "swl_probe", "--models-dir", str(dev_models_dir),
           "--allow-dev-models", "--batches", "1,2", "--min-seconds", "0.01",
           "--models", "wav2lip_gan,scrfd_2.5g,gfpgan_v1.4")
    for i, part in enumerate(sorted(manifest.parent.glob("*.part*"))):
        result = run_runner(manifest, part, tmp_path, *cpu)
        assert result.returncode == 0, result.stdout + result.stderr
        status = json.loads((tmp_path / "out" / "runner.json").read_text())
        assert len(status["missing"]) == 2 - i
    assert status["installed"] == ["swl-probe"]
    assert (tmp_path / "site" / "swl_probe" / "__init__.py").is_file()
    result = json.loads((tmp_path / "out" / "measure.json").read_text())
    env = result["environment"]
    assert Path(env["from_target"]["swl_probe"]).is_relative_to((tmp_path / "site").resolve())
    assert "CPUExecutionProvider" in env["providers"] and "TensorRT is not installed" in env["tensorrt"]
    assert {(r["model"], r["batch"]) for r in result["gpu_check"]} >= {("wav2lip_gan", 1), ("wav2lip_gan", 8)}
    assert all(r["ok"] and r["provider"] == "CPUExecutionProvider" for r in result["gpu_check"])
    rows = {(r["model"], r["precision"], r["io_binding"], r["batch"]): r for r in result["throughput"]}
    for precision in ("fp32", "fp16"):
        for binding in ("on", "off"):
            assert rows[("wav2lip_gan", precision, binding, 2)]["items_per_s"] > 0
            assert rows[("wav2lip_gan", precision, binding, 1)]["bound"] == (binding == "on")
            assert rows[("gfpgan_v1.4", precision, binding, 1)]["fixed_batch"]
    assert ("gfpgan_v1.4", "fp32", "on", 2) not in rows  # a fixed batch of 1 is measured at 1 only
    assert "| wav2lip_gan | fp16 | on | 2 |" in (tmp_path / "out" / "measure.md").read_text()

    result = run_runner(manifest, None, tmp_path, "--providers", "cpu", "--measure", "stack", "--dev-models",
                        "--seconds", "0.4", "--clients", "1", "--steps", "fresh,clients")
    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads((tmp_path / "out" / "runner.json").read_text())
    assert (status["measure"], status["measure_rc"], status["missing"]) == ("stack", 0, [])
    stack = json.loads((tmp_path / "out" / "stack.json").read_text())
    assert stack["environment"]["service_env"]["SWL_LIPSYNC_PROVIDERS"] == "cpu"
    fresh = stack["fresh"]
    assert fresh["real_time_factor"] == pytest.approx(0.4 / fresh["wall_s"])
    assert fresh["wall_enhanced_s"] > 0 and fresh["gateway_cpu_s_per_frame"] > 0
    assert {"decode", "detect", "lipsync", "paste", "encode"} <= set(fresh["gateway_stage_busy_s_per_frame"])
    assert fresh["gateway_stage_busy_s_per_frame"]["encode"] > 0
    runs = stack["clients"]["runs"]
    assert [(r["clients"], r["gpu_inference_s_per_frame"] > 0) for r in runs["batched"] + runs["seed lock"]] == \
        [(1, True), (1, True)]
    ratio = stack["clients"]["replica_ratio"]
    assert ratio["gateway_cores_per_gpu"] == pytest.approx(
        runs["batched"][0]["gateway_cpu_s_per_frame"] / runs["batched"][0]["gpu_inference_s_per_frame"])
    assert ratio["gateway_replicas_per_gpu"] >= 1
    assert stack["skipped"] == ["seed: not asked for (--steps)"]
    assert "batched over the lock at 1 clients" in (tmp_path / "out" / "stack.md").read_text()


def test_the_stack_measurement_turns_the_seed_comparison_into_its_rows(monkeypatch, tmp_path):
    """The seed step's own code: bench.seed.measure (which tests/tools/test_bench.py runs for real) is a fake here."""
    from bench import seed
    from tools.device import stack

    calls = []

    def measure(models, seconds, enhance, repeats, process_repeats, work):
        calls.append((seconds, enhance, repeats, process_repeats))
        return seed.Row(enhance, seconds, [{"total": 9.0, "startup": 8.0, "request": 1.0}], 20.0, 0.9, [0.5, 0.7])

    monkeypatch.setattr(seed, "measure", measure)
    rows = stack.seed_step(tmp_path, 5.0, 2.0, tmp_path)
    assert calls == [(5.0, False, 2, 1), (2.0, True, 2, 1)]
    assert rows[1] == {"enhance": True, "seconds": 2.0, "process_s": 9.0, "process_startup_s": 8.0,
                       "resident_startup_s": 20.0, "resident_first_s": 0.9, "resident_steady_s": 0.6,
                       "ratio": 15.0}
    text = stack.markdown({"environment": {"provider": "cuda", "cores": 16, "gpu": "H200", "models": "m",
                                           "seconds": 5.0}, "seed": rows, "skipped": []})
    assert "| GFPGAN v1.4 | 2 | 9.00 | 8.00 | 0.90 | 0.60 | 15.00 |" in text


def test_a_call_without_a_part_on_a_cold_machine_names_the_parts_to_carry_again(tmp_path):
    manifest = tiny_bundle(tmp_path)
    result = run_runner(manifest, None, tmp_path, "--providers", "cpu", "--measure", "stack")
    assert result.returncode == 3
    assert "went cold" in result.stderr and "swl-device-bundle.tar.part00" in result.stderr


def test_the_replica_ratio_assumes_the_gateway_deployment_cpu_limit():
    import yaml

    from tools.device import stack

    deployment = yaml.safe_load((ROOT / "deploy/k8s/base/gateway/deployment.yaml").read_text())
    container, = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway"]
    assert int(container["resources"]["limits"]["cpu"]) == stack.GATEWAY_CORES


def test_measurement_refuses_onnxruntime_from_outside_the_target(tmp_path):
    """On the device the image's CPU onnxruntime must not win the import: the measurement says so and stops."""
    result = subprocess.run([sys.executable, "-m", "tools.device.measure", "--providers", "cpu", "--out",
                             str(tmp_path), "--target", str(tmp_path / "site"), "--require-from-target",
                             "onnxruntime"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 4
    assert "not imported from the private target" in json.loads((tmp_path / "measure.json").read_text())["error"]


def test_nvidia_lib_folders_are_found_in_site_packages(tmp_path, monkeypatch):
    for lib in ("nvidia/cudnn/lib", "nvidia/cu13/lib", "nvidia/empty/lib"):
        (tmp_path / lib).mkdir(parents=True)
    (tmp_path / "nvidia/cudnn/lib/libcudnn.so.9").write_bytes(b"")
    (tmp_path / "nvidia/cu13/lib/libcudart.so.13").write_bytes(b"")
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    monkeypatch.setattr(runner.site, "getsitepackages", lambda: [])
    found = runner.nvidia_lib_dirs()
    assert found == [str(tmp_path / "nvidia/cu13/lib"), str(tmp_path / "nvidia/cudnn/lib")]
    env = runner.measurement_env(tmp_path / "site", found, tmp_path / "unpacked")
    assert env["PYTHONPATH"].split(":")[0] == str(tmp_path / "site")
    assert env["SWL_SHARED_DIR"] == str(tmp_path / "unpacked")  # the carried models/ and media/
    assert env["LD_LIBRARY_PATH"].startswith(str(tmp_path / "nvidia/cu13/lib"))


def test_record_writes_the_gpu_section_once_with_the_device_provenance(tmp_path):
    from tools.device import record

    env = {"measured_at": "2026-12-01 10:00 UTC", "cores": 16, "gpu": "NVIDIA H200, 580.159.04, 143771 MiB",
           "onnxruntime": "1.31.1", "device": "GPU", "providers": ["CUDAExecutionProvider"],
           "tensorrt": "TensorRT is not installed"}
    rows = [{"model": "wav2lip_gan", "precision": "fp16", "io_binding": "on", "batch": 128, "fixed_batch": False,
             "items_per_s": 2500.0}]
    (tmp_path / "m.json").write_text(json.dumps({"environment": env, "gpu_check": [], "throughput": rows,
                                                 "skipped": []}))
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n<!-- bench:x -->\n## other\n<!-- /bench:x -->\n")
    record.record(tmp_path / "m.json", results)
    record.record(tmp_path / "m.json", results)
    text = results.read_text()
    assert text.count("<!-- bench:gpu -->") == 1 and "## other" in text
    assert "on 16 cores, GPU: NVIDIA H200" in text and "| wav2lip_gan | fp16 | on | 128 | 2500.0 |" in text
    stack = {"environment": {**env, "provider": "cuda", "models": "stand-ins", "seconds": 5.0}, "skipped": [],
             "fresh": {"wall_s": 0.8, "real_time_factor": 6.25, "wall_enhanced_s": 2.0,
                       "real_time_factor_enhanced": 2.5, "gateway_stage_busy_s_per_frame": {"encode": 0.002},
                       "gateway_cpu_s_per_frame": 0.03}}
    (tmp_path / "s.json").write_text(json.dumps(stack))
    assert record.record(tmp_path / "s.json", results) == "gpu-stack"
    text = results.read_text()
    assert text.count("<!-- bench:gpu -->") == 1 and text.count("<!-- bench:gpu-stack -->") == 1
    assert "| no enhancer | 0.80 | 6.25 |" in text and "runner --measure stack" in text
    (tmp_path / "bad.json").write_text(json.dumps({"error": "no CUDA"}))
    with pytest.raises(SystemExit, match="refused measurement"):
        record.record(tmp_path / "bad.json", results)
