"""Decode one scanner frame (a TIFF strip of the roll) into uint8 pixels, refusing bad input.

A frame is one image: 8- or 16-bit unsigned, grey or RGB (an alpha or other single extra
sample is dropped), strips or tiles, classic TIFF or BigTIFF, uncompressed or compressed with
LZW, Deflate or PackBits (`ACCEPTED_COMPRESSIONS`). Everything else raises `FrameError` with a
plain reason, and every check that can be made from the header is made before pixel data is
read, so a hostile or broken header costs no memory: a frame is refused before anything is
written or any large allocation is made.

Decompression bombs: the accepted codecs' decoders stop at the raw size the header gives each
strip or tile (worker/tiff_codecs.py; the real `imagecodecs` decodes into a buffer of that
size), and the header's size is bounded by the pixel limit, so no frame decodes to more than
its header promises. Other codecs (LZMA reaches ~6,700:1, JPEG and friends carry their own
dimensions) are refused rather than trusted.

tifffile is lenient (it logs and repairs where it can, and fills strips whose offset or byte
count is 0 with zeros); a frame is evidence about a roll, so here a repair is a refusal.
Without the optional `imagecodecs` package tifffile cannot decode LZW, the commonest scanner
compression: we then register a pure-Python decoder (worker/tiff_codecs.py), correct but slow
(about 5 MB/s); install imagecodecs where LZW frames are routine.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import numpy as np
import tifffile

from worker.frame_header import (
    ACCEPTED_COMPRESSIONS,
    FrameError,
    FrameHeader,
    check_limits,
    check_segments,
    read_header,
)
from worker.tiff_codecs import install_bounded_fallbacks
from worker.tiff_directory import check_directories

__all__ = [
    "ACCEPTED_COMPRESSIONS",
    "FrameError",
    "FrameHeader",
    "decode_frame",
    "decode_frame_with_header",
    "frame_header",
    "max_frame_bytes",
]

DEFAULT_MAX_PIXELS = 200_000_000
_MAGIC = frozenset({b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"})  # classic and BigTIFF
_MAX_SAMPLE_BYTES = 4 * 2  # RGBA, 16 bits: the most raw bytes a pixel may take
_STREAM_SLACK = 16 << 20  # headers and strip tables beyond the pixels: far more than any needs


def frame_header(data: bytes | BinaryIO) -> FrameHeader:
    """Read and check a frame's header (metadata only; no pixel data is decoded).

    Raises `FrameError` for anything `decode_frame` would refuse whatever its limits: not a
    TIFF, truncated, several pages, unsupported sample format, depth, colour model or
    compression. Size limits and expectations are `decode_frame`'s.
    """
    fh, size = _as_file(data, DEFAULT_MAX_PIXELS)
    try:
        with _repairs_refused(), _open_tiff(fh, size) as tif:
            header = read_header(tif)
            check_segments(tif.pages.first, size)
            return header
    except FrameError:
        raise
    except Exception as exc:
        raise _corrupt(exc) from None


def decode_frame(
    data: bytes | BinaryIO,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    expect_width: int | None = None,
    expect_channels: int | None = None,
    width_range: tuple[int, int] | None = None,
) -> np.ndarray:
    """`decode_frame_with_header`'s pixels alone."""
    return decode_frame_with_header(
        data, max_pixels=max_pixels, expect_width=expect_width,
        expect_channels=expect_channels, width_range=width_range,
    )[0]  # fmt: skip


def decode_frame_with_header(
    data: bytes | BinaryIO,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    expect_width: int | None = None,
    expect_channels: int | None = None,
    expect_bits: int | None = None,
    width_range: tuple[int, int] | None = None,
) -> tuple[np.ndarray, FrameHeader]:
    """Decode a frame into a C-contiguous uint8 array of shape (rows, width, channels).

    `channels` is 1 (grey) or 3 (RGB); an alpha (or other single extra) sample is dropped.
    MINISWHITE grey is inverted so that bright is always high.

    16-bit samples become 8-bit by ``value >> 8`` (floor(v / 256)): a fixed, linear map of
    the full 16-bit range onto 0..255 with 256 input values per output level (rounding
    instead would overflow 65535 to 256). It is deliberately not a per-frame min/max stretch:
    the same fabric must give the same pixels in every frame, roll and scanner, because the
    model's scores and its calibrated threshold are compared across all of them; a stretch
    would change a frame's grey levels with its content (one bright defect darkens the
    rest). A scanner that stores 12-bit data in 16-bit samples therefore yields dark frames;
    scale at the scanner, not here (ingest fails a roll whose first such frame never exceeds
    4095).

    Raises `FrameError` (a `ValueError`) for every refusal, including: not a TIFF, truncated
    or corrupt data, more than one page, float / signed / other-than-8-or-16-bit samples,
    unsupported colour model or compression, more than `max_pixels` pixels (checked from
    the header before any pixel data is read), a width other than `expect_width` or outside
    `width_range` (inclusive), a channel count other than `expect_channels` and a sample
    depth other than `expect_bits`. No other exception escapes for bad input. The header
    comes back with the pixels (the roll keeps its first frame's depth).
    """
    fh, size = _as_file(data, max_pixels)
    try:
        with _repairs_refused(), _open_tiff(fh, size) as tif:
            header = read_header(tif)
            page = tif.pages.first
            check_limits(page, header, max_pixels, expect_width, expect_channels, expect_bits)
            if width_range is not None and not width_range[0] <= header.width <= width_range[1]:
                raise FrameError(
                    f"frame is {header.width} px wide; this roll's frames must be "
                    f"{width_range[0]}..{width_range[1]} px wide"
                )
            check_segments(page, size)
            # One thread: a worker process is one of several per machine already.
            pixels = page.asarray(maxworkers=1)
        return _to_uint8(pixels, page, header), header
    except FrameError:
        raise
    except Exception as exc:  # tifffile, struct, zlib, numpy: any failure here is the file's
        raise _corrupt(exc) from None


