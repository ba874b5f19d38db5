"""`make run`: starts Redis, every service of service_runtime/registry.py (gateway, detector, lipsync, enhancer), the
Envoy HTTP edge and the web UI locally, waits until all are ready, stops them on Ctrl-C. What it starts is one typed
StackConfig: tests/support/process_stack.py starts the same processes through its functions with one, the benchmarks
run this launcher with one's command line (`config.argv()`)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import signal
import subprocess
import sys
import time
import types
import typing
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

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

SERVICES = registry.names()  # ports follow this order from the base port
PORT_MAX = 65535


class StackConfigError(ValueError):
    """A stack setting holds a value it cannot take; the message names the setting, its flag and what is allowed."""


def option(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Callable[[], Any] | None = None,
           ge: float | None = None, le: float | None = None, flag: bool = True) -> Any:
    """Declares one StackConfig field: its default (or `factory`), its one-line doc (the command line's help), its
    allowed range and whether it is a command-line option (`--field-name`)."""
    metadata = {"doc": doc, "ge": ge, "le": le, "flag": flag}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def shared_model_dirs() -> tuple[str, ...]:
    """../shared/models when that folder exists (the real detector and recognition weights), else nothing."""
    shared = ROOT.parent / "shared" / "models"
    return (str(shared),) if shared.is_dir() else ()


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """Everything the launcher's functions read, typed and checked once. `make run` builds it from the command line
    (`StackConfig.from_argv`), the tests' process stack and the benchmarks build it directly (the benchmarks pass
    it to a launcher process as `config.argv()`).

    A value out of its range raises StackConfigError naming the field and its flag. Two values are filled in at
    construction: `redis_port` left None becomes the port after the last service's, and without the gateway in
    `services` there is no Redis, HTTP edge or web UI (`redis_port`, `http_port` and `ui_port` become 0). They are
    then ordinary values, so `dataclasses.replace` keeps them: give them again when you replace `base_port` or
    `services`."""

    host: str = option("127.0.0.1", "the address every process listens on and is called at")
    base_port: int = option(50051, "the gateway's gRPC port; the model services take the next ones in the "
                            "registry's order (detector, lipsync, enhancer), Redis by default the one after",
                            ge=1, le=PORT_MAX - len(SERVICES))
    metrics_base_port: int = option(9101, "the gateway's /metrics port; the model services' follow it in the same "
                                    "order", ge=1, le=PORT_MAX + 1 - len(SERVICES))
    models_dir: Path = option(ROOT / "models", "the folder of manifest.json and the real weights; models missing "
                              "there run on generated weights written to its dev/ folder")
    extra_model_dirs: tuple[str, ...] = option(
        factory=shared_model_dirs, doc="more folders searched for real weights, comma-separated on the command line "
        "(default: ../shared/models when it exists)")
    logs: Path = option(ROOT / ".run" / "logs", "the folder of each process's log, <name>.log; the gateway's data "
                        "and Redis's files go beside it (../data, ../redis)")
    ready_timeout: float = option(300.0, "seconds each process (the services together, then Envoy, then the UI) "
                                  "gets to become ready", ge=1, le=86400)
    http_port: int = option(8080, "Envoy's HTTP/gRPC listener (0: no edge, gRPC only; the benchmarks use this)",
                            ge=0, le=PORT_MAX)
    envoy_admin_port: int = option(9901, "Envoy's admin interface (loopback)", ge=1, le=PORT_MAX)
    authz_port: int | None = option(None, "the gateway's API-key check, which Envoy calls before reading a body "
                                    "(default: the port after the last service's metrics port; 0, a free one, "
                                    "when there is no edge)", ge=0, le=PORT_MAX)
    ui_port: int = option(7860, "the web UI (0: do not start it)", ge=0, le=PORT_MAX)
    redis_port: int | None = option(None, "redis-server's port (default: the one after the last service's; 0: no "
                                    "Redis, state stays in the gateway process)", ge=0, le=PORT_MAX)
    redis_url: str = option("", "the gateway's SWL_GATEWAY_REDIS_URL (empty: none); not an option: start_redis "
                            "returns the config with the Redis it started", flag=False)
    tls_cert: str | None = option(None, "serve HTTPS on the edge with this certificate (PEM) and --tls-key")
    tls_key: str | None = option(None, "the private key (PEM) of --tls-cert")
    services: tuple[str, ...] = option(SERVICES, "which of service_runtime/registry.py's services to start, "
                                       "comma-separated on the command line (default: all); without the gateway "
                                       "there is no Redis, HTTP edge or UI")

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        set_("models_dir", Path(self.models_dir))
        set_("logs", Path(self.logs))
        set_("extra_model_dirs", tuple(str(d) for d in self.extra_model_dirs if str(d)))
        for field in dataclasses.fields(self):
            low, high = field.metadata["ge"], field.metadata["le"]
            value = getattr(self, field.name)
            if (low is None and high is None) or value is None:
                continue
            whole = _field_types()[field.name] is int
            if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
                kind = "an integer" if whole else "a number"
                raise StackConfigError(f"{self.option_name(field.name)} = {value!r} is not {kind}")
            if value < low or value > high:
                raise StackConfigError(f"{self.option_name(field.name)} = {value!r} is out of range: "
                                       f"{low:g} to {high:g}")
        given = tuple(self.services)
        unknown = set(given) - set(SERVICES)
        selected = tuple(name for name in SERVICES if name in given)
        if unknown or not selected:
            raise StackConfigError(f"{self.option_name('services')}: {', '.join(sorted(unknown)) or 'none given'}; "
                                   f"known: {', '.join(SERVICES)}")
        set_("services", selected)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise StackConfigError(f"{self.option_name('tls_cert')} and {self.option_name('tls_key')} go together: "
                                   "give both or neither")
        if "gateway" not in selected:
            set_("redis_port", 0)
            set_("http_port", 0)
            set_("ui_port", 0)
        elif self.redis_port is None:
            set_("redis_port", self.base_port + len(SERVICES))
        if self.authz_port is None:
            set_("authz_port", self.metrics_base_port + len(SERVICES) if self.http_port else 0)

    @staticmethod
    def option_name(field: str) -> str:
        """A field as errors name it: `base_port (--base-port)`."""
        return f"{field} (--{field.replace('_', '-')})"

    def port(self, name: str) -> int:
        """A service's gRPC port: the base port plus its place in the registry."""
        return self.base_port + SERVICES.index(name)

    def metrics_port(self, name: str) -> int:
        return self.metrics_base_port + SERVICES.index(name)

    def address(self, name: str) -> str:
        return f"{self.host}:{self.port(name)}"

    @property
    def data_dir(self) -> Path:
        """The gateway's uploads, avatars and jobs."""
        return self.logs.parent / "data"

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        """The command line: one `--field-name` per option field, its help the field's doc. Options not given stay
        out of the parsed namespace, so the defaults are the dataclass's alone."""
        parser = argparse.ArgumentParser(description=__doc__, argument_default=argparse.SUPPRESS)
        hints = _field_types()
        for field in dataclasses.fields(cls):
            if not field.metadata["flag"]:
                continue
            doc, default = field.metadata["doc"], field.default
            if "default" not in doc and default is not None:  # else the doc says what the default is
                doc += f" (default: {','.join(default) if isinstance(default, tuple) else default})"
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=_parse_type(hints[field.name]), help=doc)
        return parser

    @classmethod
    def from_argv(cls, argv: Sequence[str] | None = None) -> StackConfig:
        """The config the command line asks for; a bad value exits with a usage error (status 2), as argparse does."""
        parser = cls.parser()
        given = vars(parser.parse_args(argv))
        try:
            return cls(**given)
        except StackConfigError as error:
            parser.error(str(error))

    def argv(self) -> list[str]:
        """The command line that asks for this config (`from_argv(config.argv()) == config`, `redis_url` aside)."""
        words = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.metadata["flag"] and value is not None:
                text = ",".join(value) if isinstance(value, tuple) else str(value)
                words += [f"--{field.name.replace('_', '-')}", text]
        return words


