"""Webhook targets: explicit ports, addresses checked after resolution, the connection made to the checked address,
and one total timeout per attempt (issue #26)."""

import asyncio
import socket
import ssl
import subprocess

import pytest

from gateway.job_store import JobRecord
from gateway.metrics import GatewayMetrics
from gateway.service import GatewaySettings
from gateway.tenants import Tenant, TenantRegistry
from gateway.webhooks import TenantWebhooks, WebhookSender, WebhookTerms, address_problem, check_webhook
from service_runtime.errors import InvalidArgument

from tests.support.waiting import eventually
from tests.support.webhook_receiver import dripping_receiver, webhook_receiver

JOB_ID = "job_" + "0" * 24


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.10", "::1",  # loopback
    "10.1.2.3", "172.16.0.1", "192.168.1.1", "fd00::1",  # RFC 1918 and unique local
    "169.254.169.254", "fe80::1",  # link-local, the cloud metadata service among them
    "0.0.0.0", "::",  # unspecified: a connection to it reaches this host
    "224.0.0.1", "ff02::1",  # multicast
    "240.0.0.1", "100.64.0.1", "192.0.2.1",  # reserved, carrier-grade NAT, documentation
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::1", "64:ff9b::a9fe:a9fe",  # IPv4 inside IPv6
])
def test_addresses_that_are_not_public_are_refused(address):
    assert address_problem(address, allow_private=False)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:93.184.216.34"])
def test_public_addresses_are_accepted(address):
    assert address_problem(address, allow_private=False) == ""


def test_the_private_addresses_setting_allows_loopback_and_private_but_never_unspecified_or_multicast():
    for address in ("127.0.0.1", "::1", "10.0.0.1", "169.254.169.254"):
        assert address_problem(address, allow_private=True) == "", address
    for address in ("0.0.0.0", "::", "224.0.0.1"):
        assert address_problem(address, allow_private=True), address


PORTS = WebhookTerms(("hooks.example", "alt.example:8443", "[2606:4700::1111]:9000"), "secret", "the tenants file")


@pytest.mark.parametrize("url", ["http://hooks.example/hook", "http://hooks.example:80/hook",
                                 "https://hooks.example/hook", "https://HOOKS.example:443/hook",
                                 "https://alt.example:8443/hook", "http://[2606:4700::1111]:9000/hook"])
def test_an_entry_allows_the_schemes_default_port_or_the_port_it_names(url):
    assert check_webhook(url, PORTS)


@pytest.mark.parametrize("url", ["http://hooks.example:8080/hook", "http://hooks.example:443/hook",
                                 "https://hooks.example:80/hook", "https://alt.example/hook",
                                 "http://[2606:4700::1111]/hook"])
def test_any_other_port_is_refused_without_listing_the_allow_list(url):
    with pytest.raises(InvalidArgument, match="allow-list") as error:
        check_webhook(url, PORTS)
    assert "alt.example:8443" not in error.value.message and "]:9000" not in error.value.message


@pytest.mark.parametrize("url", ["http://hooks.example:0/hook", "http://hooks.example:99999/hook",
                                 "http://hooks.example:abc/hook", "http://hooks.example:-1/hook"])
def test_a_bad_port_is_invalid_argument(url):
    with pytest.raises(InvalidArgument, match="port"):
        check_webhook(url, PORTS)


def sender(allow_private: bool, hosts: tuple[str, ...], tls: ssl.SSLContext | None = None, **settings):
    metrics = GatewayMetrics()
    registry = TenantRegistry([Tenant("acme", (), webhook_secret="s", webhook_hosts=hosts)])
    config = GatewaySettings.from_env({}, allow_anonymous=True, webhook_backoff_s=0.01,
                                      webhook_allow_private_addresses=allow_private, **settings)
    return WebhookSender(config, metrics, TenantWebhooks(registry, config), tls=tls), metrics