def max_frame_bytes(max_pixels: int) -> int:
    """The largest file a frame within `max_pixels` can be: every pixel 16-bit RGBA, stored
    uncompressed, plus room for headers. A larger object is refused before it is read."""
    return max_pixels * _MAX_SAMPLE_BYTES + _STREAM_SLACK


# --- input ------------------------------------------------------------------------------------


def _as_file(data: bytes | BinaryIO, max_pixels: int) -> tuple[BinaryIO, int]:
    """A seekable binary file positioned at the TIFF header, and its size in bytes."""
    if isinstance(data, bytes | bytearray | memoryview):
        return io.BytesIO(data), len(data)
    if not hasattr(data, "read"):
        raise TypeError(f"expected bytes or a binary file, got {type(data).__name__}")
    try:
        seekable = data.seekable()
    except (AttributeError, OSError, ValueError):
        seekable = False
    if seekable:
        start = data.tell()
        end = data.seek(0, io.SEEK_END)
        data.seek(start)
        return data, end - start
    # A stream (e.g. an HTTP body): read it, but never more than a legal frame can take.
    limit = max_frame_bytes(max_pixels)
    content = data.read(limit + 1)
    if not isinstance(content, bytes | bytearray):
        raise TypeError("expected a binary file (read() must return bytes)")
    if len(content) > limit:
        raise FrameError(f"file larger than {limit} bytes, more than any frame within limits")
    return io.BytesIO(content), len(content)


def _open_tiff(fh: BinaryIO, size: int) -> tifffile.TiffFile:
    start = fh.tell()
    magic = fh.read(4)
    fh.seek(start)
    if magic not in _MAGIC:
        raise FrameError(f"not a TIFF file (starts with {magic!r})")
    check_directories(fh, size)  # before tifffile, which loads every tag value eagerly
    try:
        return tifffile.TiffFile(fh)
    except Exception as exc:
        raise _corrupt(exc) from None


class _RepairLog(logging.Handler):
    """Keeps the first ERROR that tifffile logs from this thread."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.thread = threading.get_ident()
        self.first: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread and self.first is None:
            self.first = record.getMessage()


@contextmanager
def _repairs_refused() -> Iterator[None]:
    """Turn a corruption that tifffile logs at ERROR and repairs into a FrameError.

    E.g. a tag whose value lies past the end of the file is dropped, surplus strip offsets
    are trimmed: the frame would decode with wrong pixels. (Lost if an application raises
    the "tifffile" logger's level above ERROR; the structural checks still apply.)
    """
    handler = _RepairLog()
    log = logging.getLogger("tifffile")
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
    if handler.first is not None:
        raise FrameError(f"corrupt or truncated TIFF ({_short(handler.first)})")


def _corrupt(exc: BaseException) -> FrameError:
    return FrameError(f"corrupt or truncated TIFF ({type(exc).__name__}: {_short(exc)})")


def _short(exc: object) -> str:
    text = " ".join(str(exc).split())  # one line, bounded: it ends up in logs and the DB
    return text if len(text) <= 200 else text[:197] + "..."


# --- conversion -------------------------------------------------------------------------------


def _to_uint8(pixels: np.ndarray, page: Any, header: FrameHeader) -> np.ndarray:
    if page.planarconfig == 2 and pixels.ndim == 3:
        pixels = np.moveaxis(pixels, 0, -1)  # (samples, rows, width) -> (rows, width, samples)
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    expected = (header.rows, header.width)
    if pixels.ndim != 3 or pixels.shape[:2] != expected or pixels.shape[2] < header.channels:
        raise FrameError(f"decoded shape {pixels.shape} does not match the header {expected}")
    pixels = pixels[:, :, : header.channels]  # drop alpha / extra sample
    if pixels.dtype == np.uint16:  # the fixed 16 -> 8 rule (decode_frame); 8 bits fit uint16
        writable = pixels.flags.writeable  # shift in place: a frame can be hundreds of MB
        out = np.right_shift(pixels, 8, out=pixels if writable else None).astype(np.uint8)
    elif pixels.dtype == np.uint8:  # copy only when a sample was dropped or it is read-only
        out = np.array(
            pixels, order="C", copy=not (pixels.flags.c_contiguous and pixels.flags.writeable)
        )
    else:
        raise FrameError(f"decoded data type {pixels.dtype} is not 8- or 16-bit unsigned")
    if int(page.photometric) == 0:  # MINISWHITE: 0 is white
        np.subtract(255, out, out=out)
    return out


install_bounded_fallbacks()  # see worker/tiff_codecs.py
