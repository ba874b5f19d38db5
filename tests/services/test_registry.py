"""The service registry: its consumers list what it lists, and a toy model service added by following
docs/adding-a-model-service.md alone (in a copy of the repository) starts under `make run`'s launcher."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from superwav2lip_client.services import health

from deploy import settings_catalog
from deploy.docker import images
from service_runtime import registry
from tools import run_stack

from tests.support.paths import ROOT
from tests.support.processes import free_port_block, project_env

# The toy's files, as a developer following the guide writes them (kept as text: they are written into the copy).
TOY = ROOT / "tests" / "fixtures" / "toy_service"
TOY_PROTO, TOY_SERVICE, TOY_CLIENT = ((TOY / name).read_text() for name in ("toy.proto.txt", "service.py.txt",
                                                                             "client.py.txt"))


def test_every_consumer_lists_what_the_registry_lists():
    names = registry.names()
    models = tuple(entry.name for entry in registry.model_services())
    assert names[0] == "gateway" and set(models) == set(names) - {"gateway"}
    assert run_stack.SERVICES == names
    assert [title for title, _ in settings_catalog.SETTINGS][:len(names)] == list(names)
    assert {image.name for image in images.images()} == set(names)
    assert registry.get("detector").configured_models() == ["scrfd_2.5g", "arcface_seed"]


def copy_of_the_repository(target: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_a_toy_model_service_added_by_the_guide_starts_under_the_launcher(tmp_path, dev_models_dir):
    repo = copy_of_the_repository(tmp_path / "repo")
    env = {**project_env(), "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "client")])}
    # 1. The contract, and `make protos`'s generator.
    (repo / "protos/superwav2lip/toy/v1").mkdir(parents=True)
    (repo / "protos/superwav2lip/toy/v1/toy.proto").write_text(TOY_PROTO)
    subprocess.run([sys.executable, "tools/gen_protos.py"], cwd=repo, env=env, check=True, capture_output=True)
    assert (repo / "client/superwav2lip/toy/v1/toy_pb2_grpc.py").is_file()
    # 2. Its model: one already in the manifest. 3. The folder.
    (repo / "services/toy").mkdir()
    (repo / "services/toy/__init__.py").write_text('"""The toy service."""\n')
    (repo / "services/toy/__main__.py").write_text('"""`python -m services.toy`."""\nfrom .service import main\n\nmain()\n')
    (repo / "services/toy/service.py").write_text(TOY_SERVICE)
    # 4. The registry entry.
    registry_file = repo / "service_runtime/registry.py"
    text = registry_file.read_text()
    last = '("model",)),\n)'
    assert text.count(last) == 1
    registry_file.write_text(text.replace(last, '("model",)),\n    ServiceEntry("toy", "services.toy", '
                                                 '"services.toy.service:ToySettings", ("model",)),\n)'))

    base, metrics = free_port_block(5), free_port_block(5)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tools.run_stack", "--services", "toy", "--base-port", str(base), "--metrics-base-port",
         str(metrics), "--models-dir", str(dev_models_dir), "--logs", str(tmp_path / "logs"), "--extra-model-dirs", ""],
        cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = []
    try:
        deadline = time.monotonic() + 120
        for line in launcher.stdout:
            output.append(line)
            if line.startswith("READY") or time.monotonic() > deadline:
                break
        address = f"127.0.0.1:{base + 4}"  # fifth in the registry
        assert output and output[-1].startswith(f"READY toy {address}"), "".join(output)
        assert any(line.startswith("NOTE") and "wav2lip" in line for line in output)  # its model, from the registry
        assert health(address, "superwav2lip.toy.v1.Toy") == "SERVING"
        reply = subprocess.run([sys.executable, "-c", TOY_CLIENT, address], cwd=repo, env=env, capture_output=True,
                               text=True, timeout=60)
        assert reply.stdout.strip() == "[(3, 0), (0, 3), (5, 0)]", reply.stderr  # the empty item fails alone
    finally:
        launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(timeout=60)
    assert code == 0, "".join(output)


def test_a_service_keeps_the_python_path_it_inherits(tmp_path):
    """On the device the carried wheels are on PYTHONPATH (tools/device/runner.py): every process the launcher
    starts must still find them, after the project's own folders."""
    config = run_stack.StackConfig(base_port=40000, metrics_base_port=41000, logs=tmp_path / "logs",
                                   models_dir=tmp_path / "models", extra_model_dirs=())
    for name in registry.names():
        env = run_stack.service_env(name, config, {"PYTHONPATH": "/tmp/swl-site"})
        assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), str(ROOT / "client"), "/tmp/swl-site"]
