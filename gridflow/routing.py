"""Route a case: validate it, match it on durable_rules, combine the hits into a decision."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import TypeAdapter, ValidationError

from gridflow.calendar import BusinessCalendar, Duration, parse_duration
from gridflow.compiler import CompiledRules, category_scope
from gridflow.conditions import (
    ADDRESS,
    CATEGORY,
    CHANNEL,
    DESCRIPTION,
    REPORTER,
    TIME_FIELDS,
    URGENCY,
    AllOf,
    Cond,
    Predicate,
    attr_field,
    describe,
    level_field,
    tests_of,
)
from gridflow.errors import (
    CaseValidationError,
    FieldError,
    RoutingError,
    field_errors,
    suggest,
)
from gridflow.history import CaseHistory, HistorySpec
from gridflow.registry import Registry
from gridflow.schema import CaseIn, Outcome

__all__ = [
    "ConditionSeen",
    "Decision",
    "Notification",
    "RouteRule",
    "Router",
    "RuleHit",
    "case_fact",
    "normalise_description",
    "validate_case",
]

_SPACE = re.compile(r"\s+")


def normalise_description(text: str) -> str:
    """The description as the rules see it: runs of white space as one space, trimmed."""
    return _SPACE.sub(" ", text).strip()


@dataclass(frozen=True)
class ConditionSeen:
    condition: str
    field: str
    seen: Any


@dataclass(frozen=True)
class RuleHit:
    table: str
    rule: str
    source: str  # file:line
    conditions: list[ConditionSeen]


@dataclass(frozen=True)
class Notification:
    kind: str  # "broadcast" | "department"
    target: str  # level or department id
    units: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Decision:
    """Where a case goes and why, under which policy version.

    A plain dataclass (built on the routing hot path); ``to_dict()`` gives the
    JSON-ready form used by the CLI, the store and replays.
    """

    case_id: str | None
    category: str
    urgency: str
    lead: str
    lead_name: str
    assist: list[str]
    tier: str
    unit: str | None
    time_limit: str | None
    due_at: datetime | None
    priority: int
    pool: str | None
    handler: str | None
    tags: list[str]
    notify: list[Notification]
    summon: list[str]
    rule: str  # matched rule id, or "default"
    source: str  # file:line of the primary rule (or of the default route)
    default: bool
    hits: list[RuleHit]
    policy_version: str

    def to_dict(self, *, json: bool = True, exclude: set[str] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = _DECISION.dump_python(
            self, mode="json" if json else "python", exclude=exclude
        )
        return out

    def model_dump(
        self, *, mode: str = "python", exclude: set[str] | None = None
    ) -> dict[str, Any]:
        """pydantic-style alias of :meth:`to_dict`."""
        return self.to_dict(json=mode == "json", exclude=exclude)

    def explain(self) -> list[str]:
        """Human-readable trace lines."""
        lines = []
        if self.default:
            lines.append(f"no rule matched; default route ({self.source})")
        for hit in self.hits:
            lines.append(f"matched {hit.table}/{hit.rule} at {hit.source}")
            for c in hit.conditions:
                lines.append(f"    {c.condition}  (seen: {c.seen!r})")
        lines.append(f"policy version {self.policy_version}")
        return lines


_DECISION: TypeAdapter[Decision] = TypeAdapter(Decision)


@dataclass(frozen=True)
class RouteRule:
    """A compiled rule's metadata: its outcome and where it was written."""

    table: str
    rule_id: str
    outcome: Outcome
    source: str
    cond: Cond


def validate_case(
    reg: Registry, data: CaseIn | Mapping[str, Any], *, source: str | None = None
) -> CaseIn:
    """Validate a case document against the schema and the policy's references; every
    bad field is reported at once (a schema error does not hide an unknown category)."""
    if isinstance(data, CaseIn):
        case = data
    else:
        if not isinstance(data, Mapping):
            raise CaseValidationError([FieldError("case", "expected a JSON object")], source=source)
        try:
            case = CaseIn.model_validate(dict(data))
        except ValidationError as exc:
            errors = field_errors(exc.errors())
            bad = {e.field.partition(".")[0] for e in errors}
            raw = {k: v for k, v in data.items() if k not in bad}
            attributes = raw.get("attributes")
            errors += _reference_errors(
                reg, raw.get("category"), raw.get("location"), raw.get("channel"),
                attributes if isinstance(attributes, Mapping) else {},
            )
            raise CaseValidationError(errors, source=source) from None
    errors = _reference_errors(reg, case.category, case.location, case.channel,
                               case.attributes)
    if errors:
        raise CaseValidationError(errors, source=source)
    return case


