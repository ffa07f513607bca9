"""An independent reference of the routing semantics, in plain Python (tests only).

It reads the *rule-file models* (not the compiler's intermediate form) and the
case itself, so a bug in lowering, compiling or sharding shows up as a difference
with what gridflow decides through durable_rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gridflow.policy import Policy
from gridflow.schema import CaseIn, Match, When, WhenTime


@dataclass
class RefDecision:
    hits: list[tuple[str, str]]  # (table, rule)
    lead: str
    assist: list[str]
    tier: str
    rule: str
    tags: list[str]
    summon: list[str]
    error: str | None = None


class _Missing:
    pass


MISSING = _Missing()


def _op(op: str, seen: Any, value: Any) -> bool:
    if seen is MISSING:
        return False
    if op == "eq":
        return bool(seen == value)
    if op == "ne":
        return not _op("eq", seen, value)
    if op == "in":
        return any(_op("eq", seen, v) for v in value)
    if op == "not_in":
        return not _op("in", seen, value)
    if op in ("lt", "lte", "gt", "gte"):
        return bool(
            {"lt": seen < value, "lte": seen <= value, "gt": seen > value, "gte": seen >= value}[op]
        )
    if op == "prefix":
        prefixes = value if isinstance(value, list) else [value]
        return any(str(seen).startswith(p) for p in prefixes)
    if op == "contains":
        return value in seen
    if op == "contains_any":
        return any(v in seen for v in value)
    if op == "regex":
        return re.search(value, seen, re.ASCII) is not None
    raise AssertionError(op)


def _field(cond: Any, seen: Any, scalar: str = "eq", listed: str = "in") -> bool:
    if isinstance(cond, Match):
        ops = {k: v for k, v in cond.model_dump(by_alias=True).items() if v is not None}
        return all(_op(op, seen, v) for op, v in ops.items())
    if isinstance(cond, list):
        return _op(listed, seen, cond)
    return _op(scalar, seen, cond)


# (workday, holiday, within working hours): what a day with holiday data can be
DAY_KINDS = ((True, False, True), (True, False, False), (False, True, False), (False, False, False))
Kind = tuple[bool, bool, bool] | None


def _reported(rep: WhenTime, policy: Policy, case: CaseIn, kind: Kind = None) -> bool:
    if case.reported_at is None:
        return all(getattr(rep, k) is None for k in WhenTime.model_fields)
    cal = policy.calendar
    local = case.reported_at.astimezone(cal.timezone)
    day = local.date()
    covered = cal.covers(day)
    values = {
        "working_hours": cal.is_working_time(local) if covered else kind[2] if kind else MISSING,
        "workday": cal.is_workday(day) if covered else kind[0] if kind else MISSING,
        "weekend": local.isoweekday() >= 6,
        "holiday": cal.is_holiday(day) if covered else kind[1] if kind else MISSING,
        "hour": local.hour,
        "weekday": local.isoweekday(),
    }
    for key in WhenTime.model_fields:
        cond = getattr(rep, key)
        if cond is not None and not _field(cond, values[key]):
            return False
    return True


def matches(when: When, policy: Policy, case: CaseIn, kind: Kind = None) -> bool:
    reg = policy.registry
    description = " ".join(case.description.split())
    if when.category is not None and not _field(when.category, case.category):
        return False
    if when.description is not None and not _field(
        when.description, description, scalar="contains", listed="contains_any"
    ):
        return False
    address = MISSING if case.address is None else " ".join(case.address.split())
    if when.address is not None and not _field(
        when.address, address, scalar="contains", listed="contains_any"
    ):
        return False
    reporter = MISSING if case.reporter is None else case.reporter
    if when.reporter is not None and not _field(when.reporter, reporter):
        return False
    if when.channel is not None and not _field(when.channel, case.channel):
        return False
    urgency = case.urgency or reg.categories[case.category].urgency
    if when.urgency is not None and not _field(when.urgency, urgency):
        return False
    if when.location is not None:
        ancestry = reg.units[case.location].ancestry
        for level, units in when.location.items():
            if not _field(units, ancestry.get(level, MISSING)):
                return False
    if when.reported is not None and not _reported(when.reported, policy, case, kind):
        return False
    if when.attributes is not None:
        for name, cond in when.attributes.items():
            if not _field(cond, case.attributes.get(name, MISSING)):
                return False
    return not (when.any is not None
                and not any(matches(w, policy, case, kind) for w in when.any))


def reference_route(policy: Policy, tables: list[Any], default: Any, case: CaseIn) -> RefDecision:
    """Decide as docs/rule-files.md says, table by table, rule by rule. On a day without
    holiday data: the decision every kind of day would give, or the error "calendar"
    when they differ."""
    cal = policy.calendar
    if case.reported_at is None or cal.covers(case.reported_at.astimezone(cal.timezone).date()):
        return _route(policy, tables, default, case, None)
    each = [_route(policy, tables, default, case, kind) for kind in DAY_KINDS]
    if any(d != each[0] for d in each):
        return RefDecision([], "", [], "", "", [], [], error="calendar")
    return each[0]


def _route(policy: Policy, tables: list[Any], default: Any, case: CaseIn,
           kind: Kind) -> RefDecision:
    hits: list[tuple[str, Any]] = []
    for table in tables:
        matched = [r for r in table.rules if r.enabled and matches(r.when, policy, case, kind)]
        if table.hit == "first":
            matched = matched[:1]
        elif table.hit == "unique" and len(matched) > 1:
            return RefDecision([], "", [], "", "", [], [], error="unique")
        hits += [(table.id, r) for r in matched]
    if hits:
        primary, rule_id = hits[0][1].then, hits[0][1].id
    else:
        primary, rule_id = default, "default"
    assist: list[str] = []
    tags: list[str] = []
    summon: list[str] = []
    outcomes = [primary] + [r.then for _, r in hits[1:]]
    for i, o in enumerate(outcomes):
        for d in ([o.lead] if i else []) + list(o.assist):
            if d != primary.lead and d not in assist:
                assist.append(d)
        tags += [t for t in o.tags if t not in tags]
        summon += [d for d in o.summon if d not in summon]
    tier = primary.tier or policy.registry.departments[primary.lead].tier
    return RefDecision(
        [(t, r.id) for t, r in hits], primary.lead, assist, tier, rule_id, tags, summon
    )
