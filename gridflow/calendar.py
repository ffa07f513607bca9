"""The business calendar: working time, Chinese public holidays and make-up workdays (调休).

This is the only module that imports ``chinese_calendar``. It never reads the wall
clock: every computation is a function of the datetimes passed in, so replay on a
simulated clock gives the same deadlines as live operation.

chinese-calendar ships data for 2004–2026 only; a policy supplies later (or earlier)
years as :class:`CalendarYear`. A day that neither covers raises
:class:`~gridflow.errors.CalendarRangeError` instead of being counted as a plain
weekday, because a silently wrong deadline is worse than a loud one.
"""

from __future__ import annotations

import functools
import math
import re
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from types import MappingProxyType
from typing import Final, Literal, cast, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import chinese_calendar

from gridflow.errors import CalendarRangeError

__all__ = [
    "DEFAULT_WORKING_PERIODS",
    "BusinessCalendar",
    "CalendarYear",
    "Duration",
    "DurationUnit",
    "parse_duration",
]

DurationUnit = Literal["working_hours", "working_days", "hours", "minutes", "days"]
_UNITS: Final[tuple[str, ...]] = get_args(DurationUnit)

DEFAULT_WORKING_PERIODS: Final[tuple[tuple[time, time], ...]] = (
    (time(8, 30), time(12, 0)),
    (time(13, 30), time(17, 30)),
)

_US_PER_HOUR: Final = 3_600_000_000

# ---------------------------------------------------------------------------
# Durations
# ---------------------------------------------------------------------------

_COMPACT: Final[dict[str, str]] = {
    "working_hours": "wh",
    "working_days": "wd",
    "hours": "h",
    "minutes": "m",
    "days": "d",
}

# Longest alternatives first so that "wh" is not read as "w" + "h" and so on.
_UNIT_WORDS: Final[tuple[tuple[str, str], ...]] = (
    (r"working[\s_-]*hours?|wh", "working_hours"),
    (r"working[\s_-]*days?|wd", "working_days"),
    (r"hours?|hrs?|h", "hours"),
    (r"minutes?|mins?|m", "minutes"),
    (r"days?|d", "days"),
)
_NUMBER: Final = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?"
_DURATION_RE: Final = re.compile(
    rf"^\s*(?P<num>{_NUMBER})\s*(?P<unit>{'|'.join(f'(?:{w})' for w, _ in _UNIT_WORDS)})\s*$",
    re.IGNORECASE,
)
_UNIT_RES: Final = tuple((re.compile(rf"^(?:{w})$", re.IGNORECASE), u) for w, u in _UNIT_WORDS)
_ACCEPTED: Final = (
    "4wh / 4 working hours, 20wd / 20 working days, 6h / 6 hours, "
    "30m / 30 minutes, 2d / 2 days (calendar days)"
)


@dataclass(frozen=True, slots=True)
class Duration:
    """A time limit; working units need the calendar, wall-clock units do not."""

    amount: float
    unit: DurationUnit

    def __post_init__(self) -> None:
        if isinstance(self.amount, bool) or not isinstance(self.amount, int | float):
            raise TypeError(f"duration amount must be a number, not {self.amount!r}")
        if not math.isfinite(self.amount) or self.amount < 0:
            raise ValueError(f"duration amount must be finite and >= 0, not {self.amount!r}")
        if self.unit not in _UNITS:
            raise ValueError(f"unknown duration unit {self.unit!r}; expected one of {_UNITS}")
        object.__setattr__(self, "amount", float(self.amount))

    @property
    def is_working(self) -> bool:
        return self.unit in ("working_hours", "working_days")

    def __str__(self) -> str:
        amount = self.amount
        number = str(int(amount)) if amount.is_integer() else repr(amount)
        return f"{number}{_COMPACT[self.unit]}"


def parse_duration(text: str) -> Duration:
    """Read a time limit as written in policy files (``4wh``, ``20 working days``, ...).
    Answers are remembered: engines and replays read the same few limits all the time."""
    if not isinstance(text, str):
        raise TypeError(f"duration must be a string like '4wh', not {type(text).__name__}")
    return _parse_duration(str(text))


@functools.lru_cache(maxsize=4096)
def _parse_duration(text: str) -> Duration:
    match = _DURATION_RE.match(text)
    if match is None:
        raise ValueError(f"invalid duration {text!r}; accepted forms: {_ACCEPTED}")
    amount = float(match["num"])
    if not math.isfinite(amount) or amount <= 0:
        raise ValueError(
            f"invalid duration {text!r}: the amount must be positive; accepted forms: {_ACCEPTED}"
        )
    unit = next(u for rx, u in _UNIT_RES if rx.match(match["unit"]))
    return Duration(amount, cast(DurationUnit, unit))


