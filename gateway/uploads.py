"""Raw media uploads kept for a while in the data directory (shared by replicas), by an unguessable id.

An upload made through one replica is used through any other that shares the data directory, which a load
balancer in front of several gateways needs. Uploads live in `<folder>/<tenant>/<id>`: another tenant's id
is not found, exactly as a missing one. The id is checked against one pattern before it becomes a file name."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from pathlib import Path

from service_runtime.errors import InvalidArgument, NotFound, ResourceExhausted

from .limits import setting_name
from .tenants import tenant_folder

UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{24}")


class UploadStore:
    def __init__(self, folder: Path, max_bytes: int, ttl_s: float) -> None:
        self.folder, self.max_bytes, self.ttl_s = Path(folder), max_bytes, ttl_s
        self.held_bytes = 0  # what the uploads held at the last scan (a metric)

    def _tenant_folder(self, tenant: str) -> Path:
        return tenant_folder(self.folder, tenant)

    async def add(self, tenant: str, data: bytes) -> str:
        if not data:
            raise InvalidArgument("media: the upload has no bytes")
        return await asyncio.to_thread(self._add, self._tenant_folder(tenant), data)

    def _add(self, folder: Path, data: bytes) -> str:
        held = self._expire()
        if held + len(data) > self.max_bytes:
            raise ResourceExhausted(
                f"the upload store is full ({held >> 20} of {self.max_bytes >> 20} MiB, "
                f"{setting_name('upload_store_mb')}); retry once earlier uploads expire", retry_after_s=self.ttl_s / 10)
        folder.mkdir(parents=True, exist_ok=True)
        upload_id = secrets.token_urlsafe(18)
        partial = folder / f".{upload_id}.partial"
        partial.write_bytes(data)
        partial.rename(folder / upload_id)  # no replica ever reads half an upload
        self.held_bytes = held + len(data)
        return upload_id

    async def get(self, tenant: str, upload_id: str) -> bytes:
        return await asyncio.to_thread(self._get, self._tenant_folder(tenant), upload_id)

    def _get(self, folder: Path, upload_id: str) -> bytes:
        path = folder / upload_id if UPLOAD_ID.fullmatch(upload_id) else None
        try:
            if path is not None and path.stat().st_mtime + self.ttl_s >= time.time():
                return path.read_bytes()
        except FileNotFoundError:
            pass
        raise NotFound(f"upload {upload_id[:32]!r} does not exist or has expired (uploads are kept "
                       f"{self.ttl_s:.0f} s, {setting_name('upload_ttl_s')}); upload the media again")

    def _expire(self) -> int:
        """Deletes every tenant's uploads past their time; returns the bytes the others hold."""
        if not self.folder.is_dir():
            return 0
        held, now = 0, time.time()
        entries = [entry for tenant in os.scandir(self.folder) if tenant.is_dir() for entry in _scan(tenant.path)]
        for entry in entries:
            try:
                stat = entry.stat()
                if stat.st_mtime + self.ttl_s < now:
                    os.unlink(entry.path)
                else:
                    held += stat.st_size
            except FileNotFoundError:  # another replica expired it first
                continue
        self.held_bytes = held
        return held


def _scan(folder: str) -> list[os.DirEntry]:
    try:
        return list(os.scandir(folder))
    except FileNotFoundError:  # another replica removed it
        return []
