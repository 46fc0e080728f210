"""A TIFF's image directories read with `struct`, before tifffile sees the file.

tifffile loads a directory's tag values eagerly, each as a Python tuple of about 36 bytes per
value, and walks the whole chain of directories to count the pages: a 1 MiB file whose first
directory repeats StripOffsets 400 times with a quarter of a million values each took 4 GiB
before any check of `worker.frame_header` could run, and a chain of millions of empty
directories took seconds and memory in proportion. Here the directories' entries are read and
bounded first — a few hundred bytes read, whatever the file claims.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from worker.frame_header import FrameError

# bytes per value of each TIFF field type (TIFF 6.0 and BigTIFF)
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
               16: 8, 17: 8, 18: 8}  # fmt: skip
_SEGMENT_TAGS = {273: "StripOffsets", 279: "StripByteCounts", 324: "TileOffsets",
                 325: "TileByteCounts"}  # fmt: skip
# A frame's strips or tiles: one per row at 2²⁰ rows, far beyond any frame within the pixel limit
_MAX_SEGMENTS = 1 << 20
_MAX_VALUES = 3 << 16  # any other tag of numbers (a 16-bit colour map's 3 × 2¹⁶ values)
_MAX_BYTES = 1 << 24  # tags of bytes or text (ICC profile, XMP), each read as one bytes object
_MAX_NUMBERS = 2 * _MAX_SEGMENTS + _MAX_VALUES  # every tag of numbers: ≈ 80 MB as tifffile's tuples
_MAX_ENTRIES = 1024  # a frame's directory holds a few dozen tags; tifffile stops at 4096
_MAX_PAGES = 16  # how far the chain is followed to name the number of pages


def check_directories(fh: BinaryIO, size: int) -> None:
    """Refuse, as a FrameError, a TIFF whose directories would cost tifffile unbounded memory
    or time: more than one page (counted up to 16), a directory of more than 1,024 entries, a
    tag repeated, a tag with more values than a frame can need or than the file holds. Reads
    the header and the directories' entries only; `fh` is left where it was."""
    start = fh.tell()
    try:
        _check(fh, start, size)
    finally:
        fh.seek(start)


def _check(fh: BinaryIO, start: int, size: int) -> None:
    end = start + size
    head = _read(fh, start, 16, end)
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None:
        raise FrameError(f"not a TIFF file (starts with {head[:4]!r})")
    magic = struct.unpack(order + "H", head[2:4])[0]
    if magic == 42:
        count_fmt, entry_fmt, entry_size, offset_fmt = "H", "HHI", 12, "I"
        offset = struct.unpack(order + "I", head[4:8])[0]
    elif magic == 43:
        count_fmt, entry_fmt, entry_size, offset_fmt = "Q", "HHQ", 20, "Q"
        offset = struct.unpack(order + "Q", head[8:16])[0]
    else:
        raise FrameError(f"not a TIFF file (version {magic})")
    count_size, offset_size = struct.calcsize(count_fmt), struct.calcsize(offset_fmt)
    seen: set[int] = set()
    pages = 0
    while offset and pages <= _MAX_PAGES:
        if offset in seen:
            raise FrameError("corrupt TIFF: its image directories form a loop")
        seen.add(offset)
        entries = struct.unpack(order + count_fmt, _read(fh, start + offset, count_size, end))[0]
        if entries > _MAX_ENTRIES:
            raise FrameError(f"image directory of {entries} entries; at most {_MAX_ENTRIES}")
        at = start + offset + count_size
        table = _read(fh, at, entries * entry_size + offset_size, end)
        if pages == 0:  # tifffile reads the first page's tags; later pages are refused anyway
            _check_entries(order + entry_fmt, table, entries, entry_size, size)
        offset = struct.unpack(order + offset_fmt, table[entries * entry_size :])[0]
        pages += 1
    if pages > 1:
        many = f"more than {_MAX_PAGES}" if offset else str(pages)
        raise FrameError(f"TIFF has {many} pages; a frame must be a single image")


def _check_entries(fmt: str, table: bytes, entries: int, entry_size: int, size: int) -> None:
    seen: set[int] = set()
    numbers = octets = 0  # in all: distinct tags may all point at the same bytes
    for i in range(entries):
        tag, kind, count = struct.unpack_from(fmt, table, i * entry_size)
        if tag in seen:
            raise FrameError(f"tag {tag} appears twice in the image directory")
        seen.add(tag)
        value_size = _TYPE_SIZES.get(kind)
        if value_size is None:
            continue  # tifffile skips a type it does not know
        if tag in _SEGMENT_TAGS:
            limit, what = _MAX_SEGMENTS, _SEGMENT_TAGS[tag]
        elif value_size == 1:
            limit, what = _MAX_BYTES, f"tag {tag}"
        else:
            limit, what = _MAX_VALUES, f"tag {tag}"
        if count > limit:
            raise FrameError(f"{what} has {count} values; a frame has at most {limit}")
        if value_size == 1:
            octets += count
        else:
            numbers += count
        if numbers > _MAX_NUMBERS or octets > _MAX_BYTES:
            raise FrameError(
                f"the image directory's tags hold {numbers} numbers and {octets} bytes; a frame's "
                f"hold at most {_MAX_NUMBERS} and {_MAX_BYTES}"
            )
        if count * value_size > size:
            raise FrameError(
                f"corrupt or truncated TIFF: {what}'s {count} values do not fit in the file "
                f"({size} bytes)"
            )


def _read(fh: BinaryIO, at: int, n: int, end: int) -> bytes:
    fh.seek(at)
    data = fh.read(n) if at + n <= end else b""
    if len(data) != n:
        raise FrameError("corrupt or truncated TIFF: an image directory lies past the file's end")
    return data
