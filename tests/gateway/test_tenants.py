"""Tenants: the file's refusals, identifying a caller by key, reloads and the watcher, and the interceptor that
gives every gRPC call its tenant."""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import os
import pickle
import signal
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from gateway.auth import DENIED, TenantInterceptor, with_tenant
from gateway.tenants import (ANONYMOUS, no_quotas, DEFAULT_TENANT, Quotas, Tenant, TenantRegistry, TenantsFileError,
                             TenantsWatcher, current_tenant, tenant_of_call)
from tests.support.waiting import eventually_async


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def write(path: Path, document: object) -> Path:
    """Writes `document` as YAML or JSON (by the name), replacing the file as a Secret update does: a new inode."""
    text = yaml.safe_dump(document, sort_keys=False) if path.suffix in (".yaml", ".yml") else json.dumps(document)
    staged = path.with_name(path.name + ".new")
    staged.write_text(text)
    os.replace(staged, path)
    return path


ACME_KEYS = ("acme-old-key", "acme-new-key")  # a rotation: both work
TWO_TENANTS = {"tenants": {
    "acme": {"keys_sha256": [sha(key) for key in ACME_KEYS], "webhook_secret": "s3cret",
             "webhook_hosts": ["Hooks.Acme.example"], "quotas": {"live_sessions": 1, "stored_bytes": 1 << 30}},
    "beta": {"keys_sha256": [sha("beta-key")]},
}}


# --- the file's refusals ------------------------------------------------------------------------------------------

def one_tenant(**settings) -> dict:
    return {"tenants": {"acme": {"keys_sha256": [sha("acme-key")], **settings}}}


REFUSALS = [
    # (test id, document, place, words of the problem)
    ("a list, not a mapping", [1, 2], "", "must be a mapping with a `tenants` entry, got a list"),
    ("no tenants entry", {}, "tenants", "has no `tenants` entry"),
    ("tenants as a list", {"tenants": ["acme"]}, "tenants", "must map each tenant's name"),
    ("no tenant at all", {"tenants": {}}, "tenants", "lists no tenant"),
    ("unknown top-level entry", {**one_tenant(), "tenant": {}}, "tenant",
     "unknown top-level entry: the known ones are tenants"),
    ("upper-case name", {"tenants": {"beta": one_tenant()["tenants"]["acme"], "Acme": {}}}, "tenants, entry 2",
     "lower-case letters, digits"),
    ("name too long", {"tenants": {"a" * 64: {}}}, "tenants, entry 1", "1 to 63"),
    ("reserved name", {"tenants": {"anonymous": {"keys_sha256": [sha("k")]}}}, "tenants.anonymous", "reserved"),
    ("tenant not a mapping", {"tenants": {"acme": [sha("k")]}}, "tenants.acme", "must be a mapping"),
    ("unknown tenant field", one_tenant(ui_users=[]), "tenants.acme.ui_users",
     "unknown tenant field: the known ones are keys_sha256, webhook_secret, webhook_hosts, quotas"),
    ("no keys field", {"tenants": {"acme": {}}}, "tenants.acme.keys_sha256", "is missing"),
    ("empty keys list", {"tenants": {"acme": {"keys_sha256": []}}}, "tenants.acme.keys_sha256",
     "is empty: a tenant needs at least one key"),
    ("short digest", {"tenants": {"acme": {"keys_sha256": [sha("k"), sha("j")[:63]]}}},
     "tenants.acme.keys_sha256[1]", "must be 64 hex digits"),
    ("non-hex digest", {"tenants": {"acme": {"keys_sha256": ["g" * 64]}}}, "tenants.acme.keys_sha256[0]",
     "not all hex"),
    ("digest as a number", {"tenants": {"acme": {"keys_sha256": [12345]}}}, "tenants.acme.keys_sha256[0]",
     "quote it in YAML), got a number"),
    ("digest of the empty key", {"tenants": {"acme": {"keys_sha256": [sha("")]}}}, "tenants.acme.keys_sha256[0]",
     "empty key"),
    ("a digest twice in a tenant", {"tenants": {"acme": {"keys_sha256": [sha("k"), sha("j"), sha("k")]}}},
     "tenants.acme.keys_sha256[2]", "repeats tenants.acme.keys_sha256[0]"),
    ("a digest in two tenants", {"tenants": {"acme": {"keys_sha256": [sha("a"), sha("shared")]},
                                             "beta": {"keys_sha256": [sha("shared")]}}},
     "tenants.beta.keys_sha256[0]", "is the same key as tenants.acme.keys_sha256[1]"),
    ("unknown quota", one_tenant(quotas={"jobs": 3}), "tenants.acme.quotas.jobs",
     "unknown quota: the known ones are running_generations, queued_jobs, live_sessions, stored_bytes, "
     "requests_per_minute"),
    ("quota as a string", one_tenant(quotas={"live_sessions": "4"}), "tenants.acme.quotas.live_sessions",
     "must be a whole number >= 0 (0 allows none), got a string"),
    ("quota as true", one_tenant(quotas={"queued_jobs": True}), "tenants.acme.quotas.queued_jobs",
     "got true/false"),
    ("quota as a fraction", one_tenant(quotas={"stored_bytes": 1.5}), "tenants.acme.quotas.stored_bytes",
     "got a number"),
    ("negative quota", one_tenant(quotas={"requests_per_minute": -1}), "tenants.acme.quotas.requests_per_minute",
     "must be >= 0 (0 allows none), got -1"),
    ("quotas as a list", one_tenant(quotas=[1]), "tenants.acme.quotas", "must be a mapping of quota name"),
    ("webhook host as a URL", one_tenant(webhook_hosts=["ok.example", "https://x.example/hook"]),
     "tenants.acme.webhook_hosts[1]", "no scheme, no path"),
    ("webhook hosts as a string", one_tenant(webhook_hosts="x.example"), "tenants.acme.webhook_hosts",
     "must be a list of host names"),
    ("webhook secret as a number", one_tenant(webhook_secret=7), "tenants.acme.webhook_secret", "must be a string"),
]


