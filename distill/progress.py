"""Progress bars that stay readable where stderr is not a terminal.

On a terminal, tqdm's bar. Elsewhere — a log file, a container's log, a pipe — a bar is one
endless line of carriage returns (a training's 126 tiles wrote 80 of them), and a log line
written meanwhile is glued onto it: there the same bar is written as whole lines (done/total,
rate, ETA and its postfix), at most every `LINE_EVERY_S` seconds and when it ends.
"""

from __future__ import annotations

import io
import re
import sys
from typing import Any, TextIO

from tqdm.auto import tqdm

LINE_EVERY_S = 30.0
_CURSOR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines(io.TextIOBase):
    """A file for tqdm that writes each refresh of its line as a line of its own."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        # tqdm redraws its line with \r, and moves between nested bars with the cursor
        line = _CURSOR.sub("", text.replace("\r", "")).strip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(*args: Any, file: TextIO | None = None, **kwargs: Any) -> tqdm:
    """`tqdm(*args, **kwargs)` writing to `file` (stderr): a bar on a terminal, else lines."""
    stream = file if file is not None else sys.stderr
    if not _is_terminal(stream):
        kwargs |= {"mininterval": LINE_EVERY_S, "maxinterval": LINE_EVERY_S}
        kwargs |= {"dynamic_ncols": False, "ncols": 120}
        stream = _Lines(stream)
    return tqdm(*args, file=stream, **kwargs)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed, or not a real file
        return False
