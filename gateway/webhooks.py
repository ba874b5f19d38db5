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

from service_runtime.errors import FailedPrecondition, InvalidArgument
from service_runtime.supervision import cancel_and_wait

from .job_store import JobRecord
from .limits import setting_name
from .metrics import GatewayMetrics

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "x-swl-signature"
TIMESTAMP_HEADER = "x-swl-timestamp"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """HMAC-SHA256 over `timestamp.body`, as the webhook header carries it."""
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def check_webhook(url: str, allowed_hosts: tuple[str, ...], secret: str) -> str:
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise InvalidArgument("webhook_url must be an http(s) URL with a host and no user name")
    host = parts.hostname.lower()
    if host not in allowed_hosts and f"{host}:{parts.port}" not in allowed_hosts:
        raise InvalidArgument(f"webhook_url host {host!r} is not on this gateway's allow-list "
                              f"({setting_name('webhook_allowed_hosts')}: {', '.join(allowed_hosts) or 'empty'})")
    if not secret:
        raise FailedPrecondition(f"this gateway has no webhook secret ({setting_name('webhook_secret')}); "
                                 "it cannot sign webhooks")
    return url


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect could lead off the allow-list
        return None


class WebhookSender:
    """POSTs a finished job's signed outcome to its webhook, retrying with exponential back-off; each delivery is
    a task of its own, tracked so that a stop cancels it and any error is logged with the job id."""

    def __init__(self, settings, metrics: GatewayMetrics) -> None:
        self.settings, self.metrics = settings, metrics
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
        for attempt in range(self.settings.webhook_max_attempts):
            timestamp = str(int(time.time()))
            request = urllib.request.Request(record.webhook_url, data=body, method="POST", headers={
                "content-type": "application/json", TIMESTAMP_HEADER: timestamp,
                SIGNATURE_HEADER: sign(self.settings.webhook_secret, timestamp, body)})
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
