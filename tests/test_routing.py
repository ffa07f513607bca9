"""Routing through durable_rules agrees with the plain-Python reference, case by case."""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from gridflow import CaseValidationError, DefinitionError, Engine, RoutingError, load_policy
from gridflow.errors import CalendarRangeError
from gridflow.policy import Policy
from gridflow.schema import CaseIn, PolicyFile
from tests import strategies as gs
from tests.reference import reference_route


def _load(content: dict[str, Any], tmp: Path) -> Policy:
    (tmp / "policy.yaml").write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return load_policy(tmp, strict=False)


def _policy(name: str, tables: list[dict[str, Any]]) -> dict[str, Any]:
    """A one-file policy over the generated organisation, departments and categories."""
    return {
        "policy": {"name": name},
        "organisation": gs.ORGANISATION,
        "departments": gs.DEPARTMENTS,
        "categories": gs.CATEGORIES,
        "attributes": gs.ATTRIBUTES,
        "routing": {"default": {"lead": "centre", "time_limit": "1wd"}, "tables": tables},
    }


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=gs.policies(), cases=st.lists(gs.cases(), min_size=1, max_size=12))
def test_durable_rules_path_equals_reference(
    policy: dict[str, Any], cases: list[dict[str, Any]]
) -> None:
    model = PolicyFile.model_validate(policy)
    assert model.routing is not None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            compiled = _load(policy, Path(tmp))
        except DefinitionError as exc:
            # the engine limits the size of one rule's expansion; refused at load, located
            assert all("too complex" in p.message for p in exc.errors), str(exc)
            reject()
        for raw in cases:
            case = CaseIn.model_validate(raw)
            want = reference_route(compiled, model.routing.tables, model.routing.default, case)
            if want.error == "unique":
                with pytest.raises(RoutingError):
                    compiled.route(raw)
                continue
            if want.error == "calendar":
                with pytest.raises(CalendarRangeError):
                    compiled.router.route(raw, with_due=False)
                continue
            try:
                got = compiled.route(raw)
                dated = True
            except CalendarRangeError:  # the deadline falls where the calendar has no data
                assert not compiled.calendar.covers(case.reported_at.date())  # type: ignore
                got, dated = compiled.router.route(raw, with_due=False), False
            assert [(h.table, h.rule) for h in got.hits] == want.hits, raw
            assert (got.lead, got.tier, got.rule) == (want.lead, want.tier, want.rule)
            assert got.assist == want.assist
            assert got.tags == want.tags
            assert got.summon == want.summon
            assert got.default == (want.rule == "default")
            assert got.policy_version == compiled.version
            # without the trace: the same decision, hits without what their conditions saw
            untraced = compiled.router.route(raw, trace=False, with_due=dated)
            assert untraced == replace(got, hits=[replace(h, conditions=[]) for h in got.hits])
            # what the engine keeps of it: the JSON form, same keys in the same order
            kept = Engine._decision_data(got, "2026-01-05T09:00:00+00:00")
            want_kept = {**got.to_dict(exclude={"hits", "due_at", "case_id"}),
                         "matched": [h.rule for h in got.hits],
                         "due_at": "2026-01-05T09:00:00+00:00"}
            assert json.dumps(kept) == json.dumps(want_kept)


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    content = _policy("mini", [
        {
            "id": "main",
            "hit": "first",
            "rules": [
                {
                    "id": "sidewalk",
                    "when": {"category": "E04-06"},
                    "then": {"lead": "grid-team", "pool": "p1", "time_limit": "2wh"},
                },
                {
                    "id": "missing",
                    "when": {"category": "S01-01", "description": "走失"},
                    "then": {
                        "lead": "centre",
                        "notify": [{"broadcast": "grid", "within": "street"}],
                    },
                },
                {
                    "id": "garbage",
                    "when": {"category": "E01-10"},
                    "then": {"lead": "sanitation", "tier": "street"},
                },
            ],
        },
        {
            "id": "co",
            "hit": "collect",
            "rules": [
                {
                    "id": "needy",
                    "when": {"attributes": {"needy": True}},
                    "then": {"lead": "civil-affairs", "tags": ["needy"]},
                },
            ],
        },
    ])
    return _load(content, tmp_path_factory.mktemp("mini"))


