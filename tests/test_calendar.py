"""Tests of the business calendar: durations, real Chinese holidays, policy years, properties."""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import chinese_calendar
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridflow.calendar import (
    BusinessCalendar,
    CalendarYear,
    Duration,
    parse_duration,
)
from gridflow.errors import CalendarRangeError

SH = ZoneInfo("Asia/Shanghai")
CAL = BusinessCalendar()
BUILTIN_RANGE = "2004-01-01..2026-12-31"


def at(y: int, m: int, d: int, hh: int = 0, mm: int = 0) -> datetime:
    return datetime(y, m, d, hh, mm, tzinfo=SH)


def WH(x: float) -> Duration:
    return Duration(x, "working_hours")


def WD(x: float) -> Duration:
    return Duration(x, "working_days")


# A hypothetical 2027 arrangement as a policy would supply it (the real one is not yet
# published). New Year Fri 1 – Sun 3 Jan; Spring Festival Fri 5 – Sat 13 Feb with make-up
# workdays on Sun 31 Jan and Sun 14 Feb.
Y2027 = CalendarYear(
    2027,
    {
        **{date(2027, 1, d): "元旦" for d in (1, 2, 3)},
        **{date(2027, 2, d): "春节" for d in range(5, 14)},
    },
    frozenset({date(2027, 1, 31), date(2027, 2, 14)}),
)
CAL_2027 = BusinessCalendar(years=[Y2027])


# ---------------------------------------------------------------------------
# parse_duration
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "amount", "unit", "canonical"),
    [
        ("4wh", 4, "working_hours", "4wh"),
        ("4 working hours", 4, "working_hours", "4wh"),
        ("1 working hour", 1, "working_hours", "1wh"),
        ("0.5wh", 0.5, "working_hours", "0.5wh"),
        ("  4 WH ", 4, "working_hours", "4wh"),
        ("4 Working  Hours", 4, "working_hours", "4wh"),
        ("20wd", 20, "working_days", "20wd"),
        ("20 working days", 20, "working_days", "20wd"),
        ("1 working day", 1, "working_days", "1wd"),
        ("1.0wd", 1, "working_days", "1wd"),
        ("1.5 WD", 1.5, "working_days", "1.5wd"),
        ("6h", 6, "hours", "6h"),
        ("6 hours", 6, "hours", "6h"),
        ("1 hour", 1, "hours", "1h"),
        ("30m", 30, "minutes", "30m"),
        ("30 minutes", 30, "minutes", "30m"),
        ("30 MIN", 30, "minutes", "30m"),
        ("2d", 2, "days", "2d"),
        ("2 days", 2, "days", "2d"),
        ("1 day", 1, "days", "1d"),
        (".25h", 0.25, "hours", "0.25h"),
    ],
)
def test_parse_duration_valid(text: str, amount: float, unit: str, canonical: str) -> None:
    d = parse_duration(text)
    assert (d.amount, d.unit) == (amount, unit)
    assert str(d) == canonical
    assert parse_duration(str(d)) == d
    assert d.is_working == unit.startswith("working")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "wh",
        "4",
        "abc",
        "4 weeks",
        "4w",
        "4 whs",
        "4wh4",
        "1.5.2h",
        "four hours",
        "0wh",
        "0 working days",
        "-1wh",
        "-2 days",
        "0.0h",
        "4 hours ago",
        "nan h",
        "inf d",
    ],
)
def test_parse_duration_invalid(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    message = str(info.value)
    assert repr(text) in message
    assert "accepted forms" in message
    assert "20wd" in message and "working hours" in message


def test_parse_duration_rejects_non_string() -> None:
    with pytest.raises(TypeError):
        parse_duration(4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("amount", "unit"),
    [(-1, "hours"), (math.nan, "hours"), (math.inf, "days"), (1, "weeks"), (1, "wh")],
)
def test_duration_invalid(amount: float, unit: str) -> None:
    with pytest.raises(ValueError):
        Duration(amount, unit)  # type: ignore[arg-type]


def test_duration_str_and_working() -> None:
    assert str(Duration(4, "working_hours")) == "4wh"
    assert str(Duration(2.5, "days")) == "2.5d"
    assert Duration(20, "working_days").is_working
    assert not Duration(6, "hours").is_working
    assert Duration(4, "hours") == Duration(4.0, "hours")


@given(
    st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False),
    st.sampled_from(["working_hours", "working_days", "hours", "minutes", "days"]),
)
@settings(max_examples=100)
def test_duration_str_round_trip(amount: float, unit: str) -> None:
    d = Duration(amount, unit)  # type: ignore[arg-type]
    assert parse_duration(str(d)) == d


