"""Progress bars where stderr is not a terminal (distill/progress.py): whole lines, a few."""

from __future__ import annotations

import io

from distill.progress import progress_bar


def test_a_bar_written_to_a_file_is_whole_lines_and_a_log_line_keeps_its_own():
    """A training's bar wrote 80 carriage returns for 126 tiles into a log file, and a log line
    written meanwhile was glued onto the bar's text."""
    out = io.StringIO()
    with progress_bar(total=126, desc="train", unit="tile", file=out) as bar:
        for step in range(63):
            bar.update(2)
            bar.set_postfix(loss=f"{1 / (step + 1):.4f}", refresh=False)
            if step == 30:
                out.write("2026-12-06 23:55:48,764 INFO worker.context: model loaded\n")
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert "2026-12-06 23:55:48,764 INFO worker.context: model loaded" in lines
    assert len(lines) <= 4  # its first line, the log line, its last: not one per step
    assert lines[-1].startswith("train: 100%") and "126/126" in lines[-1] and "loss=" in lines[-1]


def test_a_bar_on_a_terminal_is_tqdms_own():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    with progress_bar(total=3, desc="score", file=out, mininterval=0) as bar:
        bar.update(3)
    assert "\r" in out.getvalue()


def test_an_upload_shows_its_bytes_rate_and_time_left(tmp_path, capsys):
    """`rollscan submit FOLDER` said nothing until its last frame was up (a roll of tens of GB
    goes up for minutes)."""
    from rollscan_testing.synthetic_roll import write_synthetic_roll
    from scheduler.submit import upload_folder
    from storage.objectstore import LocalStore

    folder = tmp_path / "R-up"
    write_synthetic_roll(folder, "R-up", frames=3, frame_rows=64, width=256)
    total = sum(p.stat().st_size for p in (folder / "frames").iterdir())
    upload_folder(LocalStore(tmp_path / "objects"), folder, "incoming", progress=True)
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("upload R-up: 100%") and "B/s" in last, last
    shown = last.split("| ")[1].split(" ")[0]  # "12.3k/12.3k"
    assert shown.split("/")[0] == shown.split("/")[1] and total > 0
    upload_folder(LocalStore(tmp_path / "objects"), folder, "incoming")  # small: in seconds
    assert capsys.readouterr().err == ""


def test_nested_bars_written_to_a_file_leave_no_cursor_moves():
    out = io.StringIO()
    with progress_bar(total=2, desc="outer", file=out) as outer:
        with progress_bar(total=3, desc="inner", file=out, leave=False) as inner:
            inner.update(3)
        outer.update(2)
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()
    assert out.getvalue().splitlines()[-1].startswith("outer: 100%")
