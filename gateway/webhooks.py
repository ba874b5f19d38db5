"""Job webhooks: the allow-list and address checks, and signed delivery with retries that never ends a caller."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass

import httpx

from service_runtime.errors import FailedPrecondition, InvalidArgument, ServiceError, Unavailable
from service_runtime.supervision import cancel_and_wait

from .job_store import JobRecord
from .limits import setting_name
from .metrics import GatewayMetrics
from .tenants import ANONYMOUS, DEFAULT_TENANT, TenantRegistry

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "x-swl-signature"
TIMESTAMP_HEADER = "x-swl-timestamp"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """HMAC-SHA256 over `timestamp.body`, as the webhook header carries it."""
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class WebhookTerms:
    """Where one tenant's webhooks may go and the secret they are signed with."""

    hosts: tuple[str, ...]
    secret: str
    source: str  # where a person changes them, for messages


class TenantWebhooks:
    """Each tenant's webhook terms, read at every use so that a tenants-file reload applies at once. Tenants of the
    file have their own (`webhook_hosts`, `webhook_secret`), and none when the file gives none: one tenant must
    never sign with a secret another holds. Only the gateway's own tenants (`default` of SWL_GATEWAY_API_KEYS,
    and `anonymous`) use the gateway's settings."""

    def __init__(self, tenants: TenantRegistry, settings) -> None:
        self.tenants, self.settings = tenants, settings

    def of(self, tenant: str) -> WebhookTerms:
        if tenant in (DEFAULT_TENANT, ANONYMOUS.name):
            return WebhookTerms(self.settings.webhook_allowed_hosts, self.settings.webhook_secret,
                                f"{setting_name('webhook_allowed_hosts')} and {setting_name('webhook_secret')}")
        found = self.tenants.tenant(tenant)
        if found is None:  # removed from the file since: its webhooks go nowhere
            return WebhookTerms((), "", "the tenants file")
        return WebhookTerms(found.webhook_hosts, found.webhook_secret,
                            f"webhook_hosts and webhook_secret of tenant {tenant} in the tenants file")


DEFAULT_PORTS = {"http": 80, "https": 443}
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix: its last 32 bits are an IPv4 address


@dataclass(frozen=True)
class WebhookTarget:
    """A checked webhook URL taken apart, and once resolved the address its connection goes to."""

    scheme: str
    host: str  # lower case; IPv6 without brackets
    port: int
    target: str  # path and query
    address: str = ""

    @property
    def host_header(self) -> str:
        authority = f"[{self.host}]" if ":" in self.host else self.host
        return authority if self.port == DEFAULT_PORTS[self.scheme] else f"{authority}:{self.port}"

    @property
    def connect_url(self) -> str:
        """The URL with the checked address in place of the name: nothing resolves it a second time."""
        address = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.scheme}://{address}:{self.port}{self.target}"


class AddressRefused(InvalidArgument):
    """The host resolves to an address webhooks may not go to."""


def check_webhook(url: str, terms: WebhookTerms) -> WebhookTarget | None:
    """The URL taken apart, if this tenant may have its webhooks sent there (None for no URL); the refusal does
    not list the allowed hosts. An entry without a port allows the scheme's default port only."""
    if not url:
        return None
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as error:
        raise InvalidArgument(f"webhook_url is not a valid URL: {error}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise InvalidArgument("webhook_url must be an http(s) URL with a host and no user name")
    try:
        given = parts.port  # parsed here: a port out of range or not a number raises ValueError
    except ValueError:
        given = 0
    port = DEFAULT_PORTS[parts.scheme] if given is None else given
    if not 0 < port < 65536:
        raise InvalidArgument("webhook_url has a bad port: it must be a number from 1 to 65535")
    host = parts.hostname.lower()
    authority = f"[{host}]" if ":" in host else host
    hosts = {entry.lower() for entry in terms.hosts}
    if f"{authority}:{port}" not in hosts and not (port == DEFAULT_PORTS[parts.scheme] and
                                                    (host in hosts or authority in hosts)):
        raise InvalidArgument(f"webhook_url host and port {authority[:100]}:{port} are not on your webhook "
                              f"allow-list ({terms.source})")
    if not terms.secret:
        raise FailedPrecondition(f"no webhook secret is configured for you ({terms.source}); webhooks cannot be "
                                 "signed")
    return WebhookTarget(parts.scheme, host, port, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))


