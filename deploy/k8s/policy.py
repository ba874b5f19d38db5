"""The project's rules for rendered manifests, beyond what the Kubernetes schema checks; each returns problems."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

from deploy.k8s import edge
from deploy.settings_catalog import variable_names

WORKLOADS = {"Deployment", "StatefulSet"}
GRPC_COMPONENTS = {"model-service", "gateway"}  # app.kubernetes.io/component of pods that serve gRPC
GRACE_ENV = re.compile(r"^SWL_[A-Z]+_GRACE_PERIOD_S$")
Objects = list[dict]


def name_of(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def workloads(objects: Objects) -> Iterator[dict]:
    return (obj for obj in objects if obj["kind"] in WORKLOADS)


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def component(workload: dict) -> str | None:
    return workload["spec"]["template"]["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def model_services(objects: Objects) -> Iterator[dict]:
    return (obj for obj in objects if obj["kind"] == "Deployment" and component(obj) == "model-service")


def gpu_limit_problems(objects: Objects, gpu: bool) -> list[str]:
    """On a GPU overlay each model service limits `nvidia.com/gpu` to a positive whole number (the schema also
    takes "one" and 1.5) and runs a GPU image; on a CPU overlay none asks for a GPU."""
    problems = []
    for deployment in model_services(objects):
        for container in pod_spec(deployment)["containers"]:
            limit = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            where = f"{name_of(deployment)} container {container['name']}"
            if not gpu:
                if limit is not None:
                    problems.append(f"{where}: a CPU overlay must not ask for nvidia.com/gpu")
                continue
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                problems.append(f"{where}: nvidia.com/gpu limit must be a positive integer, not {limit!r}")
            if not container["image"].endswith("-gpu"):
                problems.append(f"{where}: a GPU overlay must run the -gpu image, not {container['image']}")
    return problems


def _is_true(context: dict, key: str) -> bool:
    return context.get(key) is True


def container_problems(objects: Objects) -> list[str]:
    """Every container: probes (not init containers, which cannot have them), CPU and memory limits, non-root,
    a read-only root, no privilege escalation, all capabilities dropped; every pod: seccomp RuntimeDefault."""
    problems = []
    for workload in workloads(objects):
        spec = pod_spec(workload)
        pod_security = spec.get("securityContext", {})
        if pod_security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name_of(workload)}: pod seccompProfile must be RuntimeDefault")
        for kind, containers in (("container", spec["containers"]), ("init container", spec.get("initContainers", []))):
            for container in containers:
                where = f"{name_of(workload)} {kind} {container['name']}"
                security = container.get("securityContext", {})
                if kind == "container":
                    problems += [f"{where}: no {probe}" for probe in ("readinessProbe", "livenessProbe")
                                 if probe not in container]
                limits = container.get("resources", {}).get("limits", {})
                problems += [f"{where}: no {resource} limit" for resource in ("cpu", "memory") if resource not in limits]
                if not (_is_true(security, "runAsNonRoot") or _is_true(pod_security, "runAsNonRoot")):
                    problems.append(f"{where}: must run as non-root (runAsNonRoot: true)")
                if not _is_true(security, "readOnlyRootFilesystem"):
                    problems.append(f"{where}: root file system must be read-only")
                if security.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{where}: allowPrivilegeEscalation must be false")
                if security.get("capabilities", {}).get("drop") != ["ALL"]:
                    problems.append(f"{where}: must drop ALL capabilities")
    return problems


def grpc_port_problems(objects: Objects) -> list[str]:
    """Every port of a Service in front of gRPC pods is named `grpc` (the name the probes and Envoy rely on)."""
    components = {(obj["metadata"]["name"], component(obj)) for obj in workloads(objects)}
    grpc_apps = {name for name, kind in components if kind in GRPC_COMPONENTS}
    problems = []
    for service in (obj for obj in objects if obj["kind"] == "Service"):
        if service["spec"].get("selector", {}).get("app.kubernetes.io/name") not in grpc_apps:
            continue
        problems += [f"{name_of(service)}: gRPC port {port.get('port')} must be named grpc, not {port.get('name')!r}"
                     for port in service["spec"]["ports"] if port.get("name") != "grpc"]
    return problems


# Images with a known remote code execution, by name: the first fixed patch of each release line.
VULNERABLE = {
    "redis": ({(6, 2): 20, (7, 2): 11, (7, 4): 6, (8, 0): 4, (8, 2): 2},
              "CVE-2025-49844 (remote code execution through Redis's Lua)"),
}


def image_problems(objects: Objects) -> list[str]:
    """Every image names an explicit tag (or digest) other than `latest`, and none is a known-vulnerable one."""
    problems = []
    for workload in workloads(objects):
        spec = pod_spec(workload)
        for container in spec["containers"] + spec.get("initContainers", []):
            image = container["image"]
            if "@sha256:" in image:
                continue
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else None
            where = f"{name_of(workload)} container {container['name']}: image {image}"
            if tag in (None, "latest"):
                problems.append(f"{where} must name a version tag, not latest")
            elif (known := vulnerability(image.rsplit(":", 1)[0], tag)) is not None:
                problems.append(f"{where} has {known}; use a fixed release")
    return problems


def vulnerability(name: str, tag: str) -> str | None:
    """The known vulnerability of this image's release, if its release line has a fix it predates."""
    if name.rsplit("/", 1)[-1] not in VULNERABLE:
        return None
    fixed, what = VULNERABLE[name.rsplit("/", 1)[-1]]
    numbers = re.match(r"(\d+)\.(\d+)\.(\d+)", tag)
    if numbers is None:
        return None
    major, minor, patch = map(int, numbers.groups())
    first_fixed = fixed.get((major, minor))
    return what if first_fixed is not None and patch < first_fixed else None