@pytest.mark.parametrize(("document", "place", "problem"), [case[1:] for case in REFUSALS],
                         ids=[case[0] for case in REFUSALS])
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_each_refusal_names_the_file_the_place_and_the_problem(tmp_path, document, place, problem, suffix):
    path = write(tmp_path / f"tenants{suffix}", document)
    with pytest.raises(TenantsFileError) as refused:
        TenantRegistry.load(path)
    error = refused.value
    assert (error.file, error.place) == (str(path), place)
    assert problem in error.problem
    assert str(error) == (f"tenants file {path}: {place}: {error.problem}" if place
                          else f"tenants file {path}: {error.problem}")
    for digest in _digests_in(document):  # positions only, never values
        assert digest not in str(error) and digest[:16] not in str(error)


def _digests_in(document: object) -> list[str]:
    if isinstance(document, dict):
        return [digest for value in document.values() for digest in _digests_in(value)]
    if isinstance(document, list):
        return [digest for value in document for digest in _digests_in(value)]
    return [document] if isinstance(document, str) and len(document) >= 60 else []


@pytest.mark.parametrize(("name", "text", "place", "problem"), [
    ("tenants.json", '{"tenants": {\n  "acme": {"keys_sha256": [}\n}}', "line 2, column 28", "is not valid JSON"),
    ("tenants.yaml", "tenants:\n  acme: {keys_sha256: [\n", "line 3, column 1", "is not valid YAML"),
    ("tenants.yml", "tenants:\n  acme:\n keys_sha256: x\n", "line 3, column 2", "is not valid YAML"),
    ("tenants.yaml", "", "", "must be a mapping with a `tenants` entry, got nothing (null)"),
    ("tenants.yaml", "tenants:\n  007: {keys_sha256: ['%s']}\n" % sha("k"), "tenants, entry 1", "lower-case"),
    ("tenants.yaml", "tenants:\n  acme: {keys_sha256: [%s]}\n" % ("1" * 64), "tenants.acme.keys_sha256[0]",
     "quote it in YAML"),
])
def test_a_file_that_does_not_parse_is_refused_with_its_line(tmp_path, name, text, place, problem):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TenantsFileError) as refused:
        TenantRegistry.load(path)
    assert refused.value.place == place
    assert problem in refused.value.problem