def outcomes(metrics: GatewayMetrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("swl_gateway_webhook_attempts_total", {"outcome": outcome}) or 0


async def test_a_name_that_resolves_to_loopback_is_refused_at_submission_without_the_allow_list():
    with webhook_receiver() as (url, received):
        port = url.split(":")[2].split("/")[0]
        webhooks, _ = sender(False, (f"localhost:{port}", "internal-secret.example"))
        with pytest.raises(InvalidArgument, match="not a public address") as error:
            await webhooks.check("acme", f"http://localhost:{port}/hook")
        metadata, _ = sender(False, ("169.254.169.254",))
        with pytest.raises(InvalidArgument, match="not a public address"):
            await metadata.check("acme", "http://169.254.169.254/latest/meta-data/")
    assert "internal-secret" not in error.value.message and "127.0.0.1" not in error.value.message
    assert received == []


async def test_a_name_that_does_not_resolve_is_invalid_argument():
    webhooks, _ = sender(False, ("no-such-host.invalid",))
    with pytest.raises(InvalidArgument, match="does not resolve"):
        await webhooks.check("acme", "http://no-such-host.invalid/hook")


async def test_delivery_to_a_loopback_name_is_refused_unless_the_setting_allows_it():
    """The record may have been written by anyone who reached Redis: the address is checked again at delivery."""
    with webhook_receiver() as (url, received):
        port = url.split(":")[2].split("/")[0]
        record = JobRecord(JOB_ID, state="SUCCEEDED", webhook_url=f"http://localhost:{port}/hook", tenant="acme")
        refusing, metrics = sender(False, (f"localhost:{port}",))
        assert await refusing.deliver(record) is False
        assert received == [] and outcomes(metrics, "refused") == 1 and outcomes(metrics, "failed") == 0
        allowing, metrics = sender(True, (f"localhost:{port}",))
        assert await allowing.deliver(record) is True
        await allowing.stop()
    assert len(received) == 1 and outcomes(metrics, "delivered") == 1
    headers = {k.lower(): v for k, v in received[0][0].items()}
    assert headers["host"] == f"localhost:{port}"  # the name, though the connection went to its address


async def test_the_connection_goes_to_the_address_that_was_checked_not_a_second_lookup(monkeypatch):
    """DNS rebinding: a name that answers one address to the check and another to the connection. The system
    resolver is replaced for one name only, because no rebinding DNS server can run here; both receivers are real."""
    lookups = []
    real = socket.getaddrinfo

    def rebinding(host, port, *args, **kwargs):
        if host != "rebind.test":
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        return real("127.0.0.1" if len(lookups) == 1 else "127.0.0.2", port, *args, **kwargs)

    with webhook_receiver() as (checked_url, checked):
        port = int(checked_url.split(":")[2].split("/")[0])
        with webhook_receiver(host="127.0.0.2", port=port) as (_, rebound):
            monkeypatch.setattr(socket, "getaddrinfo", rebinding)
            webhooks, _ = sender(True, (f"rebind.test:{port}",), webhook_max_attempts=1)
            record = JobRecord(JOB_ID, state="SUCCEEDED", webhook_url=f"http://rebind.test:{port}/x", tenant="acme")
            assert await webhooks.deliver(record) is True
            await webhooks.stop()
    assert len(checked) == 1 and rebound == [] and lookups == ["rebind.test"]


async def test_https_is_verified_against_the_name_while_connecting_to_the_checked_address(monkeypatch, tmp_path):
    """A real TLS server on 127.0.0.1 whose certificate names only hooks.test: the delivery succeeds only if the
    handshake sends and checks the name (SNI), not the address it connected to."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=hooks.test",
                    "-addext", "subjectAltName=DNS:hooks.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k: real(
        "127.0.0.1" if host == "hooks.test" else host, port, *a, **k))  # no DNS here: the name is mapped by hand
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    seen_names = []
    server_context.sni_callback = lambda sock, name, context: seen_names.append(name)
    trust = ssl.create_default_context(cafile=str(cert))
    with webhook_receiver(tls=server_context) as (url, received):
        port = int(url.split(":")[2].split("/")[0])
        webhooks, metrics = sender(True, (f"hooks.test:{port}",), tls=trust, webhook_max_attempts=1)
        record = JobRecord(JOB_ID, state="SUCCEEDED", webhook_url=f"https://hooks.test:{port}/hook", tenant="acme")
        delivered = await webhooks.deliver(record)
        await webhooks.stop()
    assert delivered is True and seen_names == ["hooks.test"] and len(received) == 1


async def test_a_receiver_that_drips_its_answer_is_cut_at_the_timeout():
    """One total timeout per attempt: a receiver sending a byte of its headers every 0.2 s never trips a read timeout,
    and must not hold the attempt (or a thread) beyond webhook_timeout_s."""
    with dripping_receiver(every_s=0.2) as (url, posts, hung_up):
        port = url.split(":")[2].split("/")[0]
        webhooks, metrics = sender(True, (f"127.0.0.1:{port}",), webhook_max_attempts=1, webhook_timeout_s=0.5)
        record = JobRecord(JOB_ID, state="SUCCEEDED", webhook_url=url, tenant="acme")
        assert await asyncio.wait_for(webhooks.deliver(record), 20) is False
        eventually(hung_up.is_set, seconds=10, what="the gateway hanging up on the dripping receiver")
        await webhooks.stop()
    assert len(posts) == 1 and outcomes(metrics, "failed") == 1
