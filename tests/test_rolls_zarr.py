"""The zarr roll layout on every object-store backend (local, S3 via obstore, S3 via s3fs)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from fixtures_s3 import make_s3_store

from storage.objectstore import ObjectNotFound, ObjectStore, S3Store
from storage.zarr_rolls import (
    RollArrays,
    create_roll,
    delete_roll,
    open_roll,
    roll_exists,
    roll_prefix,
)

BAND = 256  # the smallest legal band keeps the tests quick; production uses 2048
WIDTH = 700  # not a multiple of 256: the shard width is rounded up to 768
LENGTH = 700  # 2 full bands and a partial third
MANIFEST = {"roll_id": "R1", "fabric_type": "denim", "px_per_mm": 10.0, "meta": {"loom": "L7"}}


def _image(channels: int = 3, length: int = LENGTH, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (length, WIDTH, channels), dtype=np.uint8)


def _ingest(roll: RollArrays, image: np.ndarray, frame_rows: int = 100) -> None:
    # frames of 100 rows straddle the band boundaries at 256 and 512
    row = 0
    while row < len(image):
        row = roll.write_rows(row, image[row : row + frame_rows])


def _roll(store: ObjectStore, channels: int = 3, **kwargs: object) -> RollArrays:
    return create_roll(
        store, "R1", width=WIDTH, channels=channels, band_height=BAND, manifest=MANIFEST, **kwargs
    )  # type: ignore[arg-type]


def test_layout_manifest_and_geometry(object_store: ObjectStore) -> None:
    roll = _roll(object_store)
    assert roll.manifest == MANIFEST
    assert roll.image.dtype == np.uint8
    assert roll.image.shape[1:] == (WIDTH, 3)
    assert roll.image.shape[0] % BAND == 0 and roll.image.shape[0] >= 2**22
    assert roll.image.chunks == (256, 256, 3)
    assert roll.image.shards == (BAND, 768, 3)  # one band of rows per shard, full width
    again = open_roll(object_store, "R1")
    assert (again.width, again.channels, again.band_height) == (WIDTH, 3, BAND)
    assert again.manifest == MANIFEST
    assert roll_exists(object_store, "R1")
    assert object_store.exists(f"{roll_prefix('R1')}/zarr.json")


def test_frames_straddling_bands_read_back_with_halo(object_store: ObjectStore) -> None:
    roll = _roll(object_store)
    image = _image()
    _ingest(roll, image)
    assert roll.band_count(LENGTH) == 3
    assert [roll.band_range(b, LENGTH) for b in range(3)] == [(0, 256), (256, 512), (512, 700)]
    assert list(roll.bands_of_rows(200, 300)) == [0, 1]
    for band, (lo, hi) in enumerate([(0, 288), (224, 544), (480, 700)]):
        rows, row_start = roll.read_band(band, 32, LENGTH)
        assert (row_start, len(rows)) == (lo, hi - lo)
        np.testing.assert_array_equal(rows, image[lo:hi])
    np.testing.assert_array_equal(roll.read_rows(650, 720)[50:], 0)  # not ingested: fill
    # a report's crop of a long defect: every 7th row, a few columns
    np.testing.assert_array_equal(
        roll.read_rows(3, 690, 7, slice(300, 420)), image[3:690:7, 300:420]
    )
    with pytest.raises(IndexError):
        roll.read_band(3, 32, LENGTH)
    # one object per band for the image: shards are whole bands
    shards = [o.key for o in object_store.list(f"{roll_prefix('R1')}/image/c/").items]
    assert [k.split("/image/c/")[1] for k in shards] == ["0/0/0", "1/0/0", "2/0/0"]


def test_grey_rows_may_omit_the_channel_axis(object_store: ObjectStore) -> None:
    roll = _roll(object_store, channels=1)
    grey = _image(channels=1)[:, :, 0]
    roll.write_rows(0, grey)
    np.testing.assert_array_equal(roll.read_rows(0, LENGTH)[:, :, 0], grey)


def test_rewriting_a_band_is_idempotent(object_store: ObjectStore) -> None:
    roll = _roll(object_store)
    image = _image()
    _ingest(roll, image)
    prefix = roll_prefix("R1")
    before = {o.key: o.etag for o in object_store.iter_objects(prefix + "/")}
    roll.write_rows(200, image[200:300])  # a retried frame, across a band boundary
    for start in (600, 500, 400):  # and a band re-ingested in another order
        roll.write_rows(start, image[start : start + 100])
    after = {o.key: o.etag for o in object_store.iter_objects(prefix + "/")}
    assert after == before  # byte-identical objects
    np.testing.assert_array_equal(roll.read_rows(0, LENGTH), image)


def test_write_rows_rejects_bad_frames(object_store: ObjectStore) -> None:
    roll = _roll(object_store)
    good = _image(length=10)
    with pytest.raises(ValueError, match="wide"):
        roll.write_rows(0, good[:, :600])
    with pytest.raises(ValueError, match="channels"):
        roll.write_rows(0, good[:, :, :1])
    with pytest.raises(ValueError, match="channels"):
        roll.write_rows(0, good[:, :, 0])  # grey rows for an RGB roll
    with pytest.raises(ValueError, match="uint8"):
        roll.write_rows(0, good.astype(np.uint16))
    with pytest.raises(ValueError, match="outside"):
        roll.write_rows(roll.capacity_rows - 5, good)
    with pytest.raises(ValueError, match="outside"):
        roll.write_rows(-1, good)
    assert object_store.list(f"{roll_prefix('R1')}/image/c/").items == []


def test_band_scores_round_trip_as_float16(object_store: ObjectStore) -> None:
    roll = _roll(object_store)
    rng = np.random.default_rng(1)
    maps = [rng.random((64, 175), dtype=np.float32) * 3 for _ in range(2)]
    maps.append(rng.random((47, 175), dtype=np.float32))  # ceil(188 / 4) rows
    for band, scores in enumerate(maps):
        roll.write_band_scores("rd-2024.1", band, scores, length=LENGTH)
    stored = roll.read_scores("rd-2024.1", 0, 175)
    assert stored.dtype == np.float16 and stored.shape == (175, 175)
    np.testing.assert_array_equal(stored, np.concatenate(maps).astype(np.float16))
    assert (roll.read_scores("rd-2024.1", 175, 200) == 0).all()  # fill value
    assert roll.score_versions() == ["rd-2024.1"]
    array = roll.create_scores("rd-2024.1")  # idempotent: opens, keeps the data
    assert array.shards == (64, 256) and array.chunks == (64, 256)
    assert roll.manifest == MANIFEST  # creating scores/<v> left the group attrs alone
    np.testing.assert_array_equal(roll.read_scores("rd-2024.1", 0, 64), maps[0].astype(np.float16))

    roll.write_band_scores("rd-2024.1", 1, maps[1])  # a retry of a full band, no length
    with pytest.raises(ValueError, match=r"\(64, 175\)"):
        roll.write_band_scores("rd-2024.1", 0, maps[2])
    with pytest.raises(ValueError, match=r"\(47, 175\)"):
        roll.write_band_scores("rd-2024.1", 2, maps[0], length=LENGTH)
    with pytest.raises(ValueError, match="floating"):
        roll.write_band_scores("rd-2024.1", 0, np.zeros((64, 175), np.int32))
    with pytest.raises(ValueError, match="finite"):
        roll.write_band_scores("rd-2024.1", 0, np.full((64, 175), 1e6, np.float32))
    with pytest.raises(ObjectNotFound):
        roll.read_scores("never-run", 0, 1)
    with pytest.raises(ValueError):
        roll.write_band_scores("bad/version", 0, maps[0])


def test_overview_is_a_bounded_block_mean(object_store: ObjectStore) -> None:
    roll = _roll(object_store)
    image = _image()
    _ingest(roll, image)
    small = roll.overview(LENGTH, max_side=100)  # factor 7
    assert small.shape == (100, 100, 3) and small.dtype == np.uint8
    expected = image[:7, :7].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(small[0, 0], expected, atol=0.5)
    assert roll.overview(LENGTH, max_side=2048).shape == (LENGTH, WIDTH, 3)  # no downsampling
    with pytest.raises(ValueError):
        roll.overview(0)


def test_create_open_and_delete(object_store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        open_roll(object_store, "R1")
    roll = _roll(object_store)
    roll.write_rows(0, _image(length=10))
    with pytest.raises(FileExistsError):
        _roll(object_store)
    same = _roll(object_store, exist_ok=True)
    np.testing.assert_array_equal(same.read_rows(0, 10), _image(length=10))
    with pytest.raises(ValueError, match="exists"):
        _roll(object_store, channels=1, exist_ok=True)
    with pytest.raises(ValueError, match="JSON"):
        create_roll(object_store, "R2", width=8, channels=1, manifest={"x": object()})
    with pytest.raises(ValueError, match="band_height"):
        create_roll(object_store, "R2", width=8, channels=1, band_height=100, manifest={})
    with pytest.raises(ValueError):
        roll_prefix("../R1")
    assert delete_roll(object_store, "R1") >= 3
    assert not roll_exists(object_store, "R1")
    assert object_store.list("rolls/").items == []


def test_sharded_roll_reads_across_zarr_backends(s3_server: str) -> None:
    """Written through obstore, read through s3fs, and the other way round."""
    obstore_side = make_s3_store(s3_server, "obstore")
    s3fs_side = make_s3_store(s3_server, "s3fs", bucket=obstore_side.bucket)
    image = _image()
    _ingest(_roll(obstore_side), image)
    np.testing.assert_array_equal(open_roll(s3fs_side, "R1").read_rows(0, LENGTH), image)
    open_roll(s3fs_side, "R1").write_band_scores("v1", 0, np.ones((64, 175), np.float32))
    assert float(open_roll(obstore_side, "R1").read_scores("v1", 0, 64).sum()) == 64 * 175
    assert isinstance(obstore_side.zarr_store("x"), zarr.storage.ObjectStore)
    assert isinstance(s3fs_side.zarr_store("x"), zarr.storage.FsspecStore)
    assert isinstance(obstore_side, S3Store)