@pytest.mark.parametrize(
    ("case", "routed"),
    [
        # the after-hours rule cannot match a normal case: routed without holiday data
        ({"urgency": "normal"}, "garbage"),
        # an urgent case hits it or not depending on data the calendar lacks: refused
        ({"urgency": "urgent"}, None),
        # a category no calendar-testing rule can match is never in question
        ({"category": "E04-06", "urgency": "urgent"}, "sidewalk"),
    ],
)
def test_rules_on_working_time_are_not_guessed_without_holiday_data(
    tmp_path: Path, case: dict[str, Any], routed: str | None
) -> None:
    content = {
        "policy": {"name": "after-hours"},
        "organisation": gs.ORGANISATION, "departments": gs.DEPARTMENTS,
        "categories": gs.CATEGORIES, "attributes": gs.ATTRIBUTES,
        "routing": {"default": {"lead": "centre", "time_limit": "6h"}, "tables": [
            {"id": "main", "hit": "first", "rules": [
                {"id": "after-hours", "when": {"category": "E01-10", "urgency": "urgent",
                                               "reported": {"working_hours": False}},
                 "then": {"lead": "centre", "time_limit": "6h"}},
                {"id": "garbage", "when": {"category": "E01-10"},
                 "then": {"lead": "sanitation", "time_limit": "6h"}},
                {"id": "sidewalk", "when": {"category": "E04-06"},
                 "then": {"lead": "grid-team", "time_limit": "6h"}},
            ]},
        ]},
    }
    policy = _load(content, tmp_path)
    doc = {"category": "E01-10", "location": "g1",
           "reported_at": "2031-05-06T20:00:00+08:00", **case}
    assert not policy.calendar.covers(datetime(2031, 5, 6).date())
    if routed is None:
        with pytest.raises(CalendarRangeError, match="no holiday data for 2031-05-06"):
            policy.route(doc)
    else:
        assert policy.route(doc).rule == routed
    # in a covered year the rule is decided by the calendar (20:00 is after hours)
    covered = policy.route({**doc, "reported_at": "2026-05-06T20:00:00+08:00"})
    assert covered.rule == ("after-hours" if case.get("urgency") == "urgent"
                            and doc["category"] == "E01-10" else routed)


def test_decision_carries_trace_deadline_and_version(mini: Policy) -> None:
    d = mini.route(
        {
            "id": "c-1",
            "category": "E04-06",
            "location": "g3",
            "reported_at": "2026-03-09T16:30:00+08:00",
        }
    )
    assert (d.lead, d.tier, d.unit, d.pool, d.rule) == ("grid-team", "grid", "g3", "p1", "sidewalk")
    assert d.time_limit == "2wh"
    # 16:30 + 1 h of Monday, + 1 h from 08:30 Tuesday
    assert d.due_at is not None
    assert d.due_at.isoformat() == "2026-03-10T09:30:00+08:00"
    assert d.source.endswith("policy.yaml:1")
    assert d.hits[0].conditions[0].seen == "E04-06"
    assert d.policy_version == mini.version


def test_collect_table_adds_assisting_departments(mini: Policy) -> None:
    d = mini.route({"category": "E01-10", "location": "g1", "attributes": {"needy": True}})
    assert d.lead == "sanitation"
    assert d.assist == ["civil-affairs"]
    assert d.tags == ["needy"]
    assert [h.rule for h in d.hits] == ["garbage", "needy"]