def test_a_file_that_cannot_be_read_is_refused_with_the_reason(tmp_path):
    with pytest.raises(TenantsFileError) as refused:
        TenantRegistry.load(tmp_path / "absent.json")
    assert str(refused.value) == f"tenants file {tmp_path / 'absent.json'}: cannot be read: No such file or directory"


def test_quotas_have_their_documented_defaults_and_refuse_a_negative_value():
    assert Quotas() == Quotas(running_generations=4, queued_jobs=100, live_sessions=4, stored_bytes=20 * 2**30,
                              requests_per_minute=600)
    assert Quotas(live_sessions=0).live_sessions == 0  # 0 allows none, and is allowed
    with pytest.raises(ValueError, match="quota queued_jobs must be >= 0"):
        Quotas(queued_jobs=-1)
    with pytest.raises(ValueError, match="quota live_sessions must be a whole number"):
        Quotas(live_sessions=2.0)


# --- loading and identifying ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tenants.json", "tenants.yaml", "tenants.yml"])
def test_json_and_yaml_files_load_the_same_tenants(tmp_path, name):
    registry = TenantRegistry.load(write(tmp_path / name, TWO_TENANTS))
    acme, beta = registry.tenants
    assert (acme.name, beta.name) == ("acme", "beta")
    assert acme.key_digests == tuple(hashlib.sha256(key.encode()).digest() for key in ACME_KEYS)
    assert (acme.webhook_secret, acme.webhook_hosts) == ("s3cret", ("hooks.acme.example",))
    assert acme.quotas == Quotas(live_sessions=1, stored_bytes=1 << 30)  # the rest keep their defaults
    assert (beta.webhook_secret, beta.webhook_hosts, beta.quotas) == ("", (), Quotas())
    assert registry.tenant("beta") is beta and registry.tenant("gamma") is None
    assert registry.required and registry.path == tmp_path / name


def test_identify_finds_each_keys_tenant_among_several_and_refuses_the_rest(tmp_path):
    document = {"tenants": {**TWO_TENANTS["tenants"], "gamma": {"keys_sha256": [sha("gamma-key")]}}}
    registry = TenantRegistry.load(write(tmp_path / "tenants.json", document))
    assert [registry.identify(key).name for key in (*ACME_KEYS, "beta-key", "gamma-key")] == [
        "acme", "acme", "beta", "gamma"]
    for refused in ("wrong-key", "acme-new-key ", "ACME-NEW-KEY", "", None):
        assert registry.identify(refused) is None


def test_no_tenant_is_identified_without_a_key_even_one_holding_the_empty_keys_digest():
    registry = TenantRegistry([Tenant("odd", (hashlib.sha256(b"").digest(),))])  # the file refuses this digest
    assert registry.identify("") is None and registry.identify(None) is None


def test_a_tenants_repr_shows_neither_its_key_digests_nor_its_webhook_secret(tmp_path):
    acme = TenantRegistry.load(write(tmp_path / "tenants.json", TWO_TENANTS)).tenant("acme")
    assert "s3cret" not in repr(acme) and "key_digests" not in repr(acme) and "acme" in repr(acme)


def test_the_api_keys_shorthand_is_one_default_tenant_that_keeps_no_key():
    registry = TenantRegistry.from_api_keys(["old-key", "", "new-key", "old-key"])
    (tenant,) = registry.tenants
    assert (tenant.name, tenant.quotas, len(tenant.key_digests)) == (DEFAULT_TENANT, no_quotas(), 2)
    assert registry.identify("old-key") is tenant and registry.identify("new-key") is tenant
    assert registry.identify("other") is None
    assert b"old-key" not in pickle.dumps(registry) and b"new-key" not in pickle.dumps(registry)


