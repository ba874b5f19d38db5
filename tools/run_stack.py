"""`make run`: starts Redis, every service of service_runtime/registry.py (gateway, detector, lipsync, enhancer), the
Envoy HTTP edge and the web UI locally, waits until all are ready, stops them on Ctrl-C. tests/support/process_stack.py and
the benchmarks start the same processes through its functions."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from superwav2lip_client.services import health  # noqa: E402
from deploy.envoy import local as local_envoy  # noqa: E402
from deploy.redis import local as local_redis  # noqa: E402
from deploy.envoy.render import EdgeConfig  # noqa: E402
from gateway.service import GatewaySettings  # noqa: E402
from service_runtime.dev_models import write_dev_model  # noqa: E402
from service_runtime.errors import ModelLoadError  # noqa: E402
from service_runtime.manifest import load_manifest  # noqa: E402
from service_runtime.onnx_session import resolve_model_path  # noqa: E402
from service_runtime import registry  # noqa: E402

SERVICES = registry.names()  # ports follow this order from --base-port


def configured_models(services: tuple[str, ...] = SERVICES) -> list[str]:
    return [model for entry in registry.model_services() if entry.name in services
            for model in entry.configured_models()]


def prepare_models(models_dir: Path, extra_dirs: tuple[str, ...], services: tuple[str, ...] = SERVICES) -> list[str]:
    """Generates missing dev models; returns the names that will run on generated weights."""
    manifest = load_manifest(models_dir)
    generated = []
    for name in configured_models(services):
        spec = manifest.get(name)
        try:
            resolve_model_path(models_dir, spec, allow_dev=False, extra_dirs=extra_dirs)
        except ModelLoadError:
            if not (models_dir / "dev" / spec.file).is_file():
                write_dev_model(spec, models_dir / "dev")
            generated.append(name)
    return generated


def address(name: str, args: argparse.Namespace) -> str:
    return f"{args.host}:{args.base_port + SERVICES.index(name)}"


def allocator_env(name: str) -> dict[str, str]:
    """glibc malloc settings that keep a long-running process's memory level (the images set the same):
    two arenas instead of eight per core, and for the model services large buffers (batches, tensors) mapped
    and unmapped instead of left fragmenting the heap. Measured by the soak: without them the enhancer's
    resident memory wandered between 340 and 428 MiB over 300 requests; with them it stayed within 212-220."""
    env = {"MALLOC_ARENA_MAX": "2"}
    if name != "gateway":  # the gateway allocates a frame (2.7 MB at 720p) many times a second: keep the heap
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    return env


# The gateway's key settings: with neither a tenants file nor API keys it refuses to start unless told to serve
# anonymously, which a local stack does.
TENANTS_FILE, API_KEYS, ALLOW_ANONYMOUS = (GatewaySettings.env_name(name)
                                           for name in ("tenants_file", "api_keys", "allow_anonymous"))
ANONYMOUS_NOTE = (f"NOTE: the gateway accepts calls without a key ({ALLOW_ANONYMOUS}=true); set {TENANTS_FILE} "
                  f"(or {API_KEYS}) to require keys.")


def names_keys(env: Mapping[str, str]) -> bool:
    """Whether `env` gives the gateway a tenants file or API keys (then every call but the health check needs a key)."""
    return bool(env.get(TENANTS_FILE, "").strip() or env.get(API_KEYS, "").replace(",", "").strip())


def gateway_needs_no_key(env: Mapping[str, str]) -> bool:
    """Whether a gateway started with `env` serves calls without a key: no tenants file, no API keys and the
    anonymous opt-in on (turned off by hand, the gateway refuses to start instead)."""
    return not names_keys(env) and env.get(ALLOW_ANONYMOUS, "").strip().lower() in {"1", "true", "yes", "on"}


def service_env(name: str, args: argparse.Namespace, extra_dirs: tuple[str, ...],
                base: dict[str, str] | None = None) -> dict[str, str]:
    """The process's environment: `base` (default: this one's) plus the stack's addresses, ports and folders,
    which settings already in `base` override. A gateway given neither SWL_GATEWAY_TENANTS_FILE nor
    SWL_GATEWAY_API_KEYS gets SWL_GATEWAY_ALLOW_ANONYMOUS=true (a local stack serves without keys); given either,
    it passes them on and every call but the health check needs a key."""
    entry = registry.get(name)
    prefix = entry.prefix
    index = SERVICES.index(name)
    env = dict(os.environ if base is None else base)
    # the project's folders first, then what the caller had (the device runner's private wheels)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "client"), *filter(None, [env.get("PYTHONPATH")])])
    env.update({k: v for k, v in allocator_env(name).items() if k not in env})
    env.setdefault(f"{prefix}HOST", args.host)
    env.setdefault(f"{prefix}PORT", str(args.base_port + index))
    env.setdefault(f"{prefix}METRICS_PORT", str(args.metrics_base_port + index))
    if not entry.is_model_service:  # the gateway: its data, Redis and the address of each model service it calls
        env.setdefault(f"{prefix}DATA_DIR", str(args.logs.parent / "data"))
        if getattr(args, "redis_url", ""):
            env.setdefault(f"{prefix}REDIS_URL", args.redis_url)
        if not names_keys(env):
            env.setdefault(ALLOW_ANONYMOUS, "true")
        fields = {f.name for f in dataclasses.fields(entry.settings_class())}
        for other in registry.model_services():
            if f"{other.name}_address" in fields:
                env.setdefault(f"{prefix}{other.name.upper()}_ADDRESS", address(other.name, args))
    else:
        env.setdefault(f"{prefix}MODELS_DIR", str(args.models_dir))
        env.setdefault(f"{prefix}ALLOW_DEV_MODELS", "1")
        env.setdefault(f"{prefix}EXTRA_MODEL_DIRS", ",".join(extra_dirs))
    return env


def start_service(name: str, args: argparse.Namespace, extra_dirs: tuple[str, ...],
                  base_env: dict[str, str] | None = None) -> subprocess.Popen:
    """One service as its own process, logging to <logs>/<name>.log (appended, so a restart keeps the history)."""
    with (args.logs / f"{name}.log").open("a") as log_file:
        return subprocess.Popen([sys.executable, "-m", registry.get(name).module], cwd=ROOT, stderr=log_file, stdout=log_file,
                                env=service_env(name, args, extra_dirs, base_env))


def start_redis(args: argparse.Namespace, persist: bool = False) -> subprocess.Popen | None:
    """redis-server for the plan cache, avatars and jobs (None, with a note, when it is off or not installed);
    `persist` keeps an append-only file, so a restart on the same logs folder finds the state again."""
    args.redis_url = ""
    if not args.redis_port:
        return None
    if local_redis.redis_binary() is None:
        print("NOTE: redis-server is not installed (make deps installs it): the plan cache and jobs stay "
              "inside the gateway process.", flush=True)
        return None
    with (args.logs / "redis.log").open("a") as log:
        process = local_redis.start(args.redis_port, args.logs.parent / "redis", log, persist=persist)
    local_redis.wait_ready(args.redis_port, process)
    args.redis_url = f"redis://127.0.0.1:{args.redis_port}/0"
    print(f"  {'redis':<9} on {args.redis_url}", flush=True)
    return process


def wait_serving(processes: dict[str, subprocess.Popen], addresses: dict[str, str], timeout: float) -> str | None:
    """None when all report SERVING; else the name of the one that died or never became ready."""
    deadline = time.monotonic() + timeout
    waiting = set(processes)
    while waiting and time.monotonic() < deadline:
        for name in sorted(waiting):
            if processes[name].poll() is not None:
                return name
            if health(addresses[name], timeout=1.0) == "SERVING":
                print(f"  {name:<9} SERVING on {addresses[name]}", flush=True)
                waiting.discard(name)
        time.sleep(0.3)
    return min(waiting) if waiting else None


def stop_all(processes: dict[str, subprocess.Popen], redis: subprocess.Popen | None = None, grace: float = 15.0) -> None:
    """SIGTERM to every process (each drains within its grace), then Redis, which draining gateways still use."""
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes.values():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
    if redis is not None:
        stop_all({"redis": redis})


def start_edge(args: argparse.Namespace, processes: dict[str, subprocess.Popen]) -> str:
    """Starts Envoy in front of the gateway (its body limit follows the gateway's upload limit); returns its URL."""
    gateway_host, _, gateway_port = address("gateway", args).rpartition(":")
    config = EdgeConfig(listen_host=args.host, listen_port=args.http_port, admin_port=args.envoy_admin_port,
                        gateway_host=gateway_host, gateway_port=int(gateway_port),
                        max_upload_mb=GatewaySettings.from_env().max_upload_mb,
                        tls_cert=args.tls_cert, tls_key=args.tls_key)
    scheme = "https" if args.tls_cert else "http"
    url = f"{scheme}://{args.host}:{args.http_port}"
    with (args.logs / "envoy.log").open("w") as log:
        processes["envoy"] = local_envoy.start(config, args.logs.parent, log)
    context = None
    if args.tls_cert:
        import ssl
        context = ssl.create_default_context(cafile=args.tls_cert)
    local_envoy.wait_healthy(url, processes["envoy"], args.ready_timeout, context)
    return url


def start_web_ui(args: argparse.Namespace, processes: dict[str, subprocess.Popen]) -> str:
    """Starts the web UI (a client of the gateway); returns its URL once it answers. It is given no API key: each
    visitor signs in with their own, so one shared key from this environment is not passed on."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "client")]),
               GRADIO_ANALYTICS_ENABLED="False")
    if env.pop("SWL_WEBUI_API_KEY", "").strip():
        print("NOTE: SWL_WEBUI_API_KEY is not passed to the web UI: each visitor signs in there with their own key.",
              flush=True)
    env.setdefault("SWL_WEBUI_HOST", args.host)
    env.setdefault("SWL_WEBUI_PORT", str(args.ui_port))
    env.setdefault("SWL_WEBUI_GATEWAY_ADDRESS", address("gateway", args))
    with (args.logs / "webui.log").open("w") as log:
        processes["webui"] = subprocess.Popen([sys.executable, "-m", "webui"], cwd=ROOT, stdout=log, stderr=log,
                                              env=env)
    url = f"http://{args.host}:{args.ui_port}/"
    deadline = time.monotonic() + args.ready_timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return url
        except OSError:
            if processes["webui"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("no answer") from None
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--base-port", type=int, default=50051, help="gateway port; the others follow it")
    parser.add_argument("--metrics-base-port", type=int, default=9101)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--logs", type=Path, default=ROOT / ".run" / "logs")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--http-port", type=int, default=8080,
                        help="Envoy's HTTP/gRPC listener (0: no edge, gRPC only; the benchmarks use this)")
    parser.add_argument("--envoy-admin-port", type=int, default=9901, help="Envoy's admin interface (loopback)")
    parser.add_argument("--ui-port", type=int, default=7860, help="the web UI (0: do not start it)")
    parser.add_argument("--redis-port", type=int, help="redis-server's port (default: the one after the enhancer's; "
                        "0: no Redis, state stays in the gateway process)")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM) and --tls-key")
    parser.add_argument("--tls-key")
    shared = ROOT.parent / "shared" / "models"
    parser.add_argument("--extra-model-dirs", default=str(shared) if shared.is_dir() else "",
                        help="comma-separated folders searched for real weights (default: ../shared/models if present)")
    parser.add_argument("--services", default=",".join(SERVICES),
                        help="which of service_runtime/registry.py's services to start (default: all); without the "
                             "gateway there is no Redis, HTTP edge or UI")
    args = parser.parse_args()
    selected = tuple(name for name in SERVICES if name in args.services.split(","))
    unknown = set(args.services.split(",")) - set(SERVICES)
    if unknown or not selected:
        parser.error(f"--services: {', '.join(sorted(unknown)) or 'none given'}; known: {', '.join(SERVICES)}")
    if "gateway" not in selected:
        args.redis_port, args.http_port, args.ui_port = 0, 0, 0
    extra_dirs = tuple(d for d in args.extra_model_dirs.split(",") if d)
    generated = prepare_models(args.models_dir, extra_dirs, selected)
    if generated:
        print(f"NOTE: running on generated demo weights for {', '.join(generated)}: the output will be noise "
              "where those models act (run `make models` for the real weights).", flush=True)
    args.logs.mkdir(parents=True, exist_ok=True)
    if args.redis_port is None:
        args.redis_port = args.base_port + len(SERVICES)
    for name in (*selected, "redis"):
        (args.logs / f"{name}.log").write_text("")
    try:
        redis = start_redis(args)
    except (RuntimeError, TimeoutError) as error:
        print(f"redis-server did not start: {error}; see {args.logs / 'redis.log'}", file=sys.stderr, flush=True)
        sys.exit(1)
    addresses = {name: address(name, args) for name in selected}
    if "gateway" in selected and gateway_needs_no_key(service_env("gateway", args, extra_dirs)):
        print(ANONYMOUS_NOTE, flush=True)
    processes = {name: start_service(name, args, extra_dirs) for name in selected}
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    print(f"starting (logs in {args.logs})", flush=True)
    failed = wait_serving(processes, addresses, args.ready_timeout)
    if failed:
        print(f"{failed} did not become ready; see {args.logs / (failed + '.log')}", file=sys.stderr, flush=True)
        stop_all(processes, redis)
        sys.exit(1)
    edge = "off"
    if args.http_port:
        try:
            edge = start_edge(args, processes)
        except (RuntimeError, TimeoutError) as error:
            print(f"the HTTP edge did not start: {error}; see {args.logs / 'envoy.log'}", file=sys.stderr, flush=True)
            stop_all(processes, redis)
            sys.exit(1)
        print(f"  {'envoy':<9} HTTP on {edge}", flush=True)
    ui = ""
    if args.ui_port:
        try:
            ui = start_web_ui(args, processes)
        except RuntimeError as error:
            print(f"the web UI did not start: {error}; see {args.logs / 'webui.log'}", file=sys.stderr, flush=True)
            stop_all(processes, redis)
            sys.exit(1)
        print(f"  {'webui':<9} on {ui}", flush=True)
    if "gateway" not in selected:
        print("READY " + " ".join(f"{name} {where}" for name, where in addresses.items()) + "\nCtrl-C stops them.",
              flush=True)
    else:
        print(f"READY gateway {addresses['gateway']} http {edge}" + (f" ui {ui}" if ui else "") + "\n"
              + (f"open: {ui} in a browser\n" if ui else "") +
              f"try:  superwav2lip generate --face ../shared/media/face_astronaut.png "
              f"--audio ../shared/media/speech_en_4s.wav -o out.mp4 --server {addresses['gateway']}\n"
              + (f"or:   curl -s {edge}/healthz   (docs/http-api.md has the HTTP examples)\n" if args.http_port else "")
              + "Ctrl-C stops everything.", flush=True)
    while not stop["now"]:
        dead = [name for name, p in processes.items() if p.poll() is not None]
        if dead:
            print(f"{dead[0]} exited unexpectedly; see {args.logs / (dead[0] + '.log')}", file=sys.stderr)
            break
        time.sleep(0.5)
    print("stopping", flush=True)
    stop_all(processes, redis)
    print("stopped", flush=True)
    sys.exit(0 if stop["now"] else 1)


if __name__ == "__main__":
    main()
