"""Tenants: who may call the gateway (by the sha256 of their API keys), with their quotas and webhook settings."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import signal
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

TENANTS_FILE_SETTING = "SWL_GATEWAY_TENANTS_FILE"
API_KEYS_SETTING = "SWL_GATEWAY_API_KEYS"
DEFAULT_TENANT = "default"  # the tenant SWL_GATEWAY_API_KEYS defines
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
DIGEST_HINT = "the sha256 of the key in hex, e.g. from `printf %s \"$KEY\" | sha256sum`"


def tenant_folder(root: Path, tenant: str) -> Path:
    """`root/<tenant>`: where a store keeps a tenant's objects. The name comes from configuration, never a client,
    and is checked again here because it becomes a path."""
    if not TENANT_NAME.fullmatch(tenant):
        raise ValueError(f"not a tenant name: {tenant!r}")
    return root / tenant


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


EMPTY_KEY_DIGEST = key_digest("")


@dataclass(frozen=True)
class Quotas:
    """What one tenant may use at once. Every quota is a whole number >= 0, and 0 allows none (a tenant with
    `live_sessions: 0` may open no live session)."""

    running_generations: int = 4  # generations running at once: synchronous calls and job workers together
    queued_jobs: int = 100  # jobs submitted and not yet started
    live_sessions: int = 4  # live sessions open at once
    stored_bytes: int = 20 << 30  # uploads, avatars and job results kept on the data volume: 20 GiB
    requests_per_minute: int = 600  # RPCs of any kind, over a sliding minute

    def __post_init__(self) -> None:
        for quota in fields(self):
            problem = quota_problem(getattr(self, quota.name))
            if problem:
                raise ValueError(f"quota {quota.name} {problem}")


QUOTA_NAMES = tuple(quota.name for quota in fields(Quotas))
NO_LIMIT = 1 << 62  # a quota this large is not counted at all


def no_quotas() -> Quotas:
    """The quotas of a gateway's only tenant (anonymous, or SWL_GATEWAY_API_KEYS's `default`): none of its own,
    since there is no other tenant to keep room for; the gateway's own limits still apply."""
    return Quotas(**{name: NO_LIMIT for name in QUOTA_NAMES})


