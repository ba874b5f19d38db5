"""Avatars: face media planned once and kept, so that later jobs run only the generator.

Media, plan, planning options and preview live in `<data_dir>/avatars/<tenant>/<id>/` (a shared volume across
replicas). The metadata goes to Redis when it is configured (so every replica lists the same avatars),
otherwise to `meta.json` beside the media. Every place an avatar is kept is named by its tenant, so another
tenant's avatar is not found exactly as a missing one is. Ids are made here and checked against one pattern
before any path is built from them: no client string becomes a path."""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
from superwav2lip.gateway.v1 import gateway_pb2

from service_runtime.errors import InvalidArgument, NotFound

from .redis_calls import REDIS_FAILURES, bounded
from .faces import FacePlan
from .tenants import tenant_folder

log = logging.getLogger(__name__)

AVATAR_ID = re.compile(r"av_[0-9a-f]{24}")
INDEX_KEY = "swl:avatars"  # sorted set of every "<tenant>/<id>" by creation time (the count)
MAX_PAGE = 500


def check_avatar_id(avatar_id: str) -> str:
    if not AVATAR_ID.fullmatch(avatar_id):
        raise InvalidArgument(f"avatar_id {avatar_id[:40]!r} is not an avatar id (av_ and 24 hex digits)")
    return avatar_id


@dataclass(frozen=True)
class AvatarRecord:
    avatar_id: str
    name: str
    created_unix: float
    width: int
    height: int
    fps: tuple[int, int]
    frames: int
    face_bytes: int

    def message(self, preview: bytes = b"") -> gateway_pb2.Avatar:
        return gateway_pb2.Avatar(avatar_id=self.avatar_id, name=self.name, created_unix=int(self.created_unix),
                                  width=self.width, height=self.height, fps=float(Fraction(*self.fps)),
                                  frames=self.frames, face_bytes=self.face_bytes, preview_jpeg=preview)

    @classmethod
    def from_json(cls, data: bytes | str) -> "AvatarRecord":
        raw = json.loads(data)
        return cls(**{**raw, "fps": tuple(raw["fps"])})


@dataclass(frozen=True)
class LoadedAvatar:
    record: AvatarRecord
    face: bytes
    plan: FacePlan
    planning: gateway_pb2.GenerateOptions


