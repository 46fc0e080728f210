"""The zarr layout of a roll: `rolls/<roll_id>.zarr/` on an ObjectStore's zarr store.

- group attributes: the roll's manifest, as given at creation;
- `image`: uint8 (capacity_rows, width, channels); inner chunks 256×256×C, shards one band
  tall and the full width (rounded up to 256), so every band of rows is its own shard row;
- `scores/<model_version>`: float16 anomaly map at ¼ resolution with the same banding
  (shards band_height/4 rows × the full ¼ width), fill value 0.

Arrays are created with a fixed capacity and never resized: concurrent resizes would race
on the array metadata. Unwritten chunks cost nothing; callers track the real length.

Write contract (two writers to one shard lose data: a shard write is read-modify-write
of the whole shard object):

- the image rows of one band are written by one task at a time (the pipeline serialises
  frame writes per band with a PostgreSQL advisory lock); a frame that straddles a band
  boundary touches two shards and needs both bands' locks (`bands_of_rows`);
- a band's score shard is written by exactly one task (`write_band_scores`);
- writes are idempotent: writing the same rows again gives identical data, so a retried
  task is harmless.

Read contract: zarr reads a shard with separate ranged GETs (its index, then chunks), so
a read racing a rewrite of that shard can pair one version's index with the other's
bytes. Read a band, or a neighbour's halo rows, once that band's writes are done (or
under a shared lock on it, writers holding the exclusive one). Chunks carry a zstd
checksum, so most such torn reads fail loudly instead of returning wrong pixels.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import zarr
import zarr.codecs
from zarr.errors import ContainsArrayError, ContainsGroupError, NodeNotFoundError

from storage.objectstore import ObjectNotFound, ObjectStore, validate_key

ROLLS_PREFIX = "rolls"
CHUNK = 256  # inner chunk side of the image (pixels)
SCORE_SCALE = 4  # the anomaly map's resolution is 1/4 of the image's in both axes
SCORE_CHUNK_ROWS = 64
DEFAULT_BAND_HEIGHT = 2048
DEFAULT_CAPACITY_ROWS = 2**22  # 4.2 M rows (≈ 400 m at 10 px/mm); unwritten chunks cost nothing


def _compressors() -> list[Any]:
    # zstd level 1: on AITEX fabric 1.3× smaller at ~0.7–0.9 GB/s each way on one core; LZ4
    # is faster but does not compress noisy texture at all (1.00×). The checksum (4 bytes a
    # chunk) turns a torn read (see the module docstring) into an error.
    return [zarr.codecs.ZstdCodec(level=1, checksum=True)]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def overview_factor(length: int, width: int, max_side: int) -> int:
    """Rows and columns per pixel of `RollArrays.overview`: a drawing needs it to place the
    pixels, the last of which hold fewer."""
    return max(1, -(-max(length, width) // max_side))


def roll_prefix(roll_id: str) -> str:
    """The object-store prefix of a roll's zarr group."""
    if "/" in roll_id:
        raise ValueError(f"roll id {roll_id!r} must not contain '/'")
    return validate_key(f"{ROLLS_PREFIX}/{roll_id}.zarr")


