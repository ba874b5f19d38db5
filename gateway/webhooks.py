"""Job webhooks: the allow-list check at submission, and signed delivery with retries that never ends a caller."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass

from service_runtime.errors import FailedPrecondition, InvalidArgument, ServiceError
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


def check_webhook(url: str, terms: WebhookTerms) -> str:
    """The URL, if this tenant may have its webhooks sent there; the refusal does not list the allowed hosts."""
    if not url:
        return url
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # parsed here: a port out of range or not a number raises ValueError
    except ValueError as error:
        raise InvalidArgument(f"webhook_url is not a valid URL: {error}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise InvalidArgument("webhook_url must be an http(s) URL with a host and no user name")
    host = parts.hostname.lower()
    if host not in terms.hosts and f"{host}:{port}" not in terms.hosts:
        raise InvalidArgument(f"webhook_url host {host[:100]!r} is not on your webhook allow-list ({terms.source})")
    if not terms.secret:
        raise FailedPrecondition(f"no webhook secret is configured for you ({terms.source}); webhooks cannot be "
                                 "signed")
    return url


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect could lead off the allow-list
        return None


class WebhookSender:
    """POSTs a finished job's signed outcome to its webhook, retrying with exponential back-off; each delivery is
    a task of its own, tracked so that a stop cancels it and any error is logged with the job id."""

    def __init__(self, settings, metrics: GatewayMetrics, terms: TenantWebhooks) -> None:
        self.settings, self.metrics, self.terms = settings, metrics, terms
        self._opener = urllib.request.build_opener(_NoRedirects)
        self._tasks: set[asyncio.Task] = set()

    def send(self, record: JobRecord) -> None:
        if not record.webhook_url:
            return
        task = asyncio.get_running_loop().create_task(self.deliver(record), name=f"webhook-{record.job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)

    async def deliver(self, record: JobRecord) -> bool:
        """True once delivered; False after the last attempt failed (each failure is logged and counted)."""
        body = json.dumps({"job_id": record.job_id, "state": record.state, "code": record.error_code,
                           "status": record.error_status or "OK", "message": record.error_message,
                           "video_path": f"/v1/jobs/{record.job_id}/video" if record.state == "SUCCEEDED" else ""
                           }).encode()
        try:  # again now: the record came back from the store, and the tenant's hosts may have changed
            check_webhook(record.webhook_url, self.terms.of(record.tenant))
        except ServiceError as error:
            self.metrics.webhook_attempts.labels("refused").inc()
            log.warning("webhook not sent", extra={"job_id": record.job_id, "error": error.message})
            return False
        for attempt in range(self.settings.webhook_max_attempts):
            timestamp = str(int(time.time()))
            request = urllib.request.Request(record.webhook_url, data=body, method="POST", headers={
                "content-type": "application/json", TIMESTAMP_HEADER: timestamp,
                SIGNATURE_HEADER: sign(self.terms.of(record.tenant).secret, timestamp, body)})
            try:
                await asyncio.to_thread(self._opener.open, request, None, 10)
                self.metrics.webhook_attempts.labels("delivered").inc()
                return True
            except Exception as error:  # noqa: BLE001 - any failure of the receiver or the network is retried
                self.metrics.webhook_attempts.labels("failed").inc()
                log.warning("webhook delivery failed", extra={"job_id": record.job_id, "attempt": attempt + 1,
                                                               "error": f"{type(error).__name__}: {error}"})
            await asyncio.sleep(self.settings.webhook_backoff_s * 2**attempt)
        return False
