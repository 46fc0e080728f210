"""worker.frames: real TIFFs written here round-trip exactly; bad frames raise FrameError only."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import tifffile
import tifffile.tifffile as tiff_impl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.frames import ACCEPTED_COMPRESSIONS, FrameError, FrameHeader, decode_frame, frame_header
from worker.tiff_codecs import deflate_decode, lzw_decode, packbits_decode

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
) -> bytes:
    """Little-endian classic TIFF, strips, data first and the IFD at the end (as libtiff)."""
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


def as16(a: np.ndarray) -> np.ndarray:
    return (a >> 8).astype(np.uint8)


def hwc(a: np.ndarray) -> np.ndarray:
    return a[:, :, None] if a.ndim == 2 else a


# --- round trips ------------------------------------------------------------------------------

ROUND_TRIPS = {
    "grey8": (lambda: tiff(G8), hwc(G8)),
    "grey16": (lambda: tiff(G16), hwc(as16(G16))),
    "grey16-big-endian": (lambda: tiff(G16, byteorder=">"), hwc(as16(G16))),
    "rgb8": (lambda: tiff(RGB), RGB),
    "rgb16": (lambda: tiff(RGB16), as16(RGB16)),
    "rgba8": (lambda: tiff(RGBA, photometric="rgb"), RGBA[..., :3]),
    "grey+alpha": (
        lambda: tiff(RGBA[..., :2], photometric="minisblack", extrasamples=["unassalpha"]),
        RGBA[..., :1],
    ),
    "strips": (lambda: tiff(RGB, rowsperstrip=7), RGB),
    "tiled": (lambda: tiff(RGB, tile=(32, 16)), RGB),
    "tiled16-deflate": (lambda: tiff(G16, tile=(16, 16), compression="zlib"), hwc(as16(G16))),
    "bigtiff": (lambda: tiff(RGB, bigtiff=True, tile=(16, 16)), RGB),
    "deflate": (lambda: tiff(G8, compression="zlib"), hwc(G8)),
    "deflate+predictor": (lambda: tiff(RGB16, compression="zlib", predictor=True), as16(RGB16)),
    "separate-planes": (
        lambda: tiff(np.moveaxis(RGB, -1, 0), photometric="rgb", planarconfig="separate"),
        RGB,
    ),
    "separate-planes-tiled-deflate": (
        lambda: tiff(
            np.moveaxis(RGB, -1, 0),
            photometric="rgb",
            planarconfig="separate",
            tile=(16, 16),
            compression="zlib",
        ),
        RGB,
    ),
    "miniswhite": (lambda: tiff(G8, photometric="miniswhite"), hwc(255 - G8)),
    "handmade-none": (lambda: handmade_tiff(RGB), RGB),
    "lzw": (lambda: handmade_tiff(G8, compression=5, encode=lzw_encode), hwc(G8)),
    "lzw-rgb16+predictor": (
        lambda: handmade_tiff(RGB16, compression=5, encode=lzw_encode, predictor=2),
        as16(RGB16),
    ),
    "packbits": (
        lambda: handmade_tiff(np.repeat(RGB, 3, axis=1), compression=32773, encode=packbits_encode),
        np.repeat(RGB, 3, axis=1),
    ),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_round_trip_exact(case: str) -> None:
    make, expected = ROUND_TRIPS[case]
    data = make()
    pixels = decode_frame(data)
    assert pixels.dtype == np.uint8 and pixels.flags.c_contiguous and pixels.flags.writeable
    np.testing.assert_array_equal(pixels, expected)
    header = frame_header(data)
    assert (header.rows, header.width, header.channels) == pixels.shape


def test_sixteen_bit_rule_is_fixed_shift() -> None:
    values = np.array([[0, 255, 256, 32767, 32768, 65280, 65535]], dtype=np.uint16)
    assert decode_frame(tiff(values))[0, :, 0].tolist() == [0, 0, 1, 127, 128, 255, 255]
    # Not a per-frame stretch: a dim frame stays dim.
    dim = np.full((4, 4), 1000, dtype=np.uint16)
    assert (decode_frame(tiff(dim)) == 3).all()


def test_header_fields() -> None:
    header = frame_header(tiff(RGB16, bigtiff=True, tile=(16, 16), compression="zlib"))
    assert header == FrameHeader(
        rows=70, width=48, channels=3, bits=16, compression="adobe_deflate",
        is_bigtiff=True, tiled=True,
    )  # fmt: skip
    lzw = frame_header(handmade_tiff(G8, compression=5, encode=lzw_encode))
    assert (lzw.compression, lzw.tiled, lzw.is_bigtiff, lzw.channels) == ("lzw", False, False, 1)


def test_file_objects() -> None:
    data = tiff(RGB, compression="zlib")
    stream = io.BytesIO(b"junk" + data)
    stream.seek(4)  # a TIFF starting at the current position
    np.testing.assert_array_equal(decode_frame(stream), RGB)

    class Pipe(io.RawIOBase):  # not seekable, like an HTTP body
        def __init__(self, payload: bytes) -> None:
            self._inner = io.BytesIO(payload)

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
            chunk = self._inner.read(len(b))
            b[: len(chunk)] = chunk
            return len(chunk)

    np.testing.assert_array_equal(decode_frame(io.BufferedReader(Pipe(data))), RGB)
    with pytest.raises(FrameError, match="larger than"):
        decode_frame(io.BufferedReader(Pipe(bytes(100 << 20))), max_pixels=1)


def test_only_codecs_with_bounded_decoders_are_accepted() -> None:
    """JPEG (and every codec outside ACCEPTED_COMPRESSIONS) is refused from the header, with
    the codecs a scanner may use named, whether or not imagecodecs could decode it."""
    for code in (6, 7, 34892, 34925, 50000, 34887):
        with pytest.raises(FrameError, match=r"not accepted.*none, LZW, Deflate, PackBits"):
            frame_header(handmade_tiff(G8, compression=code))
    assert set(ACCEPTED_COMPRESSIONS.values()) == {"none", "LZW", "Deflate", "PackBits"}


def test_tifffile_decodes_with_our_bounded_fallbacks() -> None:
    if tiff_impl.imagecodecs.__name__ != "tifffile._imagecodecs":
        pytest.skip("imagecodecs is installed: it decodes into a buffer of the header's size")
    for code, decoder in ((5, lzw_decode), (8, deflate_decode), (32946, deflate_decode),
                          (32773, packbits_decode)):  # fmt: skip
        assert tifffile.TIFF.DECOMPRESSORS[code] is decoder


@pytest.mark.parametrize(
    ("decoder", "bomb"),
    [
        (deflate_decode, zlib.compress(bytes(64 << 20), 9)),
        (packbits_decode, b"\x81\x00" * 500_000),  # 128 bytes per 2: 64 MB from 1 MB
        (lzw_decode, lzw_encode(bytes(2 << 20))),
    ],
    ids=["deflate", "packbits", "lzw"],
)
def test_decoders_stop_at_the_raw_size(decoder, bomb: bytes) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="decodes past its 65536 raw bytes"):
            decoder(bomb, out=65536)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    with pytest.raises(ValueError, match="raw size"):
        decoder(bomb[:100])  # no bound given: refused, never decoded without one


# --- refusals ---------------------------------------------------------------------------------


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


# --- fuzzing: FrameError or a valid frame, nothing else -----------------------------------------

FUZZ_MAX_PIXELS = 1_000_000
FUZZ = settings(
    max_examples=200,
    deadline=2000,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
SMALL = RNG.integers(0, 256, (24, 20, 3), dtype=np.uint8)
SEEDS = [
    tiff(SMALL, rowsperstrip=8),
    tiff(SMALL[..., 0].astype(np.uint16) * 200, compression="zlib", predictor=True),
    tiff(SMALL, tile=(16, 16), compression="zlib", bigtiff=True),
    handmade_tiff(SMALL[..., 0], compression=5, encode=lzw_encode, rowsperstrip=8),
    handmade_tiff(SMALL, compression=32773, encode=packbits_encode, rowsperstrip=8),
]


def check_decodes_or_refuses(data: bytes) -> None:
    try:
        pixels = decode_frame(data, max_pixels=FUZZ_MAX_PIXELS)
    except FrameError:
        return
    assert pixels.dtype == np.uint8 and pixels.ndim == 3
    assert pixels.shape[2] in (1, 3)
    assert pixels.shape[0] * pixels.shape[1] <= FUZZ_MAX_PIXELS


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes(data: bytes) -> None:
    check_decodes_or_refuses(data)
    check_decodes_or_refuses(b"II*\0" + data)


@FUZZ
@given(
    seed=st.sampled_from(range(len(SEEDS))),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_fuzz_mutated_tiffs(seed: int, flips: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(SEEDS[seed])
    # Most flips land in the header/IFD region, where they matter most.
    for position, value in flips:
        data[position % min(len(data), 400 if position % 2 else len(data))] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    check_decodes_or_refuses(bytes(data))