def quota_problem(value: object) -> str | None:
    """Why `value` cannot be a quota, or None when it can."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be a whole number >= 0 (0 allows none), got {_kind(value)}"
    if value < 0:
        return f"must be >= 0 (0 allows none), got {value}"
    return None


@dataclass(frozen=True)
class Tenant:
    name: str
    key_digests: tuple[bytes, ...] = field(repr=False)  # sha256 of each valid key; several during a rotation
    webhook_secret: str = field(default="", repr=False)  # signs this tenant's webhooks; "" = the gateway's own
    webhook_hosts: tuple[str, ...] = ()  # hosts this tenant's webhooks may be sent to, lower case
    quotas: Quotas = field(default_factory=Quotas)


ANONYMOUS = Tenant("anonymous", (), quotas=no_quotas())  # every call's tenant when no tenant is configured
RESERVED_NAMES = (ANONYMOUS.name,)

# The tenant of the gRPC call being served; TenantInterceptor sets it for the whole call.
current_tenant: ContextVar[Tenant | None] = ContextVar("current_tenant", default=None)


def tenant_of_call() -> Tenant:
    """The tenant of the gRPC call this code serves; an error outside one (a background task must be given its
    tenant: it is not inherited by tasks started outside the call)."""
    tenant = current_tenant.get()
    if tenant is None:
        raise LookupError("no tenant for this code: it does not run inside a gRPC call that passed through "
                          "TenantInterceptor; pass the tenant explicitly to work done outside a call")
    return tenant


class TenantsFileError(ValueError):
    """A tenants file that cannot be used: names the file, the place in it and what to change."""

    def __init__(self, file: str | os.PathLike[str], place: str, problem: str) -> None:
        self.file, self.place, self.problem = str(file), place, problem
        super().__init__(f"tenants file {self.file}: {place}: {problem}" if place
                         else f"tenants file {self.file}: {problem}")


# --- reading the file -------------------------------------------------------------------------------------------

TENANT_FIELDS = ("keys_sha256", "webhook_secret", "webhook_hosts", "quotas")


def read_tenants_file(path: str | os.PathLike[str]) -> tuple[Tenant, ...]:
    """The tenants of the file at `path`: JSON, or YAML when its name ends in .yaml or .yml."""
    return parse_tenants(_load_document(Path(path)), path)


def _load_document(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TenantsFileError(path, "", f"cannot be read: {_reason(error)}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise TenantsFileError(path, _yaml_place(error), f"is not valid YAML: {_yaml_problem(error)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise TenantsFileError(path, f"line {error.lineno}, column {error.colno}",
                               f"is not valid JSON: {error.msg} (a name ending in .yaml or .yml is read as YAML)"
                               ) from None


def _yaml_place(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _yaml_problem(error: yaml.YAMLError) -> str:
    return str(getattr(error, "problem", None) or type(error).__name__)


def parse_tenants(document: object, file: str | os.PathLike[str]) -> tuple[Tenant, ...]:
    """The tenants of a loaded tenants file (`file` only names it in errors)."""
    if not isinstance(document, Mapping):
        raise TenantsFileError(file, "", f"must be a mapping with a `tenants` entry, got {_kind(document)}")
    _refuse_unknown(file, "", document, ("tenants",), "top-level entry")
    entries = document.get("tenants")
    if not isinstance(entries, Mapping):
        problem = ("has no `tenants` entry" if entries is None
                   else f"must map each tenant's name to its settings, got {_kind(entries)}")
        raise TenantsFileError(file, "tenants", problem)
    if not entries:
        raise TenantsFileError(file, "tenants", f"lists no tenant: add one, or unset {TENANTS_FILE_SETTING} to "
                                                "run without it")
    tenants = tuple(_tenant(file, position, name, settings)
                    for position, (name, settings) in enumerate(entries.items(), start=1))
    refuse_shared_digests(file, tenants)
    return tenants


def _tenant(file: str | os.PathLike[str], position: int, name: object, settings: object) -> Tenant:
    if not isinstance(name, str) or not TENANT_NAME.fullmatch(name):
        # The name is not shown: a misplaced key could be sitting where a name belongs.
        raise TenantsFileError(file, f"tenants, entry {position}",
                               "the tenant's name must be 1 to 63 lower-case letters, digits, '-' or '_', starting "
                               "with a letter or digit")
    place = f"tenants.{name}"
    if name in RESERVED_NAMES:
        raise TenantsFileError(file, place, f"the name {name} is reserved for calls made without keys: choose "
                                            "another")
    if not isinstance(settings, Mapping):
        raise TenantsFileError(file, place, f"must be a mapping with at least keys_sha256, got {_kind(settings)}")
    _refuse_unknown(file, place, settings, TENANT_FIELDS, "tenant field")
    return Tenant(name=name,
                  key_digests=_digests(file, place, settings.get("keys_sha256")),
                  webhook_secret=_webhook_secret(file, place, settings.get("webhook_secret", "")),
                  webhook_hosts=_webhook_hosts(file, place, settings.get("webhook_hosts", [])),
                  quotas=_quotas(file, place, settings.get("quotas", {})))


def _digests(file: str | os.PathLike[str], place: str, entries: object) -> tuple[bytes, ...]:
    place = f"{place}.keys_sha256"
    if entries is None:
        raise TenantsFileError(file, place, f"is missing: list the tenant's keys, each as {DIGEST_HINT}")
    if not isinstance(entries, list):
        raise TenantsFileError(file, place, f"must be a list of hex digests, got {_kind(entries)}")
    if not entries:
        raise TenantsFileError(file, place, "is empty: a tenant needs at least one key (remove the tenant to "
                                            "shut it out)")
    digests: list[bytes] = []
    for index, entry in enumerate(entries):
        digest = _digest_entry(file, f"{place}[{index}]", entry)
        if digest in digests:
            raise TenantsFileError(file, f"{place}[{index}]", f"repeats {place}[{digests.index(digest)}]")
        digests.append(digest)
    return tuple(digests)


def _digest_entry(file: str | os.PathLike[str], place: str, entry: object) -> bytes:
    if not isinstance(entry, str):
        raise TenantsFileError(file, place, f"must be a string of 64 hex digits ({DIGEST_HINT}; quote it in "
                                            f"YAML), got {_kind(entry)}")
    if not HEX_DIGEST.fullmatch(entry):
        raise TenantsFileError(file, place, f"must be 64 hex digits ({DIGEST_HINT}), got {len(entry)} "
                                            "characters" + ("" if len(entry) != 64 else " that are not all hex"))
    digest = bytes.fromhex(entry)
    if digest == EMPTY_KEY_DIGEST:
        raise TenantsFileError(file, place, "is the sha256 of an empty key: hash the key itself (printf %s, "
                                            "not echo, and no empty variable)")
    return digest


def _webhook_secret(file: str | os.PathLike[str], place: str, secret: object) -> str:
    if not isinstance(secret, str):
        raise TenantsFileError(file, f"{place}.webhook_secret", f"must be a string, got {_kind(secret)}")
    return secret


def _webhook_hosts(file: str | os.PathLike[str], place: str, hosts: object) -> tuple[str, ...]:
    place = f"{place}.webhook_hosts"
    if not isinstance(hosts, list):
        raise TenantsFileError(file, place, f"must be a list of host names, got {_kind(hosts)}")
    for index, host in enumerate(hosts):
        if not isinstance(host, str) or not host or "/" in host or any(c.isspace() for c in host):
            raise TenantsFileError(file, f"{place}[{index}]",
                                   "must be a host name such as hooks.example.com (no scheme, no path)")
    return tuple(host.lower() for host in hosts)


def _quotas(file: str | os.PathLike[str], place: str, quotas: object) -> Quotas:
    place = f"{place}.quotas"
    if not isinstance(quotas, Mapping):
        raise TenantsFileError(file, place, f"must be a mapping of quota name to number, got {_kind(quotas)}")
    _refuse_unknown(file, place, quotas, QUOTA_NAMES, "quota")
    for name, value in quotas.items():
        problem = quota_problem(value)
        if problem:
            raise TenantsFileError(file, f"{place}.{name}", problem)
    return Quotas(**quotas)


def _refuse_unknown(file: str | os.PathLike[str], place: str, entries: Mapping, known: tuple[str, ...],
                    what: str) -> None:
    for name in entries:
        if name not in known:
            # A string name is shown (it is a field name, not a value); anything else only by its kind.
            shown = name if isinstance(name, str) and len(name) <= 64 else f"({_kind(name)})"
            raise TenantsFileError(file, f"{place}.{shown}" if place else shown,
                                   f"unknown {what}: the known ones are {', '.join(known)}")


def refuse_shared_digests(file: str | os.PathLike[str], tenants: Iterable[Tenant]) -> None:
    """Refuses a key digest that two tenants hold: a key must say which tenant calls."""
    holders: dict[bytes, str] = {}
    for tenant in tenants:
        for index, digest in enumerate(tenant.key_digests):
            place = f"tenants.{tenant.name}.keys_sha256[{index}]"
            if digest in holders:
                raise TenantsFileError(file, place, f"is the same key as {holders[digest]}: a key may belong to "
                                                    "one tenant only")
            holders[digest] = place


def _kind(value: object) -> str:
    """What a value is, in words, without showing it (it could be a key pasted in the wrong place)."""
    if value is None:
        return "nothing (null)"
    return {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), f"a {type(value).__name__}")


def _reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or f"{type(error).__name__}: {error}"


# --- the registry -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Snapshot:
    """One configuration, swapped in whole so that a call never sees half of a reload."""

    tenants: tuple[Tenant, ...]
    by_name: Mapping[str, Tenant]
    digests: tuple[tuple[bytes, Tenant], ...]

    @classmethod
    def of(cls, tenants: tuple[Tenant, ...]) -> _Snapshot:
        return cls(tenants, {tenant.name: tenant for tenant in tenants},
                   tuple((digest, tenant) for tenant in tenants for digest in tenant.key_digests))


class TenantRegistry:
    """The tenants now configured: those of the tenants file, which `reload` re-reads, plus fixed ones (the
    `default` tenant of SWL_GATEWAY_API_KEYS), which reloads keep."""

    def __init__(self, tenants: Iterable[Tenant] = (), *, path: str | os.PathLike[str] | None = None,
                 fixed: Iterable[Tenant] = ()) -> None:
        self._path = Path(path) if path is not None else None
        self._loaded = tuple(tenants)  # what a reload replaces
        self._fixed = tuple(fixed)
        self._snapshot = _Snapshot.of(self._combined(self._loaded))

    # -- building ---------------------------------------------------------------------------------------------

    @classmethod
    def from_api_keys(cls, keys: Iterable[str]) -> TenantRegistry:
        """The SWL_GATEWAY_API_KEYS shorthand: one tenant, `default`, with no quotas of its own (a tenants file
        gives quotas); no tenant (anonymous mode) when no key is given. The keys are hashed here and not kept."""
        digests = tuple(dict.fromkeys(key_digest(key) for key in keys if key))
        return cls(fixed=(Tenant(DEFAULT_TENANT, digests, quotas=no_quotas()),) if digests else ())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TenantRegistry:
        """The tenants of the file at `path`, which `reload` re-reads; TenantsFileError when it cannot be used."""
        return cls(read_tenants_file(path), path=path)

    @classmethod
    def from_settings(cls, tenants_file: str | os.PathLike[str] | None, api_keys: Iterable[str]) -> TenantRegistry:
        """The registry the gateway's settings describe: the tenants file and/or the API keys shorthand;
        anonymous (not `required`) when neither is set."""
        keys = cls.from_api_keys(api_keys)
        return cls.load(tenants_file).merge(keys) if tenants_file else keys

    def merge(self, other: TenantRegistry) -> TenantRegistry:
        """This registry and `other` together, e.g. a file's tenants and the `default` tenant of the API keys,
        which then survives reloads; TenantsFileError when a tenant name or a key is in both."""
        if self._path is not None and other._path is not None:
            raise ValueError("only one of the merged registries may come from a tenants file")
        file_side, rest = (self, other) if self._path is not None else (other, self)
        return TenantRegistry(file_side._loaded, path=file_side._path,
                              fixed=file_side._fixed + rest._fixed + rest._loaded)

    def _combined(self, loaded: tuple[Tenant, ...]) -> tuple[Tenant, ...]:
        """`loaded` plus the fixed tenants; refused when a name or a key would belong to two of them."""
        where = self._path or API_KEYS_SETTING
        refuse_shared_digests(where, loaded)
        holders = {digest: f"tenants.{tenant.name}.keys_sha256[{index}]"
                   for tenant in loaded for index, digest in enumerate(tenant.key_digests)}
        names = {tenant.name for tenant in loaded}
        for tenant in self._fixed:
            if tenant.name in names:
                raise TenantsFileError(where, f"tenants.{tenant.name}",
                                       f"{API_KEYS_SETTING} defines tenant {tenant.name} too: move those keys into "
                                       f"the file's tenant and unset {API_KEYS_SETTING}, or rename the file's tenant")
            names.add(tenant.name)
            for digest in tenant.key_digests:
                if digest in holders:
                    raise TenantsFileError(where, holders[digest],
                                           f"is also a key of {API_KEYS_SETTING} (tenant {tenant.name}): a key may "
                                           "belong to one tenant only")
        return loaded + self._fixed

    # -- reading ----------------------------------------------------------------------------------------------

    @property
    def path(self) -> Path | None:
        """The tenants file, or None when the tenants are fixed."""
        return self._path

    @property
    def required(self) -> bool:
        """Whether calls need a key: any tenant is configured."""
        return bool(self._snapshot.tenants)

    @property
    def tenants(self) -> tuple[Tenant, ...]:
        return self._snapshot.tenants

    def tenant(self, name: str) -> Tenant | None:
        return self._snapshot.by_name.get(name)

    def identify(self, key: str | None) -> Tenant | None:
        """The tenant whose key `key` is, or None. The key is hashed once and compared, in constant time, with
        every digest whatever matches, so the time taken says nothing about which key (or tenant) is near."""
        digest = key_digest(key or "")
        found: Tenant | None = None
        for expected, tenant in self._snapshot.digests:
            if hmac.compare_digest(digest, expected):
                found = tenant
        return found if key else None

    # -- reloading --------------------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-reads the tenants file and swaps the new tenants in at once. A file that cannot be used keeps the
        current tenants, is logged, and returns False; so does a registry without a file."""
        if self._path is None:
            return False
        try:
            loaded = read_tenants_file(self._path)
            snapshot = _Snapshot.of(self._combined(loaded))
        except TenantsFileError as error:
            log.warning("tenants file not reloaded", extra={"file": str(self._path), "error": str(error)})
            return False
        self._loaded, self._snapshot = loaded, snapshot
        log.info("tenants reloaded", extra={"file": str(self._path), "tenants": len(snapshot.tenants)})
        return True


