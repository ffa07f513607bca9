"""Indicators and rankings (BRIEF §8) for any unit and period, and the stored scores.

Two ways to the same numbers:

* the **definition**, in Python: :class:`FactsSource` tallies :class:`~gridflow.scoring.CaseFacts`
  (folded from event histories) case by case — what replays and tests use;
* the **store**: :func:`refresh` folds every changed case once and writes its facts and
  scores to the derived tables of :mod:`gridflow.store.aggregates`; :class:`StoreSource`
  then tallies them with SQL ``GROUP BY`` queries (a year of a district is ~300k cases).

Both return :class:`Tally` objects (integer counts and sums), so they agree exactly; the
rates of :class:`Indicators` are computed from a tally by one piece of code. The exact
definitions (which cases count in each numerator and denominator) are in docs/scoring.md.
Nothing here reads the clock: ``as_of`` (when open cases are judged) is a parameter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from gridflow.policy import Policy
from gridflow.registry import Registry
from gridflow.schema import ScoringSpec
from gridflow.scoring import (
    CRITERIA,
    CaseFacts,
    CaseScore,
    Subject,
    case_facts,
    ranked_dimension,
    score_case,
    subjects,
)
from gridflow.store import Store
from gridflow.store import aggregates as agg

__all__ = [
    "DIMENSIONS",
    "CaseEntry",
    "FactsSource",
    "Indicators",
    "Period",
    "RankingEntry",
    "RefreshStats",
    "ScoreRecord",
    "Source",
    "StoreSource",
    "Tally",
    "current_scores",
    "facts_from_store",
    "rank_cases",
    "rank_units",
    "refresh",
    "score_history",
    "scoring_spec",
]

#: Groupings besides the policy's hierarchy levels (grid, community, street, …).
DIMENSIONS: tuple[str, ...] = ("department", "worker")
DEFAULT_TZ = "Asia/Shanghai"


def scoring_spec(policy: Policy | None) -> ScoringSpec:
    """The policy's scoring section, or the defaults."""
    return policy.scoring if policy is not None else ScoringSpec()


# --------------------------------------------------------------------------- periods

_PERIOD_RES = (
    (re.compile(r"^(\d{4})$"), "year"),
    (re.compile(r"^(\d{4})-Q([1-4])$", re.I), "quarter"),
    (re.compile(r"^(\d{4})-(\d{2})$"), "month"),
    (re.compile(r"^(\d{4})-W(\d{2})$", re.I), "week"),
    (re.compile(r"^(\d{4})-(\d{2})-(\d{2})$"), "day"),
)