def test_without_keys_or_file_calls_are_anonymous():
    for registry in (TenantRegistry.from_api_keys(["", ""]), TenantRegistry.from_settings(None, ())):
        assert not registry.required and registry.tenants == ()
        assert registry.identify("anything") is None


def test_a_file_and_api_keys_together_add_the_default_tenant_which_reloads_keep(tmp_path):
    path = write(tmp_path / "tenants.json", TWO_TENANTS)
    registry = TenantRegistry.from_settings(path, ["plain-key"])
    assert [tenant.name for tenant in registry.tenants] == ["acme", "beta", DEFAULT_TENANT]
    assert registry.identify("plain-key").name == DEFAULT_TENANT
    write(path, {"tenants": {"beta": TWO_TENANTS["tenants"]["beta"]}})
    assert registry.reload()
    assert [tenant.name for tenant in registry.tenants] == ["beta", DEFAULT_TENANT]
    assert registry.identify("plain-key").name == DEFAULT_TENANT and registry.identify(ACME_KEYS[0]) is None


def test_api_keys_and_a_file_that_defines_default_too_are_refused(tmp_path):
    path = write(tmp_path / "tenants.yaml", {"tenants": {"default": {"keys_sha256": [sha("file-key")]}}})
    with pytest.raises(TenantsFileError) as refused:
        TenantRegistry.from_settings(path, ["plain-key"])
    assert refused.value.place == "tenants.default"
    assert "SWL_GATEWAY_API_KEYS defines tenant default too" in refused.value.problem
    assert TenantRegistry.from_settings(path, []).identify("file-key").name == "default"


def test_an_api_key_that_a_file_tenant_holds_too_is_refused(tmp_path):
    path = write(tmp_path / "tenants.json", TWO_TENANTS)
    with pytest.raises(TenantsFileError) as refused:
        TenantRegistry.load(path).merge(TenantRegistry.from_api_keys([ACME_KEYS[1]]))
    assert refused.value.place == "tenants.acme.keys_sha256[1]"
    assert "is also a key of SWL_GATEWAY_API_KEYS (tenant default)" in refused.value.problem
    assert ACME_KEYS[1] not in str(refused.value)


def test_the_tenant_of_a_call_is_an_error_outside_a_call():
    with pytest.raises(LookupError, match="does not run inside a gRPC call"):
        contextvars.Context().run(tenant_of_call)

    def inside_a_call() -> Tenant:
        current_tenant.set(ANONYMOUS)
        return tenant_of_call()

    assert contextvars.Context().run(inside_a_call) is ANONYMOUS


# --- reloading ---------------------------------------------------------------------------------------------------

def test_a_good_file_swaps_in_and_a_bad_one_keeps_the_old_tenants(tmp_path, caplog):
    path = write(tmp_path / "tenants.json", TWO_TENANTS)
    registry = TenantRegistry.load(path)
    write(path, {"tenants": {"zeta": {"keys_sha256": [sha("zeta-key")]}}})
    with caplog.at_level(logging.INFO, logger="gateway.tenants"):
        assert registry.reload() is True
    assert registry.identify("zeta-key").name == "zeta" and registry.identify("beta-key") is None
    (reloaded,) = [record for record in caplog.records if record.getMessage() == "tenants reloaded"]
    assert (reloaded.file, reloaded.tenants) == (str(path), 1)

    caplog.clear()
    write(path, {"tenants": {"zeta": {"keys_sha256": [sha("zeta-key")[:10]]}}})
    with caplog.at_level(logging.INFO, logger="gateway.tenants"):
        assert registry.reload() is False
    assert registry.identify("zeta-key").name == "zeta"  # the old configuration stays
    (warning,) = caplog.records
    assert (warning.levelno, warning.getMessage(), warning.file) == (logging.WARNING, "tenants file not reloaded",
                                                                     str(path))
    assert "tenants.zeta.keys_sha256[0]" in warning.error and sha("zeta-key")[:10] not in warning.error