def _prestop_seconds(container: dict) -> float:
    return container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)


def _grace_seconds(container: dict) -> float:
    """The service's own drain time, from its SWL_*_GRACE_PERIOD_S (10 s when not set)."""
    values = [float(env["value"]) for env in container.get("env", []) if GRACE_ENV.match(env["name"]) and "value" in env]
    return values[0] if values else 10.0


def rollout_problems(objects: Objects) -> list[str]:
    """Deployments roll with maxUnavailable 0, have a PodDisruptionBudget, and give a stopping pod more time than
    its preStop sleep plus the service's own grace period."""
    budgets = {obj["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/name")
               for obj in objects if obj["kind"] == "PodDisruptionBudget"}
    problems = []
    for deployment in (obj for obj in objects if obj["kind"] == "Deployment"):
        strategy = deployment["spec"].get("strategy", {})
        unavailable = strategy.get("rollingUpdate", {}).get("maxUnavailable")
        if strategy.get("type") != "RollingUpdate" or unavailable not in (0, "0%"):
            problems.append(f"{name_of(deployment)}: must roll out with RollingUpdate and maxUnavailable: 0")
        if deployment["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/name") not in budgets:
            problems.append(f"{name_of(deployment)}: no PodDisruptionBudget selects it")
        spec = pod_spec(deployment)
        termination = spec.get("terminationGracePeriodSeconds", 30)
        for container in spec["containers"]:
            needed = _prestop_seconds(container) + _grace_seconds(container)
            if termination <= needed:
                problems.append(f"{name_of(deployment)}: terminationGracePeriodSeconds {termination} must exceed "
                                f"preStop + grace period ({needed:g} s)")
    return problems


def _gateway_upload_mb(objects: Objects) -> str | None:
    for deployment in (obj for obj in objects if obj["kind"] == "Deployment" and obj["metadata"]["name"] == "gateway"):
        for env in pod_spec(deployment)["containers"][0].get("env", []):
            if env["name"] == "SWL_GATEWAY_MAX_UPLOAD_MB":
                return env.get("value")
    return None


def envoy_config_problems(objects: Objects) -> list[str]:
    """The Envoy ConfigMap holds exactly what deploy/envoy/render.py renders for Kubernetes, and its body limit
    comes from the same upload limit the gateway enforces."""
    maps = [obj for obj in objects if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].startswith("envoy-config")]
    if len(maps) != 1:
        return [f"expected one envoy-config ConfigMap, found {len(maps)}"]
    problems = []
    shipped = maps[0].get("data", {}).get("envoy.json", "")
    if shipped not in (edge.rendered(), edge.rendered(edge.K8S_EDGE_TLS)):  # without TLS, or with components/edge-tls
        problems.append(f"{name_of(maps[0])}: envoy.json differs from the rendering (python -m deploy.k8s.edge)")
    if _gateway_upload_mb(objects) != str(edge.K8S_EDGE.max_upload_mb):
        problems.append(f"Deployment/gateway: SWL_GATEWAY_MAX_UPLOAD_MB must be {edge.K8S_EDGE.max_upload_mb}, "
                        "the limit Envoy's config is rendered with")
    return problems