def test_unmatched_case_gets_default_with_trace(mini: Policy) -> None:
    d = mini.route({"category": "E01-01", "location": "g2"})
    assert d.default and d.rule == "default" and d.lead == "centre"
    assert d.explain()[0].startswith("no rule matched; default route")
    assert d.time_limit == "1wd"


def test_category_time_limit_is_inherited_when_rule_sets_none(mini: Policy) -> None:
    d = mini.route({"category": "E01-10", "location": "g1"})
    assert d.time_limit == "4wh"


def test_broadcast_reaches_every_grid_of_the_street(mini: Policy) -> None:
    d = mini.route({"category": "S01-01", "location": "g2", "description": "老人走失"})
    assert d.notify[0].units == ["g1", "g2", "g3", "g4"]


def test_broadcast_stays_within_the_case_s_own_unit(tmp_path: Path) -> None:
    """With two streets, ``within: street`` reaches the grids of the case's street only;
    ``within: community`` those of its community; no ``within``, every grid."""
    org = copy.deepcopy(gs.ORGANISATION)
    org["units"][0]["children"].append({
        "id": "s2", "name": "丁堰街道", "level": "street", "children": [
            {"id": "c3", "name": "东方社区", "level": "community", "children": [
                {"id": "g5", "name": "第五网格", "level": "grid"},
                {"id": "g6", "name": "第六网格", "level": "grid"}]}]})
    content = _policy("two-streets", [{"id": "main", "hit": "collect", "rules": [
        {"id": f"to-{within or 'all'}", "when": {"category": "S01-01"},
         "then": {"lead": "centre", "notify": [
             {"broadcast": "grid", **({"within": within} if within else {})}]}}
        for within in ("street", "community", None)]}])
    content["organisation"] = org
    policy = _load(content, tmp_path)

    def reached(location: str) -> list[list[str]]:
        d = policy.route({"category": "S01-01", "location": location, "description": "走失"})
        return [n.units for n in d.notify]

    everywhere = ["g1", "g2", "g3", "g4", "g5", "g6"]
    assert reached("g2") == [["g1", "g2", "g3", "g4"], ["g1", "g2"], everywhere]
    assert reached("g3") == [["g1", "g2", "g3", "g4"], ["g3", "g4"], everywhere]
    assert reached("g6") == [["g5", "g6"], ["g5", "g6"], everywhere]


@pytest.mark.parametrize("case", [
    {"category": "S01-01", "location": "g2", "description": "老人走失"},  # broadcast notify
    {"category": "E04-06", "location": "g3"},
    {"category": "E01-10", "location": "g1"},
])
def test_the_engine_keeps_the_json_form_of_a_decision(mini: Policy, case: dict[str, Any]
                                                       ) -> None:
    """Engine._decision_data builds by hand what the decision's serializer gives."""
    d = mini.route(case)
    want = {**d.to_dict(exclude={"hits", "due_at", "case_id"}),
            "matched": [h.rule for h in d.hits], "due_at": None}
    assert json.dumps(Engine._decision_data(d, None), ensure_ascii=False) == json.dumps(
        want, ensure_ascii=False)


def test_exclude_skips_departments_that_returned_the_case(mini: Policy) -> None:
    d = mini.route({"category": "E04-06", "location": "g3"}, exclude=["grid-team"])
    assert d.default and d.lead == "centre"


