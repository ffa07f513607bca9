"""Replay historic case logs through a policy, and compare two policies (BRIEF §10).

Two replays over the records of :mod:`gridflow.importer` (streamed; nothing holds the
whole log):

* **routing replay** — route every case under the policy; where the log names the
  department that actually handled the case, report the agreement overall, per
  department, and the biggest disagreements (a confusion table);
* **life-cycle replay** — drive every case through the engine on a simulated clock at
  the times of the log (steps the log lacks are filled per the rule in docs/replay.md),
  so deadlines, supervision, escalations and scores are recomputed under the policy;
  then tally the §8 indicators (:mod:`gridflow.indicators`).

:func:`replay` runs them and, with ``compare=``, runs a second policy on the same records
and reports which cases change lead department / tier / due time / overdue status, the
counts per department before and after, and how each indicator moves. The report is
plain data; :func:`to_json` gives byte-identical text for the same inputs.

Routing replay uses an exact fast path (:class:`RouteMemo`): a case's decision depends
only on what the rules can see — the fields the rule conditions test, and the truth of
the policy's text tests on the description — plus its category, location and urgency.
The first case of each such key is routed by the policy (durable_rules); later cases with
the same key reuse that outcome, with their own due time. ``bench/replay.py`` checks
every decision against a hand-written durable_rules ruleset, and ``tests/test_replay.py``
against :meth:`Policy.route`.
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
import html
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from gridflow.calendar import parse_duration
from gridflow.clock import ManualClock
from gridflow.compiler import category_scope
from gridflow.conditions import (
    ADDRESS,
    CATEGORY,
    CHANNEL,
    DESCRIPTION,
    REPORTER,
    TIME_FIELDS,
    tests_of,
)
from gridflow.engine import SUPERVISED_STATES, Actor, CaseView, Engine
from gridflow.errors import CalendarRangeError, GridflowError, GridflowRuntimeError
from gridflow.history import History, HistorySpec
from gridflow.importer import ImportReport, LogReader, LogRecord
from gridflow.indicators import Indicators, Tally, composite_centi, scoring_spec
from gridflow.policy import Policy
from gridflow.routing import Decision, normalise_description, validate_case
from gridflow.schema import CaseIn
from gridflow.scoring import case_facts, score_case, subjects
from gridflow.store import NewEvent, Store
from gridflow.store.unitofwork import BatchAborted

__all__ = [
    "CaseOutcome",
    "LifecycleReplay",
    "ReplayError",
    "RouteMemo",
    "Routed",
    "RoutingStats",
    "RunCounts",
    "fast_policy",
    "replay",
    "replay_routing",
    "to_html",
    "to_json",
]

REPORT_FORMAT = 1
_TEXT_OPS = frozenset({"contains", "prefix", "regex"})
_MISSING = ("<missing>",)  # a key part for an absent field (never equal to a value)
_CONFUSION_TOP = 20
_T_HOUR, _T_WEEKDAY, _T_WEEKEND = (
    TIME_FIELDS["hour"], TIME_FIELDS["weekday"], TIME_FIELDS["weekend"]
)
_T_WORKDAY, _T_HOLIDAY = TIME_FIELDS["workday"], TIME_FIELDS["holiday"]
_LISTED_ERRORS = 200



# =========================================================================== routing


@dataclass(frozen=True, slots=True)
class Routed:
    """The routing outcome of one case: the policy's decision for its key (``template``:
    everything but the case id, the due time and the trace), plus the case.
    :meth:`due_at` computes the due time, :meth:`decision` the full per-case decision."""

    case: CaseIn
    template: Decision
    policy: Policy

    @property
    def lead(self) -> str:
        return self.template.lead

    @property
    def tier(self) -> str:
        return self.template.tier

    @property
    def rule(self) -> str:
        return self.template.rule

    @property
    def time_limit(self) -> str | None:
        return self.template.time_limit

    def due_at(self) -> datetime | None:
        """The due time as :meth:`Policy.route` computes it (the limit added to
        ``reported_at`` on the policy's calendar)."""
        limit = self.template.time_limit
        reported = self.case.reported_at
        if limit is None or reported is None:
            return None
        return self.policy.calendar.add(reported, parse_duration(limit))

    def decision(self) -> Decision:
        """The complete decision of this case, trace included (routes it again)."""
        return self.policy.route(self.case)


@dataclass(frozen=True)
class _Seen:
    """What the rules that can match one category read of a case."""

    fields: tuple[str, ...]  # fact fields tested directly (not by a text test)
    texts: tuple[tuple[str, Any], ...]  # (field, test) of their text tests
    channel: bool
    attrs: tuple[str, ...]
    time: tuple[str, ...]  # the local-time fields tested (t_hour, t_working, ...)
    description: bool  # the description itself is tested (not only by text tests)
    address: bool  # the address is tested (by any test)
    reporter: bool  # the reporter is tested (by any test)
    history: bool  # a history condition is tested
    #: per history count field, the thresholds its tests compare with (``gte``); a count
    #: is then keyed by which thresholds it reaches. ``None``: keyed by the count itself
    #: (a test of another kind)
    thresholds: tuple[tuple[str, tuple[int, ...] | None], ...] = ()


class _Relevance:
    """Per category, the fact fields and text tests of the rules that can match it.

    A rule whose category scope (:func:`gridflow.compiler.category_scope`, the function
    the compiler shards rules by) excludes a category never matches its cases, so the
    fields only such rules read cannot change their outcome; durable_rules matches on the
    fields a rule's conditions name, nothing else."""

    def __init__(self, policy: Policy):
        router = policy.router
        self._codes = sorted(policy.registry.categories)
        preds = router.compiled.text_predicates  # the compiler's own (exact semantics)
        self._pred_index = preds.index
        self._pred_tests = preds.tests
        self._rules: list[tuple[frozenset[str] | None, list[Any]]] = []
        for table in router.rules:
            for rule in table:
                self._rules.append((category_scope(rule.cond, self._codes), tests_of(rule.cond)))
        self._cache: dict[str, _Seen] = {}

    def of(self, category: str) -> _Seen:
        found = self._cache.get(category)
        if found is not None:
            return found
        fields: set[str] = set()
        texts: dict[int, tuple[str, Any]] = {}
        counts: dict[str, set[int] | None] = {}
        for scope, tests in self._rules:
            if scope is not None and category not in scope:
                continue
            for t in tests:
                if HistorySpec.of_field(t.field) is not None:
                    known = counts.setdefault(t.field, set())
                    if known is not None and t.op == "gte" and isinstance(t.value, int):
                        known.add(t.value)
                    else:
                        counts[t.field] = None
                if t.op in _TEXT_OPS and t.field == DESCRIPTION:
                    k = self._pred_index[(t.field, t.op, str(t.value))]
                    texts[k] = self._pred_tests[k]
                else:  # other fields' text tests too: keyed by the value itself
                    fields.add(t.field)
        time_fields = set(TIME_FIELDS.values())
        found = self._cache[category] = _Seen(
            fields=tuple(sorted(fields)),
            texts=tuple(texts[k] for k in sorted(texts)),
            channel=CHANNEL in fields,
            attrs=tuple(sorted(f[2:] for f in fields if f.startswith("a_"))),
            time=tuple(sorted(fields & time_fields)),
            description=DESCRIPTION in fields,
            address=ADDRESS in fields,
            reporter=REPORTER in fields,
            history=any(HistorySpec.of_field(f) is not None for f in fields),
            thresholds=tuple((f, None if c is None else tuple(sorted(c)))
                             for f, c in sorted(counts.items())),
        )
        return found


class RouteMemo:
    """Exact memo of routing outcomes by what the rules can see (see the module docstring).

    ``route(case)`` validates the case against the policy (memoised by the fields that
    validation reads), builds the key — category, location, urgency, the fields the
    conditions test, the local-time fields when a condition tests one, the truth
    vector of the text tests on the description, and the counts of the history
    conditions — and routes the first case of a key with :meth:`Policy.route`. Errors
    are never memoised. History conditions count the cases routed before (valid ones,
    routed or not: an engine would have stored them), so feed a log in time order. The
    history keeps what the longest window can reach plus ``late`` (how far out of order
    a case may come and still be counted exactly), forgetting older cases every
    ``forget_every`` cases; a case further out of order raises ``RoutingError`` (a
    count it cannot make exactly) instead of counting too few.
    """

    def __init__(self, policy: Policy, *, max_entries: int = 500_000,
                 late: timedelta = timedelta(days=1), forget_every: int = 4096):
        self.policy = policy
        self.max_entries = max_entries
        reg = policy.registry
        self._urgency = {code: info.urgency for code, info in reg.categories.items()}
        self._seen = _Relevance(policy)
        self._tz = policy.calendar.timezone
        self._days: dict[Any, tuple[bool, bool | None, bool | None]] = {}
        self._memo: dict[tuple[Any, ...], Decision] = {}
        self._shared: dict[str, Decision] = {}
        self._valid: dict[tuple[Any, ...], bool] = {}
        self._due_ok: dict[tuple[Any, str], bool] = {}
        specs = policy.router.history_specs
        self.history = History(only={s.same for s in specs}) if specs else None
        # what the history must keep: the longest window, plus how far out of order a
        # case may come and still be counted exactly (`late`); older cases are forgotten
        # every `forget_every` cases, so memory follows the windows, not the log
        self._reach = max(s.window for s in specs) + late if specs else None
        self._forget_every = max(1, forget_every)
        self._added = 0
        self._earliest: datetime | None = None  # of the cases since the last forgetting
        self.hits = 0
        self.misses = 0

    def _time_key(self, reported: datetime | None, wanted: tuple[str, ...]) -> tuple[Any, ...]:
        """The ``wanted`` local-time fields of the fact, as :func:`case_fact` computes them
        (absent when the calendar does not cover the day)."""
        if reported is None:
            return ()
        local = reported.astimezone(self._tz)
        day = local.date()
        cal = self.policy.calendar
        known = self._days.get(day)
        if known is None:
            covers = cal.covers(day)
            known = self._days[day] = (
                covers, cal.is_workday(day) if covers else None,
                cal.is_holiday(day) if covers else None,
            )
        covers, workday, holiday = known
        out: list[Any] = []
        for name in wanted:
            if name == _T_HOUR:
                out.append(local.hour)
            elif name == _T_WEEKDAY:
                out.append(local.isoweekday())
            elif name == _T_WEEKEND:
                out.append(local.isoweekday() >= 6)
            elif not covers:
                out.append(_MISSING)
            elif name == _T_WORKDAY:
                out.append(workday)
            elif name == _T_HOLIDAY:
                out.append(holiday)
            else:
                out.append(cal.is_working_time(local))
        return tuple(out)

    def key(self, case: CaseIn) -> tuple[Any, ...]:
        category = case.category
        seen = self._seen.of(category)
        parts: list[Any] = [category, case.location, case.urgency or self._urgency[category]]
        if seen.channel:
            parts.append(case.channel)
        if seen.attrs:
            attrs = case.attributes
            for name in seen.attrs:
                value = attrs.get(name, _MISSING)
                parts.append(value if value is _MISSING else (value.__class__, value))
        if seen.time:
            parts.append(self._time_key(case.reported_at, seen.time))
        if seen.address:
            parts.append(case.address)
        if seen.reporter:
            parts.append(case.reporter)
        if seen.description:
            parts.append(normalise_description(case.description))
        elif seen.texts:
            text = normalise_description(case.description)
            parts.append(tuple([bool(test(text)) for _f, test in seen.texts]))
        if seen.history:
            # what the history tests can tell apart: which thresholds each count reaches
            # (counts 1 and 2 route alike under `at_least: 3`; the template has no trace)
            counts = self.policy.router.history_counts(case, self.history)
            parts.append(tuple(
                (f, n if ts is None or n is None else sum(1 for t in ts if n >= t))
                for f, ts in seen.thresholds for n in (counts.get(f),)
            ))
        return tuple(parts)

    def _forget(self, reported: datetime | None) -> None:
        """Every ``forget_every`` cases, forget those reported more than the reach before
        the earliest of them (the earliest, not the latest: one case dated years ahead
        must not make the history forget what the next cases need)."""
        if reported is None or self.history is None or self._reach is None:
            return
        if self._earliest is None or reported < self._earliest:
            self._earliest = reported
        self._added += 1
        if self._added % self._forget_every == 0:
            self.history.forget_before(self._earliest - self._reach)
            self._earliest = None

    def _validate(self, case: CaseIn) -> None:
        attrs = case.attributes
        vkey = (case.category, case.location, case.channel,
                tuple((k, v.__class__, v) for k, v in attrs.items()) if attrs else ())
        if vkey not in self._valid:
            validate_case(self.policy.registry, case)  # raises CaseValidationError
            if len(self._valid) >= self.max_entries:
                self._valid.clear()
            self._valid[vkey] = True

    def _check_due(self, case: CaseIn, limit: str) -> None:
        """Raise what :meth:`Policy.route` raises when the due time falls outside the
        calendar's data. A day whose last instant plus the limit is computable makes every
        start that day computable (the calendar walks forward from the start), so this
        is remembered per (local day, limit) and only such days compute per case."""
        reported = case.reported_at
        if reported is None:
            return
        local = reported.astimezone(self._tz)
        key = (local.date(), limit)
        ok = self._due_ok.get(key)
        if ok is None:
            end = local.replace(hour=23, minute=59, second=59, microsecond=999_999)
            try:
                self.policy.calendar.add(end, parse_duration(limit))
                ok = True
            except CalendarRangeError:
                ok = False
            if len(self._due_ok) >= self.max_entries:
                self._due_ok.clear()
            self._due_ok[key] = ok
        if not ok:
            self.policy.calendar.add(reported, parse_duration(limit))

    def _template(self, decision: Decision) -> Decision:
        """The case-independent part of a decision (no case id, due time or trace),
        shared by every key with the same outcome."""
        shared = dataclasses.replace(decision, case_id=None, due_at=None, hits=[])
        ident = repr(shared)
        found = self._shared.get(ident)
        if found is None:
            found = self._shared[ident] = shared
        return found

    def route(self, case: CaseIn) -> Routed:
        self._validate(case)
        key = self.key(case)
        if self.history is not None:
            self.history.add(case)  # after its own counts: it is history for later cases
            self._forget(case.reported_at)
        template = self._memo.get(key)
        if template is None:
            template = self._template(self.policy.route(case, history=self.history))
            if len(self._memo) >= self.max_entries:
                self._memo.clear()
                self._shared.clear()
            self._memo[key] = template
            self.misses += 1
        else:
            self.hits += 1
            if template.time_limit is not None:
                self._check_due(case, template.time_limit)
        return Routed(case, template, self.policy)


class _MemoMatch:
    """``CompiledRules.match`` remembered by the message content the rules that can match
    the case's category see (the fields they test, the truth of their text tests); a
    drop-in for the engine's router."""

    def __init__(self, policy: Policy, max_entries: int = 200_000):
        compiled = policy.router.compiled
        self._inner = compiled
        self.tables = compiled.tables
        self._seen = _Relevance(policy)
        self._memo: dict[tuple[Any, ...], tuple[tuple[int, ...], ...]] = {}
        self._max = max_entries

    def match(self, fact: Mapping[str, Any]) -> list[list[int]]:
        seen = self._seen.of(str(fact.get(CATEGORY)))
        values: list[Any] = [fact.get(CATEGORY)]
        for f in seen.fields:
            v = fact.get(f, _MISSING)
            values.append(v if v is _MISSING else (v.__class__, v))
        for f, test in seen.texts:
            v = fact.get(f)
            values.append(isinstance(v, str) and bool(test(v)))
        key = tuple(values)
        found = self._memo.get(key)
        if found is None:
            result = self._inner.match(fact)  # errors (e.g. a 'unique' overlap) propagate
            found = tuple(tuple(x) for x in result)
            if len(self._memo) >= self._max:
                self._memo.clear()
            self._memo[key] = found
        return [list(x) for x in found]


def fast_policy(policy: Policy) -> Policy:
    """The same policy (same version, same decisions) with durable_rules' answers
    remembered by message content — for engines driven by replays."""
    router = copy.copy(policy.router)
    router.compiled = _MemoMatch(policy)  # type: ignore[assignment]
    return dataclasses.replace(policy, router=router)


@dataclass
class RoutingStats:
    """Agreement of the policy's routing with the departments of the log."""

    cases: int = 0
    errors: int = 0
    default: int = 0
    with_actual: int = 0
    agree: int = 0
    routed: Counter[str] = field(default_factory=Counter)
    actual: Counter[str] = field(default_factory=Counter)
    agreed: Counter[str] = field(default_factory=Counter)
    confusion: Counter[tuple[str, str]] = field(default_factory=Counter)
    rules: Counter[str] = field(default_factory=Counter)

    def add(self, routed: Routed, actual: str | None) -> None:
        self.cases += 1
        t = routed.template
        lead = t.lead
        self.routed[lead] += 1
        self.rules[t.rule] += 1
        if t.default:
            self.default += 1
        if actual is not None:
            self.with_actual += 1
            self.actual[actual] += 1
            if actual == lead:
                self.agree += 1
                self.agreed[lead] += 1
            else:
                self.confusion[(actual, lead)] += 1

    def to_dict(self, names: Mapping[str, str] | None = None) -> dict[str, Any]:
        names = names or {}
        depts = sorted(set(self.routed) | set(self.actual))
        by_dept = {
            d: {
                "name": names.get(d),
                "routed": self.routed[d],
                "actual": self.actual[d],
                "agree": self.agreed[d],
                "agreement": _rate(self.agreed[d], self.actual[d]),
            }
            for d in depts
        }
        worst = sorted(self.confusion.items(), key=lambda kv: (-kv[1], kv[0]))[:_CONFUSION_TOP]
        return {
            "cases": self.cases,
            "errors": self.errors,
            "default_routed": self.default,
            "with_actual": self.with_actual,
            "agree": self.agree,
            "agreement": _rate(self.agree, self.with_actual),
            "by_department": by_dept,
            "confusion": [
                {"actual": a, "routed": r, "count": n, "share_of_actual": _rate(n, self.actual[a])}
                for (a, r), n in worst
            ],
            "by_rule": dict(sorted(self.rules.items())),
        }


def _rate(num: float, den: int, digits: int = 6) -> float | None:
    return None if den <= 0 else round(num / den, digits)


@dataclass(frozen=True)
class ReplayError:
    """A record the replay could not carry through (the engine refused a step, ...)."""

    row: int
    case_id: str | None
    step: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "case_id": self.case_id, "step": self.step,
                "message": self.message}