# ---------------------------------------------------------------------------
# Holiday data
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CalendarYear:
    """One year of holiday data supplied by a policy; replaces chinese-calendar's year."""

    year: int
    holidays: Mapping[date, str]
    workdays: frozenset[date] = frozenset()

    def __post_init__(self) -> None:
        holidays = MappingProxyType(dict(self.holidays))
        workdays = frozenset(self.workdays)
        for day in (*holidays, *workdays):
            if type(day) is not date:
                raise TypeError(f"calendar year {self.year}: {day!r} is not a date")
            if day.year != self.year:
                raise ValueError(f"calendar year {self.year}: {day} belongs to year {day.year}")
        for day in workdays:
            if day.weekday() < 5:
                raise ValueError(
                    f"calendar year {self.year}: make-up workday {day} is a weekday "
                    "(make-up workdays 调休 fall on a Saturday or Sunday)"
                )
            if day in holidays:
                raise ValueError(
                    f"calendar year {self.year}: {day} is both a holiday and a make-up workday"
                )
        object.__setattr__(self, "holidays", holidays)
        object.__setattr__(self, "workdays", workdays)

    def __hash__(self) -> int:  # the generated one would fail on the mapping
        return hash((self.year, frozenset(self.holidays.items()), self.workdays))


def _chinese_name(english: str) -> str:
    """chinese-calendar stores English names; the product speaks Chinese (春节, 国庆节)."""
    try:
        return str(chinese_calendar.Holiday(english).chinese)
    except ValueError:
        return english


def _chinese_calendar_years() -> dict[int, CalendarYear]:
    """chinese-calendar's data regrouped by the year of each date (e.g. 2018-12-30 → 2018)."""
    holidays: dict[date, str] = dict(chinese_calendar.holidays)
    workdays: dict[date, str] = dict(chinese_calendar.workdays)
    first = min(holidays).year
    last = max(holidays).year  # the library validates by year, so the whole year counts
    return {
        year: CalendarYear(
            year,
            {d: _chinese_name(n) for d, n in holidays.items() if d.year == year},
            frozenset(d for d in workdays if d.year == year),
        )
        for year in range(first, last + 1)
    }


_BUILTIN_YEARS: Final[dict[int, CalendarYear]] = _chinese_calendar_years()


def _format_ranges(ranges: Sequence[tuple[date, date]]) -> str:
    return ", ".join(f"{a.isoformat()}..{b.isoformat()}" for a, b in ranges)


@dataclass(frozen=True, slots=True)
class _Segment:
    """A contiguous run of covered days with its workdays indexed for O(log n) arithmetic."""

    first: int  # ordinal of the first covered day
    last: int  # ordinal of the last covered day
    workdays: tuple[int, ...]  # ordinals of the workdays, ascending


# ---------------------------------------------------------------------------
# The calendar
# ---------------------------------------------------------------------------


