"""Ingest against hostile input, on a real PostgreSQL and object store, without Celery
(issue 13): objects far larger than a frame, frame widths the manifest does not allow, meta
that would overwrite the roll's attributes, and a frame replaced while it is read. Races:
test_ingest_races.py; work done again: test_repeated_work.py.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from fixtures_ingest import BAND, WIDTH, frame_bytes, put_frame, register, roll_and_run
from fixtures_roll import FABRIC

from storage.objectstore import LocalStore, ObjectInfo, version_as_file
from storage.schema import Frame
from storage.zarr_rolls import create_roll, open_roll, roll_prefix
from worker.context import RetryLater
from worker.frames import decode_frame
from worker.ingest import ingest_frame
from worker.roll_rows import RollError

# --- items 3, 4, 10: what a frame may be ---------------------------------------------------


def test_an_object_larger_than_any_frame_is_refused_before_it_is_read(make_ctx, tmp_path):
    ctx = make_ctx(max_frame_pixels=1000)  # frames of at most 16 MB and 8 kB with headers
    register(ctx, "R-huge", 1)
    key = put_frame(ctx, "R-huge", 1, bytes(17 << 20))
    assert ingest_frame(ctx, "R-huge", 1, key) == "failed"
    roll, _ = roll_and_run(ctx, "R-huge")
    assert roll.status == "failed"
    assert f"{17 << 20} bytes, more than any frame" in roll.failure_reason
    assert (
        "ROLLSCAN_MAX_FRAME_PIXELS=1000" in roll.failure_reason
        and "not read" in roll.failure_reason
    )


@pytest.mark.parametrize(
    ("width", "settings", "why"),
    [
        (1000, {}, "128 px"),  # the manifest says 12.8 mm at 10 px/mm
        (90, {}, "128 px"),
        (150, {"max_frame_width": 140}, "ROLLSCAN_MAX_FRAME_WIDTH = 140"),
    ],
)
def test_the_first_frame_width_must_agree_with_the_manifest(make_ctx, width, settings, why):
    ctx = make_ctx(**settings)
    register(ctx, "R-wide", 1)
    key = put_frame(ctx, "R-wide", 1, frame_bytes(rows=8, width=width))
    assert ingest_frame(ctx, "R-wide", 1, key) == "failed"
    roll, _ = roll_and_run(ctx, "R-wide")
    assert f"frame is {width} px wide" in roll.failure_reason and why in roll.failure_reason
    assert roll.width_px is None  # nothing was written


def test_a_frame_within_the_tolerance_is_taken(make_ctx):
    ctx = make_ctx()
    register(ctx, "R-ok", 1)
    key = put_frame(ctx, "R-ok", 1, frame_bytes(width=150))  # 17 % wider than 128
    assert ingest_frame(ctx, "R-ok", 1, key) == "ingested"
    assert roll_and_run(ctx, "R-ok")[0].width_px == 150


def test_a_frame_of_another_sample_depth_than_the_first_fails_the_roll(make_ctx):
    """16-bit samples are brought to 8 bits by a fixed shift: a depth changing within a roll
    would change its grey levels from that frame on."""
    ctx = make_ctx()
    register(ctx, "R-depth", 2)
    assert (
        ingest_frame(ctx, "R-depth", 1, put_frame(ctx, "R-depth", 1, frame_bytes())) == "ingested"
    )
    deeper = io.BytesIO()
    tifffile.imwrite(deeper, np.full((BAND, WIDTH), 100 << 8, np.uint16))
    key = put_frame(ctx, "R-depth", 2, deeper.getvalue())
    assert ingest_frame(ctx, "R-depth", 2, key) == "failed"
    roll, _ = roll_and_run(ctx, "R-depth")
    assert roll.bits_per_sample == 8 and roll.rows_ingested == BAND
    assert "frame 2" in roll.failure_reason
    assert "16-bit samples; this roll's frames have 8-bit" in roll.failure_reason


def test_a_first_frame_of_12_bit_data_in_16_bit_samples_fails_the_roll_saying_so(make_ctx):
    """The fixed `>> 8` leaves 12-bit data 16 grey levels: every roll of such a line came out one
    roll-long defect, graded reject, without a word. A full-range 16-bit frame is taken."""
    ctx = make_ctx()
    register(ctx, "R-12bit", 1)
    twelve = io.BytesIO()
    rng = np.random.default_rng(0)
    tifffile.imwrite(twelve, rng.integers(0, 4096, (BAND, WIDTH), dtype=np.uint16))
    assert ingest_frame(ctx, "R-12bit", 1, put_frame(ctx, "R-12bit", 1, twelve.getvalue())) == (
        "failed"
    )
    roll, _ = roll_and_run(ctx, "R-12bit")
    assert "frame 1" in roll.failure_reason and roll.rows_ingested == 0
    assert "16-bit samples never exceed 4095" in roll.failure_reason
    assert "12-bit data in 16-bit samples?" in roll.failure_reason
    register(ctx, "R-16bit", 1)
    full = io.BytesIO()
    tifffile.imwrite(full, rng.integers(0, 65536, (BAND, WIDTH), dtype=np.uint16))
    key = put_frame(ctx, "R-16bit", 1, full.getvalue())
    assert ingest_frame(ctx, "R-16bit", 1, key) == "ingested"


def test_meta_cannot_replace_the_roll_id_in_the_zarr_attributes(make_ctx):
    ctx = make_ctx()
    register(ctx, "R-meta", 1, meta={"roll_id": "R-other", "fabric_type": "silk", "loom": "L7"})
    key = put_frame(ctx, "R-meta", 1, frame_bytes())
    assert ingest_frame(ctx, "R-meta", 1, key) == "ingested"
    attrs = open_roll(ctx.store, "R-meta").manifest
    assert (attrs["roll_id"], attrs["fabric_type"]) == ("R-meta", FABRIC)
    assert attrs["meta"] == {"roll_id": "R-other", "fabric_type": "silk", "loom": "L7"}


# --- item 6: the bytes ingested are the ETag's ----------------------------------------------


def test_a_frame_is_decoded_from_a_file_on_every_store(object_store) -> None:
    """Local: the store's own file; S3: a temporary copy streamed in, never the bytes whole."""
    data = frame_bytes(seed=3)
    object_store.put("incoming/R/frames/000001.tif", data)
    with version_as_file(object_store, object_store.head("incoming/R/frames/000001.tif")) as f:
        pixels = decode_frame(f)
        assert isinstance(f.name, str)  # tifffile takes a handle's name for a path
    np.testing.assert_array_equal(pixels[:, :, 0], tifffile.imread(io.BytesIO(data)))