# ---------------------------------------------------------------------------
# Construction and coverage
# ---------------------------------------------------------------------------


def test_defaults() -> None:
    assert CAL.working_day_hours == 7.5
    assert CAL.covered_range() == (date(2004, 1, 1), date(2026, 12, 31))
    assert CAL.last_covered_day == date(2026, 12, 31)
    assert CAL.covers(date(2004, 1, 1)) and CAL.covers(date(2026, 12, 31))
    assert not CAL.covers(date(2003, 12, 31)) and not CAL.covers(date(2027, 1, 1))


@pytest.mark.parametrize(
    "periods",
    [
        (),
        ((time(12, 0), time(8, 30)),),
        ((time(8, 30), time(8, 30)),),
        ((time(8, 30), time(12, 0)), (time(11, 0), time(17, 30))),
        ((time(13, 30), time(17, 30)), (time(8, 30), time(12, 0))),
    ],
)
def test_invalid_working_periods(periods: tuple[tuple[time, time], ...]) -> None:
    with pytest.raises(ValueError, match="period"):
        BusinessCalendar(working_periods=periods)


def test_invalid_timezone() -> None:
    with pytest.raises(ValueError, match="Mars/Olympus"):
        BusinessCalendar(timezone="Mars/Olympus")


def test_custom_single_period() -> None:
    cal = BusinessCalendar(working_periods=[(time(9), time(18))])
    assert cal.working_day_hours == 9
    assert cal.add(at(2026, 3, 2, 9), WD(1)) == at(2026, 3, 2, 18)
    assert cal.add(at(2026, 3, 2, 17), WH(2)) == at(2026, 3, 3, 10)


def test_days_until_uncovered() -> None:
    assert CAL.days_until_uncovered(date(2026, 12, 31)) == 1
    assert CAL.days_until_uncovered(date(2026, 11, 1)) == 61
    assert CAL.days_until_uncovered(date(2027, 1, 1)) == 0
    assert CAL_2027.days_until_uncovered(date(2026, 11, 1)) == 61 + 365


# ---------------------------------------------------------------------------
# Working-time arithmetic on ordinary days (Mon 2 Mar 2026 is a plain Monday)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "duration", "expected"),
    [
        (at(2026, 3, 2, 10), WD(1), at(2026, 3, 3, 10)),  # the brief's example
        (at(2026, 3, 2, 10), WH(1), at(2026, 3, 2, 11)),
        (at(2026, 3, 2, 8, 30), WH(3.5), at(2026, 3, 2, 12)),  # stays at the period end
        (at(2026, 3, 2, 13, 30), WH(4), at(2026, 3, 2, 17, 30)),  # not next morning
        (at(2026, 3, 2, 8, 30), WD(1), at(2026, 3, 2, 17, 30)),
        (at(2026, 3, 2, 11), WH(2), at(2026, 3, 2, 14, 30)),  # lunch is skipped
        (at(2026, 3, 2, 12, 30), WH(1), at(2026, 3, 2, 14, 30)),  # starts at 13:30
        (at(2026, 3, 2, 7), WH(1), at(2026, 3, 2, 9, 30)),  # starts at 08:30
        (at(2026, 3, 2, 18), WH(1), at(2026, 3, 3, 9, 30)),  # starts next morning
        (at(2026, 3, 2, 17, 30), WH(0.5), at(2026, 3, 3, 9)),
        (at(2026, 3, 6, 16), WH(4), at(2026, 3, 9, 11)),  # Friday → Monday
        (at(2026, 3, 7, 10), WH(1), at(2026, 3, 9, 9, 30)),  # Saturday start
        (at(2026, 3, 2, 10), WD(5), at(2026, 3, 9, 10)),  # a working week
        (at(2026, 3, 2, 10), WD(0.5), at(2026, 3, 2, 15, 15)),
        (at(2026, 3, 2, 10), WH(0), at(2026, 3, 2, 10)),
        (at(2026, 3, 2, 10), Duration(6, "hours"), at(2026, 3, 2, 16)),
        (at(2026, 3, 2, 10), Duration(30, "minutes"), at(2026, 3, 2, 10, 30)),
        (at(2026, 3, 6, 10), Duration(2, "days"), at(2026, 3, 8, 10)),
    ],
)
def test_add_plain_days(start: datetime, duration: Duration, expected: datetime) -> None:
    assert CAL.add(start, duration) == expected