def replay_routing(
    policy: Policy, records: Iterable[LogRecord], *, memo: RouteMemo | None = None,
    on_case: Callable[[LogRecord, Routed], None] | None = None,
    errors: list[ReplayError] | None = None,
) -> RoutingStats:
    """Route every record's case; agreement with the log's ``department``."""
    memo = memo or RouteMemo(policy)
    stats = RoutingStats()
    route = memo.route
    add = stats.add
    for rec in records:
        try:
            routed = route(rec.case)
        except GridflowError as exc:
            stats.errors += 1
            if errors is not None and len(errors) < _LISTED_ERRORS:
                errors.append(ReplayError(rec.row, rec.case.id, "route", str(exc)))
            continue
        add(routed, rec.department)
        if on_case is not None:
            on_case(rec, routed)
    return stats


# =========================================================================== life cycle


_PREFERRED_ROLES: dict[str, tuple[str, ...]] = {
    "resolve_on_spot": ("grid_worker", "grid_chief"),
    "file": ("clerk", "duty_chief", "grid_chief"),
    "cancel": ("clerk", "duty_chief"),
    "dispatch": ("dispatcher", "duty_chief", "system"),
    "accept": ("handler", "grid_worker"),
    "claim": ("handler", "grid_worker"),
    "feedback": ("handler", "grid_worker"),
    "return_case": ("handler",),
    "request_extension": ("handler",),
    "approve_extension": ("duty_chief", "dispatcher"),
    "defer": ("duty_chief",),
    "rework": ("supervisor", "grid_chief", "grid_worker"),
    "verify": ("supervisor", "grid_chief", "grid_worker"),
    "close": ("supervisor", "duty_chief", "system"),
    "evaluate": ("resident", "system", "clerk"),
}
_PATROL_CHANNELS = frozenset({"patrol", "video"})


