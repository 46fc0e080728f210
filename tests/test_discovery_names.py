"""Folder names an uploader chooses, as discovery meets them (issue 13 item 9).

A name that is no roll id is logged once, escaped, and remembered so
that the next pass does not log it again. What is remembered must stay bounded: whoever can
write under `incoming/` can create folders without end, and the scheduler runs for months.
"""

from __future__ import annotations

import json

from fixtures_discovery import RecordingEnqueuer, manifest_of, roll_row

from scheduler import discovery
from scheduler.discovery import discover_once
from storage.objectstore import LocalStore
from storage.settings import Settings
from worker.context import WorkerContext


def test_junk_folder_names_are_warned_about_in_bounded_memory(
    db_engine, tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr(discovery, "_warned", {})  # names other tests left behind
    monkeypatch.setattr(discovery, "_beyond", {"count": 0, "example": "", "said": -float("inf")})
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
    found = [r.getMessage() for r in caplog.records if "not a roll id" in r.getMessage()]
    caplog.clear()
    # the first names each once, the rest counted in one line
    assert len(found) == discovery._MAX_WARNED + 1
    assert found[-1].startswith(
        f"41 more folder names this pass, not logged one by one (more than {discovery._MAX_WARNED} "
        "were), e.g. incoming/'junk 01024'/: not a roll id"
    )
    assert len(discovery._warned) == discovery._MAX_WARNED
    discovery.discover_once(ctx)
    # evicting the oldest names to make room warned about every one of them again each pass
    # (each pass scans more names than are kept): neither the log nor the memory grows now
    assert warned() == 0
    assert len(discovery._warned) == discovery._MAX_WARNED
    assert not ctx.enqueue.calls
    # a roll's own problem is said whatever the junk beside it (it was left for the count)
    roll = tmp_path / "objects" / "incoming" / "R-0800"
    (roll / "frames").mkdir(parents=True)
    (roll / "manifest.json").write_text(json.dumps(manifest_of("R-0800")))
    for name in ("2.tif", "000002.tif"):
        (roll / "frames" / name).write_bytes(b"frame")
    problems = discovery.discover_once(ctx).problems
    assert (
        len(problems) == 1 and "R-0800: 1 frame number(s) given by several objects" in problems[0]
    )
    assert not discovery.discover_once(ctx).problems  # once
    # folders removed are forgotten: room for the names that come after them
    for i in range(100):
        (tmp_path / "objects" / "incoming" / f"junk {i:05d}").rmdir()
    discovery.discover_once(ctx)
    caplog.clear()
    assert len(discovery._warned) == discovery._MAX_WARNED - 100
    (tmp_path / "objects" / "incoming" / "junk later").mkdir()
    discovery.discover_once(ctx)
    assert warned() == 41 + 1  # those only counted so far, and the new one


def test_a_folder_name_with_a_newline_is_ignored_and_logged_escaped(
    db_engine, discovery_settings, tmp_path, caplog
):
    """`^…$` accepted "R-1\\n" (a trailing newline) as a roll id, and names went raw into the
    log: an uploader could forge log lines. The name is refused and shown escaped, once."""
    store = LocalStore(tmp_path / "objects")
    ctx = WorkerContext(discovery_settings, db_engine, store, RecordingEnqueuer(), device="cpu")
    forged = "R-1\n2026-01-01 00:00:00 INFO roll R-9 done"
    for name in ("R-1\n", forged):  # as a scanner's file share could name them
        folder = tmp_path / "objects" / "incoming" / name
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps(manifest_of("R-1", frames=1)))
    caplog.set_level("INFO", logger="scheduler.discovery")
    for _ in range(2):
        report = discover_once(ctx)
        assert not report and roll_row(ctx, "R-1") is None
    messages = [r.getMessage() for r in caplog.records if r.name == "scheduler.discovery"]
    assert len([m for m in messages if "not a roll id" in m]) == 2, messages  # once each
    assert not any("\n" in m for m in messages), messages