def test_add_converts_to_calendar_zone() -> None:
    start = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai
    result = CAL.add(start, WH(1))
    assert result == at(2026, 3, 2, 11)
    assert result.tzinfo == SH and result.utcoffset() == timedelta(hours=8)
    assert CAL.add(start, Duration(1, "hours")).tzinfo == SH


def test_is_working_time() -> None:
    assert CAL.is_working_time(at(2026, 3, 2, 8, 30))
    assert CAL.is_working_time(at(2026, 3, 2, 11, 59))
    assert not CAL.is_working_time(at(2026, 3, 2, 12))  # period end is exclusive
    assert not CAL.is_working_time(at(2026, 3, 2, 8, 29))
    assert not CAL.is_working_time(at(2026, 3, 2, 17, 30))
    assert not CAL.is_working_time(at(2026, 3, 7, 10))  # Saturday
    assert CAL.is_working_time(datetime(2026, 3, 2, 1, 0, tzinfo=UTC))  # 09:00 local


def test_working_hours_between() -> None:
    assert CAL.working_hours_between(at(2026, 3, 2, 10), at(2026, 3, 3, 10)) == 7.5
    assert CAL.working_hours_between(at(2026, 3, 3, 10), at(2026, 3, 2, 10)) == -7.5
    assert CAL.working_hours_between(at(2026, 3, 6, 17), at(2026, 3, 9, 9)) == 1.0
    assert CAL.working_hours_between(at(2026, 3, 2, 12), at(2026, 3, 2, 13, 30)) == 0
    assert CAL.working_hours_between(at(2026, 3, 7), at(2026, 3, 8, 23)) == 0


# ---------------------------------------------------------------------------
# Real Chinese holidays (data from chinese-calendar 1.11)
# ---------------------------------------------------------------------------


def test_spring_festival_2026_data_matches_chinese_calendar() -> None:
    # Checked against chinese_calendar itself: holidays Sun 15 – Mon 23 Feb 2026,
    # make-up workdays Sat 14 Feb and Sat 28 Feb.
    for d in range(15, 24):
        day = date(2026, 2, d)
        assert CAL.is_holiday(day) and not CAL.is_workday(day)
        assert CAL.holiday_name(day) == "春节"
        assert not chinese_calendar.is_workday(day)
    for day in (date(2026, 2, 14), date(2026, 2, 28)):
        assert CAL.is_workday(day) and CAL.is_weekend(day) and not CAL.is_holiday(day)
        assert chinese_calendar.is_workday(day)
    assert CAL.is_workday(date(2026, 2, 24))
    assert CAL.holiday_name(date(2026, 2, 24)) is None
    assert not CAL.is_holiday(date(2026, 3, 7))  # an ordinary Saturday is not a holiday
    assert CAL.is_weekend(date(2026, 3, 7)) and not CAL.is_workday(date(2026, 3, 7))


