"""The index record's dates and times: read without strptime where the text is plain digits,
and always as strptime reads them (the reference)."""

from __future__ import annotations

import datetime as dt

import pytest

from ricord_archive.dicom.json import _as_date, _as_time


def by_strptime_date(value: str | None) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value), "%Y%m%d").date() if value else None
    except ValueError:
        return None


def by_strptime_time(value: str | None) -> dt.time | None:
    text = str(value or "").replace(":", "")
    try:
        return dt.datetime.strptime(text[:6], "%H%M%S").time() if len(text) >= 6 else None
    except ValueError:
        return None


ODD = ["", None, "2020", "2020 101", "\u0662\u0660\u0662\u0660\u0660\u0661\u0660\u0661",
       "20200101 ", " 20200101", "2020-01-01", "202011", "1234 5", "12:3", "\uff11" * 6]


def test_dates_are_read_as_strptime_reads_them():
    values = [f"{year}{month:02d}{day:02d}" for year in ("0000", "0001", "1900", "2024", "9999")
              for month in range(14) for day in range(33)]
    for value in [*values, *ODD]:
        assert _as_date(value) == by_strptime_date(value), value


@pytest.mark.parametrize("suffix", ["", ".123456", "1", "+0100"])
def test_times_are_read_as_strptime_reads_them(suffix):
    for hour in range(26):
        for minute in (0, 5, 59, 60, 61):
            for second in (0, 1, 59, 60, 61, 62):
                for value in (f"{hour:02d}{minute:02d}{second:02d}{suffix}",
                              f"{hour:02d}:{minute:02d}:{second:02d}{suffix}"):
                    assert _as_time(value) == by_strptime_time(value), value
    for value in ODD:
        assert _as_time(value) == by_strptime_time(value), value