class BusinessCalendar:
    """Working time on Chinese statutory workdays, plus a policy's years and closures.

    Working time is counted on the local wall clock of ``timezone``. Each contiguous
    run of covered years is indexed once (lazily) as a sorted array of workdays, so a
    deadline is computed with a binary search instead of walking day by day: cost does
    not grow with the length of the limit, and no loop can run past the data.
    """

    __slots__ = (
        "_closures",
        "_covered",
        "_covered_ranges",
        "_day_us",
        "_holidays",
        "_makeup",
        "_periods",
        "_periods_us",
        "_ranges_ord",
        "_segments",
        "_tz",
    )

    def __init__(
        self,
        *,
        timezone: str = "Asia/Shanghai",
        working_periods: Sequence[tuple[time, time]] = DEFAULT_WORKING_PERIODS,
        years: Iterable[CalendarYear] = (),
        closures: Iterable[date] = (),
    ) -> None:
        try:
            self._tz = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
            raise ValueError(f"unknown time zone {timezone!r}") from exc

        self._periods = _validate_periods(working_periods)
        self._periods_us: tuple[tuple[int, int], ...] = tuple(
            (_time_us(a), _time_us(b)) for a, b in self._periods
        )
        self._day_us = sum(b - a for a, b in self._periods_us)

        merged = dict(_BUILTIN_YEARS)
        seen: set[int] = set()
        for cy in years:
            if not isinstance(cy, CalendarYear):
                raise TypeError(f"years must hold CalendarYear objects, not {cy!r}")
            if cy.year in seen:
                raise ValueError(f"calendar year {cy.year} is given twice")
            seen.add(cy.year)
            merged[cy.year] = cy
        self._holidays: dict[date, str] = {}
        makeup: set[date] = set()
        for cy in merged.values():
            self._holidays.update(cy.holidays)
            makeup.update(cy.workdays)
        self._makeup = frozenset(makeup)
        closure_set = frozenset(closures)
        for day in closure_set:
            if type(day) is not date:
                raise TypeError(f"closures must be dates, not {day!r}")
        self._closures = closure_set

        self._covered = frozenset(merged)
        ranges: list[tuple[int, int]] = []
        for year in sorted(merged):
            if ranges and ranges[-1][1] == year - 1:
                ranges[-1] = (ranges[-1][0], year)
            else:
                ranges.append((year, year))
        self._covered_ranges: tuple[tuple[date, date], ...] = tuple(
            (date(a, 1, 1), date(b, 12, 31)) for a, b in ranges
        )
        self._ranges_ord = tuple((a.toordinal(), b.toordinal()) for a, b in self._covered_ranges)
        self._segments: list[_Segment | None] = [None] * len(self._covered_ranges)

    # -- coverage ---------------------------------------------------------------

    @property
    def timezone(self) -> ZoneInfo:
        return self._tz

    @property
    def working_periods(self) -> tuple[tuple[time, time], ...]:
        return self._periods

    @property
    def working_day_hours(self) -> float:
        """Length of one working day; one working day is this many working hours."""
        return self._day_us / _US_PER_HOUR

    @property
    def covered_description(self) -> str:
        """The covered ranges as quoted in :class:`CalendarRangeError` messages."""
        return _format_ranges(self._covered_ranges)

    def covered_range(self) -> tuple[date, date]:
        """First and last covered day; there may be gaps between them (see :meth:`covers`)."""
        return self._covered_ranges[0][0], self._covered_ranges[-1][1]

    def covers(self, d: date) -> bool:
        return d.year in self._covered

    @property
    def last_covered_day(self) -> date:
        return self._covered_ranges[-1][1]

    def days_until_uncovered(self, today: date) -> int:
        """Days from ``today`` to the first day without data (0 if today has none).

        ``check`` warns when this is under 60: deadlines are weeks long, so the data
        must run out well after today, not merely after it.
        """
        day = _as_date(today, "today")
        for first, last in self._covered_ranges:
            if first <= day <= last:
                return (last - day).days + 1
        return 0

    def range_error(self, day: date) -> CalendarRangeError:
        """The error for a day outside the holiday data (naming what is covered)."""
        return CalendarRangeError(day, covered=self.covered_description)

    def _check(self, d: date, name: str = "day") -> date:
        day = _as_date(d, name)
        if day.year not in self._covered:
            raise self.range_error(day)
        return day

    # -- day-level facts --------------------------------------------------------

    def is_workday(self, d: date) -> bool:
        """Statutory workday (weekday not on holiday, or make-up day) not closed locally."""
        day = self._check(d)
        if day in self._closures:
            return False
        return day in self._makeup or (day.weekday() < 5 and day not in self._holidays)

    def is_holiday(self, d: date) -> bool:
        """A public holiday, including the weekend days inside a holiday block."""
        return self._check(d) in self._holidays

    def holiday_name(self, d: date) -> str | None:
        return self._holidays.get(self._check(d))

    def is_weekend(self, d: date) -> bool:
        """Saturday or Sunday by the weekday, even when it is a make-up workday."""
        return self._check(d).weekday() >= 5

    def is_closure(self, d: date) -> bool:
        return self._check(d) in self._closures

    def is_working_time(self, dt: datetime) -> bool:
        local = self._local(dt, "dt")
        if not self.is_workday(local.date()):
            return False
        t = _tod_us(local)
        return any(a <= t < b for a, b in self._periods_us)

    # -- arithmetic -------------------------------------------------------------

    def add(self, start: datetime, duration: Duration) -> datetime:
        """The deadline ``duration`` after ``start``, in the calendar's zone.

        A working addition that ends exactly at the end of a period stays there
        (Friday 17:30, not Monday 08:30): that is when the time actually ran out.
        """
        if not isinstance(duration, Duration):
            raise TypeError(f"duration must be a Duration, not {duration!r}")
        unit = duration.unit
        if unit == "working_hours":
            amount_us = round(duration.amount * _US_PER_HOUR)
        elif unit == "working_days":
            amount_us = round(duration.amount * self._day_us)
        else:
            return self._add_wall_clock(start, duration)
        local = self._local(start, "start")
        if amount_us == 0:
            return local
        segment, position = self._position(local)
        target = position + amount_us
        day_us = self._day_us
        index = (target - 1) // day_us
        rest = target - index * day_us  # in (0, day_us]: ends at a period end, never after
        workdays = segment.workdays
        if index >= len(workdays):
            raise self.range_error(date.fromordinal(segment.last + 1))
        for a, b in self._periods_us:
            if rest <= b - a:
                tod = a + rest
                break
            rest -= b - a
        else:  # pragma: no cover - rest <= day_us guarantees a period
            raise AssertionError("working time beyond the working day")
        result = datetime.fromordinal(workdays[index]) + timedelta(microseconds=tod)
        return result.replace(tzinfo=self._tz)

    def working_hours_between(self, a: datetime, b: datetime) -> float:
        """Working hours in ``[a, b)``; negative when ``b`` is before ``a``."""
        la = self._local(a, "a")
        lb = self._local(b, "b")
        if lb < la:
            return -self._between(lb, la)
        return self._between(la, lb)

    def _between(self, a: datetime, b: datetime) -> float:
        seg_a, pos_a = self._position(a)
        seg_b, pos_b = self._position(b)
        if seg_a is not seg_b:
            raise self.range_error(date.fromordinal(seg_a.last + 1))
        return (pos_b - pos_a) / _US_PER_HOUR

    def _add_wall_clock(self, start: datetime, duration: Duration) -> datetime:
        """Hours and minutes are elapsed time; days keep the local time of day."""
        local = self._local(start, "start")
        if duration.unit == "days":
            naive = local.replace(tzinfo=None) + timedelta(days=duration.amount)
            return naive.replace(tzinfo=self._tz)
        if duration.unit == "hours":
            delta = timedelta(hours=duration.amount)
        else:
            delta = timedelta(minutes=duration.amount)
        return (local.astimezone(UTC) + delta).astimezone(self._tz)

    def _local(self, dt: datetime, name: str) -> datetime:
        if not isinstance(dt, datetime):
            raise TypeError(f"{name} must be a datetime, not {type(dt).__name__}")
        if dt.tzinfo is None or dt.utcoffset() is None:
            raise ValueError(f"{name} must be timezone-aware, got naive {dt.isoformat()}")
        return dt.astimezone(self._tz)

    def _position(self, local: datetime) -> tuple[_Segment, int]:
        """Working microseconds from the start of the segment up to ``local``."""
        ordinal = local.toordinal()
        segment = self._segment(ordinal)
        workdays = segment.workdays
        rank = bisect_left(workdays, ordinal)
        position = rank * self._day_us
        if rank < len(workdays) and workdays[rank] == ordinal:
            t = _tod_us(local)
            for a, b in self._periods_us:
                if t <= a:
                    break
                position += (t if t < b else b) - a
        return segment, position

    def _segment(self, ordinal: int) -> _Segment:
        for i, (first, last) in enumerate(self._ranges_ord):
            if first <= ordinal <= last:
                segment = self._segments[i]
                if segment is None:
                    segment = self._segments[i] = self._build_segment(first, last)
                return segment
        raise self.range_error(date.fromordinal(ordinal))

    def _build_segment(self, start: int, stop: int) -> _Segment:
        holidays = {d.toordinal() for d in self._holidays}
        makeup = {d.toordinal() for d in self._makeup}
        closed = {d.toordinal() for d in self._closures}
        workdays = tuple(
            o
            for o in range(start, stop + 1)
            if o not in closed and (o in makeup or ((o - 1) % 7 < 5 and o not in holidays))
        )
        return _Segment(start, stop, workdays)

    def __repr__(self) -> str:
        return (
            f"BusinessCalendar(timezone={self._tz.key!r}, "
            f"working_day_hours={self.working_day_hours:g}, covered={self.covered_description!r})"
        )


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _validate_periods(periods: Sequence[tuple[time, time]]) -> tuple[tuple[time, time], ...]:
    result = tuple((a, b) for a, b in periods)
    if not result:
        raise ValueError("working_periods must hold at least one (start, end) period")
    previous_end: time | None = None
    for a, b in result:
        if not isinstance(a, time) or not isinstance(b, time):
            raise TypeError(f"working period ({a!r}, {b!r}) must be a pair of datetime.time")
        if a.tzinfo is not None or b.tzinfo is not None:
            raise ValueError(f"working period {a}–{b} must use naive local times")
        if not a < b:
            raise ValueError(f"working period {a}–{b} must start before it ends")
        if previous_end is not None and a < previous_end:
            raise ValueError(
                f"working period {a}–{b} overlaps or precedes the previous period "
                f"(ending {previous_end}); periods must be ordered and non-overlapping"
            )
        previous_end = b
    return result


def _time_us(t: time) -> int:
    return ((t.hour * 60 + t.minute) * 60 + t.second) * 1_000_000 + t.microsecond


def _tod_us(dt: datetime) -> int:
    return ((dt.hour * 60 + dt.minute) * 60 + dt.second) * 1_000_000 + dt.microsecond


def _as_date(d: date, name: str) -> date:
    if isinstance(d, datetime) or not isinstance(d, date):
        raise TypeError(
            f"{name} must be a datetime.date, not {type(d).__name__} "
            "(use is_working_time for a datetime)"
        )
    return d