@pytest.mark.parametrize(
    ("start", "duration", "expected"),
    [
        # Sat 14 Feb is the last (make-up) workday before the break: 1.5 h that day,
        # 2.5 h on Tue 24 Feb.
        (at(2026, 2, 14, 16), WH(4), at(2026, 2, 24, 11)),
        (at(2026, 2, 14, 10), WD(1), at(2026, 2, 24, 10)),
        # Friday 13 Feb spills into the make-up Saturday, not into Monday.
        (at(2026, 2, 13, 16), WH(4), at(2026, 2, 14, 11)),
        # A case reported during the holiday starts counting on Tue 24 Feb.
        (at(2026, 2, 17, 9), WH(1), at(2026, 2, 24, 9, 30)),
        # Fri 27 Feb → make-up Sat 28 Feb.
        (at(2026, 2, 27, 17), WH(1), at(2026, 2, 28, 9)),
        # 20 working days after Mon 9 Feb: 10–14 Feb (5), 24–28 Feb (5), 2–6 Mar (5),
        # 9–13 Mar (5) → Fri 13 Mar at the same time of day.
        (at(2026, 2, 9, 10), WD(20), at(2026, 3, 13, 10)),
    ],
)
def test_deadlines_across_spring_festival_2026(
    start: datetime, duration: Duration, expected: datetime
) -> None:
    assert CAL.add(start, duration) == expected


def test_national_day_2025() -> None:
    for d in range(1, 9):
        day = date(2025, 10, d)
        assert CAL.is_holiday(day) and not CAL.is_workday(day)
    # chinese-calendar labels 6 Oct 2025 (the Mid-autumn day inside the block) 中秋.
    assert CAL.holiday_name(date(2025, 10, 1)) == "国庆节"
    assert CAL.holiday_name(date(2025, 10, 6)) == "中秋"
    sun, sat = date(2025, 9, 28), date(2025, 10, 11)
    assert sun.weekday() == 6 and sat.weekday() == 5
    assert CAL.is_workday(sun) and CAL.is_workday(sat)
    assert CAL.is_weekend(sun) and not CAL.is_holiday(sun)
    # A case on the make-up Sunday counts that Sunday as a workday.
    assert CAL.add(at(2025, 9, 28, 9), WH(4)) == at(2025, 9, 28, 14, 30)
    assert CAL.is_working_time(at(2025, 9, 28, 9))
    # Tue 30 Sep 16:00 + 4 wh: 1.5 h that day, the rest on Thu 9 Oct.
    assert CAL.add(at(2025, 9, 30, 16), WH(4)) == at(2025, 10, 9, 11)
    # Fri 10 Oct → make-up Sat 11 Oct.
    assert CAL.add(at(2025, 10, 10, 16), WD(1)) == at(2025, 10, 11, 16)
    assert CAL.working_hours_between(at(2025, 9, 30, 17, 30), at(2025, 10, 9, 8, 30)) == 0
    # Fri 26 Sep – Mon 13 Oct: 26, 28 (Sun), 29, 30 Sep and 9, 10, 11 (Sat) Oct.
    assert CAL.working_hours_between(at(2025, 9, 26, 8, 30), at(2025, 10, 13, 8, 30)) == 7 * 7.5


# ---------------------------------------------------------------------------
# Coverage limits and policy years
# ---------------------------------------------------------------------------


def test_2027_without_policy_raises_readable_error() -> None:
    with pytest.raises(CalendarRangeError) as info:
        CAL.is_workday(date(2027, 1, 4))
    message = str(info.value)
    assert "2027-01-04" in message and BUILTIN_RANGE in message
    assert "policy" in message
    assert info.value.day == date(2027, 1, 4) and info.value.covered == BUILTIN_RANGE
    for query in (CAL.is_holiday, CAL.holiday_name, CAL.is_weekend):
        with pytest.raises(CalendarRangeError):
            query(date(2027, 1, 4))
    with pytest.raises(CalendarRangeError, match="2027-01-04"):
        CAL.add(at(2027, 1, 4, 10), WH(1))
    with pytest.raises(CalendarRangeError):
        CAL.is_working_time(at(2027, 1, 4, 10))
    with pytest.raises(CalendarRangeError, match="2003-06-02"):
        CAL.is_workday(date(2003, 6, 2))


def test_wall_clock_units_need_no_calendar_data() -> None:
    assert CAL.add(at(2030, 1, 1, 10), Duration(2, "days")) == at(2030, 1, 3, 10)
    assert CAL.add(at(2030, 1, 1, 10), Duration(6, "hours")) == at(2030, 1, 1, 16)


