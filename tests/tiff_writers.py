"""TIFF frames for the tests: sample images (grey and RGB, 8 and 16 bits), `tiff()` (tifffile),
and a minimal TIFF writer of our own, `handmade_tiff()`, with LZW and PackBits encoders
(tifffile cannot encode those without imagecodecs) and `patch_tag()` to break a header on
purpose. Used by test_frames.py, test_frame_refusals.py, test_frame_fuzzing.py,
test_hostile_rolls.py and test_poison.py.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import tifffile

RNG = np.random.default_rng(20240611)
G8 = RNG.integers(0, 256, (70, 48), dtype=np.uint8)
G16 = RNG.integers(0, 65536, (70, 48), dtype=np.uint16)
RGB = RNG.integers(0, 256, (70, 48, 3), dtype=np.uint8)
RGBA = RNG.integers(0, 256, (70, 48, 4), dtype=np.uint8)
RGB16 = RNG.integers(0, 65536, (70, 48, 3), dtype=np.uint16)


def tiff(array: np.ndarray, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


# --- a minimal TIFF writer: tifffile cannot encode LZW or PackBits without imagecodecs ------


def lzw_encode(data: bytes) -> bytes:
    """TIFF LZW (MSB first, 9..12-bit codes, early change), as libtiff writes it."""
    out, state = bytearray(), [0, 0]  # bit buffer, bits in it
    width = 9

    def emit(code: int) -> None:
        state[0] = (state[0] << width) | code
        state[1] += width
        while state[1] >= 8:
            state[1] -= 8
            out.append((state[0] >> state[1]) & 0xFF)
        state[0] &= (1 << state[1]) - 1

    def fresh() -> dict[bytes, int]:
        return {bytes((i,)): i for i in range(256)}

    emit(256)
    table, free, word = fresh(), 258, b""
    for value in data:
        candidate = word + bytes((value,))
        if candidate in table:
            word = candidate
            continue
        emit(table[word])
        table[candidate], free, word = free, free + 1, bytes((value,))
        if free > (1 << width) - 1 and width < 12:
            width += 1
        if free >= 4093:
            emit(256)
            table, free, width = fresh(), 258, 9
    if word:
        emit(table[word])
    emit(257)
    if state[1]:
        out.append((state[0] << (8 - state[1])) & 0xFF)
    return bytes(out)


def packbits_encode(data: bytes) -> bytes:
    out, i = bytearray(), 0
    while i < len(data):
        run = 1
        while i + run < len(data) and run < 128 and data[i + run] == data[i]:
            run += 1
        if run > 2:
            out += bytes((257 - run, data[i]))
            i += run
        else:
            chunk = data[i : i + 128]
            out += bytes((len(chunk) - 1,)) + chunk
            i += len(chunk)
    return bytes(out)


def handmade_tiff(
    array: np.ndarray,
    *,
    compression: int = 1,
    encode=lambda raw: raw,
    rowsperstrip: int = 16,
    photometric: int | None = None,
    predictor: int = 1,
    extra_tags: tuple[tuple[int, int, list[int]], ...] = (),
    shared_strip: bool = False,
) -> bytes:
    """Little-endian classic TIFF, strips, data first and the IFD at the end (as libtiff).
    `shared_strip`: only the first strip is stored, and every strip points at its bytes."""
    rows, width = array.shape[:2]
    spp = 1 if array.ndim == 2 else array.shape[2]
    bits = array.dtype.itemsize * 8
    photometric = (2 if spp >= 3 else 1) if photometric is None else photometric
    body, offsets, counts = bytearray(b"II*\0\0\0\0\0"), [], []
    for top in range(0, rows, rowsperstrip):
        strip = np.ascontiguousarray(array[top : top + rowsperstrip]).astype(
            "<" + array.dtype.str[1:]
        )
        if predictor == 2:
            strip = strip.reshape(strip.shape[0], width, spp)
            strip = np.concatenate([strip[:, :1], np.diff(strip, axis=1)], axis=1)
        data = encode(strip.tobytes())
        offsets.append(len(body))
        counts.append(len(data))
        body += data + (b"\0" if len(data) % 2 else b"")
        if shared_strip:
            break
    if shared_strip:
        n = -(-rows // rowsperstrip)
        offsets, counts = offsets * n, counts * n
    nstrips = len(offsets)
    tags = [
        (256, 4, [width]),
        (257, 4, [rows]),
        (258, 3, [bits] * spp),
        (259, 3, [compression]),
        (262, 3, [photometric]),
        (273, 4, offsets),
        (277, 3, [spp]),
        (278, 4, [rowsperstrip]),
        (279, 4, counts),
        (284, 3, [1]),
        (339, 3, [1] * spp),
        *([(317, 3, [predictor])] if predictor != 1 else []),
        *([(338, 3, [2])] if spp in (2, 4) else []),
        *extra_tags,
    ]
    tags.sort()
    ifd_at = len(body)
    extra_at = ifd_at + 2 + 12 * len(tags) + 4
    ifd, extra = bytearray(struct.pack("<H", len(tags))), bytearray()
    for code, kind, values in tags:
        fmt = "<" + ("H" if kind == 3 else "I") * len(values)
        packed = struct.pack(fmt, *values)
        if len(packed) <= 4:
            ifd += struct.pack("<HHI", code, kind, len(values)) + packed.ljust(4, b"\0")
        else:
            ifd += struct.pack("<HHII", code, kind, len(values), extra_at + len(extra))
            extra += packed
    ifd += b"\0\0\0\0"
    body[4:8] = struct.pack("<I", ifd_at)
    assert nstrips == -(-rows // rowsperstrip)
    return bytes(body + ifd + extra)


def patch_tag(data: bytes, code: int, value: int) -> bytes:
    """Set a LONG/SHORT single-value tag of the first IFD of a little-endian classic TIFF."""
    buf = bytearray(data)
    (ifd,) = struct.unpack_from("<I", buf, 4)
    (n,) = struct.unpack_from("<H", buf, ifd)
    for i in range(n):
        at = ifd + 2 + 12 * i
        tag, kind, count = struct.unpack_from("<HHI", buf, at)
        if tag == code:
            assert count == 1
            struct.pack_into("<I" if kind == 4 else "<H", buf, at + 8, value)
            return bytes(buf)
    raise KeyError(code)
