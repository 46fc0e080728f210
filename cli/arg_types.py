"""Argument types shared by several commands: dates, durations, positive numbers, and choices
that are looked up only when used (so that listing them does not import torch at start-up);
`options`, the parsed arguments handed on as keyword arguments; `command_parser`, a command
described by its module's docstring."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_MAX_SECONDS = 365 * 86400.0


def iso_date(text: str) -> datetime:
    """argparse type: an ISO date or date-time."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO date or date-time: {text!r} (e.g. 2026-05-01 or 2026-05-01T18:00)"
        ) from None


def at_site(moment: datetime | None, timezone: str) -> datetime | None:
    """A command line's date without an offset read in the site's time zone
    (`ROLLSCAN_TIMEZONE`, the nightly grading's), not the process's: a container runs in UTC,
    and a Paris site's "2026-01-01" would have started an hour late."""
    if moment is None or moment.tzinfo is not None:
        return moment
    from zoneinfo import ZoneInfo

    return moment.replace(tzinfo=ZoneInfo(timezone))


def parse_duration(text: str) -> timedelta | None:
    """'30m', '2h', '1h30m', '45s', '1d' or plain seconds; '0' or 'off' → None (never)."""
    text = text.strip().lower()
    if text in ("0", "off", "never"):
        return None
    try:
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return timedelta(seconds=float(text))
        parts = _DURATION.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return timedelta(**{_UNITS[u]: float(n) for n, u in parts})
    except OverflowError:  # past timedelta's 999,999,999 days
        raise argparse.ArgumentTypeError(f"too long a duration: {text!r}") from None
    raise argparse.ArgumentTypeError(
        f"not a duration: {text!r} (e.g. 30m, 2h, 1h30m, 90s; 0 or off = never)"
    )


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, not {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, not {value}")
    return value


def positive_seconds(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    # nan slipped through `<= 0` (a wait of nan returns at once: passes back to back), and inf
    # overflowed the first wait
    if not 0 < value <= _MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds up to a year: {text!r}")
    return value


def options(
    args: argparse.Namespace, names: str = "", *, skip_none: bool = False, **renamed: str
) -> dict[str, Any]:
    """Parsed arguments as keyword arguments: `names` (space-separated) under their own names,
    `renamed` as parameter="argument". With `skip_none`, arguments not given (None) are left
    out, so that the callee's defaults apply."""
    pairs = [(name, name) for name in names.split()] + list(renamed.items())
    values = {param: getattr(args, name) for param, name in pairs}
    return {k: v for k, v in values.items() if v is not None} if skip_none else values


def command_parser(
    subparsers: Any, name: str, summary: str, doc: str | None
) -> argparse.ArgumentParser:
    """The parser of command `name`: `summary` in the main help, and as its own description the
    second paragraph of `doc`, the command module's docstring (one text for both readers)."""
    return subparsers.add_parser(name, help=summary, description=(doc or "").split("\n\n")[1])


class LazyChoices:
    """`choices=` whose values come from `load()` on first use (a check, or a help page).

    Give the argument a `metavar`: argparse builds a metavar from the choices otherwise, which
    would load them while the parser is being built."""

    def __init__(self, load: Callable[[], Iterable[str]]) -> None:
        self._load = load
        self._values: list[str] | None = None

    def _choices(self) -> list[str]:
        if self._values is None:
            self._values = sorted(self._load())
        return self._values

    def __contains__(self, value: object) -> bool:
        return value in self._choices()

    def __iter__(self) -> Iterator[str]:
        return iter(self._choices())

    def __len__(self) -> int:
        return len(self._choices())