def test_deadline_spilling_into_2027() -> None:
    start = at(2026, 12, 28, 10)  # Monday; 4 workdays remain in 2026
    assert CAL.add(start, WD(3)) == at(2026, 12, 31, 10)
    assert CAL.add(at(2026, 12, 31, 10), WH(6)) == at(2026, 12, 31, 17, 30)  # still 2026
    with pytest.raises(CalendarRangeError, match="2027-01-01"):
        CAL.add(start, WD(5))
    with pytest.raises(CalendarRangeError, match="2027-01-01"):
        CAL.add(at(2026, 12, 31, 16), WH(4))
    # With the policy's 2027: New Year 1–3 Jan off, so the rest lands on Mon 4 Jan.
    assert CAL_2027.add(at(2026, 12, 31, 16), WH(4)) == at(2027, 1, 4, 11)
    assert CAL_2027.add(start, WD(5)) == at(2027, 1, 5, 10)


def test_policy_year_2027() -> None:
    assert CAL_2027.covered_range() == (date(2004, 1, 1), date(2027, 12, 31))
    assert CAL_2027.last_covered_day == date(2027, 12, 31)
    assert not CAL_2027.is_workday(date(2027, 1, 1))
    assert CAL_2027.holiday_name(date(2027, 2, 8)) == "春节"
    assert CAL_2027.is_workday(date(2027, 1, 4))
    assert CAL_2027.is_workday(date(2027, 1, 31)) and CAL_2027.is_weekend(date(2027, 1, 31))
    # Thu 4 Feb 16:00 + 4 wh: break 5–13 Feb, make-up Sun 14 Feb.
    assert CAL_2027.add(at(2027, 2, 4, 16), WH(4)) == at(2027, 2, 14, 11)
    assert CAL_2027.working_hours_between(at(2027, 2, 4, 16), at(2027, 2, 14, 11)) == 4
    with pytest.raises(CalendarRangeError, match=re.escape("2004-01-01..2027-12-31")):
        CAL_2027.is_workday(date(2028, 1, 3))


def test_policy_year_replaces_chinese_calendar_year() -> None:
    cal = BusinessCalendar(years=[CalendarYear(2026, {}, frozenset())])
    assert cal.is_workday(date(2026, 2, 16))  # no Spring Festival any more
    assert not cal.is_workday(date(2026, 2, 14))  # nor its make-up Saturday
    assert cal.holiday_name(date(2026, 2, 16)) is None
    assert cal.is_holiday(date(2025, 10, 1))  # other years untouched


def test_non_contiguous_policy_year() -> None:
    cal = BusinessCalendar(years=[CalendarYear(2028, {date(2028, 1, 3): "元旦"})])
    assert cal.covered_range() == (date(2004, 1, 1), date(2028, 12, 31))
    assert cal.covers(date(2028, 6, 1)) and not cal.covers(date(2027, 6, 1))
    assert not cal.is_workday(date(2028, 1, 3))
    assert cal.is_workday(date(2028, 1, 4))
    assert cal.add(at(2028, 1, 3, 10), WH(1)) == at(2028, 1, 4, 9, 30)
    with pytest.raises(CalendarRangeError) as info:
        cal.is_workday(date(2027, 6, 1))
    assert "2004-01-01..2026-12-31, 2028-01-01..2028-12-31" in str(info.value)
    with pytest.raises(CalendarRangeError, match="2027-01-01"):
        cal.add(at(2026, 12, 31, 10), WD(10))
    with pytest.raises(CalendarRangeError, match="2027-01-01"):
        cal.working_hours_between(at(2026, 12, 31, 10), at(2028, 1, 4, 10))
    assert cal.days_until_uncovered(date(2026, 12, 1)) == 31
    assert cal.days_until_uncovered(date(2027, 3, 1)) == 0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"holidays": {date(2026, 12, 31): "元旦"}}, ValueError),  # wrong year
        ({"holidays": {}, "workdays": frozenset({date(2027, 1, 4)})}, ValueError),  # Monday
        (
            {"holidays": {date(2027, 1, 2): "元旦"}, "workdays": frozenset({date(2027, 1, 2)})},
            ValueError,
        ),
        ({"holidays": {datetime(2027, 1, 1): "元旦"}}, TypeError),
    ],
)
def test_invalid_calendar_year(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error, match="2027"):
        CalendarYear(2027, **kwargs)  # type: ignore[arg-type]