def settings_problems(objects: Objects) -> list[str]:
    """An SWL_ variable no settings class declares is a typo or a leftover, and would be silently ignored."""
    known = variable_names()
    return [f"{name_of(obj)}: {env['name']} is not a setting of this project (see docs/settings.md)"
            for obj in workloads(objects) for c in pod_spec(obj)["containers"] for env in c.get("env", [])
            if env["name"].startswith("SWL_") and env["name"] not in known]


# The gateway's key settings (gateway/service.py GatewaySettings; settings_problems proves each is one).
TENANTS_FILE, API_KEYS, ALLOW_ANONYMOUS = ("SWL_GATEWAY_TENANTS_FILE", "SWL_GATEWAY_API_KEYS",
                                           "SWL_GATEWAY_ALLOW_ANONYMOUS")
FALSE_VALUES = {"0", "false", "no", "off"}  # how service_runtime/settings.py reads a false bool
KEYS_HINT = (f"give it {TENANTS_FILE} in the required Secret gateway-tenants mounted as a directory, or "
             f"{API_KEYS} from a required Secret (deploy/k8s/README.md#api-keys)")


def _secret_volume_problem(path: str, container: dict, spec: dict) -> str | None:
    """Why the tenants file at `path` may be missing or never updated, or None: it must lie in a volume of a
    required Secret mounted as a directory (a subPath mount never sees the Secret's updates)."""
    mounts = [m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    if not mounts:
        return f"{TENANTS_FILE} {path} is on no mounted volume: mount the tenants Secret's folder there"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    if "subPath" in mount or "subPathExpr" in mount:
        return (f"the tenants volume {mount['name']} is mounted with a subPath, which the kubelet never updates: "
                "keys would not rotate; mount the folder")
    volume: dict = next((v for v in spec.get("volumes", []) if v["name"] == mount["name"]), {})
    secret = volume.get("secret")
    if secret is None:
        return f"{TENANTS_FILE} {path} is on volume {mount['name']}, which is not a Secret volume"
    if secret.get("optional") is True:
        return (f"Secret {secret.get('secretName')} (volume {mount['name']}) is optional: without it the pod would "
                "start with no tenants file; remove optional")
    inside = path[len(mount["mountPath"].rstrip("/")) + 1:]
    items = secret.get("items")
    if items is not None and inside not in {item["path"] for item in items}:
        return f"{TENANTS_FILE} {path}: no item of Secret {secret.get('secretName')} is mounted as {inside}"
    return None


def _api_keys_problem(entry: dict) -> str | None:
    if "valueFrom" not in entry:
        return f"{API_KEYS} is written in the manifest: put the keys in a Secret (secretKeyRef)"
    reference = entry["valueFrom"].get("secretKeyRef")
    if reference is None:
        return f"{API_KEYS} must come from a Secret (secretKeyRef)"
    if reference.get("optional") is True:
        return (f"{API_KEYS} comes from Secret {reference.get('name')} key {reference.get('key')}, which is optional: "
                "without it the gateway would have no keys; remove optional")
    return None


def anonymous_access_problems(objects: Objects) -> list[str]:
    """The gateway never serves without keys: SWL_GATEWAY_ALLOW_ANONYMOUS is not set (or set to false), and
    SWL_GATEWAY_TENANTS_FILE lies in a required Secret mounted as a directory, or SWL_GATEWAY_API_KEYS comes from a
    required Secret. envFrom is refused on the gateway: what it sets cannot be seen here."""
    gateways = [w for w in workloads(objects) if component(w) == "gateway"]
    if not gateways:
        return ["no gateway workload (app.kubernetes.io/component: gateway) to check for API keys"]
    problems = []
    for workload in gateways:
        spec = pod_spec(workload)
        containers = [c for c in spec["containers"] if c["name"] == "gateway"
                      or any(e["name"].startswith("SWL_GATEWAY_") for e in c.get("env", []))]
        if not containers:
            problems.append(f"{name_of(workload)}: no gateway container to check for API keys")
        for container in containers:
            where = f"{name_of(workload)} container {container['name']}"
            env = {entry["name"]: entry for entry in container.get("env", [])}  # the last of a name wins
            if container.get("envFrom"):
                problems.append(f"{where}: envFrom may set {ALLOW_ANONYMOUS} unseen by this check; set the "
                                "gateway's settings one by one under env")
            if ALLOW_ANONYMOUS in env:
                entry = env[ALLOW_ANONYMOUS]
                value = entry.get("value", "")
                if "valueFrom" in entry or value.strip().lower() not in FALSE_VALUES:
                    shown = " from a reference" if "valueFrom" in entry else f"={value!r}"
                    problems.append(f"{where}: {ALLOW_ANONYMOUS}{shown} lets the gateway serve calls without a key; "
                                    f"remove it and {KEYS_HINT}")
            found: list[str] = []  # problems with the key sources
            sources = 0
            if TENANTS_FILE in env:
                entry = env[TENANTS_FILE]
                if "valueFrom" in entry:
                    found.append(f"{TENANTS_FILE} must be a literal path into the mounted tenants Secret")
                elif entry.get("value", "").strip():
                    problem = _secret_volume_problem(entry["value"].strip(), container, spec)
                    found += [problem] if problem else []
                    sources += problem is None
            if API_KEYS in env:
                problem = _api_keys_problem(env[API_KEYS])
                found += [problem] if problem else []
                sources += problem is None
            problems += [f"{where}: {problem}" for problem in found]
            if not sources and not found:
                problems.append(f"{where}: no tenants file or API keys, so the gateway would serve without keys or "
                                f"not start; {KEYS_HINT}")
    return problems


# ---- Redis as a network service (issue #26): a password from a Secret, a bounded memory that never evicts jobs;
# plans in a Redis of their own that evicts and persists nothing

REDIS_URL, PLAN_CACHE_REDIS_URL = "SWL_GATEWAY_REDIS_URL", "SWL_GATEWAY_PLAN_CACHE_REDIS_URL"
REDIS_URL_KEYS = {REDIS_URL: "url", PLAN_CACHE_REDIS_URL: "plans_url"}  # their keys in the Secret redis-auth
PLAN_CACHE_REDIS = "redis-plans"  # the app.kubernetes.io/name of the plan cache's Redis, the only one that may evict
REDIS_IMAGES = {"redis", "valkey"}
REDIS_HINT = "deploy/k8s/README.md#redis"
ENV_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
REDIS_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}
QUANTITY_UNITS = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
MAXMEMORY_SHARE = 0.75  # of the container's memory limit: the rest is for the AOF rewrite's fork and client buffers