class _Cast:
    """The actors a replay uses, with roles the policy's workflow allows."""

    def __init__(self, engine: Engine):
        graph = engine.workflow().graph
        self.graph = graph
        self.roles: dict[str, str] = {}
        for trigger, preferred in _PREFERRED_ROLES.items():
            if not graph.has_trigger(trigger):
                continue
            allowed = graph.roles_for(trigger)
            self.roles[trigger] = next((r for r in preferred if r in allowed),
                                       allowed[0] if allowed else preferred[0])
        roles = graph.roles
        # who resolves a matter on the spot: the grid's own department, when the policy
        # has exactly one at the lowest tier (else the routing decides, as for any case)
        reg = engine.policy.registry
        lowest = [d for d, info in reg.departments.items() if info.tier == reg.tiers[0]]
        self.on_spot_department = lowest[0] if len(lowest) == 1 else None
        self.reporter_role = "grid_worker" if "grid_worker" in roles else roles[0]
        self.intake_role = "clerk" if "clerk" in roles else self.reporter_role
        self._actors: dict[tuple[str, str | None], Actor] = {}  # (trigger, dept or unit)

    def actor(
        self, trigger: str, department: str | None = None, *, named: str | None = None
    ) -> Actor:
        """The actor of ``trigger`` (of ``department``); ``named``: the handler a rule
        assigned the case to, who alone may accept it."""
        role = self.roles[trigger]
        if named is not None:
            return Actor(named, role, department=department)
        key = (trigger, department)
        found = self._actors.get(key)
        if found is None:
            ident = f"replay-{role}" if department is None else f"replay-{department}"
            found = self._actors[key] = Actor(ident, role, department=department)
        return found

    def reporter(self, case: CaseIn) -> Actor:
        if case.channel in _PATROL_CHANNELS:
            key: tuple[str, str | None] = ("report", case.location)
            found = self._actors.get(key)
            if found is None:
                found = self._actors[key] = Actor(f"gw-{case.location}", self.reporter_role,
                                                  unit=case.location)
            return found
        key = ("intake", case.channel)
        found = self._actors.get(key)
        if found is None:
            found = self._actors[key] = Actor(f"intake-{case.channel}", self.intake_role)
        return found