def test_calendar_year_is_immutable_and_hashable() -> None:
    source = {date(2027, 1, 1): "元旦"}
    year = CalendarYear(2027, source)
    source[date(2027, 1, 4)] = "oops"
    assert dict(year.holidays) == {date(2027, 1, 1): "元旦"}
    assert hash(year) == hash(CalendarYear(2027, {date(2027, 1, 1): "元旦"}))
    assert year == CalendarYear(2027, {date(2027, 1, 1): "元旦"})


def test_duplicate_policy_year() -> None:
    with pytest.raises(ValueError, match="2027"):
        BusinessCalendar(years=[Y2027, Y2027])


def test_limit_far_beyond_coverage_raises_quickly() -> None:
    with pytest.raises(CalendarRangeError, match="2027-01-01"):
        CAL.add(at(2026, 1, 5, 10), WD(1e9))
    with pytest.raises(CalendarRangeError):
        CAL.add(at(2026, 1, 5, 10), WH(1e12))


# ---------------------------------------------------------------------------
# Closures
# ---------------------------------------------------------------------------


def test_closure_makes_workday_non_working() -> None:
    cal = BusinessCalendar(closures=[date(2026, 3, 3), date(2026, 2, 14)])
    assert not cal.is_workday(date(2026, 3, 3)) and cal.is_closure(date(2026, 3, 3))
    assert not cal.is_holiday(date(2026, 3, 3))
    assert not cal.is_working_time(at(2026, 3, 3, 10))
    assert cal.add(at(2026, 3, 2, 16), WH(4)) == at(2026, 3, 4, 11)
    assert cal.working_hours_between(at(2026, 3, 2, 17, 30), at(2026, 3, 4, 8, 30)) == 0
    # Closing the make-up Saturday pushes the pre-festival deadline.
    assert cal.add(at(2026, 2, 13, 16), WH(4)) == at(2026, 2, 24, 11)
    assert CAL.is_workday(date(2026, 3, 3))  # other calendars are unaffected


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_naive_datetimes_rejected_with_argument_name() -> None:
    naive = datetime(2026, 3, 2, 10)
    with pytest.raises(ValueError, match="start"):
        CAL.add(naive, WH(1))
    with pytest.raises(ValueError, match="start"):
        CAL.add(naive, Duration(1, "hours"))
    with pytest.raises(ValueError, match="b must be timezone-aware"):
        CAL.working_hours_between(at(2026, 3, 2, 10), naive)
    with pytest.raises(ValueError, match="a must be timezone-aware"):
        CAL.working_hours_between(naive, at(2026, 3, 2, 10))
    with pytest.raises(ValueError, match="dt"):
        CAL.is_working_time(naive)


def test_datetime_passed_as_date_rejected() -> None:
    with pytest.raises(TypeError, match="is_working_time"):
        CAL.is_workday(at(2026, 3, 2, 10))


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

ZONES = st.sampled_from([SH, UTC, timezone(timedelta(hours=-5)), ZoneInfo("Europe/Berlin")])
starts = st.datetimes(
    min_value=datetime(2024, 1, 1), max_value=datetime(2026, 9, 30), timezones=ZONES
)
hours = st.floats(min_value=1e-3, max_value=200, allow_nan=False, allow_infinity=False)


def reference_add(cal: BusinessCalendar, start: datetime, amount: float) -> datetime:
    """Day-by-day oracle in whole microseconds; slow and obviously right."""
    local = start.astimezone(SH).replace(tzinfo=None)
    left = round(amount * 3_600_000_000)
    day = local.date()
    while True:
        if cal.is_workday(day):
            for a, b in cal.working_periods:
                lo = max(datetime.combine(day, a), local)
                hi = datetime.combine(day, b)
                if lo >= hi:
                    continue
                span = (hi - lo) // timedelta(microseconds=1)
                if left <= span:
                    return (lo + timedelta(microseconds=left)).replace(tzinfo=SH)
                left -= span
        day += timedelta(days=1)


@given(starts, hours)
@settings(max_examples=150)
def test_add_matches_reference(start: datetime, amount: float) -> None:
    assert CAL.add(start, WH(amount)) == reference_add(CAL, start, amount)