def redis_containers(objects: Objects) -> Iterator[tuple[dict, dict]]:
    for workload in workloads(objects):
        for container in pod_spec(workload)["containers"]:
            if container["image"].rsplit("/", 1)[-1].split(":")[0].split("@")[0] in REDIS_IMAGES:
                yield workload, container


def _option(arguments: list[str], flag: str) -> str | None:
    """The value after `flag` in a command line, or None."""
    return next((arguments[i + 1] for i in range(len(arguments) - 1) if arguments[i] == flag), None)


def _bytes(text: str, units: dict[str, int]) -> int | None:
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", text.strip())
    unit = match.group(2) if match else ""
    if match is None or (unit if unit in units else unit.lower()) not in units:
        return None
    return int(match.group(1)) * units[unit if unit in units else unit.lower()]


def _secret_reference_problem(entry: dict | None, what: str) -> str | None:
    """Why an env entry is not a value from a required Secret, or None."""
    if entry is None:
        return f"{what} is set from no env variable"
    reference = entry.get("valueFrom", {}).get("secretKeyRef")
    if reference is None:
        return f"{what} is written in the manifest: take it from a Secret (secretKeyRef; {REDIS_HINT})"
    if reference.get("optional") is True:
        return f"{what} comes from Secret {reference.get('name')}, which is optional: remove optional"
    return None