@functools.cache
def _field_types() -> dict[str, Any]:
    """StackConfig's field types (`int | None` as int), for its checks and its command line."""
    types_ = {}
    for name, hint in typing.get_type_hints(StackConfig).items():
        if typing.get_origin(hint) in (types.UnionType, typing.Union):
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        types_[name] = hint
    return types_


def _parse_type(hint: Any) -> Callable[[str], Any]:
    """How the command line turns one option's text into its field's type."""
    if typing.get_origin(hint) is tuple:
        return lambda text: tuple(part.strip() for part in text.split(",") if part.strip())
    return hint


def configured_models(services: tuple[str, ...] = SERVICES) -> list[str]:
    return [model for entry in registry.model_services() if entry.name in services
            for model in entry.configured_models()]


def prepare_models(config: StackConfig) -> list[str]:
    """Generates the missing dev models of the config's services; returns the names that will run on generated
    weights."""
    models_dir = config.models_dir
    manifest = load_manifest(models_dir)
    generated = []
    for name in configured_models(config.services):
        spec = manifest.get(name)
        try:
            resolve_model_path(models_dir, spec, allow_dev=False, extra_dirs=config.extra_model_dirs)
        except ModelLoadError:
            if not (models_dir / "dev" / spec.file).is_file():
                write_dev_model(spec, models_dir / "dev")
            generated.append(name)
    return generated


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