@given(starts, hours, hours)
@settings(max_examples=150)
def test_add_is_monotone_in_amount(start: datetime, x: float, y: float) -> None:
    lo, hi = sorted((x, y))
    assert CAL.add(start, WH(lo)) <= CAL.add(start, WH(hi))
    assert CAL.add(start, WD(lo / 10)) <= CAL.add(start, WD(hi / 10))


@given(starts, hours)
@settings(max_examples=150)
def test_working_hours_between_inverts_add(start: datetime, amount: float) -> None:
    end = CAL.add(start, WH(amount))
    assert CAL.working_hours_between(start, end) == pytest.approx(amount, abs=1e-6)
    assert CAL.working_hours_between(end, start) == pytest.approx(-amount, abs=1e-6)


@given(starts, hours)
@settings(max_examples=150)
def test_working_result_is_inside_or_at_end_of_a_period(start: datetime, amount: float) -> None:
    for duration in (WH(amount), WD(amount / 7.5)):
        end = CAL.add(start, duration)
        assert end.tzinfo == SH
        assert end > start
        at_period_end = CAL.is_workday(end.date()) and any(
            end.timetz().replace(tzinfo=None) == b for _, b in CAL.working_periods
        )
        assert CAL.is_working_time(end) or at_period_end


@given(starts, hours)
@settings(max_examples=100)
def test_working_days_are_working_hours_times_day_length(start: datetime, days: float) -> None:
    days = days / 10
    assert CAL.add(start, WD(days)) == CAL.add(start, WH(days * 7.5))


sh_starts = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(SH)
)
wall = st.floats(min_value=0, max_value=10_000, allow_nan=False, allow_infinity=False)


@given(sh_starts, wall)
@settings(max_examples=100)
def test_wall_clock_units_are_timedelta_additions(start: datetime, x: float) -> None:
    assert CAL.add(start, Duration(x, "hours")) == start + timedelta(hours=x)
    assert CAL.add(start, Duration(x, "minutes")) == start + timedelta(minutes=x)
    assert CAL.add(start, Duration(x, "days")) == start + timedelta(days=x)


@pytest.mark.parametrize(
    ("start", "duration", "due"),
    [
        # spring forward (02:00 → 03:00): 2 hours elapsed end at 04:00 local, not 03:00
        ("2026-03-29T01:00:00+01:00", Duration(2, "hours"), "2026-03-29T04:00:00+02:00"),
        ("2026-03-29T01:30:00+01:00", Duration(60, "minutes"), "2026-03-29T03:30:00+02:00"),
        # fall back (03:00 → 02:00): 2 hours after 01:30 summer time is 02:30 winter time
        ("2026-10-25T01:30:00+02:00", Duration(2, "hours"), "2026-10-25T02:30:00+01:00"),
        # a day keeps the local time of day (23 or 25 hours elapsed)
        ("2026-03-28T09:00:00+01:00", Duration(1, "days"), "2026-03-29T09:00:00+02:00"),
        ("2026-10-24T09:00:00+02:00", Duration(1, "days"), "2026-10-25T09:00:00+01:00"),
    ],
)
def test_wall_clock_units_across_a_daylight_saving_change(
    start: str, duration: Duration, due: str
) -> None:
    """A policy's zone may have daylight saving (Asia/Shanghai has none): hours and
    minutes are elapsed time, days the same local time."""
    berlin = BusinessCalendar(timezone="Europe/Berlin")
    got = berlin.add(datetime.fromisoformat(start), duration)
    assert got.isoformat() == due


@given(st.datetimes(min_value=datetime(2004, 1, 2), max_value=datetime(2026, 12, 30)), hours)
@settings(max_examples=50)
def test_naive_datetime_rejected(naive: datetime, amount: float) -> None:
    for duration in (WH(amount), WD(amount), Duration(amount, "hours")):
        with pytest.raises(ValueError, match="timezone-aware"):
            CAL.add(naive, duration)
    with pytest.raises(ValueError, match="timezone-aware"):
        CAL.working_hours_between(naive, naive)
    with pytest.raises(ValueError, match="timezone-aware"):
        CAL.is_working_time(naive)