class RollArrays:
    """A roll's image and score arrays. Get one from `create_roll` or `open_roll`."""

    def __init__(self, store: ObjectStore, roll_id: str, group: zarr.Group) -> None:
        self.store, self.roll_id, self.group = store, roll_id, group
        image = group["image"]
        if not isinstance(image, zarr.Array):
            raise ValueError(f"roll {roll_id}: 'image' is not a zarr array")
        self.image = image
        self.capacity_rows, self.width, self.channels = (int(n) for n in image.shape)
        self.band_height = int(image.attrs["band_height"])  # type: ignore[arg-type]
        self.score_width = -(-self.width // SCORE_SCALE)

    def __repr__(self) -> str:
        return (
            f"RollArrays({self.roll_id!r}, width={self.width}, channels={self.channels}, "
            f"band_height={self.band_height}, store={self.store!r})"
        )

    @property
    def manifest(self) -> dict[str, Any]:
        return dict(self.group.attrs.asdict())

    # ------------------------------------------------------------------ geometry

    def _check_length(self, length: int) -> int:
        if not 0 < length <= self.capacity_rows:
            raise ValueError(
                f"roll {self.roll_id}: length {length} must be in 1..{self.capacity_rows} rows"
            )
        return int(length)

    def band_count(self, length: int) -> int:
        """Bands covering `length` ingested rows (the last one may be partial)."""
        return -(-self._check_length(length) // self.band_height)

    def band_range(self, band_index: int, length: int) -> tuple[int, int]:
        """Rows [start, stop) of a band, the last band clipped at `length`."""
        count = self.band_count(length)
        if not 0 <= band_index < count:
            raise IndexError(f"roll {self.roll_id}: band {band_index} not in 0..{count - 1}")
        start = band_index * self.band_height
        return start, min(start + self.band_height, length)

    def bands_of_rows(self, start: int, stop: int) -> range:
        """The bands (shards) that rows [start, stop) touch: the locks a writer needs."""
        if not 0 <= start < stop:
            return range(0)
        return range(start // self.band_height, (stop - 1) // self.band_height + 1)

    # ------------------------------------------------------------------ image

    def write_rows(self, row_start: int, rows: np.ndarray) -> int:
        """Write rows (n, W) or (n, W, C) of uint8 at `row_start`; return the row after them.

        The caller holds the write lock of every band in `bands_of_rows` (see the module
        docstring). Writing the same rows again is a no-op in effect (idempotent).
        """
        if not isinstance(rows, np.ndarray):
            raise ValueError(f"rows must be a numpy array, not {type(rows).__name__}")
        if rows.dtype != np.uint8:
            raise ValueError(
                f"roll {self.roll_id}: rows must be uint8, not {rows.dtype} "
                "(scale 16-bit frames to 8 bits before writing)"
            )
        if rows.ndim == 2:
            if self.channels != 1:
                raise ValueError(
                    f"roll {self.roll_id}: grey rows (n, W) given, the roll has {self.channels} channels"
                )
            rows = rows[:, :, np.newaxis]
        if rows.ndim != 3:
            raise ValueError(f"rows must have shape (n, W) or (n, W, C), not {rows.shape}")
        if rows.shape[1] != self.width:
            raise ValueError(
                f"roll {self.roll_id}: rows are {rows.shape[1]} px wide, the roll is {self.width}"
            )
        if rows.shape[2] != self.channels:
            raise ValueError(
                f"roll {self.roll_id}: rows have {rows.shape[2]} channels, the roll has {self.channels}"
            )
        stop = row_start + rows.shape[0]
        if row_start < 0 or stop > self.capacity_rows:
            raise ValueError(
                f"roll {self.roll_id}: rows {row_start}..{stop} outside 0..{self.capacity_rows}"
            )
        if rows.shape[0]:
            self.image[row_start:stop] = rows
        return stop

    def read_rows(
        self, start: int, stop: int, step: int = 1, columns: slice = slice(None)
    ) -> np.ndarray:
        """Rows [start, stop) (every `step`-th), `columns` of them, as (n, w, C) uint8;
        unwritten rows read as 0. Only the 256² chunks holding what is asked for are read."""
        if not 0 <= start <= stop <= self.capacity_rows:
            raise ValueError(
                f"roll {self.roll_id}: rows {start}..{stop} outside 0..{self.capacity_rows}"
            )
        return np.asarray(self.image[start:stop:step, columns])

    def read_band(self, band_index: int, halo: int, length: int) -> tuple[np.ndarray, int]:
        """The band's rows plus `halo` rows above and below, clipped at 0 and `length`.

        Returns (rows, row_start): rows[0] is roll row `row_start`.
        """
        if halo < 0:
            raise ValueError(f"halo must be ≥ 0, not {halo}")
        start, stop = self.band_range(band_index, length)
        lo, hi = max(0, start - halo), min(length, stop + halo)
        return self.read_rows(lo, hi), lo

    def overview(self, length: int, max_side: int = 2048) -> np.ndarray:
        """A block-mean downsample of rows [0, length): at most `max_side` px on each side,
        each pixel the mean of `overview_factor` rows and columns (fewer in the last ones).

        Reads the roll band by band (whole blocks per read), so memory stays at about one
        band; the time is that of reading the whole image once.
        """
        length = self._check_length(length)
        if max_side < 1:
            raise ValueError(f"max_side must be ≥ 1, not {max_side}")
        f = overview_factor(length, self.width, max_side)
        out = np.zeros((-(-length // f), -(-self.width // f), self.channels), np.uint8)
        col_starts = np.arange(0, self.width, f)
        col_counts = np.diff(np.append(col_starts, self.width))
        step = max(f, self.band_height // f * f)  # rows per read: whole blocks only
        for r0 in range(0, length, step):
            block = np.asarray(self.image[r0 : min(r0 + step, length)])
            row_starts = np.arange(0, block.shape[0], f)
            row_counts = np.diff(np.append(row_starts, block.shape[0]))
            # uint32 holds f rows of 255 (the big intermediate), uint64 the f×f block sums
            sums = np.add.reduceat(block, row_starts, axis=0, dtype=np.uint32)
            sums = np.add.reduceat(sums, col_starts, axis=1, dtype=np.uint64)
            counts = np.outer(row_counts, col_counts)[:, :, np.newaxis]
            out[r0 // f : r0 // f + len(row_starts)] = np.rint(sums / counts).astype(np.uint8)
        return out

    # ------------------------------------------------------------------ scores

    def _scores_path(self, model_version: str) -> str:
        if "/" in model_version:
            raise ValueError(f"model version {model_version!r} must not contain '/'")
        validate_key(model_version)
        return f"scores/{model_version}"

    def create_scores(self, model_version: str) -> zarr.Array:
        """Create (or open) the score array of a model version; idempotent and race-safe:
        a concurrent creator writes the same metadata, and existing data is never touched."""
        path = self._scores_path(model_version)
        try:
            return self._open_scores(model_version)
        except ObjectNotFound:
            pass
        band_q = self.band_height // SCORE_SCALE
        try:
            return self.group.create_array(
                path,
                shape=(self.capacity_rows // SCORE_SCALE, self.score_width),
                dtype="float16",
                chunks=(SCORE_CHUNK_ROWS, CHUNK),
                shards=(band_q, _round_up(self.score_width, CHUNK)),
                compressors=_compressors(),
                fill_value=0,
                attributes={"scale": SCORE_SCALE, "band_height": self.band_height},
                dimension_names=("y", "x"),
            )
        except (ContainsArrayError, ContainsGroupError):
            return self._open_scores(model_version)

    def _open_scores(self, model_version: str) -> zarr.Array:
        try:
            array = self.group[self._scores_path(model_version)]
        except KeyError:
            raise ObjectNotFound(
                f"roll {self.roll_id} has no scores for {model_version!r}"
            ) from None
        assert isinstance(array, zarr.Array)
        return array

    def score_versions(self) -> list[str]:
        """Model versions that have a score array in this roll."""
        try:
            scores = self.group["scores"]
        except KeyError:
            return []
        assert isinstance(scores, zarr.Group)
        return sorted(scores.array_keys())

    def write_band_scores(
        self, model_version: str, band_index: int, scores: np.ndarray, *, length: int | None = None
    ) -> None:
        """Write one band's ¼-resolution anomaly map (float16), creating the array if needed.

        `scores` must be (ceil(band_rows / 4), ceil(W / 4)): a full band, or for the last,
        partial band pass `length` (rows ingested) to size it. Exactly one task writes a
        band's score shard; a retry rewrites the same values (idempotent).
        """
        if length is None:
            start, stop = band_index * self.band_height, (band_index + 1) * self.band_height
            if not 0 <= band_index < self.capacity_rows // self.band_height:
                raise IndexError(f"roll {self.roll_id}: band {band_index} beyond the capacity")
        else:
            start, stop = self.band_range(band_index, length)
        expected = (-(-(stop - start) // SCORE_SCALE), self.score_width)
        scores = np.asarray(scores)
        if scores.shape != expected:
            raise ValueError(
                f"roll {self.roll_id} band {band_index}: scores must be {expected} "
                f"(¼ of {stop - start} rows × {self.width} px), not {scores.shape}"
            )
        if not np.issubdtype(scores.dtype, np.floating):
            raise ValueError(f"scores must be floating point, not {scores.dtype}")
        with np.errstate(over="ignore"):  # overflow shows up as inf, refused just below
            half = scores.astype(np.float16)
        if not np.isfinite(half).all():
            raise ValueError(f"roll {self.roll_id} band {band_index}: scores not finite in float16")
        array = self.create_scores(model_version)
        q0 = start // SCORE_SCALE
        array[q0 : q0 + expected[0]] = half

    def read_scores(self, model_version: str, start_row: int, stop_row: int) -> np.ndarray:
        """¼-resolution rows [start_row, stop_row) of a model version's map (float16)."""
        array = self._open_scores(model_version)
        if not 0 <= start_row <= stop_row <= array.shape[0]:
            raise ValueError(f"score rows {start_row}..{stop_row} outside 0..{array.shape[0]}")
        return np.asarray(array[start_row:stop_row])


# ---------------------------------------------------------------------- roll lifecycle


def _check_geometry(roll: RollArrays, width: int, channels: int, band_height: int) -> None:
    have = (roll.width, roll.channels, roll.band_height)
    if have != (width, channels, band_height):
        raise ValueError(
            f"roll {roll.roll_id} exists with width, channels, band height {have}, "
            f"not {(width, channels, band_height)}"
        )


def create_roll(
    store: ObjectStore,
    roll_id: str,
    *,
    width: int,
    channels: int,
    band_height: int = DEFAULT_BAND_HEIGHT,
    manifest: dict[str, Any],
    capacity_rows: int = DEFAULT_CAPACITY_ROWS,
    exist_ok: bool = False,
) -> RollArrays:
    """Create a roll's group (attrs = manifest) and its image array.

    Call once per roll (upload discovery does). With `exist_ok`, an existing roll of the
    same geometry is opened as it is (its manifest is not replaced); a different geometry
    is a ValueError. Capacity is rounded up to whole bands.
    """
    if width < 1 or not 1 <= channels <= 4:
        raise ValueError(f"width {width} must be ≥ 1 and channels {channels} in 1..4")
    if band_height < CHUNK or band_height % CHUNK:
        raise ValueError(f"band_height must be a positive multiple of {CHUNK}, not {band_height}")
    try:
        json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"roll {roll_id}: manifest is not plain JSON: {exc}") from None
    prefix = roll_prefix(roll_id)
    zstore = store.zarr_store(prefix)
    try:
        group = zarr.create_group(zstore, attributes=manifest)
    except ContainsGroupError:
        if not exist_ok:
            raise FileExistsError(f"roll {roll_id} already exists at {store.uri(prefix)}") from None
        group = zarr.open_group(zstore, mode="r+", use_consolidated=False)
    if "image" not in group:  # also completes a roll whose creation was interrupted
        capacity = _round_up(capacity_rows, band_height)
        group.create_array(
            "image",
            shape=(capacity, width, channels),
            dtype="uint8",
            chunks=(CHUNK, CHUNK, channels),
            shards=(band_height, _round_up(width, CHUNK), channels),
            compressors=_compressors(),
            fill_value=0,
            attributes={"band_height": band_height},
            dimension_names=("y", "x", "c"),
        )
    roll = RollArrays(store, roll_id, group)
    _check_geometry(roll, width, channels, band_height)
    return roll


def open_roll(store: ObjectStore, roll_id: str, *, read_only: bool = False) -> RollArrays:
    """Open an existing roll; ObjectNotFound if there is none."""
    prefix = roll_prefix(roll_id)
    try:
        group = zarr.open_group(
            store.zarr_store(prefix, read_only=read_only),
            mode="r" if read_only else "r+",
            use_consolidated=False,
        )
        return RollArrays(store, roll_id, group)
    except (NodeNotFoundError, FileNotFoundError, KeyError):
        raise ObjectNotFound(f"no roll {roll_id!r} at {store.uri(prefix)}") from None


def roll_exists(store: ObjectStore, roll_id: str) -> bool:
    return store.exists(f"{roll_prefix(roll_id)}/zarr.json")


def delete_roll(store: ObjectStore, roll_id: str) -> int:
    """Delete a roll's arrays and manifest; return the number of objects removed."""
    return store.delete_prefix(roll_prefix(roll_id))
