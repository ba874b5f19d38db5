"""Moves an mp4's `moov` box before `mdat` in memory (FFmpeg's +faststart needs a re-openable file)."""

from __future__ import annotations

import struct

CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}


def _boxes(data: bytes | bytearray, start: int, end: int):
    """(type, offset, header length, size) of each box in data[start:end]."""
    offset = start
    while offset + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, offset)
        header = 8
        if size == 1:
            size = struct.unpack_from(">Q", data, offset + 8)[0]
            header = 16
        elif size == 0:
            size = end - offset
        if size < header:
            raise ValueError(f"corrupt mp4 box {kind!r} at {offset}")
        yield kind, offset, header, size
        offset += size


def _shift_chunk_offsets(moov: bytearray, shift: int) -> None:
    def walk(start: int, end: int) -> None:
        for kind, offset, header, size in _boxes(moov, start, end):
            body = offset + header
            if kind in CONTAINERS:
                walk(body, offset + size)
            elif kind in (b"stco", b"co64"):
                count = struct.unpack_from(">I", moov, body + 4)[0]
                fmt, width = (">I", 4) if kind == b"stco" else (">Q", 8)
                for i in range(count):
                    position = body + 8 + i * width
                    value = struct.unpack_from(fmt, moov, position)[0] + shift
                    if kind == b"stco" and value >= 1 << 32:
                        raise ValueError("mp4 too large for 32-bit chunk offsets")
                    struct.pack_into(fmt, moov, position, value)

    walk(0, len(moov))


def faststart(mp4: bytes) -> bytes:
    """Returns the same movie with `moov` first (after `ftyp`), chunk offsets adjusted."""
    boxes = list(_boxes(mp4, 0, len(mp4)))
    kinds = [kind for kind, *_ in boxes]
    if b"moov" not in kinds or b"mdat" not in kinds or kinds.index(b"moov") < kinds.index(b"mdat"):
        return mp4
    _, moov_offset, _, moov_size = boxes[kinds.index(b"moov")]
    moov = bytearray(mp4[moov_offset : moov_offset + moov_size])
    _shift_chunk_offsets(moov, moov_size)
    _, mdat_offset, _, _ = boxes[kinds.index(b"mdat")]
    rest = mp4[mdat_offset:moov_offset] + mp4[moov_offset + moov_size :]
    return mp4[:mdat_offset] + bytes(moov) + rest