def test_a_registry_without_a_file_does_not_reload():
    assert TenantRegistry.from_api_keys(["k"]).reload() is False


# --- the watcher -------------------------------------------------------------------------------------------------

async def test_the_watcher_reloads_when_a_secrets_symlink_is_swapped(tmp_path):
    # A Kubernetes Secret volume: the file is a symlink through ..data, which an update points elsewhere.
    for version, document in (("v1", TWO_TENANTS), ("v2", {"tenants": {"zeta": {"keys_sha256": [sha("z")]}}})):
        (tmp_path / version).mkdir()
        write(tmp_path / version / "tenants.json", document)
    (tmp_path / "..data").symlink_to("v1")
    (tmp_path / "tenants.json").symlink_to("..data/tenants.json")
    registry = TenantRegistry.load(tmp_path / "tenants.json")
    watcher = TenantsWatcher(registry, poll_s=0.02)
    await watcher.start()
    try:
        await asyncio.sleep(0.1)
        assert registry.identify("beta-key") is not None  # nothing changed: nothing reloaded
        (tmp_path / "..data_tmp").symlink_to("v2")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        await eventually_async(lambda: registry.identify("z"), seconds=5, what="the swapped Secret's tenant")
        assert registry.identify("beta-key") is None
    finally:
        await watcher.stop()


async def test_sighup_reloads_and_stop_gives_the_signal_back(tmp_path):
    path = write(tmp_path / "tenants.yaml", TWO_TENANTS)
    registry = TenantRegistry.load(path)
    watcher = TenantsWatcher(registry, poll_s=3600)  # only the signal can reload within the test
    await watcher.start()
    try:
        assert watcher.handles_sighup  # else the signal below would end the test run
        write(path, {"tenants": {"zeta": {"keys_sha256": [sha("z")]}}})
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually_async(lambda: registry.identify("z"), seconds=5, what="the tenant reloaded on SIGHUP")
    finally:
        await watcher.stop()
    assert not watcher.handles_sighup and signal.getsignal(signal.SIGHUP) == signal.SIG_DFL


async def test_the_watcher_survives_an_exception_and_reloads_the_next_change(tmp_path, caplog, monkeypatch):
    path = write(tmp_path / "tenants.json", TWO_TENANTS)
    registry = TenantRegistry.load(path)
    real_reload, calls = registry.reload, []

    def reload_failing_once() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        return real_reload()

    monkeypatch.setattr(registry, "reload", reload_failing_once)
    watcher = TenantsWatcher(registry, poll_s=0.02)
    with caplog.at_level(logging.ERROR, logger="gateway.tenants"):
        await watcher.start()
        try:
            write(path, {"tenants": {"eta": {"keys_sha256": [sha("eta")]}}})
            await eventually_async(lambda: calls, seconds=5, what="the failing reload")
            write(path, {"tenants": {"zeta": {"keys_sha256": [sha("z")]}}})
            await eventually_async(lambda: registry.identify("z"), seconds=5, what="the reload after the error")
        finally:
            await watcher.stop()
    (logged,) = [record for record in caplog.records if record.exc_info]
    assert logged.getMessage() == "tenants watcher error; it keeps watching" and logged.file == str(path)
    assert "disk on fire" in str(logged.exc_info[1])


def test_a_registry_without_a_file_cannot_be_watched():
    with pytest.raises(ValueError, match="no tenants file"):
        TenantsWatcher(TenantRegistry.from_api_keys(["k"]))


# --- the interceptor, on a real server ---------------------------------------------------------------------------

SERVICE = "test.Tenancy"


def _name() -> bytes:
    return tenant_of_call().name.encode()


async def _name_in_a_task() -> bytes:
    return await asyncio.create_task(asyncio.sleep(0, _name()))  # a task the call starts inherits the tenant