def address_problem(address: str, allow_private: bool) -> str:
    """What is wrong with sending a webhook to `address` ("" when nothing). IPv4 inside IPv6 (mapped, 6to4,
    NAT64) is judged as the IPv4 address it reaches."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ip.ipv4_mapped or ip.sixtofour or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else ip)
    if ip.is_unspecified:
        return "an unspecified address"  # a connection to it reaches this host
    if ip.is_multicast:
        return "a multicast address"
    if allow_private:
        return ""
    for kind, is_kind in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                          ("private", ip.is_private), ("reserved", ip.is_reserved)):
        if is_kind:
            return f"a {kind} address"
    return "" if ip.is_global else "a non-global address"


async def resolve(target: WebhookTarget, allow_private: bool) -> WebhookTarget:
    """The target with the address to connect to; every address the name has must be allowed, since a name that
    also answers a private address could be given that one next."""
    try:
        answers = await asyncio.get_running_loop().getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        if error.errno == socket.EAI_AGAIN:
            raise Unavailable(f"webhook_url host {target.host[:100]!r} could not be looked up now ({error.strerror}); "
                              "try again") from None
        raise InvalidArgument(f"webhook_url host {target.host[:100]!r} does not resolve ({error.strerror})") from None
    addresses = list(dict.fromkeys(str(answer[4][0]) for answer in answers))
    for address in addresses:
        problem = address_problem(address, allow_private)
        if problem:  # the address is not named: it would tell a caller what internal names resolve to
            raise AddressRefused(f"webhook_url host {target.host[:100]!r} resolves to {problem}, not a public "
                                 "address; webhooks go only to public addresses")
    return dataclasses.replace(target, address=addresses[0])


class WebhookSender:
    """POSTs a finished job's signed outcome to its webhook, retrying with exponential back-off; each delivery is
    a task of its own, tracked so that a stop cancels it and any error is logged with the job id. Each attempt
    resolves the host, checks every address, and connects to the checked one, all within one total timeout."""

    def __init__(self, settings, metrics: GatewayMetrics, terms: TenantWebhooks,
                 tls: ssl.SSLContext | None = None) -> None:
        self.settings, self.metrics, self.terms = settings, metrics, terms
        self._tls = tls  # the certificates receivers are verified with (None: the system's)
        self._http: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task] = set()

    async def check(self, tenant: str, url: str) -> WebhookTarget | None:
        """At submission: the URL is allowed for this tenant and its host resolves only to allowed addresses."""
        target = check_webhook(url, self.terms.of(tenant))
        if target is None:
            return None
        try:
            async with asyncio.timeout(self.settings.webhook_timeout_s):
                return await resolve(target, self.settings.webhook_allow_private_addresses)
        except TimeoutError:
            raise Unavailable(f"webhook_url host {target.host[:100]!r} could not be looked up within "
                              f"{self.settings.webhook_timeout_s:g} s; try again") from None

    def send(self, record: JobRecord) -> None:
        if not record.webhook_url:
            return
        task = asyncio.get_running_loop().create_task(self.deliver(record), name=f"webhook-{record.job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def deliver(self, record: JobRecord) -> bool:
        """True once delivered; False after the last attempt failed or at a refusal (each logged and counted)."""
        body = json.dumps({"job_id": record.job_id, "state": record.state, "code": record.error_code,
                           "status": record.error_status or "OK", "message": record.error_message,
                           "video_path": f"/v1/jobs/{record.job_id}/video" if record.state == "SUCCEEDED" else ""
                           }).encode()
        try:  # again now: the record came back from the store, and the tenant's hosts may have changed
            target = check_webhook(record.webhook_url, self.terms.of(record.tenant))
        except ServiceError as error:
            return self._refused(record, error)
        assert target is not None  # send() skips records without a URL
        attempts = self.settings.webhook_max_attempts
        for attempt in range(attempts):
            try:
                async with asyncio.timeout(self.settings.webhook_timeout_s):
                    placed = await resolve(target, self.settings.webhook_allow_private_addresses)
                    status = await self._post(placed, body, self.terms.of(record.tenant).secret)
                if 200 <= status < 300:
                    self.metrics.webhook_attempts.labels("delivered").inc()
                    return True
                problem = f"the receiver answered HTTP {status}"  # a redirect too: it could lead off the list
            except AddressRefused as error:
                return self._refused(record, error)
            except TimeoutError:
                problem = (f"TimeoutError: the attempt took longer than {self.settings.webhook_timeout_s:g} s "
                           f"({setting_name('webhook_timeout_s')})")
            except Exception as error:  # noqa: BLE001 - any failure of the receiver or the network is retried
                problem = f"{type(error).__name__}: {error}"
            self.metrics.webhook_attempts.labels("failed").inc()
            log.warning("webhook delivery failed", extra={"job_id": record.job_id, "attempt": attempt + 1,
                                                           "error": problem})
            if attempt + 1 < attempts:
                await asyncio.sleep(self.settings.webhook_backoff_s * 2**attempt)
        return False

    def _refused(self, record: JobRecord, error: ServiceError) -> bool:
        self.metrics.webhook_attempts.labels("refused").inc()
        log.warning("webhook not sent", extra={"job_id": record.job_id, "error": error.message})
        return False

    async def _post(self, target: WebhookTarget, body: bytes, secret: str) -> int:
        """One POST to the checked address, with the URL's name as Host and, over TLS, as SNI and the name the
        certificate must carry; only the status is read."""
        if self._http is None:  # no proxies from the environment (they would resolve the name again), no
            # redirects, and no kept connections (one made with one name's SNI must not serve another's)
            self._http = httpx.AsyncClient(verify=self._tls or True, trust_env=False, follow_redirects=False,
                                           limits=httpx.Limits(max_keepalive_connections=0))
        timestamp = str(int(time.time()))
        request = self._http.build_request(
            "POST", target.connect_url, content=body,
            headers={"host": target.host_header, "content-type": "application/json", TIMESTAMP_HEADER: timestamp,
                     SIGNATURE_HEADER: sign(secret, timestamp, body)},
            extensions={"sni_hostname": target.host} if target.scheme == "https" else {})
        response = await self._http.send(request, stream=True)
        await response.aclose()
        return response.status_code