Step = tuple[datetime, str]  # (when, what)


def plan(record: LogRecord) -> list[Step]:
    """The steps a record is replayed with, by the fill rule of docs/replay.md:

    * earlier steps the log lacks take the time of the step before them (filed ←
      reported, dispatched ← filed, accepted ← dispatched); later ones the time of the
      step after them (verified ← closed, handled ← verified);
    * a case without ``closed_at`` (and not closed on the spot) is left open after its
      last known step, unless its status says it was cancelled or deferred;
    * ``evaluated_at`` (default: closed_at) is used only with a satisfaction value;
    * ``returns``: dispatched and returned that many times at the dispatch time, then
      dispatched again; ``extension``: requested and approved halfway between accepted
      and handled; ``rework``: the time between handled and verified is split evenly
      into feedback → rework → feedback … → verify.
    """
    case = record.case
    reported = case.reported_at
    assert reported is not None
    status = record.status or ("closed" if record.closed_at is not None else "open")
    closed = record.closed_at
    verified = record.verified_at or closed
    handled = record.handled_at or verified
    evaluated = (record.evaluated_at or closed) if record.satisfaction else None
    steps: list[Step] = []
    if record.on_spot:
        steps.append((reported, "report_on_spot"))
        if verified is not None:
            steps.append((verified, "verify"))
        if closed is not None:
            steps.append((closed, "close"))
            if evaluated is not None:
                steps.append((evaluated, "evaluate"))
        return steps
    steps.append((reported, "report"))
    filed = record.filed_at or reported
    if status == "cancelled":
        steps.append((filed, "cancel"))
        return steps
    steps.append((filed, "file"))
    dispatched = record.dispatched_at or filed
    if status == "open" and record.dispatched_at is None and record.accepted_at is None and \
            handled is None:
        return steps  # filed, never dispatched
    for _ in range(record.returns):
        steps.append((dispatched, "dispatch"))
        steps.append((dispatched, "return"))
    steps.append((dispatched, "dispatch"))
    if status == "open" and record.accepted_at is None and handled is None:
        return steps
    accepted = record.accepted_at or dispatched
    steps.append((accepted, "accept"))
    if record.extension is not None:
        mid = accepted if handled is None else accepted + (handled - accepted) / 2
        steps.append((mid, "extend"))
    if status == "deferred":
        steps.append((handled or accepted, "defer"))
        return steps
    if handled is None:
        return steps
    steps.append((handled, "feedback"))
    if verified is None:
        return steps
    parts = 2 * record.rework + 1
    for j in range(record.rework):
        steps.append((handled + (verified - handled) * (2 * j + 1) / parts, "rework"))
        steps.append((handled + (verified - handled) * (2 * j + 2) / parts, "feedback"))
    steps.append((verified, "verify"))
    if closed is None:
        return steps
    steps.append((closed, "close"))
    if evaluated is not None:
        steps.append((evaluated, "evaluate"))
    return steps


@dataclass
class _Open:
    """A case being replayed."""

    record: LogRecord
    case_id: str
    admission: int
    steps: list[Step]
    next: int = 0
    view: CaseView | None = None
    events: list[NewEvent] = field(default_factory=list)
    timers: tuple[str | None, str | None] = (None, None)  # (warn_at, due_at) armed
    failed: bool = False


@dataclass(frozen=True)
class CaseOutcome:
    """What the life-cycle replay made of one case (for comparisons)."""

    case_id: str
    row: int
    state: str
    lead: str | None
    tier: str | None
    due_at: str | None  # ISO 8601 in the policy's time zone (as routing's due times)
    overdue: bool  # should-close and not closed on time at the end of the replay

    def to_dict(self) -> dict[str, Any]:
        return {"lead": self.lead, "tier": self.tier, "due_at": self.due_at,
                "overdue": self.overdue, "state": self.state}


@dataclass
class RunCounts:
    """What a life-cycle replay counted (plain data: shards send theirs to be added up)."""

    cases: int = 0
    total: Tally = field(default_factory=Tally)
    by_department: dict[str | None, Tally] = field(default_factory=dict)
    events: Counter[str] = field(default_factory=Counter)
    error_count: int = 0
    error_steps: Counter[str] = field(default_factory=Counter)
    errors: list[ReplayError] = field(default_factory=list)


class _Counted:
    """The counts of a life-cycle replay and the report made of them."""

    policy: Policy
    until: datetime | None

    def _counts_init(self, policy: Policy) -> None:
        self.spec = scoring_spec(policy)
        self._answers = list(self.spec.satisfaction)
        self.total = Tally()
        self.by_department: dict[str | None, Tally] = {}
        self.events: Counter[str] = Counter()
        self.errors: list[ReplayError] = []
        self.error_count = 0
        self.error_steps: Counter[str] = Counter()
        self.cases = 0
        self._last_reported: datetime | None = None

    def _in_order(self, record: LogRecord) -> datetime | None:
        """The record's report time if it can be admitted; else count the error, ``None``.
        Order is checked against the last admitted report, not the clock: the rule then
        does not depend on other cases' steps (a sharded replay gives the same answer)."""
        reported = record.case.reported_at
        if reported is None:
            self.error(record, "admit", MISSING_REPORTED_AT)
            return None
        last = self._last_reported
        if last is not None and reported < last:
            self.error(record, "admit", out_of_order(reported, last))
            return None
        if self.until is not None:
            steps = plan(record)
            latest = steps[-1][0] if steps else reported
            if max(latest, reported) > self.until:
                raise GridflowRuntimeError(
                    f"row {record.row}: its steps run to {max(latest, reported).isoformat()}, "
                    f"after --until {self.until.isoformat()}: open cases are judged at "
                    "--until, so it must not precede the log (leave it out: the log's "
                    "latest time)"
                )
        self._last_reported = reported
        return reported

    def counts(self) -> RunCounts:
        return RunCounts(self.cases, self.total, self.by_department, self.events,
                         self.error_count, self.error_steps, self.errors)

    def add_counts(self, c: RunCounts) -> None:
        """Add another run's counts (a shard's): every count is an integer sum."""
        self.cases += c.cases
        self.total.add(c.total)
        for dept, tally in c.by_department.items():
            self.by_department.setdefault(dept, Tally()).add(tally)
        self.events.update(c.events)
        self.error_count += c.error_count
        self.error_steps.update(c.error_steps)
        for e in c.errors:
            _keep_first(self.errors, e)

    def error(self, record: LogRecord, step: str, message: str, case_id: str | None = None) -> None:
        self.error_count += 1
        self.error_steps[step] += 1
        _keep_first(self.errors, ReplayError(record.row, case_id or record.case.id, step, message))

    def listed_errors(self) -> list[ReplayError]:
        """The first errors by row (at most 200), whatever the order they happened in."""
        return sorted(self.errors, key=_error_key)[:_LISTED_ERRORS]


    def indicators(self) -> dict[str, Any]:
        return Indicators.of(self.total, self.spec).to_dict()

    def indicators_by_department(self) -> dict[str, dict[str, Any]]:
        return {
            (k if k is not None else "-"): Indicators.of(t, self.spec).to_dict()
            for k, t in sorted(self.by_department.items(), key=lambda kv: kv[0] or "")
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "until": self.until.isoformat() if self.until is not None else None,
            "indicators": self.indicators(),
            "by_department": self.indicators_by_department(),
            "events": dict(sorted(self.events.items())),
            "errors": self.error_count,
            "errors_by_step": dict(sorted(self.error_steps.items())),
            "error_list": [e.to_dict() for e in self.listed_errors()],
        }



