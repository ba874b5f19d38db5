"""Raw media uploads kept in memory for a while, by an unguessable id, within a byte budget."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from service_runtime.errors import InvalidArgument, NotFound, ResourceExhausted

from .limits import setting_name


@dataclass(frozen=True)
class Upload:
    data: bytes
    expires_at: float  # time.monotonic()


class UploadStore:
    """Uploads by id (a capability: whoever holds the id may use the upload), dropped after `ttl_s`."""

    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self._uploads: OrderedDict[str, Upload] = OrderedDict()  # oldest first
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def add(self, data: bytes) -> str:
        if not data:
            raise InvalidArgument("media: the upload has no bytes")
        self._expire()
        if self._bytes + len(data) > self.max_bytes:
            raise ResourceExhausted(
                f"the upload store is full ({self._bytes >> 20} of {self.max_bytes >> 20} MiB, "
                f"{setting_name('upload_store_mb')}); retry once earlier uploads expire", retry_after_s=self.ttl_s / 10)
        upload_id = secrets.token_urlsafe(18)
        self._uploads[upload_id] = Upload(data, time.monotonic() + self.ttl_s)
        self._bytes += len(data)
        return upload_id

    def get(self, upload_id: str) -> bytes:
        self._expire()
        upload = self._uploads.get(upload_id)
        if upload is None:
            raise NotFound(f"upload {upload_id[:32]!r} does not exist or has expired (uploads are kept "
                           f"{self.ttl_s:.0f} s, {setting_name('upload_ttl_s')}); upload the media again")
        return upload.data

    def _expire(self) -> None:
        now = time.monotonic()
        while self._uploads:
            upload_id, upload = next(iter(self._uploads.items()))
            if upload.expires_at > now:
                return
            del self._uploads[upload_id]
            self._bytes -= len(upload.data)
