"""worker.frames: real TIFFs written here round-trip exactly, the header reads right, and the
codecs are the bounded decoders of worker.tiff_codecs. Refusals: test_frame_refusals.py;
fuzzing: test_frame_fuzzing.py.
"""

from __future__ import annotations

import io
import tracemalloc
import zlib

import numpy as np
import pytest
import tifffile
import tifffile.tifffile as tiff_impl
from tiff_writers import G8, G16, RGB, RGB16, RGBA, handmade_tiff, lzw_encode, packbits_encode, tiff

from worker.frames import ACCEPTED_COMPRESSIONS, FrameError, FrameHeader, decode_frame, frame_header
from worker.tiff_codecs import deflate_decode, lzw_decode, packbits_decode


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