@dataclass(frozen=True)
class Period:
    """Local calendar days ``[start, end)`` (``None``: unbounded) with a label."""

    kind: str  # all, year, quarter, month, week, day, range
    label: str
    start: date | None = None
    end: date | None = None  # exclusive

    @classmethod
    def all(cls) -> Period:
        return cls("all", "all")

    @classmethod
    def parse(cls, text: str | None) -> Period:
        """``2026``, ``2026-Q1``, ``2026-03``, ``2026-W10``, ``2026-03-09``,
        ``2026-03-01..2026-03-31`` (both days included), or ``all``/empty."""
        if text is None or not text.strip() or text.strip().lower() == "all":
            return cls.all()
        s = text.strip()
        if ".." in s:
            a, _, b = s.partition("..")
            try:
                first, last = date.fromisoformat(a.strip()), date.fromisoformat(b.strip())
            except ValueError:
                raise ValueError(f"invalid period {text!r}: use YYYY-MM-DD..YYYY-MM-DD") from None
            if last < first:
                raise ValueError(f"invalid period {text!r}: it ends before it starts")
            return cls("range", f"{first.isoformat()}..{last.isoformat()}", first,
                       last + timedelta(days=1))
        for rx, kind in _PERIOD_RES:
            m = rx.match(s)
            if m is None:
                continue
            try:
                nums = [int(g) for g in m.groups()]
                if kind == "year":
                    return cls.containing("year", date(nums[0], 1, 1))
                if kind == "quarter":
                    return cls.containing("quarter", date(nums[0], 3 * nums[1] - 2, 1))
                if kind == "month":
                    return cls.containing("month", date(nums[0], nums[1], 1))
                if kind == "week":
                    return cls.containing("week", date.fromisocalendar(nums[0], nums[1], 1))
                return cls.containing("day", date(nums[0], nums[1], nums[2]))
            except ValueError as exc:
                raise ValueError(f"invalid period {text!r}: {exc}") from None
        raise ValueError(
            f"invalid period {text!r}: use 2026, 2026-Q1, 2026-03, 2026-W10, 2026-03-09 or "
            "2026-03-01..2026-03-31"
        )

    @classmethod
    def containing(cls, kind: str, day: date) -> Period:
        """The day / ISO week / month / quarter / year that contains ``day``."""
        if kind == "day":
            return cls("day", day.isoformat(), day, day + timedelta(days=1))
        if kind == "week":
            y, w, wd = day.isocalendar()
            start = day - timedelta(days=wd - 1)
            return cls("week", f"{y}-W{w:02d}", start, start + timedelta(days=7))
        if kind == "month":
            start = day.replace(day=1)
            end = (start + timedelta(days=32)).replace(day=1)
            return cls("month", f"{start:%Y-%m}", start, end)
        if kind == "quarter":
            q = (day.month - 1) // 3
            start = date(day.year, 3 * q + 1, 1)
            end = date(day.year + 1, 1, 1) if q == 3 else date(day.year, 3 * q + 4, 1)
            return cls("quarter", f"{day.year}-Q{q + 1}", start, end)
        if kind == "year":
            return cls("year", str(day.year), date(day.year, 1, 1), date(day.year + 1, 1, 1))
        raise ValueError(f"unknown period kind {kind!r}")

    def bounds(self, tz: ZoneInfo) -> tuple[datetime | None, datetime | None]:
        """The period as UTC instants ``[start, end)`` (local midnights in ``tz``)."""

        def instant(d: date | None) -> datetime | None:
            if d is None:
                return None
            return datetime(d.year, d.month, d.day, tzinfo=tz).astimezone(UTC)

        return instant(self.start), instant(self.end)

    def contains(self, when: datetime, tz: ZoneInfo) -> bool:
        start, end = self.bounds(tz)
        return (start is None or when >= start) and (end is None or when < end)

    def intersect(self, other: Period) -> Period:
        """The part of ``self`` inside ``other`` (labelled as ``self``)."""
        starts = [d for d in (self.start, other.start) if d is not None]
        ends = [d for d in (self.end, other.end) if d is not None]
        start = max(starts) if starts else None
        end = min(ends) if ends else None
        if start is not None and end is not None and end < start:
            end = start
        return replace(self, start=start, end=end)

    def to_dict(self) -> dict[str, Any]:
        last = self.end - timedelta(days=1) if self.end is not None else None
        return {
            "kind": self.kind,
            "label": self.label,
            "first_day": self.start.isoformat() if self.start else None,
            "last_day": last.isoformat() if last else None,
        }


def week_key(when: datetime, tz: ZoneInfo) -> str:
    """The ISO week of ``when`` in ``tz``, e.g. ``2026-W10``."""
    y, w, _ = when.astimezone(tz).isocalendar()
    return f"{y}-W{w:02d}"


# --------------------------------------------------------------------------- tallies


def handling_seconds(facts: CaseFacts) -> int | None:
    """Handling time in whole seconds (what the store sums)."""
    return None if facts.handling_hours is None else round(facts.handling_hours * 3600)


def composite_centi(score: CaseScore | None) -> int | None:
    """The composite in hundredths (what the store sums)."""
    return None if score is None else round(score.composite * 100)