class LifecycleReplay(_Counted):
    """Drives records through an :class:`Engine` on a simulated clock (batch mode).

    Feed records in ``reported_at`` order (:func:`in_time_order` re-orders a log that is
    roughly ordered) with :meth:`feed`, then call :meth:`finish`. Steps of all cases run
    in time order; supervision timers fire at their due times (a timer due exactly at a
    step's time fires after it); at the end timers fire up to ``until`` (default: the
    latest time in the log). ``store`` defaults to a private in-memory SQLite store.
    """

    def __init__(
        self,
        policy: Policy,
        store: Store | None = None,
        *,
        until: datetime | None = None,
        batch_size: int = 20_000,
        fast: bool = True,
        on_outcome: Callable[[CaseOutcome], None] | None = None,
    ):
        self.policy = policy
        if store is None:
            store = Store(outbox=False)
            store.create_all()
        self.store = store
        self.until = until
        self.clock = ManualClock(datetime(2000, 1, 1, tzinfo=policy.calendar.timezone))
        self.engine = Engine(fast_policy(policy) if fast else policy, store, self.clock)
        self.cast = _Cast(self.engine)
        self.batch_size = batch_size
        self.on_outcome = on_outcome
        # heaps keyed by microseconds since the epoch: aware datetimes of different tzinfo
        # objects compare through utcoffset() calls, ~20 per heap operation
        self._steps: list[tuple[int, int, int, _Open]] = []
        # due times the store may hold: (µs, admission, kind, due, case id)
        self._timers: list[tuple[int, int, str, datetime, str]] = []
        self._open: dict[str, _Open] = {}
        self._admitted = 0
        self._now: datetime | None = None
        self._now_us = 0
        self._ticked: int | None = None
        self._quiet = False  # no command since the last tick
        self._latest: datetime | None = None
        self._batch: Any = None
        self._uow: Any = None
        self._counts_init(policy)
        self.finished = False

    # -- driving --------------------------------------------------------------------------

    def __enter__(self) -> LifecycleReplay:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.finish()
        elif self._batch is not None:
            self._batch.__exit__(*exc)
            self._batch = None

    def _start(self) -> None:
        if self._batch is None:
            self._batch = self.engine.batch(size=self.batch_size)
            self._uow = self._batch.__enter__()
            self._uow.listener = self._on_events

    def _on_events(self, case_id: str, events: Sequence[NewEvent]) -> None:
        oc = self._open.get(case_id)
        for ev in events:
            self.events[ev.type] += 1
        if oc is not None:
            oc.events.extend(events)

    def feed(self, record: LogRecord) -> None:
        """Admit one record (its ``reported_at`` must not precede the replay's clock)."""
        self._start()
        reported = self._in_order(record)
        if reported is None:
            return
        self._advance(reported, inclusive=False)
        case = record.case if record.case.id is not None else record.case.model_copy(
            update={"id": f"row-{record.row}"}
        )
        if case is not record.case:
            record = dataclasses.replace(record, case=case)
        case_id = case.id
        assert case_id is not None
        if case_id in self._open:
            self.error(record, "admit", f"case id {case_id} is already being replayed")
            return
        self._admitted += 1
        self.cases += 1
        oc = _Open(record, case_id, self._admitted, plan(record))
        self._open[case_id] = oc
        latest = oc.steps[-1][0] if oc.steps else reported
        if self._latest is None or latest > self._latest:
            self._latest = latest
        self._push_step(oc)

    def _push_step(self, oc: _Open) -> None:
        if oc.next < len(oc.steps):
            when = oc.steps[oc.next][0]
            heapq.heappush(self._steps, (_us(when), oc.admission, oc.next, oc))

    def _advance(self, until: datetime, *, inclusive: bool) -> None:
        steps = self._steps
        limit = _us(until) + (1 if inclusive else 0)
        while steps and steps[0][0] < limit:
            key, _adm, i, oc = heapq.heappop(steps)
            when = oc.steps[i][0]
            self._fire_timers_before(key)
            self._now, self._now_us = when, key
            self._run_step(oc, when)

    def _fire_timers(self, until: datetime, *, inclusive: bool) -> None:
        self._fire_timers_before(_us(until) + (1 if inclusive else 0))

    def _fire_timers_before(self, limit: int) -> None:
        """Tick at each timer's due time before ``limit`` (µs since the epoch), as a host
        that ticks all the time would: a timer that comes due while its case is not
        supervised (e.g. handled, waiting for verification) is used up then and not armed
        again; one that is already due when it is armed fires right after the command that
        armed it."""
        timers = self._timers
        while timers and timers[0][0] < limit:
            key, adm, kind, due, case_id = heapq.heappop(timers)
            # a timer due before the clock (armed already late) fires at the next tick: now
            if self._now is None or key > self._now_us:
                when, when_us = due, key
            else:
                when, when_us = self._now, self._now_us
            if when_us == self._ticked and self._quiet:
                continue  # nothing ran since the tick at this very time
            if self._inert(case_id, adm):  # the tick would only use the timer up: do that alone
                self._uow.use_timer(case_id, kind, due, when)
                continue
            self._tick(when, when_us)

    def _tick(self, when: datetime, when_us: int) -> None:
        self._ticked, self._quiet = when_us, True
        self.clock.set(when.astimezone(UTC))  # UTC: formats fastest
        self._now, self._now_us = when, when_us
        fired = self.engine.tick(self.clock.now())
        for cid in dict.fromkeys(ev.case_id for ev in fired):
            other = self._open.get(cid)
            if other is not None:
                other.view = self.engine.get(cid)
                self._track_timers(other)

    def _inert(self, case_id: str, admission: int) -> bool:
        """Whether the case's timers can no longer raise an event: it was counted (no step
        left), or it is past supervision with only verification, closing and evaluation
        left (rework would bring it back). A tick for one of its timers would only mark
        that timer used; ~90% of a replay's timers are such (cases closed in time)."""
        oc = self._open.get(case_id)
        if oc is None or oc.admission != admission:  # (a later case may reuse the id)
            return True
        if oc.view is None or oc.view.state in SUPERVISED_STATES:
            return False
        return all(what in _PAST_SUPERVISION for _when, what in oc.steps[oc.next:])

    def _track_timers(self, oc: _Open) -> None:
        view = oc.view
        if view is None or view.state not in SUPERVISED_STATES:
            return
        d = view.data  # the projection's ISO texts: compared without parsing them
        pair = (d["warn_at"], d["due_at"])
        if pair == oc.timers:
            return
        oc.timers = pair
        if pair[0] is not None and not d["warned"]:
            warn = datetime.fromisoformat(pair[0])
            heapq.heappush(self._timers, (_us(warn), oc.admission, "warn", warn, oc.case_id))
        if pair[1] is not None and not d["overdue"]:
            due = datetime.fromisoformat(pair[1])
            heapq.heappush(self._timers, (_us(due), oc.admission, "overdue", due, oc.case_id))

    def _run_step(self, oc: _Open, when: datetime) -> None:
        what = oc.steps[oc.next][1]
        oc.next += 1
        self._quiet = False
        self.clock.set(when.astimezone(UTC))  # UTC: formats fastest
        try:
            oc.view = self._command(oc, what)
        except BatchAborted:
            raise  # the store lost the uncommitted batch: the replay cannot go on
        except GridflowRuntimeError as exc:
            self.error(oc.record, what, str(exc), oc.case_id)
            oc.failed = True
            oc.next = len(oc.steps)
        self._track_timers(oc)
        if oc.next < len(oc.steps):
            self._push_step(oc)
        elif oc.view is None:
            self._open.pop(oc.case_id, None)  # never reported: nothing to count
            self.cases -= 1
        elif oc.view.state in _SETTLED:
            self._finalise(oc, when)

    def _command(self, oc: _Open, what: str) -> CaseView:
        e, cast, rec, cid = self.engine, self.cast, oc.record, oc.case_id
        if what == "report":
            return e.report(rec.case, cast.reporter(rec.case))
        if what == "report_on_spot":
            actor = cast.reporter(rec.case)
            actor = Actor(actor.id, cast.roles["resolve_on_spot"], unit=actor.unit,
                          department=cast.on_spot_department)
            return e.report(rec.case, actor, on_spot=True, evidence=[f"replay:row {rec.row}"])
        view = oc.view
        assert view is not None
        lead = view.data["lead"]
        if what == "file":
            return e.file(cid, cast.actor("file"))
        if what == "cancel":
            return e.cancel(cid, cast.actor("cancel"), f"cancelled in the log (row {rec.row})")
        if what == "dispatch":
            return e.dispatch(cid, cast.actor("dispatch"))
        if what == "return":
            return e.return_case(cid, cast.actor("return_case", lead),
                                 f"returned in the log (row {rec.row})")
        if what == "accept":
            if view.pool is not None:
                return e.claim(cid, cast.actor("claim", lead))
            return e.accept(cid, cast.actor("accept", lead, named=view.handler))
        if what == "extend":
            extra = rec.extension or "1wd"
            e.request_extension(cid, cast.actor("request_extension", lead),
                                f"extension in the log (row {rec.row})", extra)
            return e.approve_extension(cid, cast.actor("approve_extension"))
        if what == "defer":
            return e.defer(cid, cast.actor("defer"), f"deferred in the log (row {rec.row})")
        if what == "feedback":
            return e.feedback(cid, cast.actor("feedback", lead),
                              evidence=[f"replay:row {rec.row}"])
        if what == "rework":
            return e.rework(cid, cast.actor("rework"), f"rework in the log (row {rec.row})")
        if what == "verify":
            return e.verify(cid, cast.actor("verify"))
        if what == "close":
            return e.close(cid, cast.actor("close"))
        if what == "evaluate":
            assert rec.satisfaction is not None
            return e.evaluate(cid, cast.actor("evaluate"), rec.satisfaction)
        raise AssertionError(what)

    def _finalise(self, oc: _Open, as_of: datetime) -> None:
        self._open.pop(oc.case_id, None)
        if not oc.events:
            return
        policy = self.policy
        facts = case_facts(oc.events, policy.calendar, policy.registry)
        self.total.add_case(facts, as_of, self._answers)
        dept = self.by_department.setdefault(facts.lead, Tally())
        dept.add_case(facts, as_of, self._answers)
        score = score_case(facts, self.spec)
        centi = composite_centi(score)
        if centi is not None:
            self.total.add_score(centi)
            for s in subjects(facts, self.spec):
                if s.kind == "department":
                    self.by_department.setdefault(s.id, Tally()).add_score(centi)
        if self.on_outcome is not None:
            view = oc.view
            should = facts.should_close(as_of)
            self.on_outcome(CaseOutcome(
                oc.case_id, oc.record.row, facts.state, facts.lead,
                view.tier if view is not None else None,
                (facts.due_at.astimezone(policy.calendar.timezone).isoformat()
                 if facts.due_at is not None else None),
                bool(should and not (facts.closed and facts.on_time)),
            ))

    def abandon(self) -> None:
        """Stop without finishing: what is not committed yet is rolled back."""
        batch, self._batch = self._batch, None
        if batch is not None:
            stop = RuntimeError("the replay was abandoned")
            batch.__exit__(RuntimeError, stop, None)
        self.finished = True

    def latest_time(self) -> datetime | None:
        """Where the replay ends by default: the latest step time of the admitted cases."""
        return self._latest or self._now

    def finish(self) -> None:
        """Run the remaining steps, fire timers up to ``until``, count the open cases."""
        if self.finished:
            return
        self._start()
        while self._steps:  # every remaining step (each may queue the case's next one)
            _key, _adm, i, oc = self._steps[0]
            self._advance(oc.steps[i][0], inclusive=True)
        until = self.until or self.latest_time()
        if until is not None:
            self._fire_timers(until, inclusive=True)
        as_of = until or self.clock.now()
        self.until = until
        for oc in sorted(self._open.values(), key=lambda o: o.admission):
            if oc.view is not None:
                oc.view = self.engine.get(oc.case_id)
            self._finalise(oc, as_of)
        batch, self._batch = self._batch, None
        if batch is not None:
            batch.__exit__(None, None, None)
        self.finished = True