def preview_jpeg(frame: np.ndarray, plan: FacePlan) -> bytes:
    """The first frame, at most 512 px wide, with the target's box drawn: what the avatar will animate."""
    picture = frame.copy()
    target = plan.targets[0] if plan.targets else None
    if target is not None:
        x1, y1, x2, y2 = target.box
        cv2.rectangle(picture, (x1, y1), (x2 - 1, y2 - 1), (0, 200, 255), max(2, picture.shape[1] // 200))
    scale = min(1.0, 512 / picture.shape[1])
    if scale < 1.0:
        picture = cv2.resize(picture, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()


class AvatarStore:
    def __init__(self, data_dir: Path, redis=None, timeout_s: float = 0.5) -> None:
        self.root = Path(data_dir) / "avatars"
        self.redis, self.timeout_s = redis, timeout_s

    def _tenant_root(self, tenant: str) -> Path:
        return tenant_folder(self.root, tenant)

    def _folder(self, tenant: str, avatar_id: str) -> Path:
        return self._tenant_root(tenant) / check_avatar_id(avatar_id)

    @staticmethod
    def _meta_key(tenant: str, avatar_id: str) -> str:
        return f"swl:avatar:{tenant}:{avatar_id}"

    @staticmethod
    def _tenant_index(tenant: str) -> str:
        return f"{INDEX_KEY}:{tenant}"

    async def _redis(self, call):
        return await bounded(call, self.timeout_s, "the avatar index")

    async def create(self, tenant: str, face: bytes, plan: FacePlan, name: str, planning: gateway_pb2.GenerateOptions,
                     preview: bytes) -> AvatarRecord:
        record = AvatarRecord("av_" + secrets.token_hex(12), name[:200], time.time(), plan.size[0], plan.size[1],
                              (plan.fps.numerator, plan.fps.denominator), plan.source_frames, len(face))
        meta = json.dumps(asdict(record))
        await asyncio.to_thread(self._write, tenant, record.avatar_id, face, plan, planning, preview,
                                None if self.redis else meta)
        if self.redis is not None:
            try:
                await self._redis(self.redis.set(self._meta_key(tenant, record.avatar_id), meta))
                await self._redis(self.redis.zadd(self._tenant_index(tenant), {record.avatar_id: record.created_unix}))
                await self._redis(self.redis.zadd(INDEX_KEY, {f"{tenant}/{record.avatar_id}": record.created_unix}))
            except REDIS_FAILURES:
                await asyncio.to_thread(shutil.rmtree, self._folder(tenant, record.avatar_id), True)
                raise
        return record

    def _write(self, tenant: str, avatar_id: str, face: bytes, plan: FacePlan, planning: gateway_pb2.GenerateOptions,
               preview: bytes, meta: str | None) -> None:
        """Writes into a hidden folder and renames it into place, so no replica sees half an avatar."""
        root = self._tenant_root(tenant)
        root.mkdir(parents=True, exist_ok=True)
        staging = root / f".{avatar_id}.partial"
        staging.mkdir()
        (staging / "face").write_bytes(face)
        (staging / "plan.json").write_bytes(plan.to_json())
        (staging / "planning.pb").write_bytes(planning.SerializeToString())
        (staging / "preview.jpg").write_bytes(preview)
        if meta is not None:
            (staging / "meta.json").write_text(meta)
        staging.rename(self._folder(tenant, avatar_id))

    async def get(self, tenant: str, avatar_id: str) -> AvatarRecord:
        folder = self._folder(tenant, avatar_id)
        if self.redis is not None:
            meta = await self._redis(self.redis.get(self._meta_key(tenant, avatar_id)))
        else:
            meta = await asyncio.to_thread(lambda: (folder / "meta.json").read_bytes()
                                           if (folder / "meta.json").is_file() else None)
        if meta is None:
            raise NotFound(f"avatar {avatar_id} does not exist (it may have been deleted)")
        return AvatarRecord.from_json(meta)

    async def preview(self, tenant: str, avatar_id: str) -> bytes:
        await self.get(tenant, avatar_id)
        return await asyncio.to_thread((self._folder(tenant, avatar_id) / "preview.jpg").read_bytes)

    async def load(self, tenant: str, avatar_id: str) -> LoadedAvatar:
        """The avatar's media, plan and planning options, for a job."""
        record = await self.get(tenant, avatar_id)
        folder = self._folder(tenant, avatar_id)

        def read():
            planning = gateway_pb2.GenerateOptions.FromString((folder / "planning.pb").read_bytes())
            return (folder / "face").read_bytes(), FacePlan.from_json((folder / "plan.json").read_bytes()), planning

        try:
            face, plan, planning = await asyncio.to_thread(read)
        except FileNotFoundError:
            raise NotFound(f"avatar {avatar_id}'s media is missing from the data directory") from None
        return LoadedAvatar(record, face, plan, planning)

    async def list(self, tenant: str, page_size: int, page_token: str) -> tuple[list[AvatarRecord], str]:
        """Newest first; the token is the offset of the next page."""
        size = min(MAX_PAGE, page_size or 50)
        if page_token and not page_token.isdigit():
            raise InvalidArgument("page_token must be the next_page_token of a previous page")
        start = int(page_token or 0)
        if self.redis is not None:
            ids = await self._redis(self.redis.zrevrange(self._tenant_index(tenant), start, start + size))
            metas = await self._redis(self.redis.mget([self._meta_key(tenant, i.decode()) for i in ids])) if ids else []
            records = [AvatarRecord.from_json(m) for m in metas if m is not None]
        else:
            records = await asyncio.to_thread(self._local_records, self._tenant_root(tenant))
            records = records[start : start + size + 1]
        more = len(records) > size
        return records[:size], str(start + size) if more else ""

    @staticmethod
    def _local_records(root: Path) -> builtins.list[AvatarRecord]:  # `list` is a method of this class
        if not root.is_dir():
            return []
        metas = [f / "meta.json" for f in root.iterdir() if AVATAR_ID.fullmatch(f.name)]
        records = [AvatarRecord.from_json(m.read_bytes()) for m in metas if m.is_file()]
        return sorted(records, key=lambda r: r.created_unix, reverse=True)

    async def count(self) -> int:
        """Every tenant's avatars (a metric)."""
        if self.redis is not None:
            return int(await self._redis(self.redis.zcard(INDEX_KEY)))

        def local_count() -> int:
            tenants = [f for f in self.root.iterdir() if f.is_dir()] if self.root.is_dir() else []
            return sum(len(self._local_records(folder)) for folder in tenants)

        return await asyncio.to_thread(local_count)

    async def delete(self, tenant: str, avatar_id: str) -> None:
        await self.get(tenant, avatar_id)
        if self.redis is not None:
            await self._redis(self.redis.delete(self._meta_key(tenant, avatar_id)))
            await self._redis(self.redis.zrem(self._tenant_index(tenant), avatar_id))
            await self._redis(self.redis.zrem(INDEX_KEY, f"{tenant}/{avatar_id}"))
        await asyncio.to_thread(shutil.rmtree, self._folder(tenant, avatar_id), True)
