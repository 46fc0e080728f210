"""What a frame's TIFF header must say, checked before any pixel is decoded.

The header read into a `FrameHeader` (one page, 8- or 16-bit unsigned grey or RGB, an accepted
compression) and the checks that bound what decoding may cost: every strip or tile present and
inside the file, no segment or image larger than its compressed bytes allow, the pixel and tile
limits. `worker.frames` decodes a frame that passes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import tifffile

# TIFF compression code → name: the codecs a scanner may use, each decoded with its output
# bounded by the segment's raw size (`worker.frames`' docstring)
ACCEPTED_COMPRESSIONS = {1: "none", 5: "LZW", 8: "Deflate", 32946: "Deflate", 32773: "PackBits"}
_MAX_EXPANSION, _SEGMENT_SLACK = 2, 4096  # no accepted codec expands data over ~1.5× (LZW, noise)
# nor compresses beyond ~1400:1 (LZW as libtiff writes it; Deflate 1032:1, PackBits 64:1)
_MAX_RATIO = 2048
_MAX_TILE_SIDE = 1024  # tiles may exceed a small image (padding), but not absurdly


class FrameError(ValueError):
    """A frame that cannot be used; the message says why in plain words."""


@dataclass(frozen=True)
class FrameHeader:
    """What a frame's header says, before any pixel is decoded."""

    rows: int
    width: int
    channels: int  # colour channels kept: 1 (grey) or 3 (RGB); an extra sample is dropped
    bits: int  # 8 or 16, per sample
    compression: str  # tifffile's name, lower case: "none", "lzw", "adobe_deflate", …
    is_bigtiff: bool
    tiled: bool


def read_header(tif: tifffile.TiffFile) -> FrameHeader:
    """The first page's header, refused unless it is one 2-D page of a kind `decode_frame`
    reads (sample format and depth, colour model, compression, predictor)."""
    npages = len(tif.pages)  # walks the IFD chain: offsets only, loops detected by tifffile
    if npages == 0:
        raise FrameError("corrupt or truncated TIFF: no valid image directory")
    if npages > 1:
        raise FrameError(f"TIFF has {npages} pages; a frame must be a single image")
    page = tif.pages.first
    if page.imagedepth != 1:
        raise FrameError(f"3-D image (ImageDepth {page.imagedepth}); a frame must be 2-D")
    if page.imagelength < 1 or page.imagewidth < 1:
        raise FrameError(f"empty image ({page.imagelength} × {page.imagewidth} pixels)")

    bits = page.bitspersample
    fmt = int(page.sampleformat)
    if fmt != 1:
        kind = {2: "signed integer", 3: "floating point"}.get(fmt, f"SampleFormat {fmt}")
        raise FrameError(f"{kind} samples; only 8- or 16-bit unsigned integers are supported")
    if not isinstance(bits, int) or bits not in (8, 16):
        raise FrameError(f"{bits}-bit samples; only 8- or 16-bit are supported")

    if page.compression not in ACCEPTED_COMPRESSIONS:
        accepted = ", ".join(dict.fromkeys(ACCEPTED_COMPRESSIONS.values()))
        raise FrameError(
            f"compression {_name(page.compression)} is not accepted; frames must be "
            f"compressed with one of: {accepted} (decoders bounded by the frame's size)"
        )
    channels = _colour_channels(page)
    extra = page.samplesperpixel - channels
    if extra < 0 or extra > 1:
        raise FrameError(
            f"{page.samplesperpixel} samples per pixel with photometric "
            f"{_name(page.photometric)}; expected {channels} (or {channels} plus alpha)"
        )
    if page.predictor not in (1, 2):
        raise FrameError(f"predictor {_name(page.predictor)} is not supported for integers")
    orientation = page.tags.valueof(274, 1)  # Orientation; its rows are the roll's only at 1
    if orientation != 1:
        shown = _name(orientation) if isinstance(orientation, int) else repr(orientation)[:40]
        raise FrameError(
            f"orientation {shown}: the frame's first row must be the image's top "
            "and its first column the left (TOPLEFT, 1); a flipped or rotated frame would put "
            "its defects at mirrored positions — write it without the tag, pixels as scanned"
        )
    return FrameHeader(
        rows=int(page.imagelength),
        width=int(page.imagewidth),
        channels=channels,
        bits=bits,
        compression=_name(page.compression).lower(),
        is_bigtiff=bool(tif.is_bigtiff),
        tiled=bool(page.is_tiled),
    )


def _colour_channels(page: Any) -> int:
    photometric = int(page.photometric)
    if photometric in (0, 1):  # MINISWHITE, MINISBLACK
        return 1
    if photometric == 2:  # RGB
        return 3
    raise FrameError(
        f"photometric {_name(page.photometric)} is not supported; frames must be grey or RGB"
    )


def _segment_sizes(page: Any) -> np.ndarray:
    """The raw bytes of each segment the header implies: a strip image's last strip of each
    plane holds only the rows left."""
    planes = page.samplesperpixel if page.planarconfig == 2 else 1
    samples = page.samplesperpixel // planes
    itemsize = page.bitspersample // 8
    if page.is_tiled:
        if page.tilelength < 1 or page.tilewidth < 1 or page.tiledepth != 1:
            raise FrameError("invalid tile size")
        count = math.ceil(page.imagelength / page.tilelength)
        count *= math.ceil(page.imagewidth / page.tilewidth) * planes
        raw = page.tilelength * page.tilewidth * samples * itemsize
        return np.full(count, raw, dtype=np.uint64)
    rows = max(1, min(page.rowsperstrip, page.imagelength))
    per_plane = math.ceil(page.imagelength / rows)
    row_bytes = page.imagewidth * samples * itemsize
    each = np.full(per_plane, rows * row_bytes, dtype=np.uint64)
    each[-1] = (page.imagelength - (per_plane - 1) * rows) * row_bytes
    return np.tile(each, planes)