_SETTLED = frozenset({"closed", "evaluated", "cancelled"})
#: steps after which a case is never supervised again (rework is not among them)
_PAST_SUPERVISION = frozenset({"verify", "close", "evaluate"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _us(when: datetime) -> int:
    """Microseconds since the epoch (exact; one utcoffset() call)."""
    d = when - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


MISSING_REPORTED_AT = "reported_at is required for the life-cycle replay"


def out_of_order(reported: datetime, last: datetime) -> str:
    return (f"reported at {reported.isoformat()}, before the previous case "
            f"({last.isoformat()}): the log is out of order")


def _error_key(e: ReplayError) -> tuple[int, str, str, str]:
    return (e.row, e.case_id or "", e.step, e.message)


def _keep_first(errors: list[ReplayError], error: ReplayError) -> None:
    """Append; past twice the listed number, keep only the first by row."""
    errors.append(error)
    if len(errors) >= 2 * _LISTED_ERRORS:
        errors.sort(key=_error_key)
        del errors[_LISTED_ERRORS:]


def in_time_order(
    records: Iterable[LogRecord], *, window: timedelta = timedelta(days=1),
    on_late: Callable[[LogRecord], None] | None = None,
) -> Iterator[LogRecord]:
    """Records by ``reported_at``, re-ordering a log that is out of order by at most
    ``window``; records further out of order go to ``on_late`` (then the replay reports
    them). Records without ``reported_at`` pass straight through (and are reported)."""
    heap: list[tuple[datetime, int, LogRecord]] = []
    latest: datetime | None = None
    last_out: datetime | None = None
    for seq, rec in enumerate(records):
        when = rec.case.reported_at
        if when is None:
            yield rec
            continue
        if last_out is not None and when < last_out:
            if on_late is not None:
                on_late(rec)
            else:
                yield rec
            continue
        heapq.heappush(heap, (when, seq, rec))
        if latest is None or when > latest:
            latest = when
        while heap and latest - heap[0][0] > window:
            out = heapq.heappop(heap)
            last_out = out[0]
            yield out[2]
    while heap:
        yield heapq.heappop(heap)[2]


# =========================================================================== the report


@dataclass
class _Compare:
    """Joins per-case results of two runs and counts what changed."""

    limit: int
    changed: Counter[str] = field(default_factory=Counter)
    compared: int = 0
    listed: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)  # max-heap
    _pending: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def offer(self, case_id: str, row: int, side: int, data: dict[str, Any]) -> None:
        a, b = self._pending.get(case_id, (None, None))
        if side == 0:
            a = (row, data)
        else:
            b = (row, data)
        if a is None or b is None:
            self._pending[case_id] = (a, b)
            return
        self._pending.pop(case_id, None)
        self.compared += 1
        before, after = a[1], b[1]
        fields = [k for k in before if before[k] != after.get(k)]
        if not fields:
            return
        for f in fields:
            self.changed[f] += 1
        self.changed["any"] += 1
        item = (-row, case_id, {"case_id": case_id, "row": row, "changed": fields,
                                "before": before, "after": after})
        if len(self.listed) < self.limit:
            heapq.heappush(self.listed, item)
        elif item > self.listed[0]:
            heapq.heapreplace(self.listed, item)

    def to_dict(self) -> dict[str, Any]:
        rows = sorted(self.listed, key=lambda it: (-it[0], it[1]))
        return {
            "compared": self.compared,
            "changed": dict(sorted(self.changed.items())),
            "listed": len(rows),
            "cases": [it[2] for it in rows],
        }


def _delta(a: Any, b: Any) -> Any:
    if isinstance(a, bool) or isinstance(b, bool):
        return None
    if isinstance(a, int | float) and isinstance(b, int | float):
        return round(b - a, 6)
    return None


def _indicator_moves(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: {"before": before[k], "after": after.get(k), "change": _delta(before[k], after.get(k))}
        for k in before
    }


def _department_moves(a: _Counted, b: _Counted) -> dict[str, Any]:
    """Per lead department, the indicators that move (departments where none does are
    left out): who gains cases under the other policy, and how they then fare."""
    by_a, by_b = a.indicators_by_department(), b.indicators_by_department()
    none = Indicators.of(Tally(), a.spec).to_dict()
    out = {}
    for dept in sorted(set(by_a) | set(by_b)):
        moves = _indicator_moves(by_a.get(dept, none), by_b.get(dept, none))
        moved = {k: v for k, v in moves.items() if v["before"] != v["after"]}
        if moved:
            out[dept] = moved
    return out


def _policy_info(policy: Policy) -> dict[str, Any]:
    return {"name": policy.name, "version": policy.version}


Mode = Literal["auto", "routing", "lifecycle"]


def replay(
    policy: Policy,
    reader: LogReader | Iterable[LogRecord],
    *,
    mode: Mode = "auto",
    compare: Policy | None = None,
    store: Store | None = None,
    until: datetime | None = None,
    window: timedelta = timedelta(days=1),
    max_listed: int = 1000,
    progress: Callable[[int], None] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Replay a log under ``policy`` (and ``compare``); the report as plain data.

    ``mode``: ``routing`` (routing and agreement only), ``lifecycle`` (also the life
    cycle, indicators), ``auto`` (life cycle when the log has later-step columns).
    ``window``: how far out of order a row may be (the life cycle re-orders it; history
    conditions still count it exactly).
    ``store``: where the life-cycle replay of ``policy`` is stored (default in-memory
    SQLite; the compared policy always runs in memory). ``progress`` is called with the
    number of records read, every 1,000 records. ``jobs`` > 1 runs each life-cycle
    replay over that many worker processes (:mod:`gridflow.shards`; same report; ``store``
    must then not hold any of the log's case ids) — except where shards cannot keep a
    policy's history counts (:func:`gridflow.shards.shardable`): then in this process.
    """
    from gridflow.shards import ShardedLifecycleReplay, shardable  # builds on this module

    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError("jobs must be a positive integer")
    lifecycle = mode == "lifecycle" or (
        mode == "auto" and isinstance(reader, LogReader) and reader.has_steps()
    )
    names = {d: info.name for d, info in policy.registry.departments.items()}
    # the routing history keeps rows as far out of order as the life cycle re-orders
    memo_a = RouteMemo(policy, late=window)
    memo_b = RouteMemo(compare, late=window) if compare is not None else None
    stats_a, stats_b = RoutingStats(), RoutingStats()
    route_errors: list[ReplayError] = []
    late: list[LogRecord] = []
    cmp_routes = _Compare(max_listed) if compare is not None else None
    cmp_cases = _Compare(max_listed) if compare is not None and lifecycle else None
    runs: list[LifecycleReplay | ShardedLifecycleReplay] = []

    def run_of(p: Policy, into: Store | None, side: int) -> Any:
        outcome = (
            (lambda o: cmp_cases.offer(o.case_id, o.row, side, o.to_dict()))
            if cmp_cases is not None else None
        )
        if jobs > 1 and shardable(p, into):
            return ShardedLifecycleReplay(p, into, jobs=jobs, until=until, on_outcome=outcome)
        return LifecycleReplay(p, into, until=until, on_outcome=outcome)

    if lifecycle:
        runs.append(run_of(policy, store, 0))
        if compare is not None:
            runs.append(run_of(compare, None, 1))

    def routed_summary(r: Routed) -> dict[str, Any]:
        due = r.due_at()
        return {"lead": r.lead, "tier": r.tier, "time_limit": r.time_limit,
                "due_at": due.isoformat() if due is not None else None}

    def records() -> Iterator[LogRecord]:
        n = 0
        for rec in reader:
            n += 1
            if progress is not None and n % 1000 == 0:
                progress(n)
            ra = _route_one(memo_a, rec, stats_a, route_errors)
            if memo_b is not None:
                rb = _route_one(memo_b, rec, stats_b, None)
                if cmp_routes is not None and ra is not None and rb is not None:
                    cid = rec.case.id or f"row-{rec.row}"
                    cmp_routes.offer(cid, rec.row, 0, routed_summary(ra))
                    cmp_routes.offer(cid, rec.row, 1, routed_summary(rb))
            yield rec
        if progress is not None:
            progress(n)

    stream: Iterable[LogRecord] = records()
    if lifecycle:
        stream = in_time_order(stream, window=window, on_late=late.append)
    try:
        for rec in stream:
            for run in runs:
                run.feed(rec)
        for run in runs:
            for rec in late:
                run.error(rec, "admit", "out of order by more than the re-ordering window "
                          f"({window}); sort the log by reported_at")
            run.finish()
    finally:
        for run in runs:
            if isinstance(run, ShardedLifecycleReplay):
                run.close()  # workers stop whatever happened

    import_report = reader.report if isinstance(reader, LogReader) else ImportReport()
    doc: dict[str, Any] = {
        "gridflow_replay": REPORT_FORMAT,
        "mode": "lifecycle" if lifecycle else "routing",
        "policy": _policy_info(policy),
        "input": import_report.to_dict(),
        "routing": {**stats_a.to_dict(names),
                    "errors_list": [e.to_dict() for e in route_errors]},
    }
    if lifecycle:
        doc["lifecycle"] = runs[0].to_dict()
    if compare is not None:
        assert cmp_routes is not None
        depts = sorted(set(stats_a.routed) | set(stats_b.routed))
        comparison: dict[str, Any] = {
            "policy": _policy_info(compare),
            "routing": {
                **cmp_routes.to_dict(),
                "errors": stats_b.errors,
                "per_department": {
                    d: {"before": stats_a.routed[d], "after": stats_b.routed[d],
                        "change": stats_b.routed[d] - stats_a.routed[d]}
                    for d in depts
                },
                "agreement": {"before": _rate(stats_a.agree, stats_a.with_actual),
                              "after": _rate(stats_b.agree, stats_b.with_actual)},
            },
        }
        if lifecycle:
            assert cmp_cases is not None
            ind_a, ind_b = runs[0].indicators(), runs[1].indicators()
            comparison["lifecycle"] = {
                **cmp_cases.to_dict(),
                "indicators": _indicator_moves(ind_a, ind_b),
                "by_department": _department_moves(runs[0], runs[1]),
                "errors": runs[1].error_count,
            }
        doc["compare"] = comparison
    return doc


def _route_one(
    memo: RouteMemo, rec: LogRecord, stats: RoutingStats, errors: list[ReplayError] | None
) -> Routed | None:
    try:
        routed = memo.route(rec.case)
    except GridflowError as exc:
        stats.errors += 1
        if errors is not None and len(errors) < _LISTED_ERRORS:
            errors.append(ReplayError(rec.row, rec.case.id, "route", str(exc)))
        return None
    stats.add(routed, rec.department)
    return routed


def to_json(doc: Mapping[str, Any]) -> str:
    """Canonical JSON of a report: same report → same bytes."""
    return json.dumps(doc, ensure_ascii=False, sort_keys=True, indent=2) + "\n"


# --------------------------------------------------------------------------- HTML


def _pct(v: Any) -> str:
    return "–" if v is None else f"{v * 100:.2f}%"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_RATES = ("completion_rate", "on_time_rate", "overdue_rate", "rework_rate", "extension_rate",
          "satisfaction_rate")


def to_html(doc: Mapping[str, Any]) -> str:
    """A self-contained HTML page of a replay report (no scripts, no external files)."""
    p = doc["policy"]
    parts = [
        "<!doctype html><html lang='zh'><head><meta charset='utf-8'>",
        f"<title>gridflow replay — {html.escape(str(p['name']))}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:"
        "collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:"
        "right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}</style>",
        "</head><body>",
        f"<h1>Replay: {html.escape(str(p['name']))}</h1>",
        f"<p>policy version {html.escape(str(p['version']))}; mode {html.escape(doc['mode'])}</p>",
    ]
    inp = doc["input"]
    parts.append("<h2>Input</h2>" + _table(
        ["source", "rows", "imported", "bad rows"],
        [[inp["source"], inp["rows"], inp["imported"], inp["bad_rows"]]],
    ))
    if inp["errors"]:
        parts.append(_table(["row", "field", "reason"], [
            [e["row"], e["field"] or "", e["message"]] for e in inp["errors"][:50]
        ]))
    r = doc["routing"]
    parts.append("<h2>Routing</h2>")
    parts.append(_table(["cases", "default-routed", "with actual department", "agreement"], [
        [r["cases"], r["default_routed"], r["with_actual"], _pct(r["agreement"])]
    ]))
    parts.append(_table(["department", "name", "routed", "actual", "agree", "agreement"], [
        [d, v["name"] or "", v["routed"], v["actual"], v["agree"], _pct(v["agreement"])]
        for d, v in r["by_department"].items()
    ]))
    if r["confusion"]:
        parts.append("<h3>Biggest disagreements</h3>" + _table(
            ["actual", "routed", "cases", "share of actual"],
            [[c["actual"], c["routed"], c["count"], _pct(c["share_of_actual"])]
             for c in r["confusion"]],
        ))
    life = doc.get("lifecycle")
    if life is not None:
        ind = life["indicators"]
        parts.append("<h2>Life cycle</h2>")
        parts.append(_table(["reported", "should close", "closed", *_RATES, "composite"], [[
            ind["reported"], ind["should_close"], ind["closed"],
            *(_pct(ind[k]) for k in _RATES), ind["composite"] if ind["composite"] is not None
            else "–",
        ]]))
        parts.append(_table(["department", "reported", "closed", *_RATES], [
            [d, v["reported"], v["closed"], *(_pct(v[k]) for k in _RATES)]
            for d, v in life["by_department"].items()
        ]))
    cmp_doc = doc.get("compare")
    if cmp_doc is not None:
        q = cmp_doc["policy"]
        parts.append(f"<h2>What-if: {html.escape(str(q['name']))} "
                     f"({html.escape(str(q['version']))})</h2>")
        cr = cmp_doc["routing"]
        parts.append(_table(["department", "before", "after", "change"], [
            [d, v["before"], v["after"], f"{v['change']:+d}"]
            for d, v in cr["per_department"].items() if v["change"] or v["before"]
        ]))
        lc = cmp_doc.get("lifecycle")
        if lc is not None:
            parts.append(_table(["indicator", "before", "after", "change"], [
                [k, v["before"], v["after"], "" if v["change"] is None else v["change"]]
                for k, v in lc["indicators"].items()
            ]))
            parts.append("<h3>By lead department</h3>" + _table(
                ["department", "indicator", "before", "after", "change"],
                [[d, k, v["before"], v["after"], "" if v["change"] is None else v["change"]]
                 for d, moves in lc["by_department"].items() for k, v in moves.items()],
            ))
        changes = (lc or cr)["cases"]
        if changes:
            parts.append("<h3>Changed cases</h3>" + _table(
                ["row", "case", "changed", "before", "after"],
                [[c["row"], c["case_id"], ", ".join(c["changed"]),
                  json.dumps(c["before"], ensure_ascii=False, sort_keys=True),
                  json.dumps(c["after"], ensure_ascii=False, sort_keys=True)]
                 for c in changes[:200]],
            ))
    parts.append("</body></html>\n")
    return "\n".join(parts)
