"""Dates on the command line: ISO, read in the site's zone, or with the zone `rollscan rolls`
prints after them, so that a date copied from its table can be pasted back."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta

import pytest

from cli.arg_types import at_site, iso_date

PARIS = "Europe/Paris"


def _utc(text: str, timezone: str = PARIS) -> datetime:
    moment = at_site(iso_date(text), timezone)
    assert moment is not None and moment.utcoffset() is not None
    return moment.astimezone(UTC).replace(tzinfo=None)


def test_a_date_without_a_zone_is_the_sites():
    assert _utc("2026-11-27") == datetime(2026, 11, 26, 23, 0)
    assert _utc("2026-07-01T00:30") == datetime(2026, 6, 30, 22, 30)
    assert _utc("2026-11-27T00:30+05:00") == datetime(2026, 11, 26, 19, 30)
    assert at_site(None, PARIS) is None


def test_the_zone_a_table_prints_is_read_back():
    assert _utc("2026-11-27 00:30 CET") == datetime(2026, 11, 26, 23, 30)
    assert _utc("2026-07-01 00:30 CEST") == datetime(2026, 6, 30, 22, 30)
    assert _utc("2026-11-27 09:00 JST", "Asia/Tokyo") == datetime(2026, 11, 27, 0, 0)
    assert _utc("2026-11-27 00:30 UTC") == datetime(2026, 11, 27, 0, 30)
    assert _utc("2026-11-27 09:00 Asia/Tokyo") == datetime(2026, 11, 27, 0, 0)
    # the hour the clocks go back comes twice; its zone says which
    first, second = _utc("2026-10-25 02:30 CEST"), _utc("2026-10-25 02:30 CET")
    assert second - first == timedelta(hours=1)


def test_a_zone_that_is_not_the_sites_on_that_date_is_refused():
    # CEST in November is not Paris's time: a typo or another site's table, not a guess
    with pytest.raises(ValueError, match=r"'CEST' is neither the site's zone on that date \(CET"):
        at_site(iso_date("2026-11-27 00:30 CEST"), PARIS)
    with pytest.raises(ValueError, match="give an offset instead"):
        at_site(iso_date("2026-11-27 00:30 PST"), PARIS)
    # CET is also a zone name, whose summer is CEST: in July it was read as +02:00
    with pytest.raises(ValueError, match="'CET' is neither the site's zone on that date"):
        at_site(iso_date("2026-07-01 00:30 CET"), PARIS)
    with pytest.raises(ValueError, match="'EET' is neither"):
        at_site(iso_date("2026-07-01 00:30 EET"), "Europe/London")


@pytest.mark.parametrize(
    "text", ["junk", "2026-13-01", "2026-11-27T00:30+01:00 CET", "2026-11-27 00:30 C$T", "CET"]
)
def test_what_is_no_date_is_refused_by_the_parser(text):
    with pytest.raises(argparse.ArgumentTypeError, match="not an ISO date or date-time"):
        iso_date(text)


def test_a_time_the_clocks_skip_or_repeat_is_refused_not_read_one_way():
    """The hour the clocks skip was read as the hour after (or, as "02:30 CEST", before), and
    the hour they repeat without its zone as the first: each an hour off the other reading,
    without a word — `reprocess --until` left out the rolls of the second 02:00–02:30."""
    for text in ("2027-03-28 02:30", "2027-03-28 02:30 CEST", "2027-03-28 02:30 CET"):
        with pytest.raises(ValueError, match=r"is no time in Europe/Paris .* skip it that night; "
                           r"give an offset instead \(e\.g\. 2027-03-28T02:30\+01:00\)"):  # fmt: skip
            at_site(iso_date(text), PARIS)
    with pytest.raises(ValueError, match="no time in America/New_York"):
        at_site(iso_date("2027-03-14 02:30 America/New_York"), PARIS)
    with pytest.raises(ValueError, match=r"comes twice in Europe/Paris \(ROLLSCAN_TIMEZONE\), the "
                       r"night the clocks go back: write '2027-10-31 02:30 CEST' or "
                       r"'2027-10-31 02:30 CET'"):  # fmt: skip
        at_site(iso_date("2027-10-31 02:30"), PARIS)
    assert _utc("2027-10-31 02:30 CEST") == datetime(2027, 10, 31, 0, 30)
    assert _utc("2027-10-31 02:30 CET") == datetime(2027, 10, 31, 1, 30)
    assert _utc("2027-03-28 03:30") == datetime(2027, 3, 28, 1, 30)
    # a date alone is its day's first instant, where the clocks skip midnight (Santiago) or
    # repeat it (Havana) too
    assert _utc("2026-09-06", "America/Santiago") == datetime(2026, 9, 6, 4, 0)
    assert _utc("2024-11-03", "America/Havana") == datetime(2024, 11, 3, 4, 0)
    # another region's repeated hour: offsets, which are read back, not its abbreviations
    with pytest.raises(ValueError, match=r"comes twice in Europe/Paris, .* write "
                       r"'2027-10-31T02:30\+02:00' or '2027-10-31T02:30\+01:00'"):  # fmt: skip
        at_site(iso_date("2027-10-31 02:30 Europe/Paris"), "Asia/Tokyo")
    with pytest.raises(ValueError, match="no time in America/Santiago"):
        at_site(iso_date("2026-09-06 00:30"), "America/Santiago")