def service_env(name: str, config: StackConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The process's environment: `base` (default: this one's) plus the stack's addresses, ports and folders,
    which settings already in `base` override. A gateway given neither SWL_GATEWAY_TENANTS_FILE nor
    SWL_GATEWAY_API_KEYS gets SWL_GATEWAY_ALLOW_ANONYMOUS=true (a local stack serves without keys); given either,
    it passes them on and every call but the health check needs a key."""
    entry = registry.get(name)
    prefix = entry.prefix
    env = dict(os.environ if base is None else base)
    # the project's folders first, then what the caller had (the device runner's private wheels)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "client"), *filter(None, [env.get("PYTHONPATH")])])
    env.update({k: v for k, v in allocator_env(name).items() if k not in env})
    env.setdefault(f"{prefix}HOST", config.host)
    env.setdefault(f"{prefix}PORT", str(config.port(name)))
    env.setdefault(f"{prefix}METRICS_PORT", str(config.metrics_port(name)))
    if not entry.is_model_service:  # the gateway: its data, Redis and the address of each model service it calls
        env.setdefault(f"{prefix}DATA_DIR", str(config.data_dir))
        env.setdefault(f"{prefix}AUTHZ_PORT", str(config.authz_port))
        if config.redis_url:
            env.setdefault(f"{prefix}REDIS_URL", config.redis_url)
        if not names_keys(env):
            env.setdefault(ALLOW_ANONYMOUS, "true")
        # a local stack's webhook receivers are on this machine: loopback and private addresses allowed
        env.setdefault(f"{prefix}WEBHOOK_ALLOW_PRIVATE_ADDRESSES", "true")
        fields = {f.name for f in dataclasses.fields(entry.settings_class())}
        for other in registry.model_services():
            if f"{other.name}_address" in fields:
                env.setdefault(f"{prefix}{other.name.upper()}_ADDRESS", config.address(other.name))
    else:
        env.setdefault(f"{prefix}MODELS_DIR", str(config.models_dir))
        env.setdefault(f"{prefix}ALLOW_DEV_MODELS", "1")
        env.setdefault(f"{prefix}EXTRA_MODEL_DIRS", ",".join(config.extra_model_dirs))
    return env


def start_service(name: str, config: StackConfig, base_env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """One service as its own process, logging to <logs>/<name>.log (appended, so a restart keeps the history)."""
    with (config.logs / f"{name}.log").open("a") as log_file:
        return subprocess.Popen([sys.executable, "-m", registry.get(name).module], cwd=ROOT, stderr=log_file, stdout=log_file,
                                env=service_env(name, config, base_env))


def start_redis(config: StackConfig, persist: bool = False) -> tuple[subprocess.Popen | None, StackConfig]:
    """redis-server for the plan cache, avatars and jobs (None, with a note, when it is off or not installed), and
    `config` with `redis_url` set to it (empty without it): start the gateway with that one. `persist` keeps an
    append-only file, so a restart on the same logs folder finds the state again."""
    without = dataclasses.replace(config, redis_url="")
    if not config.redis_port:
        return None, without
    if local_redis.redis_binary() is None:
        print("NOTE: redis-server is not installed (make deps installs it): the plan cache and jobs stay "
              "inside the gateway process.", flush=True)
        return None, without
    with (config.logs / "redis.log").open("a") as log:
        process = local_redis.start(config.redis_port, config.logs.parent / "redis", log, persist=persist)
    local_redis.wait_ready(config.redis_port, process)
    url = f"redis://127.0.0.1:{config.redis_port}/0"
    print(f"  {'redis':<9} on {url}", flush=True)
    return process, dataclasses.replace(config, redis_url=url)


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


def start_edge(config: StackConfig, processes: dict[str, subprocess.Popen]) -> str:
    """Starts Envoy in front of the gateway (its body limit follows the gateway's upload limit); returns its URL."""
    edge = EdgeConfig(listen_host=config.host, listen_port=config.http_port, admin_port=config.envoy_admin_port,
                      gateway_host=config.host, gateway_port=config.port("gateway"), authz_port=config.authz_port,
                      max_upload_mb=GatewaySettings.from_env().max_upload_mb,
                      tls_cert=config.tls_cert, tls_key=config.tls_key)
    scheme = "https" if config.tls_cert else "http"
    url = f"{scheme}://{config.host}:{config.http_port}"
    with (config.logs / "envoy.log").open("w") as log:
        processes["envoy"] = local_envoy.start(edge, config.logs.parent, log)
    context = None
    if config.tls_cert:
        import ssl
        context = ssl.create_default_context(cafile=config.tls_cert)
    local_envoy.wait_healthy(url, processes["envoy"], config.ready_timeout, context)
    return url


def start_web_ui(config: StackConfig, processes: dict[str, subprocess.Popen]) -> str:
    """Starts the web UI (a client of the gateway); returns its URL once it answers. It is given no API key: each
    visitor signs in with their own, so one shared key from this environment is not passed on."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "client")]),
               GRADIO_ANALYTICS_ENABLED="False")
    if env.pop("SWL_WEBUI_API_KEY", "").strip():
        print("NOTE: SWL_WEBUI_API_KEY is not passed to the web UI: each visitor signs in there with their own key.",
              flush=True)
    env.setdefault("SWL_WEBUI_HOST", config.host)
    env.setdefault("SWL_WEBUI_PORT", str(config.ui_port))
    env.setdefault("SWL_WEBUI_GATEWAY_ADDRESS", config.address("gateway"))
    with (config.logs / "webui.log").open("w") as log:
        processes["webui"] = subprocess.Popen([sys.executable, "-m", "webui"], cwd=ROOT, stdout=log, stderr=log,
                                              env=env)
    url = f"http://{config.host}:{config.ui_port}/"
    deadline = time.monotonic() + config.ready_timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return url
        except OSError:
            if processes["webui"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("no answer") from None
            time.sleep(0.5)


def run(config: StackConfig) -> int:
    """Starts the stack `config` describes, prints its READY line, serves until SIGTERM or SIGINT (or until a process
    dies), stops everything; returns the exit status (0 after a signal, 1 on a failure)."""
    generated = prepare_models(config)
    if generated:
        print(f"NOTE: running on generated demo weights for {', '.join(generated)}: the output will be noise "
              "where those models act (run `make models` for the real weights).", flush=True)
    config.logs.mkdir(parents=True, exist_ok=True)
    for name in (*config.services, "redis"):
        (config.logs / f"{name}.log").write_text("")
    try:
        redis, config = start_redis(config)
    except (RuntimeError, TimeoutError) as error:
        print(f"redis-server did not start: {error}; see {config.logs / 'redis.log'}", file=sys.stderr, flush=True)
        return 1
    addresses = {name: config.address(name) for name in config.services}
    if "gateway" in config.services and gateway_needs_no_key(service_env("gateway", config)):
        print(ANONYMOUS_NOTE, flush=True)
    processes = {name: start_service(name, config) for name in config.services}
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    print(f"starting (logs in {config.logs})", flush=True)
    failed = wait_serving(processes, addresses, config.ready_timeout)
    if failed:
        print(f"{failed} did not become ready; see {config.logs / (failed + '.log')}", file=sys.stderr, flush=True)
        stop_all(processes, redis)
        return 1
    edge = "off"
    if config.http_port:
        try:
            edge = start_edge(config, processes)
        except (RuntimeError, TimeoutError) as error:
            print(f"the HTTP edge did not start: {error}; see {config.logs / 'envoy.log'}", file=sys.stderr,
                  flush=True)
            stop_all(processes, redis)
            return 1
        print(f"  {'envoy':<9} HTTP on {edge}", flush=True)
    ui = ""
    if config.ui_port:
        try:
            ui = start_web_ui(config, processes)
        except RuntimeError as error:
            print(f"the web UI did not start: {error}; see {config.logs / 'webui.log'}", file=sys.stderr, flush=True)
            stop_all(processes, redis)
            return 1
        print(f"  {'webui':<9} on {ui}", flush=True)
    if "gateway" not in config.services:
        print("READY " + " ".join(f"{name} {where}" for name, where in addresses.items()) + "\nCtrl-C stops them.",
              flush=True)
    else:
        print(f"READY gateway {addresses['gateway']} http {edge}" + (f" ui {ui}" if ui else "") + "\n"
              + (f"open: {ui} in a browser\n" if ui else "") +
              f"try:  superwav2lip generate --face ../shared/media/face_astronaut.png "
              f"--audio ../shared/media/speech_en_4s.wav -o out.mp4 --server {addresses['gateway']}\n"
              + (f"or:   curl -s {edge}/healthz   (docs/http-api.md has the HTTP examples)\n" if config.http_port
                 else "")
              + "Ctrl-C stops everything.", flush=True)
    while not stop["now"]:
        dead = [name for name, p in processes.items() if p.poll() is not None]
        if dead:
            print(f"{dead[0]} exited unexpectedly; see {config.logs / (dead[0] + '.log')}", file=sys.stderr)
            break
        time.sleep(0.5)
    print("stopping", flush=True)
    stop_all(processes, redis)
    print("stopped", flush=True)
    return 0 if stop["now"] else 1


def main(argv: Sequence[str] | None = None) -> None:
    """`make run`: the command line, converted once into a StackConfig, then `run`."""
    sys.exit(run(StackConfig.from_argv(argv)))


if __name__ == "__main__":
    main()
