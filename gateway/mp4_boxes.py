"""Edits of an mp4's boxes in memory: `moov` before `mdat` (faststart), and the AAC priming tag for fragmented output."""

from __future__ import annotations

import struct

CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}


def _boxes(data: bytes | bytearray | memoryview, start: int, end: int):
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


def faststart(mp4: bytes | memoryview) -> bytes:
    """Returns the same movie with `moov` first (after `ftyp`), chunk offsets adjusted. Given a view of the
    muxer's buffer it makes one copy, the result: the media data is joined from slices of the view, never copied
    on the way (slicing bytes had held three copies of the video at once)."""
    view = memoryview(mp4)
    boxes = list(_boxes(view, 0, len(view)))
    kinds = [kind for kind, *_ in boxes]
    if b"moov" not in kinds or b"mdat" not in kinds or kinds.index(b"moov") < kinds.index(b"mdat"):
        return bytes(view)
    _, moov_offset, _, moov_size = boxes[kinds.index(b"moov")]
    moov = bytearray(view[moov_offset : moov_offset + moov_size])
    _shift_chunk_offsets(moov, moov_size)
    _, mdat_offset, _, _ = boxes[kinds.index(b"mdat")]
    return b"".join((view[:mdat_offset], moov, view[mdat_offset:moov_offset], view[moov_offset + moov_size :]))


def _box(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _full_box(kind: bytes, body: bytes) -> bytes:
    """A box with a version and flags word (all zero)."""
    return _box(kind, b"\0\0\0\0" + body)


def _child(data: bytes | bytearray, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    """(offset, size) of the first `kind` box in data[start:end]."""
    for found, offset, _, size in _boxes(data, start, end):
        if found == kind:
            return offset, size
    return None


METADATA_PATH = (b"udta", b"meta", b"ilst")  # where iTunes metadata lives inside moov


def _header_length(data: bytes | bytearray, offset: int) -> int:
    """Bytes before a box's children: `meta` has a version and flags word after its header."""
    return 12 if data[offset + 4 : offset + 8] == b"meta" else 8


def _wrapped(entry: bytes, kinds: tuple[bytes, ...]) -> bytes:
    """`entry` inside the boxes `kinds` (outermost first); a new `meta` gets the iTunes handler."""
    for kind in reversed(kinds):
        entry = (_full_box(kind, _box(b"hdlr", b"\0" * 8 + b"mdirappl" + b"\0" * 9) + entry) if kind == b"meta"
                 else _box(kind, entry))
    return entry


def gapless_tag(priming: int, padding: int, samples: int) -> bytes:
    """iTunes' gapless-playback entry (`----` iTunSMPB): samples to drop at the start and end, and the real count."""
    value = f" 00000000 {priming:08X} {padding:08X} {samples:016X}" + " 00000000" * 8
    return _box(b"----", _full_box(b"mean", b"com.apple.iTunes") + _full_box(b"name", b"iTunSMPB")
                + _box(b"data", struct.pack(">II", 1, 0) + value.encode()))


def has_complete_moov(data: bytes) -> bool:
    located = _child(data, 0, len(data), b"moov")
    return located is not None and located[0] + located[1] <= len(data)


def with_gapless_info(head: bytes, priming: int, padding: int, samples: int) -> bytes:
    """`head` (an mp4's `ftyp` and complete `moov`, and maybe more) with iTunSMPB in moov/udta/meta/ilst.

    FFmpeg 5.1 (Debian 12's) applies a fragmented file's edit list as a time offset only: the AAC priming samples
    still decode, dated before 0 (ffprobe's start_time -0.021333); FFmpeg 8.1 skips them. iTunSMPB is the signal
    that every FFmpeg, and Apple's players, turn into samples skipped at the start. The entry goes after the tracks, as
    FFmpeg reads it for the last track, the audio one. Fragments address their data from their own `moof`, so
    growing `moov` moves nothing they point at."""
    if not has_complete_moov(head):
        raise ValueError("no complete moov box in the mp4's head")
    moov, moov_size = _child(head, 0, len(head), b"moov") or (0, 0)  # present: has_complete_moov said so
    entry, grown = gapless_tag(priming, padding, samples), [moov]
    parent, parent_end = moov, moov + moov_size
    for depth, kind in enumerate(METADATA_PATH):
        found = _child(head, parent + _header_length(head, parent), parent_end, kind)
        if found is None:
            entry = _wrapped(entry, METADATA_PATH[depth:])
            break
        grown.append(found[0])
        parent, parent_end = found
        parent_end += parent
    out = bytearray(head)
    out[parent_end:parent_end] = entry
    for offset in grown:
        struct.pack_into(">I", out, offset, struct.unpack_from(">I", out, offset)[0] + len(entry))
    return bytes(out)