def _redis_password_problem(arguments: list[str], env: dict[str, dict]) -> str | None:
    password = _option(arguments, "--requirepass")
    if password is None:
        return (f"Redis runs without a password: add --requirepass $(REDIS_PASSWORD) with REDIS_PASSWORD from the "
                f"required Secret redis-auth ({REDIS_HINT})")
    reference = ENV_REFERENCE.fullmatch(password)
    if reference is None:
        return f"the Redis password is written in the manifest: use $(REDIS_PASSWORD) from a Secret ({REDIS_HINT})"
    return _secret_reference_problem(env.get(reference.group(1)), f"the Redis password ({reference.group(1)})")


def is_plan_cache(workload: dict) -> bool:
    return workload["spec"]["template"]["metadata"].get("labels", {}).get("app.kubernetes.io/name") == PLAN_CACHE_REDIS


def _eviction_problem(arguments: list[str], plan_cache: bool) -> str | None:
    policy = _option(arguments, "--maxmemory-policy")
    if plan_cache and not (policy or "").startswith("allkeys-"):
        return (f"--maxmemory-policy {policy or '(default)'} must be an allkeys-* policy (allkeys-lru): a full plan "
                f"cache must make room for new plans ({REDIS_HINT})")
    if not plan_cache and policy != "noeviction":
        return (f"--maxmemory-policy {policy or '(default)'} must be noeviction: job leases, finished jobs and "
                f"cancel flags carry TTLs, so any eviction could drop them ({REDIS_HINT})")
    return None


def _persistence_problems(arguments: list[str]) -> list[str]:
    """The plan cache keeps nothing on disk: Redis snapshots by default, and on a read-only root a failed
    snapshot makes it refuse every write."""
    save, appendonly = _option(arguments, "--save"), _option(arguments, "--appendonly")
    problems = []
    if save != "":
        shown = "(default)" if save is None else repr(save)
        problems.append(f'--save {shown} persists the plan cache: set --save "" (a cache needs no snapshot, and a '
                        f"failed one makes Redis refuse writes; {REDIS_HINT})")
    if appendonly not in (None, "no"):
        problems.append(f"--appendonly {appendonly} persists the plan cache: set --appendonly no ({REDIS_HINT})")
    return problems


def _redis_memory_problems(arguments: list[str], container: dict, plan_cache: bool) -> list[str]:
    problems = [p for p in [_eviction_problem(arguments, plan_cache)] if p]
    maxmemory = _option(arguments, "--maxmemory")
    limit = _bytes(str(container.get("resources", {}).get("limits", {}).get("memory", "")), QUANTITY_UNITS)
    wanted = _bytes(maxmemory, REDIS_UNITS) if maxmemory is not None else None
    if not wanted or limit is None:
        problems.append(f"--maxmemory {maxmemory or '(none)'}: set it (e.g. 1gb) with a memory limit, or Redis grows "
                        "until the kernel kills it and every job with it")
    elif wanted > MAXMEMORY_SHARE * limit:
        problems.append(f"--maxmemory {maxmemory} exceeds {MAXMEMORY_SHARE:.0%} of the memory limit: the append-only "
                        "file's rewrite (a fork) and client buffers need the rest")
    return problems


def redis_problems(objects: Objects) -> list[str]:
    """Every Redis runs with a password from a required Secret and a maxmemory within its limit; the plan cache's
    (known by its label) evicts any key and persists nothing, every other one never evicts."""
    problems = []
    for workload, container in redis_containers(objects):
        arguments = [str(a) for a in container.get("command", []) + container.get("args", [])]
        env = {entry["name"]: entry for entry in container.get("env", [])}
        plan_cache = is_plan_cache(workload)
        found = [_redis_password_problem(arguments, env), *_redis_memory_problems(arguments, container, plan_cache),
                 *(_persistence_problems(arguments) if plan_cache else [])]
        problems += [f"{name_of(workload)} container {container['name']}: {p}" for p in found if p]
    return problems


def _redis_url_problem(variable: str, entry: dict, in_cluster: bool) -> str | None:
    """Why this Redis URL entry may leak its password or fail to log in, or None."""
    if "value" not in entry:
        return _secret_reference_problem(entry, variable)
    try:
        password = urlsplit(entry["value"]).password
    except ValueError:
        password = None
    if password:
        return (f"{variable} holds a password in the manifest: put the URL in a Secret and take it with "
                f"secretKeyRef ({REDIS_HINT})")
    if in_cluster:
        return (f"{variable} has no password, and this overlay's Redis requires one: take the URL from the Secret "
                f"redis-auth, key {REDIS_URL_KEYS[variable]} ({REDIS_HINT})")
    return None


