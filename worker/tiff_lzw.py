"""A pure-Python TIFF LZW decoder, registered with tifffile only when `imagecodecs` is missing.

tifffile 2026.3.3 decodes only zlib, lzma, zstd and PackBits by itself; scanners often write
LZW. This decoder is correct but slow (about 5 MB/s): install `imagecodecs` for speed.
"""

from __future__ import annotations

from typing import Any

import tifffile.tifffile as _tifffile_impl


def _lzw_decode(data: bytes, /, *, out: Any = None) -> bytes:
    """TIFF LZW (MSB-first codes, 9..12 bits, early change), pure Python.

    Called by tifffile as ``decompress(data, out=expected_size)``; decoding stops at
    `out` bytes, so a corrupt or hostile strip cannot inflate past its raw size.
    """
    limit = out if isinstance(out, int) and out > 0 else 1 << 62
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
                return bytes(result[:limit])
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
            if len(result) >= limit:
                return bytes(result[:limit])
            previous = entry
            if len(table) >= grow_at and width < 12:  # early change, as libtiff
                width += 1
                mask = grow_at = (1 << width) - 1
    return bytes(result)  # tolerated: strips without end-of-information code


def install_lzw_fallback() -> None:
    # tifffile looks codecs up by attribute on its `imagecodecs` module (its own pure-Python
    # `_imagecodecs` when the real package is missing); a failed lookup is not cached.
    codecs = getattr(_tifffile_impl, "imagecodecs", None)
    if codecs is not None and not hasattr(codecs, "lzw_decode"):
        codecs.lzw_decode = _lzw_decode