def _reference_errors(
    reg: Registry, category: Any, location: Any, channel: Any, attributes: Mapping[str, Any]
) -> list[FieldError]:
    """What the policy refuses in a case's references (values that are not strings were
    reported by the schema, or are absent)."""
    errors: list[FieldError] = []
    if isinstance(category, str) and category not in reg.categories:
        hint = suggest(category, reg.categories)
        errors.append(
            FieldError(
                "category",
                f"unknown category '{category}'" + (f" (did you mean '{hint}'?)" if hint else ""),
            )
        )
    if isinstance(location, str) and location not in reg.units:
        hint = suggest(location, reg.units)
        errors.append(
            FieldError(
                "location",
                f"unknown unit '{location}'" + (f" (did you mean '{hint}'?)" if hint else ""),
            )
        )
    if isinstance(channel, str) and channel not in reg.channels:
        hint = suggest(channel, reg.channels)
        errors.append(
            FieldError(
                "channel",
                f"unknown channel '{channel}'" + (f" (did you mean '{hint}'?)" if hint else
                                                  f" (allowed: {', '.join(reg.channels)})"),
            )
        )
    for name, value in attributes.items():
        kind = reg.attributes.get(name)
        if kind is None:
            hint = suggest(name, reg.attributes)
            errors.append(
                FieldError(
                    f"attributes.{name}",
                    "undeclared attribute" + (f" (did you mean '{hint}'?)" if hint else ""),
                )
            )
            continue
        ok = {
            "string": isinstance(value, str),
            "number": isinstance(value, int | float) and not isinstance(value, bool),
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "boolean": isinstance(value, bool),
        }[kind]
        if not ok:
            errors.append(FieldError(f"attributes.{name}", f"expected {kind}, got {value!r}"))
        elif reg.attribute_values.get(name) is not None and value not in (
            reg.attribute_values[name] or ()
        ):
            errors.append(FieldError(f"attributes.{name}", f"{value!r} is not an allowed value"))
    return errors


def case_fact(reg: Registry, calendar: BusinessCalendar, case: CaseIn) -> dict[str, Any]:
    """The flat fact the rules see (field names from :mod:`gridflow.conditions`)."""
    info = reg.categories[case.category]
    fact: dict[str, Any] = {
        CATEGORY: case.category,
        DESCRIPTION: normalise_description(case.description),
        CHANNEL: case.channel,
        URGENCY: case.urgency or info.urgency,
    }
    if case.address is not None:
        fact[ADDRESS] = normalise_description(case.address)
    if case.reporter is not None:
        fact[REPORTER] = case.reporter
    ancestry = reg.units[case.location].ancestry
    for i, level in enumerate(reg.levels):
        if level in ancestry:
            fact[level_field(i)] = ancestry[level]
    if case.reported_at is not None:
        local = case.reported_at.astimezone(calendar.timezone)
        day = local.date()
        fact[TIME_FIELDS["hour"]] = local.hour
        fact[TIME_FIELDS["weekday"]] = local.isoweekday()
        fact[TIME_FIELDS["weekend"]] = local.isoweekday() >= 6
        if calendar.covers(day):
            fact[TIME_FIELDS["workday"]] = calendar.is_workday(day)
            fact[TIME_FIELDS["holiday"]] = calendar.is_holiday(day)
            fact[TIME_FIELDS["working_hours"]] = calendar.is_working_time(local)
    for name, value in case.attributes.items():
        fact[attr_field(name)] = value
    return fact


_WORKDAY, _HOLIDAY, _WORKING = (TIME_FIELDS[n] for n in ("workday", "holiday", "working_hours"))
_CALENDAR_FIELDS = frozenset((_WORKDAY, _HOLIDAY, _WORKING))
# (workday, holiday, within working hours) as a day with holiday data can have them
_DAY_KINDS = ((True, False, True), (True, False, False), (False, True, False),
              (False, False, False))


def _history_specs(tests: Iterable[Predicate]) -> tuple[HistorySpec, ...]:
    """The distinct history conditions among ``tests``, in order."""
    specs = (HistorySpec.of_field(t.field) for t in tests)
    return tuple(dict.fromkeys(s for s in specs if s is not None))


def _pick_limit(spec: Any, urgency: str) -> str | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        return spec
    value = spec.get(urgency) or spec.get("normal")
    return str(value) if value is not None else None


