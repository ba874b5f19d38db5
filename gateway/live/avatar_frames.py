"""An avatar's frames at a live session's output size, decoded once and kept as JPEG for random access.

Idle playback runs the avatar forwards and backwards (ping-pong); decoding a video backwards means a seek to
the keyframe before every frame. So the media is decoded once, forwards, in the background, each frame framed
to the output size and kept compressed; sessions of the same avatar and size share it."""

from __future__ import annotations

import asyncio
import collections
from concurrent.futures import Executor
from typing import Any

import cv2
import numpy as np

from ..face_source import FaceSource
from ..faces import FacePlan, Target
from .output import Framing

KEPT_QUALITY = 95  # JPEG quality of the kept frames: invisible under the session's own encoding
DECODE_RUN = 16  # frames decoded per worker-thread call
CACHED_AVATARS = 4  # avatars (at one size each) kept after their sessions end


def framed_target(target: Target | None, framing: Framing) -> Target | None:
    """The target in output coordinates; None when the face is not wholly inside the output."""
    if target is None:
        return None
    x0, y0, x1, y1 = framing.crop
    out_w, out_h = framing.size
    sx, sy = out_w / (x1 - x0), out_h / (y1 - y0)
    bx1, by1, bx2, by2 = target.box
    box = (round((bx1 - x0) * sx), round((by1 - y0) * sy), round((bx2 - x0) * sx), round((by2 - y0) * sy))
    if box[0] < 0 or box[1] < 0 or box[2] > out_w or box[3] > out_h or box[2] - box[0] < 8 or box[3] - box[1] < 8:
        return None
    landmarks = (np.asarray(target.landmarks, np.float64) - [x0, y0]) * [sx, sy]
    return Target(box, landmarks)


class FramedAvatar:
    """One avatar at one output size: its targets now, its frames as the background decode reaches them."""

    def __init__(self, face: bytes, plan: FacePlan, framing: Framing, open_source) -> None:
        self.plan, self.framing = plan, framing
        self.targets = tuple(framed_target(t, framing) for t in plan.targets)
        self._face, self._open_source = face, open_source
        self._frames: list[bytes] = []
        self._progress = asyncio.Condition()
        self._error: BaseException | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._decode(), name="live-avatar-decode")

    async def _decode(self) -> None:
        source: FaceSource | None = None
        try:
            source = opened = await asyncio.to_thread(self._open_source, self._face)
            total = self.plan.source_frames
            while len(self._frames) < total:
                start = len(self._frames)
                run = await asyncio.to_thread(self._framed_run, opened, start, min(total, start + DECODE_RUN))
                if not run:
                    raise ValueError(f"the avatar's media ended at frame {start} of {total}")
                async with self._progress:
                    self._frames.extend(run)
                    self._progress.notify_all()
        except BaseException as error:  # noqa: BLE001 - every waiting session gets it
            async with self._progress:
                self._error = error
                self._progress.notify_all()
            if not isinstance(error, Exception):
                raise
        finally:
            if source is not None:
                source.close()

    def _framed_run(self, source: FaceSource, start: int, stop: int) -> list[bytes]:
        out = []
        for frame in source.read(start, stop):
            ok, data = cv2.imencode(".jpg", self.framing(frame), [cv2.IMWRITE_JPEG_QUALITY, KEPT_QUALITY])
            out.append(data.tobytes())
        return out

    async def frames(self, indices: list[int], executor: Executor | None = None) -> list[Any]:
        """The frames at `indices` (BGR, output size), waiting for the decode to reach them."""
        last = max(indices)
        async with self._progress:
            await self._progress.wait_for(lambda: len(self._frames) > last or self._error is not None)
        if self._error is not None and len(self._frames) <= last:
            raise self._error
        encoded = [self._frames[i] for i in indices]
        return await asyncio.get_running_loop().run_in_executor(
            executor, lambda: [cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) for data in encoded])

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


class FramedAvatars:
    """The few avatars most recently opened live, at their sizes."""

    def __init__(self, open_source) -> None:
        self._open_source = open_source
        self._kept: collections.OrderedDict[tuple, FramedAvatar] = collections.OrderedDict()

    def get(self, key: tuple, face: bytes, plan: FacePlan, framing: Framing) -> FramedAvatar:
        found = self._kept.get(key)
        if found is None or (found._error is not None):
            found = FramedAvatar(face, plan, framing, self._open_source)
            self._kept[key] = found
            found.start()
        self._kept.move_to_end(key)
        while len(self._kept) > CACHED_AVATARS:
            _, evicted = self._kept.popitem(last=False)
            evicted.close()
        return found
