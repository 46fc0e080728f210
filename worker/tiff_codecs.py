"""TIFF decoders whose output is bounded by what the frame's header promises.

tifffile calls a segment's decoder as ``decompress(data, out=raw_size)``, `raw_size` being
the strip's or tile's size from the header. The real `imagecodecs` package decodes into a
buffer of that size. Without it tifffile falls back to its pure-Python `_imagecodecs` module,
whose zlib and PackBits decoders ignore `out` (a strip of a few kB may inflate to gigabytes)
and which has no LZW at all. `install_bounded_fallbacks` replaces those fallbacks with the
decoders below, each of which refuses a segment as soon as it passes `out` bytes; frames in
other codecs are refused before decoding (`worker.frame_header.ACCEPTED_COMPRESSIONS`).
"""

from __future__ import annotations

import zlib
from typing import Any

import tifffile.tifffile as _tifffile_impl

__all__ = ["deflate_decode", "install_bounded_fallbacks", "lzw_decode", "packbits_decode"]


def _limit(out: Any) -> int:
    if not isinstance(out, int) or out < 0:
        # every caller in tifffile passes the raw size; without it nothing bounds the output
        raise ValueError("refusing to decode without the segment's raw size")
    return out


def deflate_decode(data: bytes, /, *, out: Any = None) -> bytes:
    """zlib/Deflate that never produces more than `out` + 1 bytes: more raises ValueError."""
    limit = _limit(out)
    inflater = zlib.decompressobj()
    try:
        result = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise ValueError(f"corrupt deflate data ({exc})") from None
    if len(result) > limit:
        raise _past(limit)
    return result


def _past(limit: int) -> ValueError:
    # a frame is evidence: a segment that decodes to more than its raw size is refused, not
    # cut to size as libtiff does
    return ValueError(f"a segment decodes past its {limit} raw bytes (corrupt, or a bomb)")


def packbits_decode(data: bytes, /, *, out: Any = None) -> bytes:
    """PackBits; ValueError as soon as the output would pass `out` bytes."""
    limit = _limit(out)
    data = bytes(data)
    result = bytearray()
    i, n = 0, len(data)
    while i < n:
        header = data[i]
        i += 1
        if header < 128:  # a literal of header + 1 bytes
            result += data[i : i + header + 1]
            i += header + 1
        elif header > 128:  # a run: the next byte 257 - header times
            result += data[i : i + 1] * (257 - header)
            i += 1
        # 128 is a no-op
        if len(result) > limit:
            raise _past(limit)
    return bytes(result)


def lzw_decode(data: bytes, /, *, out: Any = None) -> bytes:
    """TIFF LZW (MSB-first codes, 9..12 bits, early change), pure Python (about 5 MB/s).

    A strip that decodes to more than `out` bytes raises ValueError as it passes them, so a
    corrupt or hostile strip cannot inflate past its raw size.
    """
    limit = _limit(out)
    data = bytes(data)
    if len(data) >= 2 and data[0] == 0 and data[1] & 1:
        raise ValueError("old-style (pre-TIFF 6.0) LZW is not supported")
    table: list[bytes] = [bytes((i,)) for i in range(256)] + [b"", b""]
    result = bytearray()
    width, mask, grow_at = 9, 511, 511
    buffer = nbits = 0
    previous = b""
    for byte in data:
        buffer = ((buffer << 8) | byte) & 0xFFFFFF  # at most 8 + 11 live bits
        nbits += 8
        while nbits >= width:
            nbits -= width
            code = (buffer >> nbits) & mask
            if code == 256:  # clear
                del table[258:]
                width, mask, grow_at = 9, 511, 511
                previous = b""
                continue
            if code == 257:  # end of information
                return bytes(result)
            size = len(table)
            if code < size:
                entry = table[code]
                if previous and size < 4096:
                    table.append(previous + entry[:1])
            elif code == size and previous:  # the KwKwK case
                entry = previous + previous[:1]
                if size < 4096:
                    table.append(entry)
            else:
                raise ValueError(f"corrupt LZW data (code {code} with {size} table entries)")
            result += entry
            if len(result) > limit:
                raise _past(limit)
            previous = entry
            if len(table) >= grow_at and width < 12:  # early change, as libtiff
                width += 1
                mask = grow_at = (1 << width) - 1
    return bytes(result)  # tolerated: strips without end-of-information code


def install_bounded_fallbacks() -> None:
    """Give tifffile's pure-Python codec module (used when `imagecodecs` is missing) our
    bounded decoders. tifffile looks them up by attribute on that module when a frame is
    decoded; with the real imagecodecs installed nothing changes."""
    codecs = getattr(_tifffile_impl, "imagecodecs", None)
    if codecs is None or not getattr(codecs, "__name__", "").startswith("tifffile"):
        return
    codecs.zlib_decode = deflate_decode
    codecs.packbits_decode = packbits_decode
    codecs.lzw_decode = lzw_decode
    # tifffile caches a decoder once looked up: forget any taken before this ran
    cached = getattr(_tifffile_impl.TIFF.DECOMPRESSORS, "_codecs", {})
    for code in (5, 8, 32773, 32946):
        cached.pop(code, None)
