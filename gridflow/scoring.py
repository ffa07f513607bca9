"""Scoring of closed cases on the four criteria of BRIEF §8 (timeliness, resolution,
quality, satisfaction), with weights and curves from the policy's ``scoring`` section.

Everything here is a pure function of a case's event history (oldest first), the policy's
business calendar and its scoring section; nothing reads the clock or a database.

* :func:`case_facts` folds a history into :class:`CaseFacts` — what the indicators count
  (filed, closed, on time, reworked, …) and what the criteria are computed from;
* :func:`score_case` turns the facts of an evaluated case into a :class:`CaseScore`
  (each criterion 0..1 and the weighted composite 0..100), applying the exemptions of
  upheld score appeals;
* :func:`subjects` says who is scored on the case (lead department, assisting departments
  and the reporting grid worker, as the policy says).

The definitions, with worked examples, are in docs/scoring.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any

from gridflow.calendar import BusinessCalendar, Duration, parse_duration
from gridflow.events import EventLike
from gridflow.registry import Registry
from gridflow.schema import CurvePoint, ScoringSpec

__all__ = [
    "CLOSED_STATES",
    "CRITERIA",
    "GRID_ROLES",
    "CaseFacts",
    "CaseScore",
    "HistoryEvent",
    "Subject",
    "case_facts",
    "curve_value",
    "resolution_kind",
    "score_case",
    "subjects",
    "validate_spec",
]

Path = tuple[str | int, ...]

#: The four criteria, in the order reports show them.
CRITERIA: tuple[str, ...] = ("timeliness", "resolution", "quality", "satisfaction")
#: Reporter roles that are scored as the reporting grid worker (``score_reporter``).
GRID_ROLES: tuple[str, ...] = ("grid_worker", "grid_chief")
#: States of a closed case (closed, waiting for the callback, or evaluated).
CLOSED_STATES: tuple[str, ...] = ("closed", "evaluated")
#: Resolution kinds every policy must score, and the callback answers of the engine.
_REQUIRED_RESOLUTIONS = ("normal", "deferred")
_REQUIRED_ANSWERS = ("satisfied", "basically_satisfied", "dissatisfied")
_RANKED = {"grid_workers": "worker", "workers": "worker", "departments": "department",
           "cases": "case", "grids": "grid", "communities": "community", "streets": "street"}


# --------------------------------------------------------------------------- validation


def _non_increasing(points: list[CurvePoint], name: str) -> list[tuple[Path, str]]:
    out: list[tuple[Path, str]] = []
    for i in range(1, len(points)):
        if points[i].x <= points[i - 1].x:
            out.append(((name, i, "x"), f"{name} points must have increasing x"))
        elif points[i].score > points[i - 1].score:
            out.append(((name, i, "score"),
                        f"{name} must not increase (a worse case never scores higher)"))
    if not points:
        out.append(((name,), f"{name} needs at least one point"))
    return out


def validate_spec(spec: ScoringSpec) -> list[tuple[Path, str]]:
    """Problems of a scoring section as (path inside the section, message)."""
    problems: list[tuple[Path, str]] = []
    total = sum(spec.weights.values())
    if abs(total - 100) > 1e-9:
        problems.append((("weights",), f"weights must sum to 100 (they sum to {total:g})"))
    for name, w in spec.weights.items():
        if w < 0:
            problems.append((("weights", name), "a weight cannot be negative"))
    problems += _non_increasing(spec.timeliness_curve, "timeliness_curve")
    problems += _non_increasing(spec.rework_curve, "rework_curve")
    for table in ("resolution", "satisfaction"):
        for key, value in getattr(spec, table).items():
            if not 0 <= value <= 1:
                problems.append(((table, key), f"{table} scores are between 0 and 1"))
    for key in _REQUIRED_RESOLUTIONS:
        if key not in spec.resolution:
            problems.append((("resolution",), f"resolution needs a score for '{key}'"))
    for key in _REQUIRED_ANSWERS:
        if key not in spec.satisfaction:
            problems.append((("satisfaction",),
                             f"satisfaction needs a score for the callback answer '{key}'"))
    for rname, ranking in spec.rankings.items():
        period = ranking.get("period", "month")
        if period not in ("day", "week", "month", "quarter", "year"):
            problems.append((("rankings", rname, "period"),
                             f"unknown period '{period}' (day, week, month, quarter, year)"))
        top = ranking.get("top", 0)
        if not isinstance(top, int) or isinstance(top, bool) or top < 0:
            problems.append((("rankings", rname, "top"), "top must be a whole number ≥ 0"))
        of = ranking.get("of", rname)
        if of not in _RANKED and of not in _RANKED.values():
            known = ", ".join(sorted(_RANKED))
            problems.append((("rankings", rname),
                             f"unknown ranking '{of}': name it one of {known} "
                             "or give 'of: department|worker|case|<level>'"))
    return problems


def ranked_dimension(name: str, ranking: Mapping[str, Any]) -> str:
    """What a ranking of the policy ranks: ``worker``, ``department``, ``case`` or a level."""
    of = str(ranking.get("of", name))
    return _RANKED.get(of, of)


# --------------------------------------------------------------------------- curves


def curve_value(points: Sequence[CurvePoint], x: float) -> float:
    """The curve at ``x``: linear between points, flat before the first and after the last."""
    if not points:
        return 1.0
    if math.isnan(x) or x <= points[0].x:
        return points[0].score
    for a, b in pairwise(points):
        if x <= b.x:
            return a.score + (b.score - a.score) * (x - a.x) / (b.x - a.x)
    return points[-1].score


# --------------------------------------------------------------------------- facts


HistoryEvent = EventLike  # what scoring reads of an event


@dataclass(frozen=True)
class CaseFacts:
    """What a case's history says, as the indicators and the criteria need it.

    Times are timezone-aware. "Working hours" are on the policy's business calendar.
    See docs/scoring.md for the definition of every field.
    """

    case_id: str
    version: int  # number of events folded
    state: str
    reported_at: datetime
    updated_at: datetime  # time of the latest event
    category: str | None = None
    location: str | None = None
    units: Mapping[str, str] = field(default_factory=dict)  # level → unit (location ancestry)
    reporter_id: str | None = None
    reporter_role: str | None = None
    lead: str | None = None
    assist: tuple[str, ...] = ()  # assisting and summoned departments (not the lead)
    on_spot: bool = False
    filed: bool = False  # accepted as a case (filed or resolved on the spot), not cancelled
    cancelled: bool = False
    deferred: bool = False  # in 挂账 now
    ever_deferred: bool = False
    closed: bool = False
    closed_at: datetime | None = None  # the latest closure
    due_at: datetime | None = None  # deadline in force (+ approved extensions, + deferral)
    on_time: bool | None = None  # closed: every closure in time, or timeliness exempted
    overdue_share: float = 0.0  # the worst closure's overdue time / allowed time
    extensions: int = 0  # approved extensions
    returns: int = 0
    rework_count: int = 0  # reworks + reopenings (resident or duty chief, upheld appeals)
    reopens: int = 0
    evaluated: bool = False
    satisfaction: str | None = None  # the callback answer of the current evaluation
    resolution: str | None = None  # closed cases: normal, deferred, or the close's kind
    handling_hours: float | None = None  # closed cases: working hours of handling
    exempt_hours: float = 0.0  # working hours exempted by upheld routing appeals
    exempt: tuple[str, ...] = ()  # criteria exempted by upheld score appeals
    score_appeals: int = 0  # upheld score appeals
    score_appeal_reason: str | None = None  # the latest upheld score appeal's reason

    @property
    def reporter(self) -> str | None:
        """The reporting grid worker (a reporter with a grid role), if any."""
        return self.reporter_id if self.reporter_role in GRID_ROLES else None

    @property
    def extended(self) -> bool:
        return self.extensions > 0

    @property
    def scored(self) -> bool:
        """Scored cases: evaluated (closed and the callback done); never cancelled ones."""
        return self.evaluated and self.closed and not self.cancelled

    def should_close(self, as_of: datetime) -> bool:
        """应结案: filed, not deferred now, and closed or due at ``as_of``."""
        if not self.filed or self.deferred:
            return False
        return self.closed or (self.due_at is not None and self.due_at <= as_of)


def _time(value: Any, default: datetime) -> datetime:
    if isinstance(value, str):
        return datetime.fromisoformat(value)
    if isinstance(value, datetime):
        return value
    return default


def _opt_time(value: Any) -> datetime | None:
    if isinstance(value, str):
        return datetime.fromisoformat(value)
    return value if isinstance(value, datetime) else None


def _is_working(limit: Any) -> bool:
    if isinstance(limit, str) and limit:
        try:
            return parse_duration(limit).is_working
        except ValueError:
            return True
    return True


def _named_criteria(exemption: Mapping[str, Any]) -> tuple[str, ...]:
    named = exemption.get("criteria", exemption.get("criterion"))
    if isinstance(named, str):
        named = [named]
    if isinstance(named, list | tuple):
        chosen = tuple(c for c in CRITERIA if c in named)
        if chosen:
            return chosen
    return CRITERIA  # an upheld score appeal that names no criterion exempts every one


class _Fold:
    """The running state of :func:`case_facts` (one instance per history)."""

    def __init__(self, calendar: BusinessCalendar):
        self.cal = calendar
        self.f: dict[str, Any] = {"version": 0}
        self.working = True  # the deadline's kind of time (working or elapsed hours)
        self.round_start: datetime | None = None  # start of the deadline in force
        self.handling_start: datetime | None = None  # start of the handling round
        self.due: datetime | None = None
        self.pause_start: datetime | None = None
        self.paused_round = 0.0  # paused time in the deadline's kind of time
        self.paused_in_due = 0.0  # of which the engine already moved ``due`` by
        self.paused_handling = 0.0  # paused working hours in the handling round
        self.handling = 0.0
        self.closures = 0
        self.worst = 0.0
        self.assist: list[str] = []
        self.summoned: list[str] = []
        self.exempt: list[str] = []

    def measure(self, a: datetime, b: datetime) -> float:
        if self.working:
            return self.cal.working_hours_between(a, b)
        return (b - a).total_seconds() / 3600.0

    def effective_due(self) -> datetime | None:
        extra = self.paused_round - self.paused_in_due
        if self.due is None or extra <= 0:
            return self.due
        if self.working:
            return self.cal.add(self.due, Duration(extra, "working_hours"))
        return self.due + timedelta(hours=extra)

    def new_round(self, at: datetime, due: datetime | None, limit: Any) -> None:
        self.round_start = at
        self.due = due
        self.working = _is_working(limit)
        self.paused_round = 0.0
        self.paused_in_due = 0.0  # paused time the engine already moved ``due`` by

    def apply(self, ev: HistoryEvent) -> None:
        f, p = self.f, ev.payload
        f["version"] += 1
        f["updated_at"] = ev.at
        state = p.get("state")
        if isinstance(state, str):
            f["state"] = state
        step = _STEPS.get(ev.type)
        if step is not None:  # most events (accept, feedback, verify, …) only move the state
            step(self, ev, f, p)

    def _reported(self, ev: HistoryEvent, f: dict[str, Any], p: Mapping[str, Any]) -> None:
        case = p.get("case") or {}
        f["case_id"] = p.get("case_id", f.get("case_id"))
        f["reported_at"] = _time(p.get("reported_at"), ev.at)
        f["category"] = case.get("category")
        f["location"] = case.get("location")
        f["reporter_id"] = ev.actor_id
        f["reporter_role"] = ev.actor_role

    def _dispatch(self, ev: HistoryEvent, f: dict[str, Any], p: Mapping[str, Any]) -> None:
        at = ev.at
        decision = p.get("decision") or {}
        f["lead"] = p.get("lead")
        f["filed"] = True
        self.assist = [d for d in decision.get("assist", []) if isinstance(d, str)]
        self.summoned = [d for d in p.get("summoned", []) if isinstance(d, str)]
        if ev.type == "resolve_on_spot":
            f["on_spot"] = True
            self.new_round(at, None, None)
        else:
            f["limit"] = decision.get("time_limit")
            self.new_round(at, _opt_time(p.get("due_at")), f["limit"])
        if self.handling_start is None:
            self.handling_start = at
            self.paused_handling = 0.0

    def _file(self, ev: HistoryEvent, f: dict[str, Any], p: Mapping[str, Any]) -> None:
        f["filed"] = True

    def _cancel(self, ev: HistoryEvent, f: dict[str, Any], p: Mapping[str, Any]) -> None:
        f["cancelled"] = True

    def _return(self, ev: HistoryEvent, f: dict[str, Any], p: Mapping[str, Any]) -> None:
        f["returns"] = f.get("returns", 0) + 1
        f["lead"] = None

    def _routing_appeal(self, ev: HistoryEvent, f: dict[str, Any], p: Mapping[str, Any]) -> None:
        f["lead"] = None
        ex = p.get("exemption") or {}
        hours = ex.get("working_hours")
        start, end = _opt_time(ex.get("from")), _opt_time(ex.get("to"))
        if not isinstance(hours, int | float) and start is not None and end is not None:
            hours = self.cal.working_hours_between(start, end)
        if isinstance(hours, int | float) and hours > 0:
            f["exempt_hours"] = f.get("exempt_hours", 0.0) + float(hours)

    def _score_appeal(self, ev: HistoryEvent, f: dict[str, Any], p: Mapping[str, Any]) -> None:
        ex = p.get("exemption") or {}
        self.exempt += [c for c in _named_criteria(ex) if c not in self.exempt]
        f["score_appeals"] = f.get("score_appeals", 0) + 1
        f["score_appeal_reason"] = ex.get("reason") or ev.reason

    def _extension(self, ev: HistoryEvent, f: dict[str, Any], p: Mapping[str, Any]) -> None:
        f["extensions"] = f.get("extensions", 0) + 1
        due = _opt_time(p.get("due_at"))
        if due is not None:
            self.due = due

    def _defer(self, ev: HistoryEvent, f: dict[str, Any], p: Mapping[str, Any]) -> None:
        f["ever_deferred"] = True
        self.pause_start = ev.at

    def _resume(self, ev: HistoryEvent, f: dict[str, Any], p: Mapping[str, Any]) -> None:
        start = self.pause_start
        self.end_pause(ev.at)
        due = _opt_time(p.get("due_at"))
        if due is not None and start is not None:  # the engine moved the deadline itself
            self.due = due
            self.paused_in_due += max(self.measure(start, ev.at), 0.0)

    def _summon(self, ev: HistoryEvent, f: dict[str, Any], p: Mapping[str, Any]) -> None:
        self.summoned += [d for d in p.get("departments", []) if d not in self.summoned]

    def _rework(self, ev: HistoryEvent, f: dict[str, Any], p: Mapping[str, Any]) -> None:
        f["rework_count"] = f.get("rework_count", 0) + 1

    def _reopen(self, ev: HistoryEvent, f: dict[str, Any], p: Mapping[str, Any]) -> None:
        at = ev.at
        f["rework_count"] = f.get("rework_count", 0) + 1
        f["reopens"] = f.get("reopens", 0) + 1
        f["closed_at"] = None
        f["satisfaction"] = None
        f["resolution"] = None
        self.new_round(at, _opt_time(p.get("due_at")), f.get("limit"))
        self.handling_start = at
        self.paused_handling = 0.0
        self.exempt = []  # an upheld score appeal covered the evaluation it contested

    def _close(self, ev: HistoryEvent, f: dict[str, Any], p: Mapping[str, Any]) -> None:
        self.close(ev.at, p)

    def _evaluate(self, ev: HistoryEvent, f: dict[str, Any], p: Mapping[str, Any]) -> None:
        answer = p.get("satisfaction")
        f["satisfaction"] = answer if isinstance(answer, str) else None

    def end_pause(self, at: datetime) -> None:
        if self.pause_start is not None:
            self.paused_round += max(self.measure(self.pause_start, at), 0.0)
            self.paused_handling += max(self.cal.working_hours_between(self.pause_start, at), 0.0)
            self.pause_start = None

    def close(self, at: datetime, p: Mapping[str, Any]) -> None:
        f = self.f
        self.end_pause(at)
        share = 0.0
        if self.due is not None and self.round_start is not None:
            over = self.measure(self.due, at) - (self.paused_round - self.paused_in_due)
            if over > 0:
                allowed = self.measure(self.round_start, self.due) - self.paused_in_due
                share = over / allowed if allowed > 0 else math.inf
        self.worst = max(self.worst, share)
        if self.handling_start is not None:
            spent = self.cal.working_hours_between(self.handling_start, at)
            self.handling += max(spent - self.paused_handling, 0.0)
        self.handling_start = None
        self.closures += 1
        f["closed_at"] = at
        kind = p.get("resolution")
        f["resolution"] = kind if isinstance(kind, str) and kind else (
            "deferred" if f.get("ever_deferred") else "normal")

    def result(self, registry: Registry | None) -> CaseFacts:
        f = self.f
        state = str(f.get("state") or "reported")
        location = f.get("location")
        units: Mapping[str, str] = {}
        if registry is not None and isinstance(location, str) and location in registry.units:
            units = dict(registry.units[location].ancestry)
        lead = f.get("lead")
        assist = tuple(dict.fromkeys(d for d in [*self.assist, *self.summoned] if d != lead))
        cancelled = bool(f.get("cancelled")) and state == "cancelled"
        closed = state in CLOSED_STATES and f.get("closed_at") is not None
        handling = None
        if closed:
            handling = max(self.handling - float(f.get("exempt_hours", 0.0)), 0.0)
        return CaseFacts(
            case_id=str(f.get("case_id")),
            version=int(f.get("version", 0)),
            state=state,
            reported_at=f["reported_at"],
            updated_at=f["updated_at"],
            category=f.get("category"),
            location=location,
            units=units,
            reporter_id=f.get("reporter_id"),
            reporter_role=f.get("reporter_role"),
            lead=lead,
            assist=assist,
            on_spot=bool(f.get("on_spot")),
            filed=bool(f.get("filed")) and not cancelled,
            cancelled=cancelled,
            deferred=state == "deferred",
            ever_deferred=bool(f.get("ever_deferred")),
            closed=closed,
            closed_at=f.get("closed_at") if closed else None,
            due_at=self.effective_due(),
            on_time=(self.worst <= 0 or "timeliness" in self.exempt) if closed else None,
            overdue_share=self.worst if closed else 0.0,
            extensions=int(f.get("extensions", 0)),
            returns=int(f.get("returns", 0)),
            rework_count=int(f.get("rework_count", 0)),
            reopens=int(f.get("reopens", 0)),
            evaluated=state == "evaluated" and f.get("satisfaction") is not None,
            satisfaction=f.get("satisfaction") if state == "evaluated" else None,
            resolution=f.get("resolution") if closed else None,
            handling_hours=handling,
            exempt_hours=float(f.get("exempt_hours", 0.0)),
            exempt=tuple(c for c in CRITERIA if c in self.exempt),
            score_appeals=int(f.get("score_appeals", 0)),
            score_appeal_reason=f.get("score_appeal_reason"),
        )


#: what each kind of event adds to the facts beyond its state (the others add nothing)
_STEPS: dict[str, Callable[[_Fold, HistoryEvent, dict[str, Any], Mapping[str, Any]], None]] = {
    "reported": _Fold._reported,
    "dispatch": _Fold._dispatch,
    "resolve_on_spot": _Fold._dispatch,
    "file": _Fold._file,
    "cancel": _Fold._cancel,
    "return_case": _Fold._return,
    "uphold_routing_appeal": _Fold._routing_appeal,
    "uphold_score_appeal": _Fold._score_appeal,
    "approve_extension": _Fold._extension,
    "defer": _Fold._defer,
    "resume": _Fold._resume,
    "summon": _Fold._summon,
    "rework": _Fold._rework,
    "reopen": _Fold._reopen,
    "uphold_resident_appeal": _Fold._reopen,
    "close": _Fold._close,
    "evaluate": _Fold._evaluate,
}


def case_facts(
    events: Iterable[HistoryEvent],
    calendar: BusinessCalendar,
    registry: Registry | None = None,
) -> CaseFacts:
    """Fold a case's events (oldest first, starting with ``reported``) into its facts.

    ``calendar`` measures working time; ``registry`` (optional) gives the location's
    ancestry (grid → community → street …) for the per-unit indicators.
    """
    fold = _Fold(calendar)
    first = True
    for ev in events:
        if first and ev.type != "reported":
            raise ValueError(f"a case history starts with 'reported', not '{ev.type}'")
        first = False
        fold.apply(ev)
    if first:
        raise ValueError("an empty history has no facts")
    return fold.result(registry)


# --------------------------------------------------------------------------- scores


@dataclass(frozen=True)
class CaseScore:
    """A case's score: the criteria after exemptions (``criteria``) and before (``raw``),
    each 0..1, and the weighted composite 0..100 (rounded to 2 decimals)."""

    criteria: Mapping[str, float]
    raw: Mapping[str, float]
    exempt: tuple[str, ...]
    composite: float
    inputs: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "criteria": dict(self.criteria),
            "raw": dict(self.raw),
            "exempt": list(self.exempt),
            "composite": self.composite,
            "inputs": dict(self.inputs),
        }


def resolution_kind(facts: CaseFacts, spec: ScoringSpec) -> str:
    """How the case was closed, as a key of the policy's ``resolution`` table: the
    close's own kind when the table has it (e.g. ``special``), ``deferred`` when the case
    was ever deferred (挂账), else ``normal``; an unknown kind counts as ``special`` when
    the table has that key."""
    kind = facts.resolution or "normal"
    if kind in spec.resolution:
        return kind
    if kind not in ("normal", "deferred") and "special" in spec.resolution:
        return "special"
    return "deferred" if facts.ever_deferred else "normal"


def _r4(x: float) -> float:
    return round(x + 0.0, 4)


def score_case(facts: CaseFacts, spec: ScoringSpec | None = None) -> CaseScore | None:
    """The 4-criteria score of an evaluated case (``None`` for a case not scored: not
    closed, not yet evaluated, or cancelled)."""
    spec = spec if spec is not None else ScoringSpec()
    if not facts.scored:
        return None
    timeliness = 1.0 if facts.overdue_share <= 0 else curve_value(spec.timeliness_curve,
                                                                  facts.overdue_share)
    kind = resolution_kind(facts, spec)
    raw = {
        "timeliness": _r4(timeliness),
        "resolution": _r4(spec.resolution.get(kind, 1.0)),
        "quality": _r4(curve_value(spec.rework_curve, float(facts.rework_count))),
        "satisfaction": _r4(spec.satisfaction.get(facts.satisfaction or "", 0.0)),
    }
    criteria = {c: (1.0 if c in facts.exempt else raw[c]) for c in CRITERIA}
    weights: dict[str, float] = {str(k): v for k, v in spec.weights.items()}
    composite = sum(weights.get(c, 0.0) * criteria[c] for c in CRITERIA)
    share = facts.overdue_share
    inputs = {
        "on_time": bool(facts.on_time),
        "overdue_share": None if math.isinf(share) else _r4(share),
        "resolution": kind,
        "rework_count": facts.rework_count,
        "satisfaction": facts.satisfaction,
    }
    return CaseScore(criteria, raw, facts.exempt, round(composite + 0.0, 2), inputs)


@dataclass(frozen=True, order=True)
class Subject:
    """Who is scored on a case: ``kind`` ``department`` or ``worker``; ``role`` ``lead``,
    ``assist`` or ``reporter``."""

    kind: str
    id: str
    role: str


def subjects(facts: CaseFacts, spec: ScoringSpec | None = None) -> tuple[Subject, ...]:
    """The lead department, the assisting (and summoned) departments when
    ``score_assisting``, and the reporting grid worker when ``score_reporter``."""
    spec = spec if spec is not None else ScoringSpec()
    out: list[Subject] = []
    if facts.lead:
        out.append(Subject("department", facts.lead, "lead"))
    if spec.score_assisting:
        out += [Subject("department", d, "assist") for d in facts.assist]
    if spec.score_reporter and facts.reporter:
        out.append(Subject("worker", facts.reporter, "reporter"))
    return tuple(out)