class ReplacedAfterHead(LocalStore):
    """The store of a scanner that re-uploads a frame the moment after rollscan's HEAD."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.replacements: dict[str, bytes] = {}

    def head(self, key: str) -> ObjectInfo:
        info = super().head(key)
        if key in self.replacements:
            self.put(key, self.replacements.pop(key))
        return info


def test_a_frame_replaced_between_head_and_read_is_read_again(make_ctx, tmp_path):
    store = ReplacedAfterHead(tmp_path / "objects")
    ctx = make_ctx(store)
    register(ctx, "R-etag", 1)
    old, new = frame_bytes(seed=1), frame_bytes(seed=2)
    key = put_frame(ctx, "R-etag", 1, old)
    store.replacements[key] = new
    with pytest.raises(RetryLater, match="replaced"):
        ingest_frame(ctx, "R-etag", 1, key)
    assert roll_and_run(ctx, "R-etag")[0].width_px is None  # nothing written under either
    assert ingest_frame(ctx, "R-etag", 1, key) == "ingested"  # the retry
    with ctx.session() as session:
        frame = session.get(Frame, ("R-etag", 1))
    assert frame.etag == hashlib.md5(new).hexdigest()
    stored = open_roll(ctx.store, "R-etag").read_rows(0, BAND)[:, :, 0]
    np.testing.assert_array_equal(stored, tifffile.imread(io.BytesIO(new)))


# --- the roll's zarr image: a creation cut short, a roll longer than it holds ---------------


def test_a_roll_whose_zarr_creation_was_cut_short_is_completed_by_its_next_frame(make_ctx):
    ctx = make_ctx()
    register(ctx, "R-half", 1)
    # a worker killed between creating the group and its image array leaves this
    zarr.create_group(ctx.store.zarr_store(roll_prefix("R-half")), attributes={"roll_id": "R-half"})
    key = put_frame(ctx, "R-half", 1, frame_bytes())
    assert ingest_frame(ctx, "R-half", 1, key) == "ingested"
    np.testing.assert_array_equal(
        open_roll(ctx.store, "R-half").read_rows(0, BAND)[:, :, 0],
        tifffile.imread(io.BytesIO(frame_bytes())),
    )


def test_a_roll_longer_than_its_image_holds_fails_with_the_reason_and_writes_nothing(make_ctx):
    ctx = make_ctx()
    register(ctx, "R-long", 2)
    # an image of one band's rows (the real one holds 4.2 M rows: 21 m at 200 px/mm)
    create_roll(ctx.store, "R-long", width=WIDTH, channels=1, band_height=BAND,
                manifest={"roll_id": "R-long"}, capacity_rows=BAND)  # fmt: skip
    assert ingest_frame(ctx, "R-long", 1, put_frame(ctx, "R-long", 1, frame_bytes())) == "ingested"
    key = put_frame(ctx, "R-long", 2, frame_bytes(seed=3))
    assert ingest_frame(ctx, "R-long", 2, key) == "failed"
    roll, run = roll_and_run(ctx, "R-long")
    assert (roll.status, run.status) == ("failed", "failed")
    assert f"would end at row {2 * BAND}, past the {BAND} rows" in roll.failure_reason
    assert "split the roll" in roll.failure_reason
    with ctx.session() as session:
        assert session.get(Frame, ("R-long", 2)) is None
    assert roll.rows_ingested == BAND


# --- what a manifest sent again may change ---------------------------------------------------


def test_a_manifest_sent_again_cannot_change_what_a_roll_was_registered_or_completed_with(
    make_ctx,
):
    ctx = make_ctx()
    register(ctx, "R-again", 2, complete=False)
    register(ctx, "R-again", 3, complete=False)  # a growing roll may still add frames
    register(ctx, "R-again", 2)  # and complete with the count it ends with
    register(ctx, "R-again", 2, meta={"loom": "L7"})  # the same count again: meta may change
    refusals = [
        ({"frames": 3}, "already complete with 2 frames; a manifest cannot change that to 3"),
        ({"frames": 2, "complete": False}, "already complete; a manifest cannot reopen it"),
        ({"frames": 2, "width_mm": 20.0}, "the manifest changes width_mm"),
    ]
    for change, why in refusals:
        with pytest.raises(RollError, match=why):
            register(ctx, "R-again", **change)
    roll, _ = roll_and_run(ctx, "R-again")
    assert (roll.frames_total, roll.complete, roll.meta) == (2, True, {"loom": "L7"})


class ReplacedAfterOpen(LocalStore):
    """The store of a scanner that re-uploads a frame while rollscan decodes the version it
    opened (a large frame's slow decode)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.replacements: dict[str, bytes] = {}

    def open(self, key: str, *, version: ObjectInfo | None = None):
        reader = super().open(key, version=version)
        if key in self.replacements:
            self.put(key, self.replacements.pop(key))
        return reader


def test_a_bad_version_replaced_while_it_is_decoded_does_not_fail_the_roll(make_ctx, tmp_path):
    """A delivery still decoding a replaced version failed the roll with that version's error —
    after the good one had been ingested, or after `resume --retry` had finished the roll."""
    store = ReplacedAfterOpen(tmp_path / "objects")
    ctx = make_ctx(store)
    register(ctx, "R-stale", 1)
    key = put_frame(ctx, "R-stale", 1, frame_bytes(width=WIDTH // 2, seed=5))  # too narrow
    store.replacements[key] = frame_bytes(seed=2)
    with pytest.raises(RetryLater, match="changed while it was checked"):
        ingest_frame(ctx, "R-stale", 1, key)
    assert roll_and_run(ctx, "R-stale")[0].status != "failed"
    assert ingest_frame(ctx, "R-stale", 1, key) == "ingested"  # the retry: the good version
    # the bad version still there: it fails the roll, as before
    register(ctx, "R-bad", 1)
    key = put_frame(ctx, "R-bad", 1, frame_bytes(width=WIDTH // 2, seed=5))
    assert ingest_frame(ctx, "R-bad", 1, key) == "failed"
    assert "px wide" in roll_and_run(ctx, "R-bad")[0].failure_reason


def test_a_stray_frame_past_the_count_removed_by_the_scanner_is_skipped(make_ctx):
    """Queued before the manifest gave the count, then deleted by the scanner: its "not found"
    failed the roll before the count was looked at."""
    ctx = make_ctx()
    register(ctx, "R-stray", None, complete=False)
    keys = [put_frame(ctx, "R-stray", seq, frame_bytes(seed=seq)) for seq in (1, 2, 3)]
    register(ctx, "R-stray", 2, complete=True)
    ctx.store.delete(keys[2])
    assert ingest_frame(ctx, "R-stray", 3, keys[2]) == "skipped"
    for seq in (1, 2):
        assert ingest_frame(ctx, "R-stray", seq, keys[seq - 1]) == "ingested"
    assert roll_and_run(ctx, "R-stray")[0].status != "failed"
