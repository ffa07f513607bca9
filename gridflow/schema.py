"""Pydantic models of rule files and of the case document.

A policy directory is a set of YAML files; every file has the shape of
:class:`PolicyFile` (each top-level section optional) so files can be split by
concern however the policy staff like. ``gridflow schema`` prints the JSON Schema
of :class:`PolicyFile` for editor completion. Cross-file references (departments,
units, tiers, categories) are checked by :mod:`gridflow.loader`, not here.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
)

from gridflow.calendar import parse_duration
from gridflow.errors import IDENT_PATTERN

__all__ = [
    "AppealWindow",
    "AppealsSpec",
    "AttributeDef",
    "CalendarSpec",
    "CaseIn",
    "Category",
    "Department",
    "DurationText",
    "EscalationSpec",
    "EvaluationSpec",
    "Expectation",
    "HolidaySpan",
    "Level",
    "Match",
    "Notify",
    "Organisation",
    "Outcome",
    "PolicyFile",
    "PolicyMeta",
    "Pool",
    "Routing",
    "Rule",
    "RuleTest",
    "ScoringSpec",
    "SupervisionSpec",
    "Table",
    "Unit",
    "Urgency",
    "When",
    "WhenTime",
    "WorkflowSpec",
    "YearSpec",
]

Ident = Annotated[
    str,
    StringConstraints(pattern=IDENT_PATTERN, max_length=64),
    Field(description="identifier: a letter, then letters, digits, '_' or '-'"),
]
Code = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$", max_length=32),
    Field(description="category code, e.g. E01-10"),
]
AttrName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$", max_length=48)]
Urgency = Literal["normal", "urgent", "emergency"]
Scalar = StrictBool | StrictInt | StrictFloat | str


def _check_duration(text: str) -> str:
    parse_duration(text)
    return text


DurationText = Annotated[
    str,
    AfterValidator(_check_duration),
    Field(description="e.g. '4wh' (working hours), '20wd' (working days), '6h', '30m', '2d'"),
]
TimeLimit = DurationText | dict[Urgency, DurationText]
Clock = Annotated[str, StringConstraints(pattern=r"^\d{1,2}:\d{2}-\d{1,2}:\d{2}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --- policy meta and organisation -------------------------------------------------------


class PolicyMeta(Strict):
    """Name of the policy and settings that apply everywhere."""

    name: str
    description: str | None = None
    default_time_limit: TimeLimit | None = Field(
        None, description="used when neither rule, category nor default route sets one"
    )
    channels: list[Ident] | None = Field(
        None,
        description="allowed case channels (default: patrol, hotline, app, video, "
        "wechat, media, other)",
    )
    max_rules_per_ruleset: int = Field(
        256, ge=16, le=500, description="shard size for the rules engine (it hangs above 512)"
    )


class Level(Strict):
    id: Ident
    name: str | None = None


class Unit(Strict):
    id: Ident
    name: str
    level: Ident
    children: list[Unit] = Field(default_factory=list)
    households: int | None = Field(None, ge=0)


class Organisation(Strict):
    name: str | None = None
    timezone: str = "Asia/Shanghai"
    levels: list[Level] = Field(description="hierarchy levels, top (district) to bottom (grid)")
    tiers: list[Ident] | None = Field(
        None, description="escalation tiers, lowest first; default: the levels bottom-up"
    )
    units: list[Unit]


class Pool(Strict):
    id: Ident
    name: str | None = None


class Handler(Strict):
    id: Ident = Field(description="the handler's actor id in the host platform")
    name: str | None = None


class Department(Strict):
    id: Ident
    name: str
    name_en: str | None = None
    tier: Ident
    unit: Ident | None = Field(None, description="the unit the department belongs to")
    pools: list[Pool] = Field(default_factory=list)
    handlers: list[Handler] = Field(
        default_factory=list, description="named handlers a rule may assign cases to"
    )


class Category(Strict):
    code: Code
    name: str
    name_en: str | None = None
    kind: str | None = Field(None, description="e.g. 部件 component, 事件 event, 服务 service")
    urgency: Urgency | None = Field(None, description="default urgency (inherited)")
    time_limit: TimeLimit | None = Field(None, description="default time limit (inherited)")
    children: list[Category] = Field(default_factory=list)


class AttributeDef(Strict):
    name: AttrName
    type: Literal["string", "number", "integer", "boolean"]
    description: str | None = None
    values: list[Scalar] | None = Field(None, description="allowed values, if restricted")


# --- calendar ---------------------------------------------------------------------------


class HolidaySpan(Strict):
    name: str
    start: dt.date = Field(alias="from")
    end: dt.date | None = Field(None, alias="to")


class YearSpec(Strict):
    holidays: list[HolidaySpan] = Field(default_factory=list)
    workdays: list[dt.date] = Field(default_factory=list, description="make-up workdays 调休")
    note: str | None = None


class CalendarSpec(Strict):
    working_hours: list[Clock] = Field(
        default_factory=lambda: ["08:30-12:00", "13:30-17:30"],
        description="working periods of a workday, e.g. ['08:30-12:00', '13:30-17:30']",
    )
    years: dict[int, YearSpec] = Field(
        default_factory=dict,
        description="holiday data for years chinese-calendar does not cover (2027+)",
    )
    closures: list[dt.date] = Field(default_factory=list, description="local closure days")


# --- routing ----------------------------------------------------------------------------


class Match(Strict):
    """Operators on one field; several operators on a field must all hold."""

    eq: Scalar | None = None
    ne: Scalar | None = None
    in_: list[Scalar] | None = Field(None, alias="in")
    not_in: list[Scalar] | None = None
    lt: StrictInt | StrictFloat | None = None
    lte: StrictInt | StrictFloat | None = None
    gt: StrictInt | StrictFloat | None = None
    gte: StrictInt | StrictFloat | None = None
    prefix: str | list[str] | None = None
    contains: str | None = None
    contains_any: list[str] | None = None
    regex: str | None = None


FieldCond = Scalar | list[Scalar] | Match


class WhenTime(Strict):
    """Conditions on the time of report (on the policy's business calendar)."""

    working_hours: StrictBool | None = None
    workday: StrictBool | None = None
    weekend: StrictBool | None = None
    holiday: StrictBool | None = None
    hour: StrictInt | list[StrictInt] | Match | None = None
    weekday: StrictInt | list[StrictInt] | Match | None = Field(
        None, description="1 = Monday … 7 = Sunday"
    )


HistoryField = Literal["category", "location", "address", "reporter"]


def _same_category_and_address() -> list[HistoryField]:
    return ["category", "address"]


class WhenHistory(Strict):
    """At least ``at_least`` cases (this one included) reported ``within`` the time
    before it that share its ``same`` fields."""

    same: list[HistoryField] = Field(
        default_factory=_same_category_and_address, min_length=1,
        description="case fields the earlier cases share with this one",
    )
    within: DurationText = Field(description="calendar time before the report: 30d, 72h")
    at_least: StrictInt = Field(ge=2, description="cases counted, this one included")


class When(Strict):
    """All present conditions must hold (AND); ``any`` holds when one branch holds."""

    category: FieldCond | None = None
    description: str | list[str] | Match | None = Field(
        None, description="a string: contains it; a list: contains any of them"
    )
    address: str | list[str] | Match | None = Field(
        None, description="a string: contains it; a list: contains any of them"
    )
    reporter: str | list[str] | Match | None = Field(
        None, description="a string: equals it; a list: one of them"
    )
    channel: FieldCond | None = None
    urgency: FieldCond | None = None
    location: dict[Ident, Ident | list[Ident]] | None = Field(
        None, description="level → unit id(s), e.g. {community: qdj}"
    )
    reported: WhenTime | None = None
    attributes: dict[AttrName, FieldCond] | None = None
    history: WhenHistory | None = None
    any: list[When] | None = None


class Notify(Strict):
    broadcast: Ident | None = Field(None, description="level whose units are notified, e.g. grid")
    within: Ident | None = Field(None, description="level of the case's ancestor to broadcast in")
    department: Ident | None = None


class Outcome(Strict):
    lead: Ident
    assist: list[Ident] = Field(default_factory=list)
    tier: Ident | None = Field(None, description="default: the lead department's tier")
    time_limit: TimeLimit | None = None
    priority: int | None = Field(None, ge=1, le=9, description="1 = highest")
    pool: Ident | None = None
    handler: Ident | None = Field(
        None, description="a named handler of the lead department (指定处置人), not with pool"
    )
    tags: list[str] = Field(default_factory=list)
    notify: list[Notify] = Field(default_factory=list)
    summon: list[Ident] = Field(
        default_factory=list, description="departments summoned for joint handling (吹哨报到)"
    )


class Rule(Strict):
    id: Ident
    description: str | None = None
    when: When
    then: Outcome
    enabled: bool = True


class Table(Strict):
    id: Ident
    description: str | None = None
    hit: Literal["first", "unique", "collect"]
    rules: list[Rule]


class Routing(Strict):
    default: Outcome | None = Field(None, description="route for cases no rule matches")
    tables: list[Table] = Field(default_factory=list)


# --- cases and rule tests ---------------------------------------------------------------


class CaseIn(BaseModel):
    """A case as a host or a JSON file submits it (see docs/cases.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    category: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    location: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    description: Annotated[str, StringConstraints(max_length=4000)] = ""
    channel: str = "patrol"
    urgency: Urgency | None = None
    reported_at: AwareDatetime | None = None
    reporter: Annotated[str, StringConstraints(max_length=128)] | None = None
    address: Annotated[str, StringConstraints(max_length=255)] | None = None
    attributes: dict[str, Scalar] = Field(default_factory=dict)


class Expectation(Strict):
    lead: Ident | None = None
    tier: Ident | None = None
    assist: list[Ident] | None = None
    rule: str | None = Field(None, description="matched rule id, or 'default'")
    pool: Ident | None = None
    handler: Ident | None = None
    priority: int | None = None
    time_limit: str | None = None
    due_at: AwareDatetime | None = None
    tags: list[str] | None = None
    summon: list[Ident] | None = None
    unit: Ident | None = None
    urgency: Urgency | None = None
    notify: list[Ident] | None = Field(None, description="units that are notified (broadcast)")


class RuleTest(Strict):
    name: str
    case: dict[str, Any]
    earlier: list[dict[str, Any]] = Field(
        default_factory=list, description="cases reported before it (for history conditions)"
    )
    expect: Expectation


# --- life cycle: workflow roles, supervision, escalation, appeals -------------------------


class WorkflowSpec(Strict):
    roles: dict[str, list[str]] = Field(
        default_factory=dict, description="trigger → roles allowed to fire it (overrides)"
    )


class SupervisionSpec(Strict):
    warn_at: float = Field(0.8, gt=0, lt=1, description="share of the time limit that warns")


class EscalationSpec(Strict):
    path: dict[Ident, Ident] | None = Field(
        None, description="tier → the tier above it; default: the tiers in order"
    )
    on_overdue: list[Ident] = Field(
        default_factory=list, description="tiers at which an overdue case escalates one tier up"
    )
    after_returns: int = Field(2, ge=1, description="returned by this many departments → escalate")
    after_rework: int = Field(2, ge=1, description="reworked this many times → escalate")
    summon_at: list[Ident] = Field(
        default_factory=lambda: ["street"], description="tiers that may summon departments"
    )


class AppealWindow(Strict):
    window: DurationText = Field(description="how long after the event the appeal may be filed")


class AppealsSpec(Strict):
    routing: AppealWindow = AppealWindow(window="2wd")
    score: AppealWindow = AppealWindow(window="5wd")
    resident: AppealWindow = AppealWindow(window="7d")


class EvaluationSpec(Strict):
    reopen_window: DurationText = Field("7d", description="a resident may reopen within this")


# --- scoring ------------------------------------------------------------------------------

Criterion = Literal["timeliness", "resolution", "quality", "satisfaction"]


_DEFAULT_WEIGHTS: dict[Criterion, float] = {
    "timeliness": 30.0, "resolution": 30.0, "quality": 20.0, "satisfaction": 20.0}


class CurvePoint(Strict):
    x: float = Field(ge=0, description="input of the curve (e.g. overdue share, rework count)")
    score: float = Field(ge=0, le=1)


class ScoringSpec(Strict):
    """How closed cases are scored (BRIEF §8); validated by gridflow.scoring."""

    weights: dict[Criterion, float] = Field(
        default_factory=lambda: _DEFAULT_WEIGHTS.copy(),
        description="criterion → weight; the weights must sum to 100",
    )
    timeliness_curve: list[CurvePoint] = Field(
        default_factory=lambda: [CurvePoint(x=0, score=1), CurvePoint(x=1, score=0)],
        description="overdue share (overdue working time / limit) → score, non-increasing",
    )
    rework_curve: list[CurvePoint] = Field(
        default_factory=lambda: [CurvePoint(x=0, score=1), CurvePoint(x=1, score=0.7),
                                 CurvePoint(x=2, score=0.4), CurvePoint(x=3, score=0)],
        description="number of reworks → quality score, non-increasing",
    )
    resolution: dict[str, float] = Field(
        default_factory=lambda: {"normal": 1.0, "deferred": 0.6, "special": 0.8},
        description="how the case was closed → resolution score",
    )
    satisfaction: dict[str, float] = Field(
        default_factory=lambda: {
            "satisfied": 1.0, "basically_satisfied": 0.9, "dissatisfied": 0.0},
        description="callback answer → satisfaction score",
    )
    score_assisting: bool = Field(False, description="also score assisting departments")
    score_reporter: bool = Field(True, description="score the reporting grid worker")
    rankings: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {
            "grid_workers": {"period": "week", "top": 5},
            "cases": {"period": "month", "top": 10},
            "departments": {"period": "month", "top": 0},
        },
        description="ranking name → {period: day|week|month|quarter|year, top: N (0 = all)}",
    )


class PolicyFile(Strict):
    """One rule file. Lists (departments, categories, tables, tests…) from several
    files are concatenated; single sections (policy, organisation, calendar,
    routing.default) may appear in one file only."""

    policy: PolicyMeta | None = None
    organisation: Organisation | None = None
    departments: list[Department] | None = None
    categories: list[Category] | None = None
    attributes: list[AttributeDef] | None = None
    calendar: CalendarSpec | None = None
    routing: Routing | None = None
    tests: list[RuleTest] | None = None
    workflow: WorkflowSpec | None = None
    supervision: SupervisionSpec | None = None
    escalation: EscalationSpec | None = None
    appeals: AppealsSpec | None = None
    evaluation: EvaluationSpec | None = None
    scoring: ScoringSpec | None = None
