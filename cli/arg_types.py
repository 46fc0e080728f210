"""Argument types shared by several commands: dates, durations, positive numbers, and choices
that are looked up only when used (so that listing them does not import torch at start-up);
`options`, the parsed arguments handed on as keyword arguments; `command_parser`, a command
described by its module's docstring."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_MAX_SECONDS = 365 * 86400.0
_ZONE = re.compile(r"[A-Za-z][A-Za-z0-9_+\-/]*")  # CET, UTC, Asia/Tokyo, Etc/GMT+1


@dataclass(frozen=True)
class SiteDate:
    """A command line's date, and the zone named after it (`2026-11-27 00:30 CET`, as
    `rollscan rolls` and `rollscan report` print dates, so that one can be pasted back)."""

    moment: datetime
    zone: str | None = None


def iso_date(text: str) -> SiteDate:
    """argparse type: an ISO date or date-time, optionally followed by a zone's name or
    abbreviation (checked by `at_site`, which knows the site's zone)."""
    text = text.strip()
    for body, zone in ((text, None), *([text.rsplit(None, 1)] if " " in text else [])):
        try:
            moment = datetime.fromisoformat(body)
        except ValueError:
            continue
        if zone is not None and (moment.tzinfo is not None or not _ZONE.fullmatch(zone)):
            break
        return SiteDate(moment, zone)
    raise argparse.ArgumentTypeError(
        f"not an ISO date or date-time: {text!r} (e.g. 2026-05-01, 2026-05-01T18:00, "
        "2026-05-01 18:00 CET)"
    )


def at_site(date: SiteDate | None, timezone: str) -> datetime | None:
    """A command line's date without an offset read in the site's time zone
    (`ROLLSCAN_TIMEZONE`, the nightly grading's), not the process's: a container runs in UTC,
    and a Paris site's "2026-01-01" would have started an hour late. A zone named after it
    must be the site's abbreviation on that date (CET, CEST), a region's zone (Asia/Tokyo) or
    UTC: another abbreviation is refused, not guessed (CET is also a zone name, with summer
    time)."""
    if date is None:
        return None
    moment = date.moment
    if moment.tzinfo is not None:
        return moment
    for fold in (0, 1):  # the hour a clock is set back comes twice: 02:30 CEST, 02:30 CET
        here = moment.replace(tzinfo=ZoneInfo(timezone), fold=fold)
        if date.zone is None or date.zone == here.tzname():
            return here
    try:  # a region's name; abbreviations that are also zone names (CET, EET) keep summer time
        if "/" in date.zone or date.zone in ("UTC", "GMT"):
            return moment.replace(tzinfo=ZoneInfo(date.zone))
    except (ZoneInfoNotFoundError, ValueError):
        pass
    raise ValueError(
        f"{moment:%Y-%m-%d %H:%M} {date.zone}: {date.zone!r} is neither the site's zone on "
        f"that date ({here.tzname()}, ROLLSCAN_TIMEZONE={timezone}) nor a region's zone "
        f"(Asia/Tokyo) or UTC; give an offset instead (e.g. {moment:%Y-%m-%dT%H:%M}+01:00)"
    )


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