class TenancyHandlers:
    """One method of each shape, answering with the caller's tenant name; `ran` counts the calls that ran."""

    def __init__(self) -> None:
        self.ran = 0

    async def unary_unary(self, request, context):
        self.ran += 1
        await asyncio.sleep(0)
        return _name() + b"|" + await asyncio.create_task(_name_in_a_task())

    async def unary_stream(self, request, context):
        self.ran += 1
        for _ in range(2):  # still the tenant after a yield
            yield _name()
            await asyncio.sleep(0)

    async def stream_unary(self, requests, context):
        self.ran += 1
        return b"".join([_name() async for _ in requests])

    async def stream_stream(self, requests, context):
        self.ran += 1
        async for _ in requests:
            yield _name()

    async def writer(self, request, context):  # the reader/writer form of a streaming handler
        self.ran += 1
        await context.write(_name())

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "UnaryUnary": grpc.unary_unary_rpc_method_handler(self.unary_unary),
            "UnaryStream": grpc.unary_stream_rpc_method_handler(self.unary_stream),
            "StreamUnary": grpc.stream_unary_rpc_method_handler(self.stream_unary),
            "StreamStream": grpc.stream_stream_rpc_method_handler(self.stream_stream),
            "Writer": grpc.unary_stream_rpc_method_handler(self.writer),
        })


async def call(channel: grpc.aio.Channel, method: str, metadata=(), requests=(b"one", b"two")) -> list[bytes]:
    """Calls `method` with `requests` where it streams them, else with one, and returns what came back."""
    path = f"/{SERVICE}/{method}"
    if method == "UnaryUnary":
        return [await channel.unary_unary(path)(b"x", metadata=metadata)]
    if method in ("UnaryStream", "Writer"):
        return [reply async for reply in channel.unary_stream(path)(b"x", metadata=metadata)]
    if method == "StreamUnary":
        return [await channel.stream_unary(path)(iter(requests), metadata=metadata)]
    return [reply async for reply in channel.stream_stream(path)(iter(requests), metadata=metadata)]


EXPECTED = {"UnaryUnary": [b"%s|%s"], "UnaryStream": [b"%s", b"%s"], "StreamUnary": [b"%s%s"],
            "StreamStream": [b"%s", b"%s"], "Writer": [b"%s"]}
METHODS = tuple(EXPECTED)


def expected(method: str, name: str) -> list[bytes]:
    return [reply.replace(b"%s", name.encode()) for reply in EXPECTED[method]]