def redis_url_problems(objects: Objects) -> list[str]:
    """The gateway's Redis URLs carry the password, so they come from a required Secret: a literal URL may name
    no password, and cannot reach a Redis of this overlay (which has one). Where the plan cache has its own Redis,
    the gateway is pointed at it."""
    redis_workloads = [workload for workload, _ in redis_containers(objects)]
    plan_caches = [name_of(w) for w in redis_workloads if is_plan_cache(w)]
    problems = []
    for workload in (w for w in workloads(objects) if component(w) == "gateway"):
        for container in pod_spec(workload)["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            where = f"{name_of(workload)} container {container['name']}"
            for variable in REDIS_URL_KEYS:
                if variable in env and (problem := _redis_url_problem(variable, env[variable],
                                                                      bool(redis_workloads))) is not None:
                    problems.append(f"{where}: {problem}")
            if plan_caches and container["name"] == "gateway" and PLAN_CACHE_REDIS_URL not in env:
                problems.append(f"{where}: no {PLAN_CACHE_REDIS_URL}, though {plan_caches[0]} runs the plan cache: "
                                "plans would fill the job Redis, which never evicts; take it from the Secret "
                                f"redis-auth, key {REDIS_URL_KEYS[PLAN_CACHE_REDIS_URL]} ({REDIS_HINT})")
    return problems


# ---- NetworkPolicies: deny by default, then say who may reach each workload

NETWORK_HINT = "deploy/k8s/README.md#network"


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects these labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if not {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}.get(operator, False):
            return False
    return True


def _policy_types(policy: dict) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


# The workloads that cannot work without calling out, and what they call.
MUST_CALL_OUT = {"envoy": "the gateway", "gateway": "the model services and Redis"}


def network_policy_problems(objects: Objects) -> list[str]:
    """Default-deny ingress and egress policies for the namespace; for every workload's pods a policy of their
    own that says who may reach them (without one, the default deny leaves them unreachable); and an egress policy
    for the workloads that must call out (MUST_CALL_OUT). Others need none: a model service or Redis that reaches
    nothing is the point of the default."""
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    namespaces = {w["metadata"].get("namespace") for w in workloads(objects)}
    problems = []
    for namespace in sorted(namespaces, key=str):
        for kind, rules, unlimited in (("Ingress", "ingress", "take connections from anywhere"),
                                       ("Egress", "egress", "connect anywhere")):
            if not any(p["metadata"].get("namespace") == namespace and not p["spec"].get("podSelector")
                       and kind in _policy_types(p) and not p["spec"].get(rules) for p in policies):
                problems.append(f"namespace {namespace}: no default-deny NetworkPolicy (podSelector {{}}, "
                                f"policyTypes [{kind}], no rules): every pod could {unlimited} ({NETWORK_HINT})")
    for workload in workloads(objects):
        labels = workload["spec"]["template"]["metadata"].get("labels", {})

        def selected(kind: str) -> bool:
            return any(p["metadata"].get("namespace") == workload["metadata"].get("namespace")
                       and p["spec"].get("podSelector") and kind in _policy_types(p)
                       and _selects(p["spec"]["podSelector"], labels) for p in policies)

        if not selected("Ingress"):
            problems.append(f"{name_of(workload)}: no NetworkPolicy selects its pods to say who may reach them "
                            f"({NETWORK_HINT})")
        needs = MUST_CALL_OUT.get(labels.get("app.kubernetes.io/name", ""))
        if needs and not selected("Egress"):
            problems.append(f"{name_of(workload)}: no egress NetworkPolicy lets its pods reach {needs}; the default "
                            f"deny leaves them reaching nothing ({NETWORK_HINT})")
    return problems


def all_problems(objects: Objects, gpu: bool) -> list[str]:
    checks: list[Callable[[Objects], list[str]]] = [container_problems, grpc_port_problems, image_problems,
                                                    rollout_problems, envoy_config_problems, settings_problems,
                                                    anonymous_access_problems, redis_problems, redis_url_problems,
                                                    network_policy_problems]
    return gpu_limit_problems(objects, gpu) + [problem for check in checks for problem in check(objects)]