@pytest.mark.parametrize(
    ("case", "fields"),
    [
        ({"location": "g1"}, ["category"]),
        ({"category": "E01-10"}, ["location"]),
        ({"category": "E01-1O", "location": "g1"}, ["category"]),
        ({"category": "E01-10", "location": "g9"}, ["location"]),
        (
            {"category": "E01-10", "location": "g1", "attributes": {"households": "many"}},
            ["attributes.households"],
        ),
        (
            {"category": "E01-10", "location": "g1", "attributes": {"floors": 3}},
            ["attributes.floors"],
        ),
        (
            {"category": "E01-10", "location": "g1", "reported_at": "2026-03-09T10:00:00"},
            ["reported_at"],
        ),
        ({"category": "E01-10", "location": "g1", "channel": "pigeon"}, ["channel"]),
        ({"category": 7, "location": "g1", "colour": "red"}, ["category", "colour"]),
        # a schema error does not hide what the policy refuses in the other fields
        (
            {"category": "E0l-10", "location": "g99", "channel": "pigeon", "urgency": "urgnt",
             "attributes": {"floors": 3}},
            ["urgency", "category", "location", "channel", "attributes.floors"],
        ),
    ],
)
def test_invalid_case_names_the_field(
    mini: Policy, case: dict[str, Any], fields: list[str]
) -> None:
    with pytest.raises(CaseValidationError) as info:
        mini.route(case)
    assert sorted(info.value.fields) == sorted(fields)
    for f in fields:
        assert f in str(info.value)


def test_near_miss_category_is_suggested(mini: Policy) -> None:
    with pytest.raises(CaseValidationError, match="did you mean 'E01-10'"):
        mini.route({"category": "E0l-10", "location": "g1"})


def test_bad_attribute_value_and_unknown_channel_are_both_reported(mini: Policy) -> None:
    with pytest.raises(CaseValidationError) as info:
        mini.route({"category": "E01-10", "location": "g1", "attributes": {"a": [1]},
                    "channel": "pigeon"})
    fields = info.value.fields
    assert "channel" in fields
    assert fields and all(f == "channel" or f.startswith("attributes.a") for f in fields)


def test_near_miss_urgency_is_suggested(mini: Policy) -> None:
    with pytest.raises(CaseValidationError, match="did you mean 'urgent'"):
        mini.route({"category": "E01-10", "location": "g1", "urgency": "urgnt"})


# --- conditions on the address ----------------------------------------------------------


def _first_hit(name: str, rules: list[tuple[str, dict[str, Any], str]], tmp: Path) -> Policy:
    """A policy of one first-hit table of ``(rule id, when, lead)`` rules."""
    content = _policy(name, [{"id": "main", "hit": "first", "rules": [
        {"id": rid, "when": when, "then": {"lead": lead}} for rid, when, lead in rules
    ]}])
    return _load(content, tmp)