class Router:
    """Decides routes for one compiled policy; immutable once built."""

    def __init__(
        self,
        registry: Registry,
        calendar: BusinessCalendar,
        compiled: CompiledRules,
        rules: Sequence[Sequence[RouteRule]],
        default: Outcome | None,
        default_source: str,
        default_time_limit: Any,
        version: str,
    ):
        self.registry = registry
        self.calendar = calendar
        self.compiled = compiled
        self.rules = [list(t) for t in rules]
        self.default = default
        self.default_source = default_source
        self.default_time_limit = default_time_limit
        self.version = version
        self._trace_shapes: dict[int, list[tuple[str, str, tuple[str, ...]]]] = {}
        self._combined: dict[tuple[Any, ...], Any] = {}
        self._calendar_tests: dict[str, bool] = {}
        self._history_tests: dict[str, tuple[HistorySpec, ...]] = {}
        #: the distinct history conditions of the policy (what a history must count)
        self.history_specs = _history_specs(self._tests())

    def validate(self, data: CaseIn | Mapping[str, Any], *, source: str | None = None) -> CaseIn:
        return validate_case(self.registry, data, source=source)

    def fact(self, case: CaseIn) -> dict[str, Any]:
        return case_fact(self.registry, self.calendar, case)

    def route(
        self,
        data: CaseIn | Mapping[str, Any],
        *,
        exclude: Sequence[str] = (),
        source: str | None = None,
        with_due: bool = True,
        trace: bool = True,
        history: CaseHistory | None = None,
    ) -> Decision:
        """Decide lead/assist/tier/deadline for a case.

        ``exclude`` lists departments that returned the case as misrouted: hits whose
        lead is excluded are skipped (the next hit, or the default, applies).
        ``with_due=False`` leaves ``due_at`` out (``None``): the engine dates the deadline
        from the dispatch, not from the report, and saves the calendar arithmetic.
        ``trace=False`` leaves out what each hit's conditions saw (``hits[i].conditions``
        is empty), for callers that keep only the matched rules.
        ``history`` counts the earlier cases for ``history`` conditions (an engine passes
        its store's; ``None``: no earlier case is known).
        """
        case = self.validate(data, source=source)
        fact = self.fact(case)
        if self.history_specs:
            fact.update(self.history_counts(case, history))
        if (case.reported_at is not None and _WORKDAY not in fact
                and self._tests_calendar(case.category)):
            per_table = self._without_holiday_data(case.reported_at, fact)
        else:
            per_table = self.compiled.match(fact)
        hits: list[RouteRule] = []
        for t_index, indexes in enumerate(per_table):
            for i in indexes:
                rule = self.rules[t_index][i]
                if rule.outcome.lead not in exclude:
                    hits.append(rule)
        return self._decide(case, fact, hits, with_due, trace)

    def _tests(self, category: str | None = None) -> Iterator[Predicate]:
        """The tests of the rules (of those that can match ``category``, if given)."""
        codes = sorted(self.registry.categories)
        for table in self.rules:
            for rule in table:
                if category is not None:
                    scope = category_scope(rule.cond, codes)
                    if scope is not None and category not in scope:
                        continue
                yield from tests_of(rule.cond)

    def _history_specs(self, category: str) -> tuple[HistorySpec, ...]:
        """The history conditions of the rules that can match ``category``."""
        found = self._history_tests.get(category)
        if found is None:
            found = self._history_tests[category] = _history_specs(self._tests(category))
        return found

    def history_counts(self, case: CaseIn, history: CaseHistory | None) -> dict[str, int]:
        """The fact fields of the history conditions that can apply to ``case``: the
        cases counted, this one included (``history=None``: no earlier case is known, the
        count is 1). A case without ``reported_at`` (or without a compared field, e.g. no
        address) gets none, so such conditions do not hold."""
        wanted = self._history_specs(case.category)
        before = case.reported_at
        if not wanted or before is None:
            return {}
        out: dict[str, int] = {}
        for spec in wanted:
            values = spec.values(case)
            if values is not None:
                out[spec.field] = 1 + (0 if history is None else history.count_reported(
                    spec.same, values, before - spec.window, before))
        return out

    def _tests_calendar(self, category: str) -> bool:
        """Whether a rule that can match ``category`` tests a field that needs the
        calendar's holiday data (workday, holiday, working hours)."""
        found = self._calendar_tests.get(category)
        if found is None:
            found = any(t.field in _CALENDAR_FIELDS for t in self._tests(category))
            self._calendar_tests[category] = found
        return found

    def _without_holiday_data(self, reported: datetime, fact: dict[str, Any]) -> list[list[int]]:
        """The hits of a case reported on a day the calendar has no holiday data for, when
        they are the same whatever that data would say (working day or not, holiday or
        not, within working hours or not); otherwise :class:`CalendarRangeError` — a
        rule would be decided on a guess."""
        found: list[list[int]] | None = None
        for workday, holiday, working in _DAY_KINDS:
            trial = {**fact, _WORKDAY: workday, _HOLIDAY: holiday, _WORKING: working}
            hits = self.compiled.match(trial)
            if found is None:
                found = hits
            elif hits != found:
                raise self.calendar.range_error(reported.astimezone(self.calendar.timezone).date())
        assert found is not None
        return found

    def _decide(
        self, case: CaseIn, fact: Mapping[str, Any], hits: list[RouteRule], with_due: bool = True,
        trace: bool = True,
    ) -> Decision:
        reg = self.registry
        info = reg.categories[case.category]
        urgency = str(fact[URGENCY])
        default = not hits
        if default:
            if self.default is None:
                raise RoutingError(
                    f"no rule matched category {case.category} and the policy declares no "
                    "default route"
                )
            primary = self.default
            rule_id, source = "default", self.default_source
        else:
            primary = hits[0].outcome
            rule_id, source = hits[0].rule_id, hits[0].source
        key = (tuple(id(h) for h in hits), case.category, urgency)
        combined = self._combined.get(key)
        if combined is None:
            combined = self._combined[key] = self._combine(primary, hits, default, info, urgency)
        assist, tags, summon, notify_specs, tier, limit, priority = combined
        due_at = None
        if with_due and limit is not None and case.reported_at is not None:
            due_at = self.calendar.add(case.reported_at, limit)
        notifications = []
        for spec in notify_specs:
            if spec.department:
                notifications.append(
                    Notification(kind="department", target=spec.department, units=[])
                )
            if spec.broadcast:
                within = spec.within
                anchor = reg.units[case.location].ancestry.get(within) if within else None
                units = (
                    reg.descendants_at(anchor, spec.broadcast)
                    if anchor
                    else reg.units_at(spec.broadcast)
                )
                notifications.append(
                    Notification(kind="broadcast", target=spec.broadcast, units=list(units))
                )
        return Decision(
            case_id=case.id,
            category=case.category,
            urgency=urgency,
            lead=primary.lead,
            lead_name=reg.departments[primary.lead].name,
            assist=list(assist),
            tier=tier,
            unit=reg.unit_for_tier(case.location, tier),
            time_limit=str(limit) if limit else None,
            due_at=due_at,
            priority=priority,
            pool=primary.pool,
            handler=primary.handler,
            tags=list(tags),
            notify=notifications,
            summon=list(summon),
            rule=rule_id,
            source=source,
            default=default,
            hits=[self._trace(h, fact) if trace else RuleHit(h.table, h.rule_id, h.source, [])
                  for h in hits],
            policy_version=self.version,
        )

    def _combine(
        self, primary: Outcome, hits: list[RouteRule], default: bool, info: Any, urgency: str
    ) -> tuple[list[str], list[str], list[str], list[Any], str, Duration | None, int]:
        """The case-independent part of a decision (memoised per hit combination)."""
        reg = self.registry
        assist: list[str] = []
        tags: list[str] = []
        summon: list[str] = []
        notify_specs: list[Any] = []
        for outcome in [primary, *(h.outcome for h in hits[1:])]:
            for dept in ([outcome.lead] if outcome is not primary else []) + list(outcome.assist):
                if dept != primary.lead and dept not in assist:
                    assist.append(dept)
            tags += [t for t in outcome.tags if t not in tags]
            summon += [d for d in outcome.summon if d not in summon]
            notify_specs += list(outcome.notify)
        tier = primary.tier or reg.departments[primary.lead].tier
        limit_text = (
            (None if default else _pick_limit(primary.time_limit, urgency))
            or _pick_limit(info.time_limit, urgency)
            or _pick_limit(self.default.time_limit if self.default else None, urgency)
            or _pick_limit(self.default_time_limit, urgency)
        )
        limit = parse_duration(limit_text) if limit_text else None
        priority = primary.priority or min((h.outcome.priority or 5 for h in hits), default=5)
        return assist, tags, summon, notify_specs, tier, limit, priority

    def _trace(self, rule: RouteRule, fact: Mapping[str, Any]) -> RuleHit:
        """One line per top-level condition; an ``any`` group is shown whole."""
        shape = self._trace_shapes.get(id(rule))
        if shape is None:
            shape = self._trace_shapes[id(rule)] = _trace_shape(rule.cond)
        seen = []
        for condition, label, fields in shape:
            values = [fact.get(f) for f in fields]
            seen.append(
                ConditionSeen(
                    condition=condition, field=label, seen=values[0] if len(values) == 1 else values
                )
            )
        return RuleHit(table=rule.table, rule=rule.rule_id, source=rule.source, conditions=seen)


def _trace_shape(cond: Cond) -> list[tuple[str, str, tuple[str, ...]]]:
    items = cond.items if isinstance(cond, AllOf) else (cond,)
    out = []
    for item in items:
        tests = tests_of(item)
        out.append(
            (
                str(item) if isinstance(item, Predicate) else describe(item),
                ", ".join(dict.fromkeys(t.label for t in tests)),
                tuple(dict.fromkeys(t.field for t in tests)),
            )
        )
    return out

