"""Synthetic case logs for a policy: a seeded, realistic year of grid work (BRIEF §10).

``generate(policy, cases=N, seed=S)`` yields log rows (dicts, in ``reported_at`` order)
that :mod:`gridflow.importer` reads without a mapping file; :func:`write_log` writes them
as CSV or JSONL. Everything comes from ``random.Random(seed)`` and the policy: the same
arguments give the same bytes.

What a row holds and how it is drawn (defaults in :class:`Settings`, calibrated to the
seed articles where they give figures — e.g. Qishuyan: 22,107 reported, completion
99.85%; Dongli: 98.4%; weekly top-5 worker rankings):

* arrivals spread over ``days`` by weekday (quieter weekends and public holidays) and by
  hour of day (patrol hours peak in the morning and early afternoon);
* a category mix by top-level group (events, components, services, hazards, disputes,
  people), locations uniform over the lowest units (grids), channels (patrol first);
* an address in the grid (its name and a house number, a few numbers far more often
  than the rest), so history conditions ("the third report at the same address within
  30 days") meet repeats at the rate a real district sees them;
* description text from the category name and, for some cases, a keyword the policy's
  rules test, so routing exercises the text rules;
* on-the-spot resolution for a share of patrol cases; cancellations; returns, rework,
  extensions, deferrals; cases left open (stuck) — and every step time drawn relative to
  the case's time limit under the policy (the share of the limit used is log-normal, so
  a few percent run late);
* the department that handled the case (mostly the policy's lead department) and the
  resident's satisfaction for most closed cases.

Steps after the end of the period are not in the log (it was extracted then): those cases
are open in it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from gridflow.calendar import BusinessCalendar, Duration, parse_duration
from gridflow.conditions import CATEGORY, DESCRIPTION, tests_of
from gridflow.errors import CalendarRangeError, GridflowError
from gridflow.importer import CASE_FIELDS, OUTCOME_FIELDS, STEP_FIELDS
from gridflow.policy import Policy
from gridflow.schema import CaseIn

__all__ = ["Settings", "columns", "generate", "write_log"]

_MINUTE = timedelta(minutes=1)


@dataclass(frozen=True)
class Settings:
    """Distributions of the generator (shares are probabilities per case)."""

    days: int = 365
    #: relative arrivals per hour of day 0..23 (local time)
    hour_weights: tuple[float, ...] = (
        0.2, 0.1, 0.1, 0.1, 0.1, 0.2, 0.6, 1.5, 3.0, 4.2, 4.4, 3.6,
        2.2, 2.6, 3.8, 4.0, 3.6, 2.6, 1.6, 1.2, 1.0, 0.8, 0.5, 0.3,
    )  # fmt: skip
    #: relative arrivals Monday..Sunday
    weekday_weights: tuple[float, ...] = (1.15, 1.1, 1.05, 1.05, 1.0, 0.55, 0.5)
    holiday_factor: float = 0.45
    #: top-level category group → weight (groups not listed weigh 1)
    category_weights: Mapping[str, float] = field(default_factory=lambda: {
        "E": 4.5, "C": 2.0, "S": 1.2, "H": 1.0, "D": 0.8, "P": 0.5,
    })
    channel_weights: Mapping[str, float] = field(default_factory=lambda: {
        "patrol": 62, "hotline": 16, "app": 8, "wechat": 8, "visit": 3, "video": 2, "media": 1,
    })
    on_spot_share: float = 0.35  # of patrol cases: solved at once by the grid worker
    cancel_share: float = 0.008
    defer_share: float = 0.002
    stuck_share: float = 0.0015  # accepted, never closed (keeps completion near 99.85%)
    return_share: float = 0.03
    rework_share: float = 0.02
    extension_share: float = 0.02
    urgent_share: float = 0.03
    keyword_share: float = 0.35  # descriptions that carry a keyword the rules test
    attribute_share: float = 0.06  # each declared attribute is set on this share of cases
    agree_share: float = 0.93  # the log's department is the policy's lead department
    evaluated_share: float = 0.96  # closed cases with a resident callback
    satisfaction: Mapping[str, float] = field(default_factory=lambda: {
        "satisfied": 0.90, "basically_satisfied": 0.08, "dissatisfied": 0.02,
    })
    #: share of the time limit used until closure: log-normal (median, sigma)
    handling_median: float = 0.38
    handling_sigma: float = 0.5
    #: house numbers (门牌) per grid; a case's address is one of them with weight
    #: 1/k^address_skew, so a few places (a market gate, an old estate) draw repeated
    #: reports, as history conditions expect ("≥3 at the same address within 30 days")
    addresses_per_grid: int = 400
    address_skew: float = 1.0


_PHRASES = ("群众反映", "网格员巡查发现", "居民来电", "社区反映", "巡查时发现", "热线转办")
_TAILS = ("，请尽快处理", "，影响通行", "，居民意见较大", "，已拍照上传", "", "，多次反映")


def columns(policy: Policy) -> list[str]:
    """The columns of a generated log (CSV header order)."""
    attrs = [f"attributes.{a}" for a in sorted(policy.registry.attributes)]
    return [*CASE_FIELDS, *attrs, *STEP_FIELDS, *OUTCOME_FIELDS]


class _Model:
    """The policy-derived pieces of the generator."""

    def __init__(self, policy: Policy, s: Settings, rng: random.Random):
        reg = policy.registry
        self.policy = policy
        codes = list(reg.categories)
        parents = {info.parent for info in reg.categories.values() if info.parent}
        leaves = [c for c in codes if c not in parents]
        groups: dict[str, list[str]] = {}
        for c in leaves:
            groups.setdefault(reg.categories[c].group, []).append(c)
        self.categories: list[str] = []
        weights: list[float] = []
        for g, members in groups.items():
            w = s.category_weights.get(g, 1.0) / len(members)
            for c in members:
                self.categories.append(c)
                weights.append(w)
        self.category_cum = _cumulative(weights)
        lowest = reg.levels[-1]
        self.locations = list(reg.units_at(lowest)) or list(reg.units)
        chans = [c for c in reg.channels if s.channel_weights.get(c, 0) > 0] or list(reg.channels)
        self.channels = chans
        self.channel_cum = _cumulative([s.channel_weights.get(c, 1.0) for c in chans])
        self.departments = sorted(reg.departments)
        self.keywords = self._keywords(policy)
        self.attributes = sorted(reg.attributes.items())
        self.attribute_values = reg.attribute_values
        self.satisfaction = list(s.satisfaction)
        self.satisfaction_cum = _cumulative(list(s.satisfaction.values()))
        self.numbers = list(range(1, max(s.addresses_per_grid, 1) + 1))
        self.number_cum = _cumulative([k ** -s.address_skew for k in self.numbers])

    @staticmethod
    def _keywords(policy: Policy) -> dict[str | None, list[str]]:
        """Literal words the rules look for in descriptions, by the category they name
        (``None``: rules that test no category)."""
        out: dict[str | None, list[str]] = {}
        codes = list(policy.registry.categories)
        for table in policy.router.rules:
            for rule in table:
                tests = tests_of(rule.cond)
                words = [str(v) for t in tests if t.field == DESCRIPTION and t.op == "contains"
                         for v in (t.value if isinstance(t.value, list | tuple) else [t.value])]
                if not words:
                    continue
                cats: set[str] = set()
                for t in tests:
                    if t.field != CATEGORY:
                        continue
                    if t.op == "eq":
                        cats.add(str(t.value))
                    elif t.op == "in":
                        cats.update(str(v) for v in t.value)
                    elif t.op == "prefix":
                        cats.update(c for c in codes if c.startswith(str(t.value)))
                targets: list[str | None] = list(cats) if cats else [None]
                for c in targets:
                    bucket = out.setdefault(c, [])
                    bucket.extend(w for w in words if w not in bucket)
        return out


def _cumulative(weights: Sequence[float]) -> list[float]:
    out, total = [], 0.0
    for w in weights:
        total += max(w, 0.0)
        out.append(total)
    return out


def _pick(rng: random.Random, items: Sequence[Any], cum: Sequence[float]) -> Any:
    return rng.choices(items, cum_weights=cum, k=1)[0]


def _day_counts(policy: Policy, s: Settings, n: int, start: date) -> list[int]:
    """Cases per day: ``n`` split by weekday and holiday weights (largest remainder)."""
    cal = policy.calendar
    weights = []
    for i in range(s.days):
        day = start + timedelta(days=i)
        w = s.weekday_weights[day.weekday()]
        if cal.covers(day) and cal.is_holiday(day):
            w *= s.holiday_factor
        weights.append(w)
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [int(x) for x in exact]
    rest = n - sum(counts)
    order = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[:rest]:
        counts[i] += 1
    return counts


def generate(
    policy: Policy,
    cases: int,
    *,
    seed: int = 0,
    start: date | None = None,
    settings: Settings | None = None,
    id_prefix: str = "G",
    route: Callable[[CaseIn], Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield ``cases`` log rows for ``policy`` in ``reported_at`` order (see the module
    docstring). ``start``: the first day (default 2026-01-01), local time. ``route``
    decides each case's lead department and time limit (default :meth:`Policy.route`;
    ``gridflow.replay.RouteMemo(policy).route`` gives the same answers much faster)."""
    if cases < 0:
        raise ValueError("cases must be ≥ 0")
    s = settings or Settings()
    if s.days < 1:
        raise ValueError("days must be ≥ 1")
    rng = random.Random(seed)
    # addresses come from a stream of their own: the other draws (and so every figure
    # calibrated on them) do not depend on the address model
    addresses = random.Random(f"{seed}:address")
    model = _Model(policy, s, rng)
    router: Callable[[CaseIn], Any] = route or policy.route
    tz = policy.calendar.timezone
    first = start or date(2026, 1, 1)
    horizon = datetime(first.year, first.month, first.day, tzinfo=tz) + timedelta(days=s.days)
    hour_cum = _cumulative(s.hour_weights)
    hours = list(range(24))
    number = 0
    width = max(7, len(str(cases)))
    for offset, count in enumerate(_day_counts(policy, s, cases, first)):
        day = first + timedelta(days=offset)
        stamps = sorted(
            datetime(day.year, day.month, day.day, _pick(rng, hours, hour_cum),
                     rng.randrange(60), rng.randrange(60), tzinfo=tz)
            for _ in range(count)
        )
        for reported in stamps:
            number += 1
            yield _row(policy, model, router, s, rng, f"{id_prefix}{number:0{width}d}",
                       reported, horizon, addresses)


