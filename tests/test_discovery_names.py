"""Folder names an uploader chooses, as discovery meets them (issue 13 item 9).

A name that is no roll id is logged once, escaped (tests/test_discovery.py), and remembered so
that the next pass does not log it again. What is remembered must stay bounded: whoever can
write under `incoming/` can create folders without end, and the scheduler runs for months.
"""

from __future__ import annotations

from test_discovery import RecordingEnqueuer

from scheduler import discovery
from storage.objectstore import LocalStore
from storage.settings import Settings
from worker.context import WorkerContext


def test_junk_folder_names_are_warned_about_in_bounded_memory(
    db_engine, tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr(discovery, "_warned_names", {})  # names other tests left behind
    store = LocalStore(tmp_path / "objects")
    flood = discovery._MAX_WARNED + 40
    # folders as a scanner's file share could name them (the store's own keys refuse a space)
    for name in [f"junk {i:05d}" for i in range(flood)] + ["junk final"]:
        (tmp_path / "objects" / "incoming" / name).mkdir(parents=True)
    ctx = WorkerContext(Settings(data_dir=tmp_path / "d", device="cpu"), db_engine, store,
                        RecordingEnqueuer(), device="cpu")  # fmt: skip
    caplog.set_level("WARNING", logger="scheduler.discovery")

    def warned() -> int:
        found = [r for r in caplog.records if "not a roll id" in r.getMessage()]
        caplog.clear()
        return len(found)

    assert not discovery.discover_once(ctx).problems
    assert warned() == flood + 1  # each once
    assert len(discovery._warned_names) == discovery._MAX_WARNED
    discovery.discover_once(ctx)
    # beyond the bound the oldest names make room and are warned about again (each pass scans
    # more names than are kept, so every one of them): the log grows, the memory does not
    assert warned() == flood + 1
    assert len(discovery._warned_names) == discovery._MAX_WARNED
    assert not ctx.enqueue.calls
