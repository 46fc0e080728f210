"""Argument types shared by several commands: dates, durations, positive numbers, and choices
that are looked up only when used (so that listing them does not import torch at start-up);
`options`, the parsed arguments handed on as keyword arguments; `command_parser`, a command
described by its module's docstring."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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
    timed: bool = True  # a time of day was given (a date alone is its day's first instant)


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
        return SiteDate(moment, zone, timed=len(body) > len("2026-05-01"))
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
    time). A time the clocks skip is refused, and so is one they repeat without the zone that
    says which (`02:30 CEST` or `02:30 CET`): each was read one way without a word, an hour off
    the other (a date alone is its day's first instant, even where midnight is skipped)."""
    if date is None:
        return None
    moment = date.moment
    if moment.tzinfo is not None:
        return moment
    zone, name = ZoneInfo(timezone), f"{timezone} (ROLLSCAN_TIMEZONE)"
    site_names = {moment.replace(tzinfo=zone, fold=fold).tzname() for fold in (0, 1)}
    readings = _readings(moment, zone)
    if date.zone in site_names:
        readings = [here for here in readings if here.tzname() == date.zone]
    elif date.zone is not None:
        try:  # a region's name; abbreviations that are also zone names (CET, EET) keep summer time
            if "/" not in date.zone and date.zone not in ("UTC", "GMT"):
                raise ValueError(date.zone)
            zone, name = ZoneInfo(date.zone), date.zone
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"{moment:%Y-%m-%d %H:%M} {date.zone}: {date.zone!r} is neither the site's zone "
                f"on that date ({'/'.join(sorted(site_names))}, ROLLSCAN_TIMEZONE={timezone}) nor "
                f"a region's zone (Asia/Tokyo) or UTC; give an offset instead (e.g. "
                f"{moment.replace(tzinfo=zone).isoformat(timespec='minutes')})"
            ) from None
        readings = _readings(moment, zone)
    if len(readings) == 1:
        return readings[0]
    if not date.timed:  # the day's first instant, where its midnight is skipped or repeated
        return readings[0] if readings else moment.replace(tzinfo=zone)
    if not readings:
        raise ValueError(
            f"{moment:%Y-%m-%d %H:%M} is no time in {name}: the clocks skip it that night; "
            f"give an offset instead (e.g. {moment.replace(tzinfo=zone).isoformat(timespec='minutes')})"
        )
    both = " or ".join(  # abbreviations are read back in the site's zone only
        f"'{moment:%Y-%m-%d %H:%M} {here.tzname()}'" if zone.key == timezone
        else f"'{here.isoformat(timespec='minutes')}'"
        for here in readings
    )  # fmt: skip
    raise ValueError(
        f"{moment:%Y-%m-%d %H:%M} comes twice in {name}, the night the clocks go back: write {both}"
    )


def _readings(moment: datetime, zone: ZoneInfo) -> list[datetime]:
    """The instants a wall-clock time names in `zone`: one, two in the hour the clocks go back
    (first the earlier), none in the hour they skip."""
    readings: list[datetime] = []
    for fold in (0, 1):
        here = moment.replace(tzinfo=zone, fold=fold)
        exists = here.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == moment
        if exists and all(here.utcoffset() != other.utcoffset() for other in readings):
            readings.append(here)
    return readings


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