def check_segments(page: Any, size: int) -> None:
    """Every strip or tile the header implies exists, is non-empty, lies in the file and shares
    no byte with another; an uncompressed one holds all its raw bytes."""
    raw_each = _segment_sizes(page)
    count, raw = len(raw_each), int(raw_each.max())  # raw: a full segment's bytes
    kind = "tile" if page.is_tiled else "strip"
    offsets, counts = page.dataoffsets, page.databytecounts
    if len(offsets) != count or len(counts) != count:
        raise FrameError(
            f"header describes {count} {kind}s but lists {len(offsets)} offsets and "
            f"{len(counts)} byte counts (corrupt header)"
        )
    off = np.asarray(offsets, dtype=np.uint64)
    cnt = np.asarray(counts, dtype=np.uint64)
    bad = np.flatnonzero((off == 0) | (cnt == 0))
    if bad.size:
        raise FrameError(f"{kind} {bad[0]} of {count} is missing (offset or byte count 0)")
    end = off + np.minimum(cnt, size)  # no uint64 wrap: both at most the file's size here
    past = np.flatnonzero((off > size) | (end > size))
    if past.size:
        i = int(past[0])
        raise FrameError(
            f"truncated file: {kind} {i} of {count} ends at byte {int(off[i]) + int(cnt[i])} "
            f"but the file has {size} bytes"
        )
    # Segments sharing bytes would let a small file decode into a large image (every strip
    # pointing at one stream): each must start at or after the end of the one before it.
    order = np.argsort(off, kind="stable")
    shared = np.flatnonzero(off[order][1:] < end[order][:-1])
    if shared.size:
        i, j = sorted((int(order[shared[0]]), int(order[shared[0] + 1])))
        raise FrameError(f"{kind}s {i} and {j} share bytes of the file (corrupt header)")
    if page.compression == 1:
        # tifffile reads a segment's raw size whatever its byte count says: a short count
        # would turn the bytes after it into pixels
        short = np.flatnonzero(cnt < raw_each)
        if short.size:
            i = int(short[0])
            raise FrameError(
                f"uncompressed {kind} {i} has {int(cnt[i])} bytes for {int(raw_each[i])} raw "
                "bytes (corrupt header)"
            )
        return
    limit = min(_MAX_EXPANSION * raw + _SEGMENT_SLACK, 2**63)  # stays a valid uint64
    big = np.flatnonzero(cnt > limit)
    if big.size:
        i = int(big[0])
        raise FrameError(
            f"{kind} {i} has {int(cnt[i])} compressed bytes for {raw} raw bytes (corrupt)"
        )
    # The output array is allocated before any strip is decoded: a tiny file must not claim a
    # huge image. No TIFF codec compresses beyond ~1350:1 (LZW on a flat image).
    total = page.imagelength * page.imagewidth * page.samplesperpixel * page.bitspersample
    stored = int(cnt.sum(dtype=np.uint64))
    if total // 8 > _MAX_RATIO * stored + _SEGMENT_SLACK:
        raise FrameError(
            f"{page.imagelength} × {page.imagewidth} pixels claimed from only {stored} "
            "compressed bytes (corrupt header)"
        )


def check_limits(
    page: Any,
    header: FrameHeader,
    max_pixels: int,
    expect_width: int | None,
    expect_channels: int | None,
    expect_bits: int | None = None,
) -> None:
    """The size limits and the roll's expectations: at most `max_pixels` pixels, tiles in
    proportion to the image, the width, channel count and sample depth the roll's frames
    have."""
    pixels = header.rows * header.width
    if pixels > max_pixels:
        raise FrameError(
            f"frame of {header.rows} × {header.width} pixels exceeds the limit of "
            f"{max_pixels} pixels"
        )
    tl, tw = (page.tilelength, page.tilewidth) if page.is_tiled else (1, 1)
    if (
        tl * tw > max_pixels
        or tl > max(header.rows, _MAX_TILE_SIDE)
        or tw > max(header.width, _MAX_TILE_SIDE)
    ):
        raise FrameError(f"tiles of {tl} × {tw} are out of proportion to the image")
    if expect_width is not None and header.width != expect_width:
        raise FrameError(f"frame is {header.width} px wide; this roll's frames are {expect_width}")
    if expect_channels is not None and header.channels != expect_channels:
        raise FrameError(
            f"frame has {header.channels} channel(s); this roll's frames have {expect_channels}"
        )
    if expect_bits is not None and header.bits != expect_bits:
        # 16-bit samples are brought to 8 by a fixed shift: a scanner switching depth within a
        # roll would change its grey levels, and every score, from that frame on
        raise FrameError(
            f"frame has {header.bits}-bit samples; this roll's frames have {expect_bits}-bit"
        )


def _name(value: Any) -> str:
    name = getattr(value, "name", None)
    return str(name) if name else str(int(value))