@pytest.fixture(scope="module")
def by_address(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    """First-hit rules on the address: exact, contains, one of, prefix and regex."""
    rules = [
        ("exact", {"address": {"eq": "景荣小区 1号楼"}}, "community-office"),
        ("jingrong", {"category": "E01-10", "address": "景荣小区"}, "grid-team"),
        ("roads", {"address": {"prefix": ["蓝天路", "青年路"]}}, "urban-mgmt"),
        ("buildings", {"address": {"regex": "[0-9]+号楼$"}}, "sanitation"),
        ("markets", {"address": ["菜场", "市场"]}, "civil-affairs"),
    ]
    return _first_hit("by-address", rules, tmp_path_factory.mktemp("by-address"))


@pytest.mark.parametrize(
    ("category", "address", "rule"),
    [
        ("E01-10", "景荣小区 1号楼", "exact"),
        ("E01-10", "  景荣小区   1号楼 ", "exact"),  # white space runs count as one space
        ("E01-10", "景荣小区1号楼", "jingrong"),  # not the exact text: contains
        ("E04-06", "景荣小区东门", "default"),  # contains, but another category
        ("E04-06", "蓝天路88号", "roads"),
        ("E04-06", "青年路口", "roads"),
        ("E04-06", "人民路蓝天路口", "default"),  # contains 蓝天路, does not start with it
        ("E04-06", "人民路12号楼", "buildings"),
        ("E04-06", "人民路12号楼东", "default"),
        ("S01-01", "东门菜场", "markets"),
        ("E01-10", None, "default"),  # no address: no address condition holds
        ("E01-10", "", "default"),
    ],
)
def test_rules_test_the_address(
    by_address: Policy, category: str, address: str | None, rule: str
) -> None:
    case = {"category": category, "location": "g1", "description": "群众反映"}
    if address is not None:
        case["address"] = address
    d = by_address.route(case)
    assert d.rule == rule
    if rule != "default":
        (condition,) = [c for c in d.hits[0].conditions if "address" in c.condition]
        assert condition.seen == " ".join(address.split())  # type: ignore[union-attr]


def test_an_address_condition_takes_text_operators_only(tmp_path: Path) -> None:
    content = _policy("bad", [{"id": "t", "hit": "first", "rules": [
        {"id": "r", "when": {"address": {"gte": 3}}, "then": {"lead": "centre"}},
    ]}])
    with pytest.raises(DefinitionError, match=r"operator 'gte' is not allowed on address "
                       r"\(allowed: eq, contains, contains_any, prefix, regex\)"):
        _load(content, tmp_path)


# --- conditions on the reporter ---------------------------------------------------------


@pytest.fixture(scope="module")
def by_reporter(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    """First-hit rules on who reported the case: a deputy's name, a list of grid workers,
    the hotline's operator ids, anyone but the video robot, one resident exactly."""
    rules = [
        ("deputy", {"reporter": {"contains": "人大代表"}}, "community-office"),
        ("listed", {"reporter": ["gw-chen", "gw-li"]}, "grid-team"),
        ("hotline", {"category": "E04-06", "reporter": {"prefix": "12345-"}}, "urban-mgmt"),
        ("not-robot", {"category": "S01-01", "reporter": {"ne": "video-ai"}}, "civil-affairs"),
        ("numbered", {"reporter": {"regex": "^gw-[0-9]+$"}}, "sanitation"),
        ("exact", {"reporter": "居民 盧根银"}, "sanitation"),
    ]
    return _first_hit("by-reporter", rules, tmp_path_factory.mktemp("by-reporter"))


@pytest.mark.parametrize(
    ("category", "reporter", "rule"),
    [
        ("E01-10", "人大代表 王芳", "deputy"),
        ("E01-10", "gw-chen", "listed"),
        ("E01-10", "gw-chen2", "default"),  # a list is 'one of', not a prefix
        ("E04-06", "12345-0031", "hotline"),
        ("E01-10", "12345-0031", "default"),  # the hotline rule is for E04-06 only
        ("E04-06", "x12345-0031", "default"),  # prefix: at the start only
        ("S01-01", "gw-wang", "not-robot"),
        ("S01-01", "video-ai", "default"),
        ("S01-01", None, "default"),  # no reporter: no reporter condition holds, not even ne
        ("E01-10", "gw-0042", "numbered"),
        ("E01-10", "gw-0042a", "default"),
        ("E01-10", "居民 盧根银", "exact"),
        ("E01-10", "居民  盧根银", "default"),  # an identity: compared as written
    ],
)
def test_rules_test_the_reporter(
    by_reporter: Policy, category: str, reporter: str | None, rule: str
) -> None:
    case = {"category": category, "location": "g1", "description": "群众反映"}
    if reporter is not None:
        case["reporter"] = reporter
    d = by_reporter.route(case)
    assert d.rule == rule
    if rule != "default":
        (condition,) = [c for c in d.hits[0].conditions if "reporter" in c.condition]
        assert condition.seen == reporter


def test_a_reporter_condition_names_its_operators(tmp_path: Path) -> None:
    content = _policy("bad", [{"id": "t", "hit": "first", "rules": [
        {"id": "r", "when": {"reporter": {"contains_any": ["a"]}}, "then": {"lead": "centre"}},
    ]}])
    with pytest.raises(DefinitionError, match=r"operator 'contains_any' is not allowed on "
                       r"reporter \(allowed: eq, ne, in, not_in, prefix, contains, regex\)"):
        _load(content, tmp_path)
