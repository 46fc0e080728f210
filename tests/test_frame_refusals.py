"""worker.frames refuses a bad frame with FrameError and a reason: not a TIFF, a format the
pipeline does not take, truncated or missing data, absurd dimensions, and compression bombs,
refused without allocating what they claim.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from tiff_writers import G8, RGB, handmade_tiff, lzw_encode, patch_tag, tiff

from worker.frames import FrameError, decode_frame, frame_header

RNG = np.random.default_rng(20240612)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not a TIFF"),
        (b"hello, world; not an image at all", "not a TIFF"),
        (bytes(RNG.integers(0, 256, 5000, dtype=np.uint8)), "not a TIFF"),
        (b"II*\0" + bytes(RNG.integers(0, 256, 5000, dtype=np.uint8)), "corrupt"),
        (tiff(G8.astype(np.float32)), "floating point"),
        (tiff(G8.astype(np.int16)), "signed integer"),
        (tiff(G8.astype(np.uint32)), "32-bit"),
        (tiff(G8 > 128), "1-bit"),
        (tiff(np.stack([G8, G8])), "2 pages"),
        (tiff(G8, colormap=RNG.integers(0, 65536, (3, 256), dtype=np.uint16)), "PALETTE"),
        (tiff(RNG.integers(0, 256, (8, 8, 5), dtype=np.uint8), photometric="rgb"), "5 samples"),
        (handmade_tiff(G8, compression=34925, encode=lambda r: r), "LZMA is not accepted"),
        (handmade_tiff(G8, compression=50000 + 7), "50007 is not accepted"),
        (handmade_tiff(G8, predictor=3), "predictor"),
        # rows not as scanned: the defects would be stored at mirrored positions
        (tiff(G8, extratags=[(274, 3, 1, 3, True)]), "orientation BOTRIGHT"),
        (tiff(G8, extratags=[(274, 3, 1, 6, True)]), "orientation RIGHTTOP"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_refused(data: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        decode_frame(data)


def test_refused_by_expectation() -> None:
    data = tiff(RGB)
    assert decode_frame(data, expect_width=48, expect_channels=3).shape == (70, 48, 3)
    with pytest.raises(FrameError, match="48 px wide; this roll's frames are 64"):
        decode_frame(data, expect_width=64)
    with pytest.raises(FrameError, match="3 channel"):
        decode_frame(data, expect_channels=1)
    with pytest.raises(FrameError, match="exceeds the limit"):
        decode_frame(data, max_pixels=70 * 48 - 1)


@pytest.mark.parametrize("layout", ["tifffile", "tifffile-deflate-tiled", "ifd-at-end", "lzw"])
def test_truncated(layout: str) -> None:
    data = {
        "tifffile": lambda: tiff(RGB, rowsperstrip=8),
        "tifffile-deflate-tiled": lambda: tiff(RGB, tile=(16, 16), compression="zlib"),
        "ifd-at-end": lambda: handmade_tiff(RGB),
        "lzw": lambda: handmade_tiff(G8, compression=5, encode=lzw_encode),
    }[layout]()
    for cut in sorted({3, 8, 16, 40, 200, len(data) // 3, len(data) // 2, len(data) - 1}):
        with pytest.raises(FrameError):
            decode_frame(data[:cut])
        with pytest.raises(FrameError):
            frame_header(data[:cut])


def test_missing_strip_is_refused_not_zero_filled() -> None:
    # tifffile alone would return zeros for a strip whose byte count is 0.
    data = handmade_tiff(G8, rowsperstrip=70)
    broken = patch_tag(data, 279, 0)
    with pytest.raises(FrameError, match="missing"):
        decode_frame(broken)


def test_absurd_dimensions_refused_without_allocation() -> None:
    data = patch_tag(patch_tag(tiff(G8), 256, 10**9), 257, 10**9)
    tracemalloc.start()
    try:
        began = time.perf_counter()
        with pytest.raises(FrameError, match="exceeds the limit"):
            decode_frame(data)
        elapsed = time.perf_counter() - began
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 50 << 20
    header = frame_header(handmade_tiff(G8, rowsperstrip=10**9))  # one strip for all rows
    assert header.rows == 70


def test_tiny_file_claiming_a_big_image_refused_without_allocation() -> None:
    # Within max_pixels, but 8000 × 8000 from a few hundred compressed bytes is a lie that
    # would cost a 64 MB output array before the first strip failed to decode.
    small = handmade_tiff(G8, compression=8, encode=zlib.compress, rowsperstrip=10**9)
    data = patch_tag(patch_tag(small, 256, 8000), 257, 8000)
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match="compressed bytes"):
            decode_frame(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20
    # A flat frame compresses very well and is still fine.
    flat = np.zeros((2048, 2048), dtype=np.uint8)
    assert decode_frame(tiff(flat, compression="zlib")).shape == (2048, 2048, 1)
    flat_lzw = handmade_tiff(flat[:512], compression=5, encode=lzw_encode, rowsperstrip=512)
    assert decode_frame(flat_lzw).shape == (512, 2048, 1)


@pytest.mark.parametrize("compression", [1, 8])
def test_strips_sharing_bytes_refused_without_allocation(compression: int) -> None:
    """Every strip pointing at one stored strip: the review's 25 kB file decoded into 2.1 GiB
    (the compressed bytes were summed per strip, and uncompressed frames were not checked)."""
    frame = np.zeros((2048, 2048), dtype=np.uint8)
    encode = zlib.compress if compression == 8 else (lambda raw: raw)
    data = handmade_tiff(frame, compression=compression, encode=encode, rowsperstrip=1,
                         shared_strip=True)  # fmt: skip
    assert len(data) < 20_000
    assert refusal_peak(data, "strips 0 and 1 share bytes") < 2 << 20
    assert not decode_frame(handmade_tiff(frame, compression=compression, encode=encode)).any()


def test_an_uncompressed_strip_shorter_than_its_rows_refused() -> None:
    """tifffile reads a strip's raw size whatever its byte count says: the bytes after a short
    strip became pixels."""
    data = handmade_tiff(G8, rowsperstrip=len(G8))
    short = patch_tag(data, 279, G8.size // 2)
    with pytest.raises(FrameError, match=f"uncompressed strip 0 has {G8.size // 2} bytes for"):
        decode_frame(short)
    last = handmade_tiff(G8[:-3], rowsperstrip=16)  # its last strip holds only the rows left
    np.testing.assert_array_equal(decode_frame(last)[..., 0], G8[:-3])


def refusal_peak(data: bytes, reason: str) -> int:
    """decode_frame refuses `data` for `reason`; the peak memory (bytes) it took to do so."""
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match=reason):
            decode_frame(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_deflate_bomb_refused_without_allocation() -> None:
    # One strip that claims 256×256 raw bytes but inflates to 64 MiB.
    bomb = zlib.compress(bytes(64 << 20), 9)
    frame = np.zeros((256, 256), dtype=np.uint8)
    data = handmade_tiff(frame, compression=8, encode=lambda raw: bomb, rowsperstrip=256)
    assert refusal_peak(data, "decodes past") < 50 << 20


def test_lzma_bomb_refused_before_decoding() -> None:
    # the review's case: a 10 kB LZMA frame claiming 256 × 256 pixels peaked at 205 MiB
    import lzma

    bomb = lzma.compress(bytes(64 << 20), preset=9)
    assert len(bomb) < 40_000
    frame = np.zeros((256, 256), dtype=np.uint8)
    data = handmade_tiff(frame, compression=34925, encode=lambda raw: bomb, rowsperstrip=256)
    assert refusal_peak(data, "LZMA is not accepted") < 20 << 20


@pytest.mark.parametrize("codec", ["packbits", "lzw"])
def test_bombs_in_the_other_codecs_are_refused_within_their_header_size(codec: str) -> None:
    frame = np.zeros((256, 256), dtype=np.uint8)
    if codec == "packbits":  # 7.7 MB of 7s from 120 kB, for a 64 kB strip
        code, bomb = 32773, b"\x81\x07" * 60_000
    else:
        code, bomb = 5, lzw_encode(bytes(4 << 20))
    data = handmade_tiff(frame, compression=code, encode=lambda raw: bomb, rowsperstrip=256)
    assert refusal_peak(data, "decodes past its 65536 raw bytes") < 20 << 20


def test_oversized_compressed_segment_refused() -> None:
    data = handmade_tiff(G8, compression=8, encode=lambda raw: zlib.compress(raw) + bytes(20000))
    with pytest.raises(FrameError, match="compressed bytes"):
        decode_frame(data)


def _directory_bomb(tags: list[tuple[int, int, int, int]], region: int, *, big: bool) -> bytes:
    """A TIFF of one (or many) image directories whose entries all point at one region of
    `region` bytes: (tag, type, count, value) each."""
    head = b"II+\0\x08\0\0\0" + bytes(8) if big else b"II*\0" + bytes(4)
    body = bytearray(head) + bytes(region)
    entry = "<HHQQ" if big else "<HHII"
    ifd = struct.pack("<Q" if big else "<H", len(tags))
    ifd += b"".join(struct.pack(entry, *t) for t in tags) + bytes(8 if big else 4)
    at = len(body)
    body[8 if big else 4 : 16 if big else 8] = struct.pack("<Q" if big else "<I", at)
    return bytes(body + ifd)


_IMAGE = [(256, 4, 1, 64), (257, 4, 1, 64), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
          (277, 3, 1, 1), (278, 4, 1, 64), (279, 4, 1, 4096)]  # fmt: skip


@pytest.mark.parametrize("big", [False, True], ids=["classic", "bigtiff"])
@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        # StripOffsets 400 times over 1 MiB: tifffile loaded every copy, ≈ 4 GiB of tuples
        ([(273, 4, 1 << 18, 16)] * 400, "tag 273 appears twice"),
        ([(273, 4, 1 << 21, 16)], "StripOffsets has 2097152 values"),
        # 600 distinct private tags, each within bounds, all on the same bytes: 80× the file
        ([(273, 4, 1, 16)] + [(40000 + i, 4, 1 << 17, 16) for i in range(600)], "tags hold"),
        ([(273, 4, 1, 16), (50000, 4, 1 << 19, 16)], "50000 has 524288 values"),
    ],
    ids=["repeated", "segments", "many-tags", "one-tag"],
)
def test_a_directory_that_would_cost_unbounded_memory_is_refused_before_tifffile_reads_it(
    extra: list[tuple[int, int, int, int]], reason: str, big: bool
) -> None:
    data = _directory_bomb(sorted(_IMAGE + extra[:1]) + extra[1:], 1 << 20, big=big)
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match=reason):
            decode_frame(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * len(data), peak  # the file's copy and the directory, no tag's values


def test_a_long_or_looping_chain_of_directories_is_refused_without_walking_it() -> None:
    one = tiff(G8)
    first = struct.unpack("<I", one[4:8])[0]
    entries = struct.unpack("<H", one[first : first + 2])[0]
    next_at = first + 2 + 12 * entries  # the first directory's link to the next one
    # a million directories after the first (each 6 bytes: no entries, a link to the next)
    chain = bytearray(one)
    start = len(chain)
    chain[next_at : next_at + 4] = struct.pack("<I", start)
    for i in range(1, 1_000_001):
        chain += struct.pack("<HI", 0, start + 6 * i if i < 1_000_000 else 0)
    with pytest.raises(FrameError, match="more than 16 pages"):
        decode_frame(bytes(chain))
    looped = bytearray(one)
    looped[next_at : next_at + 4] = struct.pack("<I", first)
    with pytest.raises(FrameError, match="loop"):
        decode_frame(bytes(looped))


def test_an_orientation_tag_of_one_is_taken() -> None:
    assert (decode_frame(tiff(G8, extratags=[(274, 3, 1, 1, True)]))[..., 0] == G8).all()