@dataclass
class Tally:
    """Integer counts and sums of one unit and period (see docs/scoring.md)."""

    reported: int = 0
    filed: int = 0
    cancelled: int = 0
    deferred: int = 0
    should_close: int = 0
    closed: int = 0
    on_time: int = 0
    reworked: int = 0
    extended: int = 0
    evaluated: int = 0
    handled: int = 0
    handling_seconds: int = 0
    scored: int = 0
    composite_centi: int = 0
    answers: dict[str, int] = field(default_factory=dict)

    def add_case(self, f: CaseFacts, as_of: datetime, answers: Sequence[str]) -> None:
        """Count one case (the in-Python definition of every count)."""
        self.reported += 1
        self.filed += f.filed
        self.cancelled += f.cancelled
        self.deferred += f.filed and f.deferred
        should = f.should_close(as_of)
        self.should_close += should
        self.closed += f.closed
        self.on_time += f.closed and bool(f.on_time)
        self.reworked += f.closed and f.rework_count > 0
        self.extended += should and f.extended
        self.evaluated += f.evaluated
        for a in answers:
            self.answers.setdefault(a, 0)
        if f.evaluated and f.satisfaction in self.answers:
            self.answers[f.satisfaction] += 1
        secs = handling_seconds(f)
        if f.closed and secs is not None:
            self.handled += 1
            self.handling_seconds += secs

    def add_score(self, centi: int) -> None:
        self.scored += 1
        self.composite_centi += centi

    def add(self, other: Tally) -> None:
        """Add another tally's counts (exact: all integers)."""
        for f in fields(self):
            if f.name != "answers":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        for k, v in other.answers.items():
            self.answers[k] = self.answers.get(k, 0) + v

    @classmethod
    def from_sums(cls, sums: Mapping[str, int]) -> Tally:
        t = cls()
        for k, v in sums.items():
            if not k.startswith("answer:"):
                setattr(t, k, int(v))
        t.answers = {k.removeprefix("answer:"): int(v) for k, v in sums.items()
                     if k.startswith("answer:")}
        return t

    @property
    def overdue(self) -> int:
        """超期: should-close cases not closed on time (closed late, or open past due)."""
        return self.should_close - self.on_time


def _rate(num: float, den: int, digits: int = 6) -> float | None:
    return None if den <= 0 else round(num / den, digits)