def _description(model: _Model, rng: random.Random, category: str, name: str,
                 s: Settings) -> str:
    text = f"{rng.choice(_PHRASES)}{name}"
    if rng.random() < s.keyword_share:
        words = model.keywords.get(category) or model.keywords.get(None)
        if words:
            text += f"，{rng.choice(words)}"
    return text + rng.choice(_TAILS)


def _attributes(model: _Model, rng: random.Random, s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kind in model.attributes:
        if rng.random() >= s.attribute_share:
            continue
        allowed = model.attribute_values.get(name)
        if allowed:
            out[name] = rng.choice(list(allowed))
        elif kind == "boolean":
            out[name] = True
        elif kind == "integer":
            out[name] = 1 + min(int(rng.expovariate(0.6)), 20)
        elif kind == "number":
            out[name] = round(rng.uniform(1, 200), 1)
        else:
            out[name] = "x"
    return out


def _limit_span(cal: BusinessCalendar, start: datetime, limit: Duration, share: float) -> datetime:
    """``start`` plus ``share`` of ``limit`` on the calendar."""
    return cal.add(start, Duration(max(limit.amount * share, 0.01), limit.unit))


def _row(
    policy: Policy, model: _Model, route: Callable[[CaseIn], Any], s: Settings,
    rng: random.Random,
    case_id: str, reported: datetime, horizon: datetime, addresses: random.Random,
) -> dict[str, Any]:
    reg = policy.registry
    cal = policy.calendar
    category = _pick(rng, model.categories, model.category_cum)
    location = rng.choice(model.locations)
    channel = _pick(rng, model.channels, model.channel_cum)
    number = _pick(addresses, model.numbers, model.number_cum)
    case: dict[str, Any] = {
        "id": case_id,
        "category": category,
        "location": location,
        "address": f"{reg.units[location].name}{number}号",
        "description": _description(model, rng, category, reg.categories[category].name, s),
        "channel": channel,
        "reported_at": reported,
    }
    if rng.random() < s.urgent_share:
        case["urgency"] = "urgent"
    attrs = _attributes(model, rng, s)
    if attrs:
        case["attributes"] = attrs
    row: dict[str, Any] = dict(case)
    try:
        routed = route(CaseIn.model_validate(case))
        lead, limit_text = routed.lead, routed.time_limit
    except GridflowError:
        lead, limit_text = None, None
    limit = parse_duration(limit_text) if limit_text else parse_duration("1wd")
    department = lead
    if lead is not None and rng.random() >= s.agree_share and len(model.departments) > 1:
        department = rng.choice([d for d in model.departments if d != lead])
    row["department"] = department
    draw = rng.random()
    times: dict[str, datetime] = {}
    status = "closed"
    try:
        if channel == "patrol" and draw < s.on_spot_share:
            row["on_spot"] = True
            times["verified_at"] = reported + _MINUTE * rng.randint(3, 40)
            times["closed_at"] = times["verified_at"] + _MINUTE * rng.randint(0, 15)
        else:
            times["filed_at"] = reported + _MINUTE * rng.randint(2, 30)
            if rng.random() < s.cancel_share:
                status = "cancelled"
            else:
                status = _handling(cal, s, rng, row, times, limit)
    except CalendarRangeError:
        status = "open"  # a deadline beyond the calendar's data: leave it open
    if status == "closed" and rng.random() < s.evaluated_share:
        times["evaluated_at"] = times["closed_at"] + timedelta(
            minutes=rng.randint(60, 48 * 60))
        row["satisfaction"] = _pick(rng, model.satisfaction, model.satisfaction_cum)
    # the log was extracted at the horizon: later steps are not in it
    for name in STEP_FIELDS:
        when = times.get(name)
        if when is not None and when <= horizon:
            row[name] = when
    if status == "closed" and "closed_at" not in row:
        status = "open"
    if "evaluated_at" not in row:
        row.pop("satisfaction", None)
    row["status"] = status
    return row


def _handling(
    cal: BusinessCalendar, s: Settings, rng: random.Random, row: dict[str, Any],
    times: dict[str, datetime], limit: Duration,
) -> str:
    dispatched = times["filed_at"] + _MINUTE * rng.randint(5, 60)
    returns = 0
    if rng.random() < s.return_share:
        returns = 2 if rng.random() < 0.15 else 1
        dispatched += _MINUTE * rng.randint(30, 120) * returns
        row["returns"] = returns
    times["dispatched_at"] = dispatched
    times["accepted_at"] = dispatched + _MINUTE * rng.randint(5, 120)
    if rng.random() < s.stuck_share:
        return "open"
    if rng.random() < s.defer_share:
        times["handled_at"] = times["accepted_at"] + _MINUTE * rng.randint(60, 600)
        return "deferred"
    share = s.handling_median * math.exp(rng.gauss(0.0, s.handling_sigma))
    if rng.random() < s.extension_share:
        row["extension"] = str(Duration(max(1.0, round(limit.amount / 2)), limit.unit))
        share *= 1.5
    rework = 0
    if rng.random() < s.rework_share:
        rework = 2 if rng.random() < 0.1 else 1
        row["rework"] = rework
        share *= 1.0 + 0.2 * rework
    closed = _limit_span(cal, dispatched, limit, share)
    floor = times["accepted_at"] + 4 * _MINUTE
    closed = max(closed, floor + 4 * _MINUTE)
    span = closed - times["accepted_at"]
    times["handled_at"] = times["accepted_at"] + span * 0.8
    times["verified_at"] = times["accepted_at"] + span * 0.95
    times["closed_at"] = closed
    return "closed"


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def write_log(
    path: str | os.PathLike[str],
    policy: Policy,
    cases: int,
    *,
    seed: int = 0,
    start: date | None = None,
    settings: Settings | None = None,
    format: str | None = None,
    route: Callable[[CaseIn], Any] | None = None,
) -> int:
    """Write a generated log (CSV, or JSONL for ``.jsonl``/``.ndjson``); returns the number
    of rows written. Streams: memory does not grow with ``cases``."""
    p = Path(path)
    fmt = format or ("jsonl" if p.suffix.lower() in (".jsonl", ".ndjson") else "csv")
    rows = generate(policy, cases, seed=seed, start=start, settings=settings, route=route)
    n = 0
    with p.open("w", encoding="utf-8", newline="") as f:
        if fmt == "csv":
            cols = columns(policy)
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(cols)
            for row in rows:
                attrs = row.get("attributes") or {}
                writer.writerow([
                    _text(attrs.get(c[11:])) if c.startswith("attributes.") else _text(row.get(c))
                    for c in cols
                ])
                n += 1
        else:
            for row in rows:
                doc = {k: (v.isoformat(timespec="seconds") if isinstance(v, datetime) else v)
                       for k, v in row.items() if v is not None}
                f.write(json.dumps(doc, ensure_ascii=False, sort_keys=False) + "\n")
                n += 1
    return n
