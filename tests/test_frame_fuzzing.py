"""worker.frames under fuzzing: random bytes and mutated TIFFs give FrameError or a valid
frame, nothing else.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiff_writers import handmade_tiff, lzw_encode, packbits_encode, tiff

from worker.frames import FrameError, decode_frame

FUZZ_MAX_PIXELS = 1_000_000
FUZZ = settings(
    max_examples=200,
    deadline=2000,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
SMALL = np.random.default_rng(20240613).integers(0, 256, (24, 20, 3), dtype=np.uint8)
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
