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

from .conftest import ROOT, free_port_block, project_env

TOY_PROTO = """// A toy model service: the size of each item, refused for an empty one.
syntax = "proto3";

package superwav2lip.toy.v1;

import "google/rpc/status.proto";

service Toy {
  rpc Measure(MeasureRequest) returns (MeasureResponse);
}

message MeasureRequest {
  repeated bytes items = 1;
}

message Measured {
  int32 size = 1;
  google.rpc.Status error = 2;
}

message MeasureResponse {
  repeated Measured results = 1;
}
"""

TOY_SERVICE = '''"""Toy service start-up: settings, its model and its servicer."""

from __future__ import annotations

import dataclasses

from superwav2lip.toy.v1 import toy_pb2, toy_pb2_grpc

from service_runtime.errors import InvalidArgument
from service_runtime.manifest import load_manifest
from service_runtime.metrics import ServiceMetrics
from service_runtime.rpc import grpc_method, item_status
from service_runtime.server import ModelService, run_service
from service_runtime.settings import ServiceSettings, metrics_port_setting, port_setting, setting


@dataclasses.dataclass(frozen=True)
class ToySettings(ServiceSettings):
    ENV_PREFIX = "SWL_TOY_"
    port: int = port_setting(50055)
    metrics_port: int = metrics_port_setting(9105)
    model: str = setting("wav2lip", "Manifest name of the model it loads.")


def prepare(item: bytes) -> bytes:
    if not item:
        raise InvalidArgument("an empty item has no size")
    return item


class ToyServicer(toy_pb2_grpc.ToyServicer):
    def __init__(self, queue, metrics) -> None:
        self.queue, self.metrics = queue, metrics

    @grpc_method()
    async def Measure(self, request, context):
        outcomes = await self.queue.run_each(request.items, prepare)
        return toy_pb2.MeasureResponse(results=[
            toy_pb2.Measured(error=item_status(o)) if isinstance(o, BaseException) else toy_pb2.Measured(size=o)
            for o in outcomes])


class ToyService(ModelService):
    name = "toy"
    grpc_service_names = (toy_pb2.DESCRIPTOR.services_by_name["Toy"].full_name,)

    def __init__(self, settings: ToySettings, metrics: ServiceMetrics | None = None) -> None:
        super().__init__(settings, metrics or ServiceMetrics())
        self.spec = load_manifest(settings.models_dir).get(settings.model)
        self.servicer = ToyServicer(self.new_queue(settings.model, lambda items: [len(i) for i in items]),
                                    self.metrics)

    def load_models(self):
        return {self.spec.name: self.load(self.spec)}

    def register(self, server) -> None:
        toy_pb2_grpc.add_ToyServicer_to_server(self.servicer, server)


def main() -> None:
    run_service(ToyService(ToySettings.from_env()))
'''

TOY_CLIENT = """
import sys
import grpc
from superwav2lip.toy.v1 import toy_pb2, toy_pb2_grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    reply = toy_pb2_grpc.ToyStub(channel).Measure(toy_pb2.MeasureRequest(items=[b"abc", b"", b"12345"]), timeout=30)
print([(r.size, r.error.code) for r in reply.results])
"""


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
    import argparse

    args = argparse.Namespace(host="127.0.0.1", base_port=40000, metrics_base_port=41000, logs=tmp_path / "logs",
                              models_dir=tmp_path / "models", redis_url="")
    for name in registry.names():
        env = run_stack.service_env(name, args, (), {"PYTHONPATH": "/tmp/swl-site"})
        assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), str(ROOT / "client"), "/tmp/swl-site"]
