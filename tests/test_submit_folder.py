"""`rollscan submit FOLDER`'s checks of the folder, refused in bounded memory before anything is
uploaded: the frames' numbering and the manifest's size."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from scheduler.submit import upload_folder
from storage.manifest import MAX_MANIFEST_BYTES, ManifestError, frame_seq
from storage.objectstore import LocalStore
from worker.frames import max_frame_bytes

MANIFEST = {"roll_id": "R-1", "fabric_type": "twill", "width_mm": 100.0, "px_per_mm": 10.0,
            "complete": False}  # fmt: skip


def _folder(tmp_path: Path, frames: list[str], manifest: dict | None = None) -> Path:
    folder = tmp_path / "R-1"
    (folder / "frames").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(manifest or MANIFEST))
    for name in frames:
        (folder / "frames" / name).write_bytes(b"II*\0")
    return folder


def _refused(call: Callable[[], object], error: type[Exception], match: str) -> int:
    """Assert `call` raises; return the peak of Python's allocations while it ran."""
    tracemalloc.start()
    try:
        with pytest.raises(error, match=match):
            call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        # a set of ten million numbers was built to name ten of them (999999999: a billion)
        (["000001.tif", "010000000.tif"], r"missing \[2, 3, 4, 5, 6, 7, 8, 9, 10, 11\]"),
        (["1.tif", "01.tif", "2.tif"], r"numbered twice: \[1\]"),
        (["000001.tif", "000003.tif"], r"missing \[2\]"),
    ],
    ids=["sparse", "twice", "gap"],
)
def test_frames_numbered_wrong_are_refused_before_upload(tmp_path, frames, reason) -> None:
    store = LocalStore(tmp_path / "objects")
    folder = _folder(tmp_path, frames)
    peak = _refused(lambda: upload_folder(store, folder, "incoming"), ValueError, reason)
    assert peak < 16 << 20
    assert list(store.iter_objects("")) == []


def test_a_frame_named_with_another_scripts_digits_is_no_frame() -> None:
    """`\\d` took "٢.tif" for frame 2, whose key the object store then refused: its roll
    waited for ever."""
    assert frame_seq("٢.tif") is None and frame_seq("000002.tif") == 2


def test_an_oversized_manifest_is_refused_from_its_size(tmp_path) -> None:
    store = LocalStore(tmp_path / "objects")
    folder = _folder(tmp_path, ["000001.tif"])
    with (folder / "manifest.json").open("r+b") as file:  # sparse: no disk, 64 MiB to read
        file.truncate(64 << 20)
    peak = _refused(lambda: upload_folder(store, folder, "incoming"), ManifestError,
                    f"larger than {MAX_MANIFEST_BYTES} bytes")  # fmt: skip
    assert peak < 16 << 20
    assert list(store.iter_objects("")) == []


@pytest.mark.parametrize("kind", ["device", "folder", "too big"])
def test_a_frame_that_is_no_regular_file_or_too_big_is_refused_before_upload(tmp_path, kind):
    """A link to /dev/zero streamed 627 MiB into the store in 3 s, and on; a folder named like
    a frame left frame 1 uploaded without a manifest."""
    store = LocalStore(tmp_path / "objects")
    folder = _folder(tmp_path, ["000001.tif"] + (["000002.tif"] if kind == "too big" else []))
    second = folder / "frames" / "000002.tif"
    if kind == "device":
        second.symlink_to("/dev/zero")
    elif kind == "folder":
        second.mkdir()
    else:
        second.write_bytes(bytes(max_frame_bytes(1000) + 1))
    reason = "more than any frame within ROLLSCAN_MAX_FRAME_PIXELS=1000"
    with pytest.raises(ValueError, match=reason if kind == "too big" else "not a regular file"):
        upload_folder(store, folder, "incoming", max_frame_pixels=1000)
    assert list(store.iter_objects("")) == []