@dataclass(frozen=True)
class Indicators:
    """The §8 indicators of one tally (rates 0..1, ``None`` when the denominator is 0)."""

    reported: int
    filed: int
    cancelled: int
    deferred: int
    should_close: int
    closed: int
    on_time: int
    overdue: int
    reworked: int
    extended: int
    evaluated: int
    scored: int
    completion_rate: float | None  # 办结率 closed / should-close
    on_time_rate: float | None  # 按期处置率 on time / should-close
    overdue_rate: float | None  # 超期率 overdue / should-close
    rework_rate: float | None  # 返工率 reworked / closed
    extension_rate: float | None  # 延期率 extended / should-close
    satisfaction_rate: float | None  # 满意率 Σ answer weight / evaluated
    avg_handling_hours: float | None  # closed cases, working hours
    composite: float | None  # mean composite 0..100 of the scored cases

    @classmethod
    def of(cls, t: Tally, spec: ScoringSpec) -> Indicators:
        weighted = sum(spec.satisfaction.get(a, 0.0) * n for a, n in sorted(t.answers.items()))
        return cls(
            reported=t.reported,
            filed=t.filed,
            cancelled=t.cancelled,
            deferred=t.deferred,
            should_close=t.should_close,
            closed=t.closed,
            on_time=t.on_time,
            overdue=t.overdue,
            reworked=t.reworked,
            extended=t.extended,
            evaluated=t.evaluated,
            scored=t.scored,
            completion_rate=_rate(t.closed, t.should_close),
            on_time_rate=_rate(t.on_time, t.should_close),
            overdue_rate=_rate(t.overdue, t.should_close),
            rework_rate=_rate(t.reworked, t.closed),
            extension_rate=_rate(t.extended, t.should_close),
            satisfaction_rate=_rate(weighted, t.evaluated),
            avg_handling_hours=_rate(t.handling_seconds / 3600, t.handled, 2),
            composite=_rate(t.composite_centi / 100, t.scored, 2),
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class CaseEntry:
    """A scored case in a ranking of cases."""

    case_id: str
    composite: float
    closed_at: datetime | None
    reported_at: datetime
    lead: str | None
    location: str | None
    category: str | None


@dataclass(frozen=True)
class RankingEntry:
    rank: int
    key: str
    composite: float
    scored: int
    closed: int


class Source(Protocol):
    """Where a report's numbers come from (the definition or the store)."""

    @property
    def policy_version(self) -> str | None: ...
    @property
    def timezone(self) -> ZoneInfo: ...
    def latest(self) -> datetime | None: ...
    def tally(self, by: str | None, period: Period, as_of: datetime) -> dict[str | None, Tally]:
        ...
    def top_cases(self, period: Period, top: int) -> list[CaseEntry]: ...


def _group_key(by: str | None, f: CaseFacts, tz: ZoneInfo) -> str | None:
    if by is None:
        return None
    if by == "department":
        return f.lead
    if by == "worker":
        return f.reporter
    if by == "week":
        return week_key(f.reported_at, tz)
    if by.startswith("level:"):
        return f.units.get(by.removeprefix("level:"))
    raise ValueError(f"unknown grouping {by!r}")


def _subject_keys(by: str | None, f: CaseFacts, spec: ScoringSpec, tz: ZoneInfo) -> list[
    str | None
]:
    """The keys whose composite a scored case adds to (subjects for departments/workers)."""
    if by == "department":
        return [s.id for s in subjects(f, spec) if s.kind == "department"]
    if by == "worker":
        return [s.id for s in subjects(f, spec) if s.kind == "worker"]
    return [_group_key(by, f, tz)]


class FactsSource:
    """The in-Python definition: tallies over case facts held in memory."""

    def __init__(
        self,
        facts: Iterable[CaseFacts],
        spec: ScoringSpec | None = None,
        *,
        timezone: str | ZoneInfo = DEFAULT_TZ,
        policy_version: str | None = None,
    ):
        self.spec = spec if spec is not None else ScoringSpec()
        self._tz = timezone if isinstance(timezone, ZoneInfo) else ZoneInfo(timezone)
        self._version = policy_version
        self.cases: list[tuple[CaseFacts, CaseScore | None]] = [
            (f, score_case(f, self.spec)) for f in facts
        ]

    @classmethod
    def from_policy(cls, facts: Iterable[CaseFacts], policy: Policy) -> FactsSource:
        return cls(facts, scoring_spec(policy), timezone=policy.calendar.timezone,
                   policy_version=policy.version)

    @property
    def policy_version(self) -> str | None:
        return self._version

    @property
    def timezone(self) -> ZoneInfo:
        return self._tz

    def latest(self) -> datetime | None:
        return max((f.updated_at for f, _ in self.cases), default=None)

    def tally(self, by: str | None, period: Period, as_of: datetime) -> dict[str | None, Tally]:
        answers = list(self.spec.satisfaction)
        out: dict[str | None, Tally] = {}
        for f, score in self.cases:
            if not period.contains(f.reported_at, self._tz):
                continue
            key = _group_key(by, f, self._tz)
            out.setdefault(key, Tally()).add_case(f, as_of, answers)
            centi = composite_centi(score)
            if centi is None:
                continue
            for k in _subject_keys(by, f, self.spec, self._tz):
                out.setdefault(k, Tally(answers=dict.fromkeys(answers, 0))).add_score(centi)
        return out

    def top_cases(self, period: Period, top: int) -> list[CaseEntry]:
        return [
            CaseEntry(f.case_id, score.composite, f.closed_at, f.reported_at, f.lead,
                      f.location, f.category)
            for f, score in self.cases
            if score is not None and period.contains(f.reported_at, self._tz)
        ]


@dataclass(frozen=True)
class RefreshStats:
    cases: int  # cases whose facts were (re)computed
    scored: int  # of them, cases with a score now
    revisions: int  # cases that got a new score revision
    retired: int  # cases whose score was withdrawn (reopened)


@dataclass(frozen=True)
class ScoreRecord:
    """One stored score row: a subject's score of a case under one policy version."""

    case_id: str
    policy_version: str
    revision: int
    current: bool
    subject: Subject
    criteria: Mapping[str, float]
    composite: float
    exempt: tuple[str, ...]
    reason: str | None
    scored_at: datetime
    details: Mapping[str, Any]


def _record(row: Mapping[str, Any]) -> ScoreRecord:
    return ScoreRecord(
        case_id=row["case_id"],
        policy_version=row["policy_version"],
        revision=int(row["revision"]),
        current=bool(row["current"]),
        subject=Subject(row["subject_kind"], row["subject_id"], row["role"]),
        criteria={c: float(row[c]) for c in CRITERIA},
        composite=int(row["composite_centi"]) / 100,
        exempt=tuple(x for x in str(row["exempt"]).split(",") if x),
        reason=row["reason"],
        scored_at=row["scored_at"],
        details=row["details"],
    )


def _facts_row(f: CaseFacts, score: CaseScore | None, version: str, tz: ZoneInfo) -> dict[
    str, Any
]:
    return {
        "case_id": f.case_id,
        "case_version": f.version,
        "policy_version": version,
        "state": f.state,
        "reported_at": f.reported_at,
        "report_week": week_key(f.reported_at, tz),
        "updated_at": f.updated_at,
        "category": f.category,
        "location": f.location,
        "lead": f.lead,
        "reporter": f.reporter,
        "filed": int(f.filed),
        "cancelled": int(f.cancelled),
        "deferred": int(f.deferred),
        "closed": int(f.closed),
        "on_time": int(bool(f.on_time)),
        "extended": int(f.extended),
        "evaluated": int(f.evaluated),
        "rework_count": f.rework_count,
        "satisfaction": f.satisfaction,
        "due_at": f.due_at,
        "closed_at": f.closed_at,
        "handling_seconds": handling_seconds(f),
        "composite_centi": composite_centi(score),
    }


def _signature(rows: Iterable[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted(
        (r["subject_kind"], r["subject_id"], r["role"], *(float(r[c]) for c in CRITERIA),
         int(r["composite_centi"]), str(r["exempt"]))
        for r in rows
    )


def _reason(f: CaseFacts, version: str, previous: Sequence[Mapping[str, Any]],
            other_versions: set[str]) -> str:
    if not previous:
        if other_versions:
            return f"rescored under policy {version} (was {', '.join(sorted(other_versions))})"
        return "evaluated"
    last = previous[-1]["details"] or {}
    if f.score_appeals > int(last.get("score_appeals", 0)):
        return f"score appeal upheld: {f.score_appeal_reason or '-'}"
    if f.reopens > int(last.get("reopens", 0)):
        return "re-evaluated after reopening"
    return "recomputed"


def _score_rows(f: CaseFacts, score: CaseScore, spec: ScoringSpec, version: str, revision: int,
                reason: str) -> list[dict[str, Any]]:
    details = {**score.to_dict(), "score_appeals": f.score_appeals, "reopens": f.reopens}
    return [
        {
            "case_id": f.case_id,
            "policy_version": version,
            "revision": revision,
            "current": 1,
            "subject_kind": s.kind,
            "subject_id": s.id,
            "role": s.role,
            **{c: score.criteria[c] for c in CRITERIA},
            "composite_centi": composite_centi(score),
            "exempt": ",".join(score.exempt),
            "reason": reason,
            "details": details,
            "case_version": f.version,
            "reported_at": f.reported_at,
            "scored_at": f.updated_at,
        }
        for s in subjects(f, spec)
    ]


def refresh(store: Store, policy: Policy, *, batch: int = 500) -> RefreshStats:
    """Bring the derived tables up to date with the event history under ``policy``.

    Folds every case whose facts are missing, stale (the case has new events) or of
    another policy version, one batch per transaction. Scores: a new revision is
    written when a case's score changes (evaluation, upheld score appeal, re-evaluation
    after reopening, another policy version) with the reason; rows of other policy
    versions are never touched, so old scores stay readable. Run it from one worker at a
    time (e.g. after ``tick`` or before a report); it is idempotent.
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    t = agg.ensure_aggregate_tables(store)
    spec = scoring_spec(policy)
    version = policy.version
    tz = policy.calendar.timezone
    total = scored = revised = retired = 0
    after: str | None = None
    while True:
        with store.transaction(readonly=True) as tx:
            ids = agg.stale_cases(tx, t, version, after, batch)
            events = agg.histories(tx, t, ids)
        if not ids:
            break
        facts = [case_facts(events[cid], policy.calendar, policy.registry) for cid in ids
                 if events[cid]]
        pairs = [(f, score_case(f, spec)) for f in facts]
        with store.transaction() as tx:
            agg.write_facts(
                tx, t,
                [_facts_row(f, s, version, tz) for f, s in pairs],
                [{"case_id": f.case_id, "level": level, "unit": unit}
                 for f, _ in pairs for level, unit in sorted(f.units.items())],
            )
            rows = agg.score_rows(tx, t, [f.case_id for f, _ in pairs])
            by_case: dict[str, list[dict[str, Any]]] = {}
            for r in rows:
                by_case.setdefault(r["case_id"], []).append(r)
            retire: list[int] = []
            new_rows: list[dict[str, Any]] = []
            for f, score in pairs:
                mine = [r for r in by_case.get(f.case_id, []) if r["policy_version"] == version]
                others = {r["policy_version"] for r in by_case.get(f.case_id, [])} - {version}
                current = [r for r in mine if r["current"]]
                fresh = [] if score is None else _score_rows(f, score, spec, version, 0, "")
                scored += score is not None
                if _signature(current) == _signature(fresh):
                    continue
                retire += [int(r["id"]) for r in current]
                if score is None or not fresh:
                    retired += bool(current)
                    continue
                revised += 1
                revision = max((int(r["revision"]) for r in mine), default=0) + 1
                reason = _reason(f, version, mine, others)
                new_rows += _score_rows(f, score, spec, version, revision, reason)
            agg.retire_scores(tx, t, retire)
            agg.insert_scores(tx, t, new_rows)
        total += len(pairs)
        after = ids[-1]
        if len(ids) < batch:
            break
    return RefreshStats(total, scored, revised, retired)


def score_history(store: Store, case_id: str, policy_version: str | None = None) -> list[
    ScoreRecord
]:
    """Every stored score row of a case (all revisions; all policy versions unless one is
    given), oldest first."""
    if not agg.has_aggregate_tables(store):
        return []
    t = agg.aggregate_tables(store)
    with store.transaction(readonly=True) as tx:
        return [_record(r) for r in agg.score_rows(tx, t, [case_id], policy_version)]


def current_scores(store: Store, case_id: str, policy_version: str) -> list[ScoreRecord]:
    """The case's scores in force under ``policy_version`` (one per scored subject)."""
    return [r for r in score_history(store, case_id, policy_version) if r.current]


def facts_from_store(store: Store, policy: Policy, *, batch: int = 500) -> list[CaseFacts]:
    """Fold every case of the store from its events (the in-Python path; nothing is
    written), in case id order."""
    t = agg.aggregate_tables(store)
    out: list[CaseFacts] = []
    with store.transaction(readonly=True) as tx:
        ids = [r.case_id for r in tx.iter_cases(batch)]
        for i in range(0, len(ids), batch):
            chunk = ids[i:i + batch]
            events = agg.histories(tx, t, chunk)
            out += [case_facts(events[cid], policy.calendar, policy.registry)
                    for cid in chunk if events[cid]]
    return out


class StoreSource:
    """The store path: SQL aggregation over the derived tables (after :func:`refresh`)."""

    def __init__(
        self,
        store: Store,
        spec: ScoringSpec | None = None,
        *,
        policy_version: str | None = None,
        timezone: str | ZoneInfo = DEFAULT_TZ,
    ):
        self.store = store
        self.spec = spec if spec is not None else ScoringSpec()
        self._tz = timezone if isinstance(timezone, ZoneInfo) else ZoneInfo(timezone)
        self._t = agg.aggregate_tables(store)
        if policy_version is None:
            with store.transaction(readonly=True) as tx:
                versions = [v for v in agg.facts_versions(tx, self._t) if v is not None]
            if len(versions) > 1:
                raise ValueError(
                    "the stored facts mix policy versions "
                    f"({', '.join(sorted(versions))}): refresh them under one policy"
                )
            policy_version = versions[0] if versions else None
        self._version = policy_version

    @classmethod
    def from_policy(cls, store: Store, policy: Policy) -> StoreSource:
        return cls(store, scoring_spec(policy), policy_version=policy.version,
                   timezone=policy.calendar.timezone)

    @property
    def policy_version(self) -> str | None:
        return self._version

    @property
    def timezone(self) -> ZoneInfo:
        return self._tz

    def latest(self) -> datetime | None:
        with self.store.transaction(readonly=True) as tx:
            return agg.latest_update(tx, self._t)

    def tally(self, by: str | None, period: Period, as_of: datetime) -> dict[str | None, Tally]:
        start, end = period.bounds(self._tz)
        answers = list(self.spec.satisfaction)
        with self.store.transaction(readonly=True) as tx:
            sums = agg.tally(tx, self._t, by=by, start=start, end=end, as_of=as_of,
                             answers=answers)
            subject = None
            if by in ("department", "worker") and self._version is not None:
                subject = agg.subject_tally(tx, self._t, kind=by, policy_version=self._version,
                                            start=start, end=end)
        out = {k: Tally.from_sums(v) for k, v in sums.items()}
        if subject is not None:
            for t in out.values():
                t.scored = t.composite_centi = 0
            for key, (n, centi) in subject.items():
                t = out.setdefault(key, Tally(answers=dict.fromkeys(answers, 0)))
                t.scored, t.composite_centi = n, centi
        return out

    def top_cases(self, period: Period, top: int) -> list[CaseEntry]:
        start, end = period.bounds(self._tz)
        with self.store.transaction(readonly=True) as tx:
            rows = agg.top_cases(tx, self._t, start=start, end=end, top=top)
        return [
            CaseEntry(r["case_id"], int(r["composite_centi"]) / 100, r["closed_at"],
                      r["reported_at"], r["lead"], r["location"], r["category"])
            for r in rows
        ]


# --------------------------------------------------------------------------- rankings


def rank_units(tallies: Mapping[str | None, Tally], top: int) -> list[RankingEntry]:
    """Units with scored cases by mean composite (higher first; ties: more scored cases,
    then key); ``top`` 0 keeps all."""
    scored = [(k, t) for k, t in tallies.items() if k is not None and t.scored > 0]
    scored.sort(key=lambda kt: (-kt[1].composite_centi / kt[1].scored, -kt[1].scored, kt[0]))
    if top > 0:
        scored = scored[:top]
    return [
        RankingEntry(i, k, round(t.composite_centi / t.scored / 100, 2), t.scored, t.closed)
        for i, (k, t) in enumerate(scored, start=1)
        if k is not None
    ]


def rank_cases(entries: Iterable[CaseEntry], top: int) -> list[CaseEntry]:
    """Cases by composite (higher first; ties: closed earlier, then case id)."""
    far = datetime.max.replace(tzinfo=UTC)
    ordered = sorted(entries, key=lambda e: (-e.composite, e.closed_at or far, e.case_id))
    return ordered[:top] if top > 0 else ordered


def ranking_window(kind: str, period: Period, as_of: datetime, tz: ZoneInfo) -> Period:
    """The ranking's own period (``kind``) that contains the report's reference day — the
    day of ``as_of``, or the last day of the report period if that is earlier — clipped to
    the report period."""
    ref = as_of.astimezone(tz).date()
    if period.end is not None and ref >= period.end:
        ref = period.end - timedelta(days=1)
    if period.start is not None and ref < period.start:
        ref = period.start
    return Period.containing(kind, ref).intersect(period)


def ranking_specs(spec: ScoringSpec) -> list[tuple[str, str, str, int]]:
    """(name, dimension, period kind, top) of the policy's rankings, by name."""
    out = []
    for name, r in sorted(spec.rankings.items()):
        out.append((name, ranked_dimension(name, r), str(r.get("period", "month")),
                    int(r.get("top", 0))))
    return out


def unit_names(registry: Registry | None, group: str) -> dict[str, str]:
    """Display names of the keys of a grouping (``department``: departments; ``unit`` or
    ``level:<level>``: units of the organisation), in the policy's order."""
    if registry is None:
        return {}
    if group == "department":
        return {k: d.name for k, d in registry.departments.items()}
    if group == "unit" or group.startswith("level:"):
        return {k: u.name for k, u in registry.units.items()}
    return {}