class Served:
    def __init__(self, interceptor: grpc.aio.ServerInterceptor) -> None:
        self.handlers = TenancyHandlers()
        self.health = HealthServicer()
        self.server = grpc.aio.server(interceptors=[interceptor])
        self.server.add_generic_rpc_handlers((self.handlers.generic_handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def __aenter__(self) -> Served:
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.channel.close()
        await self.server.stop(None)


@pytest.fixture
def registry(tmp_path) -> TenantRegistry:
    return TenantRegistry.load(write(tmp_path / "tenants.json", TWO_TENANTS))


@pytest.mark.parametrize("method", METHODS)
async def test_each_call_runs_as_its_keys_tenant_in_every_handler_shape(registry, method):
    async with Served(TenantInterceptor(registry)) as served:
        for key, header, tenant in [(ACME_KEYS[0], "x-api-key", "acme"), (ACME_KEYS[1], "authorization", "acme"),
                                    ("beta-key", "x-api-key", "beta"), ("beta-key", "authorization", "beta")]:
            value = f"Bearer {key}" if header == "authorization" else key
            assert await call(served.channel, method, ((header, value),)) == expected(method, tenant)
        assert current_tenant.get() is None  # nothing leaked into the test's own context


@pytest.mark.parametrize("method", METHODS)
async def test_a_call_without_a_known_key_is_refused_before_its_handler_runs(registry, method):
    denied: list[int] = []
    async with Served(TenantInterceptor(registry, lambda: denied.append(1))) as served:
        for metadata in ((), (("x-api-key", "wrong"),), (("authorization", f"Basic {ACME_KEYS[0]}"),)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                # No request is streamed: a grpc.aio client writing after the refusal may report INTERNAL instead
                # of the server's status (grpc/grpc#36066), whatever the server does.
                await call(served.channel, method, metadata, requests=())
            assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, DENIED)
        assert (served.handlers.ran, len(denied)) == (0, 3)


async def test_the_health_check_needs_no_key(registry):
    async with Served(TenantInterceptor(registry)) as served:
        await served.health.set("", health_pb2.HealthCheckResponse.SERVING)
        reply = await health_pb2_grpc.HealthStub(served.channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("method", METHODS)
async def test_without_tenants_every_call_runs_as_anonymous(method):
    async with Served(TenantInterceptor(TenantRegistry.from_api_keys([]))) as served:
        assert await call(served.channel, method) == expected(method, ANONYMOUS.name)
        assert await call(served.channel, method, (("x-api-key", "any"),)) == expected(method, ANONYMOUS.name)


async def test_a_reload_changes_who_the_next_call_runs_as(tmp_path):
    path = write(tmp_path / "tenants.json", TWO_TENANTS)
    registry = TenantRegistry.load(path)
    async with Served(TenantInterceptor(registry)) as served:
        assert await call(served.channel, "UnaryUnary", (("x-api-key", "beta-key"),)) == [b"beta|beta"]
        write(path, {"tenants": {"gamma": {"keys_sha256": [sha("beta-key")]}}})
        assert registry.reload()
        assert await call(served.channel, "UnaryUnary", (("x-api-key", "beta-key"),)) == [b"gamma|gamma"]


class ContextProbe(grpc.aio.ServerInterceptor):
    """Sets a context variable in intercept_service only, as TenantInterceptor deliberately does not."""

    def __init__(self, variable: contextvars.ContextVar[str]) -> None:
        self.variable = variable

    async def intercept_service(self, continuation, details):
        self.variable.set("set in intercept_service")
        return await continuation(details)


async def test_what_intercept_service_alone_would_give_the_handler():
    # Not a promise of grpc.aio, which is why with_tenant wraps the behaviour instead: this records what the
    # installed grpcio does, so that a change in it is seen here rather than as a wrong tenant.
    seen: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="unset")

    async def read(request, context):
        return seen.get().encode()

    server = grpc.aio.server(interceptors=[ContextProbe(seen)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"Read": grpc.unary_unary_rpc_method_handler(read)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await channel.unary_unary(f"/{SERVICE}/Read")(b"")
    finally:
        await server.stop(None)
    assert reply == b"set in intercept_service", (
        f"grpcio {grpc.__version__} no longer runs intercept_service in the handler's task (got {reply!r}); "
        "with_tenant does not depend on it")


# --- with_tenant, without a server -------------------------------------------------------------------------------

async def test_with_tenant_sets_the_tenant_itself_and_restores_the_callers_value():
    acme = Tenant("acme", ())

    async def answer(request, context):
        return tenant_of_call().name

    wrapped = with_tenant(grpc.unary_unary_rpc_method_handler(answer), acme)
    # Run in a fresh context, where nothing but the wrapper can have set the tenant.
    assert await asyncio.create_task(wrapped.unary_unary(None, None), context=contextvars.Context()) == "acme"
    token = current_tenant.set(ANONYMOUS)
    try:
        assert await wrapped.unary_unary(None, None) == "acme"
        assert current_tenant.get() is ANONYMOUS
    finally:
        current_tenant.reset(token)


async def test_with_tenant_closes_an_abandoned_stream_at_once():
    closed: list[str] = []

    async def replies(request, context):
        try:
            yield tenant_of_call().name
            yield "never sent"
        finally:
            closed.append("closed")  # e.g. a job slot given back

    stream = with_tenant(grpc.unary_stream_rpc_method_handler(replies), Tenant("acme", ())).unary_stream(None, None)
    assert await anext(stream) == "acme"
    await stream.aclose()
    assert closed == ["closed"]


def test_with_tenant_refuses_a_synchronous_handler():
    with pytest.raises(TypeError, match="grpc.aio handlers"):
        with_tenant(grpc.unary_unary_rpc_method_handler(lambda request, context: b""), ANONYMOUS)