class TenantsWatcher:
    """Reloads a registry's tenants file on SIGHUP and when the file changes. The path is stat-ed each time, not an
    open file: a Kubernetes Secret update swaps a symlink, so the path leads to a new file (a new inode)."""

    def __init__(self, registry: TenantRegistry, *, poll_s: float = 2.0) -> None:
        if registry.path is None:
            raise ValueError("this registry has no tenants file to watch")
        self._registry = registry
        self._path: Path = registry.path
        self._poll_s = poll_s
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handles_sighup = False

    @property
    def handles_sighup(self) -> bool:
        """Whether SIGHUP reloads: only a watcher started in the main thread can take the signal."""
        return self._handles_sighup

    async def start(self, spawn: Callable[[Coroutine, str], asyncio.Task] | None = None) -> None:
        """Starts watching; `spawn` (the process's Supervisor.spawn) owns the watching task."""
        self._loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            with contextlib.suppress(NotImplementedError):  # no Unix signals in this event loop
                self._loop.add_signal_handler(signal.SIGHUP, self._reload)
                self._handles_sighup = True
        watch = self._watch(self._stamp())
        self._task = spawn(watch, "tenants watcher") if spawn else asyncio.create_task(watch, name="tenants watcher")

    async def stop(self) -> None:
        if self._handles_sighup and self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGHUP)
            self._handles_sighup = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self._path)  # follows the symlink, so a swapped Secret shows as a new inode
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    async def _watch(self, seen: tuple[int, int, int] | None) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                stamp = self._stamp()
                if stamp != seen:
                    seen = stamp  # first: a change whose reload fails is reported once, not at every poll
                    self._changed(stamp)
            except Exception:  # a watcher that dies silently would leave old keys working: log and go on
                log.exception("tenants watcher error; it keeps watching", extra={"file": str(self._path)})

    def _changed(self, stamp: tuple[int, int, int] | None) -> None:
        if stamp is None:  # mid-swap, or removed: reload when it is back
            log.warning("tenants file missing; keeping the current tenants", extra={"file": str(self._path)})
        else:
            self._registry.reload()

    def _reload(self) -> None:
        try:
            self._registry.reload()
        except Exception:  # a signal handler that raises is only logged by asyncio, without the file
            log.exception("tenants reload on SIGHUP failed", extra={"file": str(self._path)})
