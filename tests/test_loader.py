"""Loading policy directories: every definition error, located, in one pass (gridflow.loader).

Broken policies are small textual variations of ``tests/policies/mini`` written to
``tmp_path``; expected positions are computed from the edited text itself (the first
occurrence of a needle), so each row states exactly which token the error must point at.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gridflow.errors import DefinitionError, Problem, RoutingError
from gridflow.loader import load_policy

MINI = Path(__file__).parent / "policies" / "mini"
TODAY = dt.date(2026, 3, 1)  # far from the end of chinese-calendar's data: no warning

Edit = tuple[str, str, str]  # file, old text, new text (first occurrence)


def make_policy(
    root: Path,
    edits: tuple[Edit, ...] = (),
    extra: dict[str, str] | None = None,
    remove: tuple[str, ...] = (),
) -> Path:
    """Copy the mini policy to ``root`` with textual edits, extra files and removals."""
    root.mkdir(parents=True, exist_ok=True)
    pending = list(edits)
    for src in sorted(MINI.glob("*.yaml")):
        if src.name in remove:
            continue
        text = src.read_text(encoding="utf-8")
        for edit in edits:
            name, old, new = edit
            if name == src.name:
                assert old in text, f"fixture drifted: {old!r} not in {name}"
                text = text.replace(old, new, 1)
                pending.remove(edit)
        (root / src.name).write_text(text, encoding="utf-8")
    assert not pending, f"edits for files that do not exist: {pending}"
    for name, text in (extra or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def position(path: Path, needle: str) -> tuple[int, int]:
    """1-based line and column of the first occurrence of ``needle`` in a file."""
    text = path.read_text(encoding="utf-8")
    index = text.index(needle)
    line = text.count("\n", 0, index) + 1
    col = index - (text.rfind("\n", 0, index) + 1) + 1
    return line, col


def load_errors(root: Path, today: dt.date | None = TODAY) -> DefinitionError:
    with pytest.raises(DefinitionError) as info:
        load_policy(root, today=today)
    return info.value


def errors_of(err: DefinitionError) -> list[Problem]:
    return [p for p in err.problems if p.severity == "error"]


@dataclass(frozen=True)
class Expected:
    file: str
    needle: str  # the error points at the first occurrence of this text in the file
    message: str  # a substring of the message
    suggestion: str | None = None
    nth_line_offset: int = 0  # for needles on a line above the reported token


@dataclass(frozen=True)
class Broken:
    id: str
    edits: tuple[Edit, ...] = ()
    expected: tuple[Expected, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)
    exact: bool = True  # the expected problems are all the errors reported
    xfail: str | None = None


G = "when: {category: E01-10, description: 垃圾}"
GARBAGE_THEN = "then: {lead: sanitation, pool: east}"
CAL = """\
calendar:
  years:
    2027:
      holidays:
        - {{name: 元旦, from: 2027-01-01, to: 2027-01-03}}
      workdays: [{workdays}]
"""
SECOND_TABLE = """\
routing:
  tables:
    - id: main
      hit: collect
      rules:
        - id: tow
          when: {category: E04-09}
          then: {lead: centre}
"""

BROKEN = [
    # --- unknown keys ----------------------------------------------------------------------
    Broken(
        "unknown-key-with-suggestion",
        (("policy.yaml", "  description:", "  descripton:"),),
        (Expected("policy.yaml", "descripton", "unknown key 'descripton'", "description"),),
    ),
    Broken(
        "unknown-top-level-key",
        (("policy.yaml", "policy:", "polcy:"),),
        (Expected("policy.yaml", "polcy", "unknown key 'polcy'", "policy"),),
    ),
    Broken(
        "unknown-key-in-rule",
        (("routing.yaml", "- id: garbage\n          when:", "- id: garbage\n          whn:"),),
        (Expected("routing.yaml", "whn", "unknown key 'whn'", "when"),),
    ),
    Broken(
        "unknown-key-in-when",
        (("routing.yaml", "when: {category: E01-10,", "when: {categroy: E01-10,"),),
        (Expected("routing.yaml", "categroy", "unknown key 'categroy'", "category"),),
    ),
    Broken(
        "unknown-operator",
        (("routing.yaml", "households: {gte: 300}", "households: {gtee: 300}"),),
        (Expected("routing.yaml", "gtee", "unknown key 'gtee'", "gte"),),
    ),
    Broken(
        "unknown-key-in-table",
        (("routing.yaml", "hit: first", "hit: first\n      rulez: []"),),
        (Expected("routing.yaml", "rulez", "unknown key 'rulez'", "rules"),),
    ),
    Broken(
        "unknown-key-without-close-match-lists-allowed-keys",
        (("policy.yaml", "  description:", "  zzzqqq:"),),
        (Expected("policy.yaml", "zzzqqq",
                  "unknown key 'zzzqqq' (allowed: name, description, default_time_limit"),),
    ),
    Broken(
        "unknown-key-in-outcome-lists-allowed-keys",
        (("routing.yaml", GARBAGE_THEN, "then: {lead: sanitation, pool: east, colour: red}"),),
        (Expected("routing.yaml", "colour",
                  "unknown key 'colour' (allowed: lead, assist, tier, time_limit"),),
    ),
    # --- a key one level off (indentation) ------------------------------------------------
    Broken(
        "then-indented-under-when",
        (("routing.yaml", "            attributes: {households: {gte: 300}}\n          then:",
          "            attributes: {households: {gte: 300}}\n            then:"),),
        (Expected("routing.yaml", "then: {lead: sanitation, assist",
                  "unknown key 'then': it belongs one level up, beside 'when' (check its "
                  "indentation)"),),
        exact=False,  # (the rule then has no 'then': also reported)
    ),
    Broken(
        "tier-outdented-from-then",
        (("routing.yaml", "then: {lead: sanitation, assist: [community-office]}",
          "then: {lead: sanitation, assist: [community-office]}\n          tier: street"),),
        (Expected("routing.yaml", "tier: street",
                  "unknown key 'tier': it belongs under 'then' (check its indentation)"),),
    ),
    # --- wrong types -----------------------------------------------------------------------
    Broken(
        "wrong-type-hit-policy",
        (("routing.yaml", "hit: first", "hit: firts"),),
        (Expected("routing.yaml", "firts", "'first', 'unique' or 'collect'", "first"),),
    ),
    Broken(
        "wrong-choice-without-close-match",
        (("routing.yaml", "hit: first", "hit: everything"),),
        (Expected("routing.yaml", "everything", "'first', 'unique' or 'collect'"),),
    ),
    Broken(
        "wrong-type-priority",
        (("routing.yaml", GARBAGE_THEN, "then: {lead: sanitation, pool: east, priority: high}"),),
        (Expected("routing.yaml", "high", "valid integer"),),
    ),
    Broken(
        "wrong-type-string-expected",
        (("policy.yaml", "  name: mini", "  name: [mini]"),),
        (Expected("policy.yaml", "[mini]", "valid string"),),
    ),
    Broken(
        "wrong-type-comparison-operand",
        (("routing.yaml", "households: {gte: 300}", "households: {gte: many}"),),
        (Expected("routing.yaml", "many", "valid integer"),),
    ),
    # --- unknown references ----------------------------------------------------------------
    Broken(
        "unknown-lead",
        (("routing.yaml", GARBAGE_THEN, "then: {lead: sanitaton, pool: east}"),),
        (Expected("routing.yaml", "sanitaton", "unknown department 'sanitaton'", "sanitation"),),
    ),
    Broken(
        "unknown-assist",
        (("routing.yaml", "assist: [community-office]", "assist: [comunity-office]"),),
        (Expected("routing.yaml", "comunity-office", "unknown department 'comunity-office'",
                  "community-office"),),
    ),
    Broken(
        "unknown-summon",
        (("routing.yaml", "then: {lead: urban-mgmt,",
          "then: {lead: urban-mgmt, summon: [centre, sanitatio],"),),
        (Expected("routing.yaml", "sanitatio]", "unknown department 'sanitatio'", "sanitation"),),
    ),
    Broken(
        "unknown-category",
        (("routing.yaml", "when: {category: E01-10,", "when: {category: E01-01,"),),
        (Expected("routing.yaml", "E01-01", "unknown category 'E01-01'", "E01-11"),),
    ),
    Broken(
        "unknown-unit",
        (("routing.yaml", "category: E01-11\n",
          "category: E01-11\n            location: {grid: g11}\n"),),
        (Expected("routing.yaml", "g11", "unknown grid unit 'g11'", "g1"),),
    ),
    Broken(
        "unknown-department-tier",
        (("departments.yaml", "name: 网格员, tier: grid}", "name: 网格员, tier: gird}"),),
        (Expected("departments.yaml", "gird", "unknown tier 'gird'", "grid"),),
    ),
    Broken(
        "unknown-outcome-tier",
        (("routing.yaml", GARBAGE_THEN, "then: {lead: sanitation, pool: east, tier: streat}"),),
        (Expected("routing.yaml", "streat", "unknown tier 'streat'", "street"),),
    ),
    Broken(
        "unknown-level-in-location",
        (("routing.yaml", "category: E01-11\n",
          "category: E01-11\n            location: {comunity: c1}\n"),),
        (Expected("routing.yaml", "comunity", "unknown level 'comunity'", "community"),),
    ),
    Broken(
        "unknown-unit-level",
        (("organisation.yaml", "{id: g3, name: 网格三, level: grid}",
          "{id: g3, name: 网格三, level: gridd}"),),
        (Expected("organisation.yaml", "gridd", "unknown level 'gridd'", "grid"),),
        exact=False,  # g3 is then unknown to the rule tests that use it
    ),
    Broken(
        "unknown-attribute",
        (("routing.yaml", "households: {gte: 300}", "housholds: {gte: 300}"),),
        (Expected("routing.yaml", "housholds", "unknown attribute 'housholds'", "households"),),
    ),
    Broken(
        "pool-not-of-lead",
        (("routing.yaml", GARBAGE_THEN, "then: {lead: urban-mgmt, pool: east}"),),
        (Expected("routing.yaml", "east}", "'east' is not a pool of department 'urban-mgmt'"),),
    ),
    Broken(
        "pool-typo-suggests-a-pool-of-the-lead",
        (("routing.yaml", GARBAGE_THEN, "then: {lead: sanitation, pool: eastt}"),),
        (Expected("routing.yaml", "eastt", "'eastt' is not a pool of department 'sanitation'",
                  "east"),),
    ),
    Broken(
        "handler-not-of-lead",
        (("routing.yaml", GARBAGE_THEN, "then: {lead: urban-mgmt, handler: wang-qiang}"),),
        (Expected("routing.yaml", "wang-qiang}",
                  "'wang-qiang' is not a handler of department 'urban-mgmt' (it has no "
                  "handlers)"),),
    ),
    Broken(
        "handler-typo-suggests-a-handler-of-the-lead",
        (("routing.yaml", GARBAGE_THEN, "then: {lead: sanitation, handler: wang-qaing}"),),
        (Expected("routing.yaml", "wang-qaing",
                  "'wang-qaing' is not a handler of department 'sanitation' (handlers: "
                  "wang-qiang)", "wang-qiang"),),
    ),
    Broken(
        "pool-and-handler",
        (("routing.yaml", GARBAGE_THEN,
          "then: {lead: sanitation, pool: east, handler: wang-qiang}"),),
        (Expected("routing.yaml", "wang-qiang}",
                  "a rule routes to a pool or to a named handler, not both"),),
    ),
    # --- duplicate ids ---------------------------------------------------------------------
    Broken(
        "duplicate-department",
        (("departments.yaml", "  - {id: centre, name: 联动指挥中心, tier: district}\n",
          "  - {id: centre, name: 联动指挥中心, tier: district}\n"
          "  - {id: centre, name: 又一个中心, tier: district}\n"),),
        (Expected("departments.yaml", "centre, name: 又一个中心",
                  "duplicate department id 'centre'"),),
    ),
    Broken(
        "duplicate-handler",
        (("departments.yaml", "handlers: [{id: wang-qiang, name: 王强（片长）}]",
          "handlers: [{id: wang-qiang}, {id: wang-qiang, name: 王强（片长）}]"),),
        (Expected("departments.yaml", "[{id: wang-qiang}", "duplicate handler ids"),),
    ),
    Broken(
        "duplicate-unit",
        (("organisation.yaml", "                - {id: g3, name: 网格三, level: grid}\n",
          "                - {id: g3, name: 网格三, level: grid}\n"
          "                - {id: g1, name: 重复, level: grid}\n"),),
        (Expected("organisation.yaml", "g1, name: 重复", "duplicate unit id 'g1'"),),
    ),
    Broken(
        "duplicate-category",
        (("categories.yaml", "      - {code: E04-09, name: 机动车乱停放}\n",
          "      - {code: E04-09, name: 机动车乱停放}\n      - {code: E01-11, name: 重复}\n"),),
        (Expected("categories.yaml", "E01-11, name: 重复", "duplicate category code 'E01-11'"),),
    ),
    Broken(
        "duplicate-rule",
        (("routing.yaml", "- id: street-order", "- id: garbage"),),
        (Expected("routing.yaml", "garbage\n          when: {category: {prefix",
                  "duplicate rule id 'garbage'"),),
    ),
    Broken(
        "duplicate-table-in-another-file",
        extra={"routing2.yaml": SECOND_TABLE},
        expected=(Expected("routing2.yaml", "main", "duplicate table id 'main'"),),
    ),
    # --- regexes (Python syntax, checked at load) --------------------------------------------
    Broken(
        "regex-invalid-in-python",
        (("routing.yaml", G, "when: {category: E01-10, description: {regex: '垃圾(('}}"),),
        (Expected("routing.yaml", "'垃圾((", "invalid regex"),),
    ),
    Broken(
        "regex-bad-repeat",
        (("routing.yaml", G, "when: {category: E01-10, description: {regex: '垃圾{3,1}'}}"),),
        (Expected("routing.yaml", "'垃圾{3", "invalid regex"),),
    ),
    # --- time limits -----------------------------------------------------------------------
    Broken(
        "time-limit-zero",
        (("routing.yaml", "time_limit: 1wd}", "time_limit: 0wh}"),),
        (Expected("routing.yaml", "0wh", "invalid duration '0wh'"),),
    ),
    Broken(
        "time-limit-negative",
        (("routing.yaml", "time_limit: 1wd}", "time_limit: -2h}"),),
        (Expected("routing.yaml", "-2h", "invalid duration '-2h'"),),
    ),
    Broken(
        "time-limit-garbage",
        (("routing.yaml", "{normal: 1wd, urgent: 2wh}", "{normal: 1wd, urgent: soon}"),),
        # the path names list items by id (or, without one, by 1-based position)
        (Expected("routing.yaml", "soon", "routing.tables[main].rules[street-order].then"
                  ".time_limit.urgent: invalid duration 'soon'"),),
    ),
    Broken(
        "path-names-an-item-without-id-by-position",
        extra={"calendar.yaml": CAL.format(workdays="2027-01-09, soon")},
        expected=(Expected("calendar.yaml", "soon",
                           "calendar.years.2027.workdays[#2]: Input should be a valid date"),),
    ),
    Broken(
        "time-limit-by-urgency-without-normal-in-rule",
        (("routing.yaml", "{normal: 1wd, urgent: 2wh}", "{urgent: 2wh}"),),
        (Expected("routing.yaml", "{urgent: 2wh}", "must give 'normal'"),),
    ),
    Broken(
        "time-limit-by-urgency-without-normal-in-category",
        (("categories.yaml", "{normal: 2wd, urgent: 4wh}", "{urgent: 4wh}"),),
        (Expected("categories.yaml", "{urgent: 4wh}", "must give 'normal'"),),
    ),
    Broken(
        "time-limit-without-unit",
        (("routing.yaml", "time_limit: 1wd}", "time_limit: 20}"),),
        (Expected("routing.yaml", "20}", "20 has no unit: accepted forms: 4wh"),),
    ),
    # --- display names where an id belongs ------------------------------------------------
    Broken(
        "department-name-as-lead",
        (("routing.yaml", GARBAGE_THEN, "then: {lead: 环卫所, pool: east}"),),
        (Expected("routing.yaml", "环卫所", "'环卫所' is not an id", "sanitation"),),
    ),
    Broken(
        "level-name-as-tier",
        (("routing.yaml", GARBAGE_THEN, "then: {lead: sanitation, pool: east, tier: 街道}"),),
        (Expected("routing.yaml", "街道", "'街道' is not an id", "street"),),
    ),
    Broken(
        "unknown-name-as-lead",
        (("routing.yaml", GARBAGE_THEN, "then: {lead: 环卫处, pool: east}"),),
        (Expected("routing.yaml", "环卫处", "'环卫处' is not an id: an id is a letter"),),
    ),
    # --- overlap, shadowing and gaps --------------------------------------------------------
    Broken(
        "unique-with-overlapping-rules",
        (("routing.yaml", "hit: first", "hit: unique"),
         ("routing.yaml", "when: {category: {prefix: E04}}", "when: {category: {prefix: E0}}")),
        (Expected("routing.yaml", "street-order", "'garbage'"),
         Expected("routing.yaml", "street-order", "'stairwell'")),
    ),
    Broken(
        "first-rule-shadowed-by-an-earlier-one",
        (("routing.yaml", "        - id: street-order",
          "        - id: all-e0\n          when: {category: {prefix: E0}}\n"
          "          then: {lead: centre}\n        - id: street-order"),),
        (Expected("routing.yaml", "street-order",
                  "rule 'street-order' can never fire: rule 'all-e0'"),),
    ),
    Broken(
        "category-gap-without-default-route",
        (("routing.yaml", "  default: {lead: centre, time_limit: 1wd}\n", ""),),
        (Expected("categories.yaml", "E01\n", "category 'E01' has no route"),
         # rules that also test the description leave the category's other cases unrouted
         Expected("categories.yaml", "E01-10,", "category 'E01-10' is routed only when the "
                  "other conditions of rule(s) 'garbage' hold"),
         Expected("categories.yaml", "E01-11,", "rule(s) 'stairwell' hold")),
    ),
    # --- calendar --------------------------------------------------------------------------
    Broken(
        "calendar-make-up-workday-on-a-weekday",
        extra={"calendar.yaml": CAL.format(workdays="2027-01-09, 2027-01-04")},
        expected=(Expected("calendar.yaml", "2027-01-04]", "make-up workday 2027-01-04"),),
    ),
    Broken(
        "calendar-make-up-workday-in-another-year",
        extra={"calendar.yaml": CAL.format(workdays="2028-01-08")},
        expected=(Expected("calendar.yaml", "2028-01-08", "belongs to year 2028"),),
    ),
    Broken(
        "calendar-impossible-date-beside-another-error",
        extra={"calendar.yaml": CAL.format(workdays="2027-02-30, 2027/01/09")},
        expected=(Expected("calendar.yaml", "2027-02-30",
                           "invalid date '2027-02-30': day is out of range for month"),
                  Expected("calendar.yaml", "2027/01/09", "invalid date separator")),
    ),
    # --- sections defined twice --------------------------------------------------------------
    Broken(
        "two-organisation-sections",
        extra={"zz-org.yaml": "organisation:\n  levels: [{id: district}]\n"
                              "  units: [{id: dx, name: 另区, level: district}]\n"},
        expected=(Expected("zz-org.yaml", "organisation", "'organisation' is already defined in"),),
    ),
    Broken(
        "two-default-routes",
        extra={"zz-default.yaml": "routing:\n  default: {lead: grid-team}\n"},
        expected=(Expected("zz-default.yaml", "default",
                           "'routing.default' is already defined in"),),
    ),
    # --- rule tests whose case is invalid ----------------------------------------------------
    Broken(
        "rule-test-case-unknown-unit",
        (("tests.yaml", "location: g1, urgency: urgent}", "location: g9, urgency: urgent}"),),
        (Expected("tests.yaml", "g9", "test '紧急占道经营': location: unknown unit 'g9'"),),
    ),
    Broken(
        "rule-test-case-missing-category",
        (("tests.yaml", "{category: E04-06, location: g1,", "{location: g1,"),),
        (Expected("tests.yaml", "{location: g1,", "test '紧急占道经营': category: required"),),
    ),
    Broken(
        "rule-test-case-bad-urgency",
        (("tests.yaml", "urgency: urgent}", "urgency: asap}"),),
        (Expected("tests.yaml", "asap", "urgency"),),
    ),
    Broken(
        "rule-test-case-attribute-of-wrong-type",
        (("tests.yaml", "attributes: {households: 320}", "attributes: {households: many}"),),
        (Expected("tests.yaml", "many", "attributes.households: expected integer"),),
    ),
    Broken(
        "rule-test-expects-unknown-department",
        (("tests.yaml", "expect: {lead: urban-mgmt,", "expect: {lead: urban-mgnt,"),),
        (Expected("tests.yaml", "urban-mgnt", "unknown department 'urban-mgnt'", "urban-mgmt"),),
    ),
    Broken(
        "rule-test-expects-unknown-rule",
        (("tests.yaml", "rule: street-order,", "rule: street-ordr,"),),
        (Expected("tests.yaml", "street-ordr", "unknown rule 'street-ordr'", "street-order"),),
    ),
    Broken(
        "rule-test-case-time-without-offset",
        (("tests.yaml", '"2026-03-09T10:00:00+08:00"', '"2026-03-09T10:00:00"'),),
        (Expected("tests.yaml", '"2026-03-09T10:00:00"',
                  "reported_at: needs a UTC offset, e.g. 2026-03-09 08:05+08:00"),),
    ),
    # --- files that are not rule files --------------------------------------------------------
    Broken(
        "yaml-syntax-error-in-one-file",
        (("policy.yaml", "  name: mini", "  name: [mini"),),
        (Expected("policy.yaml", ": 测试用", "YAML syntax error"),),
    ),
    Broken(
        "full-width-colon-after-a-key",
        (("policy.yaml", "  name: mini", "  name： mini"),),
        (Expected("policy.yaml", "： mini", "full-width colon '：' after 'name'"),),
    ),
    Broken(
        "full-width-space-as-indentation",
        (("departments.yaml", "  - {id: centre", "\u3000- {id: centre"),),
        (Expected("departments.yaml", "\u3000- {id",
                  "full-width space (U+3000) in the indentation"),),
        exact=False,
    ),
    Broken(
        "file-that-is-not-a-mapping",
        extra={"list.yaml": "- a\n- b\n"},
        expected=(Expected("list.yaml", "- a", "must be a mapping"),),
    ),
]


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(b, id=b.id, marks=[pytest.mark.xfail(strict=True, reason=b.xfail)]
                     if b.xfail else [])
        for b in BROKEN
    ],
)
def test_broken_policy_is_reported_at_the_offending_token(case: Broken, tmp_path: Path) -> None:
    root = make_policy(tmp_path / "p", case.edits, case.extra)
    err = load_errors(root)
    found = errors_of(err)
    for exp in case.expected:
        path = root / exp.file
        line, col = position(path, exp.needle)
        matching = [p for p in found if exp.message in p.message]
        assert matching, f"no error containing {exp.message!r} in:\n{err}"
        located = [p for p in matching if (p.path, p.line, p.col) == (str(path), line, col)]
        assert located, (f"expected {path.name}:{line}:{col}, got "
                         f"{[f'{Path(p.path).name}:{p.line}:{p.col}' for p in matching]}")
        assert located[0].suggestion == exp.suggestion
        assert str(located[0]).startswith(f"{path}:{line}:{col}: ")
        if exp.suggestion:
            assert str(located[0]).endswith(f"(did you mean '{exp.suggestion}'?)")
        else:
            assert "did you mean" not in str(located[0])
    if case.exact:
        assert len(found) == len(case.expected), f"unexpected extra errors:\n{err}"


NO_DEFAULT = ("routing.yaml", "  default: {lead: centre, time_limit: 1wd}\n", "")


@pytest.mark.parametrize(
    ("rule", "gaps"),
    [
        # a rule without a category test but with another condition covers nothing fully:
        # it no longer switches the gap check off
        ("{id: urgent-any, when: {urgency: urgent}, then: {lead: centre}}",
         {"E01": "is routed only when", "E01-10": "is routed only when",
          "E01-11": "is routed only when"}),
        # a catch-all rule routes every case of every category
        ("{id: catch-all, when: {}, then: {lead: centre}}", {}),
        # so does a category test alone
        ("{id: all-e01, when: {category: {prefix: E01}}, then: {lead: centre}}", {}),
        # a rule on the group code alone covers the group code, not its children
        ("{id: group, when: {category: E01}, then: {lead: centre}}",
         {"E01-10": "is routed only when", "E01-11": "is routed only when"}),
    ],
)
def test_gaps_without_a_default_route(
    tmp_path: Path, rule: str, gaps: dict[str, str]
) -> None:
    edit = ("routing.yaml", "  tables:\n",
            f"  tables:\n    - id: extra\n      hit: first\n      rules:\n        - {rule}\n")
    root = make_policy(tmp_path / "p", (NO_DEFAULT, edit))
    found: dict[str, str] = {}
    try:
        load_policy(root, today=TODAY)
    except DefinitionError as err:
        for p in errors_of(err):
            code = p.message.split("'")[1]
            found[code] = p.message
    assert sorted(found) == sorted(gaps), found
    for code, words in gaps.items():
        assert words in found[code]
    # partly routed categories are lints: warnings when the load is not strict
    policy = load_policy(root, today=TODAY, strict=False)
    assert sorted(w.message.split("'")[1] for w in policy.warnings) == sorted(gaps)


def test_unique_rules_whose_regexes_may_both_match_get_a_warning(tmp_path: Path) -> None:
    """Whether two regexes can match one text is not decided at load: a warning names
    the pair, and a case matching both is refused when routed."""
    table = ("  tables:\n    - id: noise\n      hit: unique\n      rules:\n"
             "        - {id: noise-a, when: {category: E01-10, description: {regex: 垃圾}}, "
             "then: {lead: centre}}\n"
             "        - {id: noise-b, when: {category: E01-10, description: {regex: 暴露}}, "
             "then: {lead: sanitation}}\n"
             "        - {id: noise-c, when: {category: E01-11, description: {regex: 暴露}}, "
             "then: {lead: sanitation}}\n")
    root = make_policy(tmp_path / "p", (("routing.yaml", "  tables:\n", table),))
    policy = load_policy(root, today=TODAY)  # strict: still loads (a warning, not a lint)
    pairs = [w for w in policy.warnings if "regexes" in w.message]
    assert len(pairs) == 1  # noise-c tests another category: no overlap possible
    assert "'noise-a'" in pairs[0].message and "'noise-b'" in pairs[0].message
    assert (pairs[0].line, pairs[0].col) == position(root / "routing.yaml", "noise-b")
    assert policy.route({"category": "E01-10", "location": "g1",
                         "description": "暴露"}).lead == "sanitation"
    with pytest.raises(RoutingError, match="noise-a, noise-b"):
        policy.route({"category": "E01-10", "location": "g1", "description": "暴露垃圾"})


@pytest.mark.parametrize(
    ("extra", "unreachable"),
    [
        # the default chain of tiers reaches every one above a department
        ({}, []),
        # a tier above the district that nothing names and no path leads to
        ({"organisation.yaml": None, "escalation.yaml":
          "escalation:\n  path: {grid: community, community: street, street: district}\n"},
         ["city"]),
        # the path leads there: reachable
        ({"organisation.yaml": None, "escalation.yaml":
          "escalation:\n  path: {grid: community, community: street, street: district, "
          "district: city}\n"}, []),
    ],
)
def test_unreachable_tiers_are_warned_about(
    tmp_path: Path, extra: dict[str, str | None], unreachable: list[str]
) -> None:
    edits = ()
    if "organisation.yaml" in extra:
        edits = (("organisation.yaml", "  levels:\n",
                  "  tiers: [grid, community, street, district, city]\n  levels:\n"),)
    files = {k: v for k, v in extra.items() if v is not None}
    root = make_policy(tmp_path / "p", edits, files)
    policy = load_policy(root, today=TODAY)
    found = [w for w in policy.warnings if "unreachable" in w.message]
    assert [w.message.split("'")[1] for w in found] == unreachable
    for w in found:
        assert (w.line, w.col) == position(root / "organisation.yaml", "city")


def test_the_mini_fixture_itself_is_valid() -> None:
    policy = load_policy(MINI, today=TODAY)
    assert policy.name == "mini"
    assert policy.warnings == ()
    results = policy.run_tests()
    assert len(results) == 4
    assert all(r.passed for r in results), [r.failures for r in results]


def test_bad_make_up_workday_is_reported_in_the_calendar_file(tmp_path: Path) -> None:
    root = make_policy(tmp_path / "p", extra={
        "calendar.yaml": CAL.format(workdays="2027-01-09, 2027-01-04"),
    })
    (p,) = errors_of(load_errors(root))
    assert p.path == str(root / "calendar.yaml")
    assert "make-up workday 2027-01-04 is a weekday" in p.message
    assert p.line in range(3, 7)  # somewhere in the 2027 block (see the xfail row above)


# --- one pass, one error, sorted ------------------------------------------------------------

SEVERAL = (
    ("policy.yaml", "  description:", "  descripton:"),
    ("routing.yaml", GARBAGE_THEN, "then: {lead: sanitaton, pool: east}"),
    ("routing.yaml", "households: {gte: 300}", "households: {gte: 300, regex: '('}"),
    ("categories.yaml", "      - {code: E04-09, name: 机动车乱停放}\n",
     "      - {code: E04-09, name: 机动车乱停放}\n      - {code: E01-11, name: 重复}\n"),
    ("departments.yaml", "name: 网格员, tier: grid}", "name: 网格员, tier: gird}"),
    ("tests.yaml", "location: g1, urgency: urgent}", "location: g9, urgency: urgent}"),
)


def test_all_errors_of_a_directory_come_out_in_one_definition_error(tmp_path: Path) -> None:
    root = make_policy(tmp_path / "p", SEVERAL)
    err = load_errors(root)
    messages = [p.message for p in errors_of(err)]
    for fragment in (
        "unknown key 'descripton'",
        "unknown department 'sanitaton'",
        "operator 'regex' is not allowed on attributes.households",
        "duplicate category code 'E01-11'",
        "unknown tier 'gird'",
        "unknown unit 'g9'",
    ):
        assert any(fragment in m for m in messages), f"{fragment!r} missing from:\n{err}"
    files = {Path(p.path).name for p in err.problems}
    assert files == {"policy.yaml", "routing.yaml", "categories.yaml", "departments.yaml",
                     "tests.yaml"}


def test_problems_are_sorted_by_file_then_line_then_column(tmp_path: Path) -> None:
    root = make_policy(tmp_path / "p", SEVERAL)
    err = load_errors(root)
    keys = [(p.path, p.line, p.col) for p in err.problems]
    assert len(keys) >= 6
    assert keys == sorted(keys)


def test_str_of_the_error_is_one_path_line_col_message_line_per_problem(tmp_path: Path) -> None:
    root = make_policy(tmp_path / "p", SEVERAL)
    err = load_errors(root)
    lines = str(err).splitlines()
    assert lines == [str(p) for p in err.problems]
    pattern = re.compile(r"^(?P<path>.+\.yaml):(?P<line>\d+):(?P<col>\d+): (?P<message>.+)$")
    for text, problem in zip(lines, err.problems, strict=True):
        m = pattern.match(text)
        assert m, text
        assert Path(m["path"]).parent == root
        assert (int(m["line"]), int(m["col"])) == (problem.line, problem.col)
        assert problem.message in m["message"]


def test_problems_carry_path_line_col_message_and_suggestion(tmp_path: Path) -> None:
    root = make_policy(tmp_path / "p", SEVERAL)
    err = load_errors(root)
    (typo,) = [p for p in err.problems if "sanitaton" in p.message]
    line, col = position(root / "routing.yaml", "sanitaton")
    assert (typo.path, typo.line, typo.col) == (str(root / "routing.yaml"), line, col)
    assert typo.message == "unknown department 'sanitaton'"
    assert typo.suggestion == "sanitation"
    assert typo.severity == "error"
    (dup,) = [p for p in err.problems if "duplicate category" in p.message]
    assert dup.suggestion is None


def test_no_suggestion_when_nothing_is_close(tmp_path: Path) -> None:
    root = make_policy(tmp_path / "p", (("routing.yaml", GARBAGE_THEN,
                                         "then: {lead: water-board, pool: east}"),))
    err = load_errors(root)
    (p,) = [p for p in err.problems if "water-board" in p.message]
    assert p.suggestion is None
    assert "did you mean" not in str(err)


@pytest.mark.parametrize(
    "org_edit",
    [
        ("organisation.yaml", "{id: g3, name: 网格三, level: grid}",
         "{id: g3, name: 网格三, level: grid, colour: 1}"),
        ("organisation.yaml", "  name: 测试区\n", "  name: 测试区\n  name: 又一个\n"),
    ],
    ids=["unknown-key-in-a-unit", "duplicate-yaml-key"],
)
def test_a_broken_organisation_does_not_hide_the_other_errors(
    org_edit: Edit, tmp_path: Path
) -> None:
    root = make_policy(tmp_path / "p", (
        org_edit,
        ("routing.yaml", GARBAGE_THEN, "then: {lead: sanitaton, pool: east}"),
    ))
    err = load_errors(root)
    assert not any("no 'organisation' section" in p.message for p in err.problems), str(err)
    assert any("unknown department 'sanitaton'" in p.message for p in err.problems), str(err)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("departments.yaml", "pools: [{id: east, name: 东片}, {id: west}]", "pools: east"),
         "valid list"),
        (("categories.yaml", "time_limit: 4wh", "time_limit: 0wh"), "invalid duration '0wh'"),
    ],
    ids=["department-with-bad-pools", "child-category-with-bad-time-limit"],
)
def test_an_invalid_definition_is_reported_once_not_at_every_use(
    edit: Edit, message: str, tmp_path: Path
) -> None:
    err = load_errors(make_policy(tmp_path / "p", (edit,)))
    found = errors_of(err)
    assert any(message in p.message for p in found)
    assert len(found) == 1, str(err)


# --- warnings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("today", "warned"),
    [
        (dt.date(2025, 6, 1), False),
        (dt.date(2026, 10, 31), False),  # 61 days before the last covered day (2026-12-31)
        (dt.date(2026, 11, 2), True),  # 59 days before
        (dt.date(2026, 12, 31), True),
        (None, False),  # no clock given: no warning
    ],
)
def test_calendar_ends_soon_warning_only_within_60_days(
    today: dt.date | None, warned: bool
) -> None:
    seen: list[Problem] = []
    policy = load_policy(MINI, today=today, on_warning=seen.append)
    assert list(policy.warnings) == seen
    if warned:
        (w,) = seen
        assert w.severity == "warning"
        assert "2026-12-31" in w.message
        assert str(w).endswith("[warning]")
    else:
        assert seen == []


def test_calendar_warning_moves_with_policy_supplied_years(tmp_path: Path) -> None:
    root = make_policy(tmp_path / "p", extra={
        "calendar.yaml": CAL.format(workdays="2027-01-09"),
    })
    assert load_policy(root, today=dt.date(2026, 12, 1)).warnings == ()
    (w,) = load_policy(root, today=dt.date(2027, 12, 1)).warnings
    assert "2027-12-31" in w.message
    line, col = position(root / "calendar.yaml", "years")
    assert (w.path, w.line, w.col) == (str(root / "calendar.yaml"), line, col)


def test_warnings_alone_do_not_fail_the_load() -> None:
    policy = load_policy(MINI, today=dt.date(2026, 12, 1))
    assert len(policy.warnings) == 1
    assert policy.route({"category": "E01-10", "location": "g1", "description": "垃圾"}).lead \
        == "sanitation"


def test_warnings_are_listed_with_errors_when_the_load_fails(tmp_path: Path) -> None:
    root = make_policy(tmp_path / "p", (("policy.yaml", "  description:", "  descripton:"),))
    err = load_errors(root, today=dt.date(2026, 12, 1))
    assert [p.severity for p in err.problems].count("warning") == 1
    assert len(err.errors) == 1


# --- version, discovery, splitting --------------------------------------------------------------


def test_version_is_a_content_hash(tmp_path: Path) -> None:
    a = make_policy(tmp_path / "a")
    b = make_policy(tmp_path / "elsewhere" / "b")
    va, vb = load_policy(a, today=TODAY).version, load_policy(b, today=TODAY).version
    assert va == vb == load_policy(MINI, today=TODAY).version
    assert re.fullmatch(r"[0-9a-f]{8,}", va)
    c = make_policy(tmp_path / "c", (("policy.yaml", "测试用小型策略", "测试用小型策咯"),))
    d = make_policy(tmp_path / "d", (("routing.yaml", "default: {lead: centre, time_limit: 1wd}",
                                      "default: {lead: centre,  time_limit: 1wd}"),))
    e = make_policy(tmp_path / "e", (("tests.yaml", "\n", "\n\n"),))
    versions = {va, *(load_policy(p, today=TODAY).version for p in (c, d, e))}
    assert len(versions) == 4


def test_version_changes_when_a_file_is_added(tmp_path: Path) -> None:
    a = make_policy(tmp_path / "a")
    b = make_policy(tmp_path / "b", extra={"notes.yaml": "# nothing yet\n"})
    assert load_policy(a, today=TODAY).version != load_policy(b, today=TODAY).version


def test_hidden_directories_and_files_and_other_extensions_are_ignored(tmp_path: Path) -> None:
    plain = make_policy(tmp_path / "plain")
    root = make_policy(tmp_path / "p", extra={
        ".git/config.yaml": "this: [is not: valid\n",
        ".hidden/more.yaml": "departments: 3\n",
        "sub/.cache/x.yml": "policy: {name: other}\n",
        ".backup.yaml": "organisation: broken\n",
        "README.md": "# not a rule file\n",
        "cases.json": "{}\n",
    })
    policy = load_policy(root, today=TODAY)
    assert policy.name == "mini"
    assert policy.version == load_policy(plain, today=TODAY).version


def test_yml_files_and_subdirectories_are_read(tmp_path: Path) -> None:
    root = make_policy(tmp_path / "p", remove=("attributes.yaml",), extra={
        "more/attributes.yml": (MINI / "attributes.yaml").read_text(encoding="utf-8"),
    })
    policy = load_policy(root, today=TODAY)
    assert set(policy.registry.attributes) == {"households", "needy"}


def single_file_copy(root: Path) -> Path:
    root.mkdir(parents=True)
    parts = [f.read_text(encoding="utf-8") for f in sorted(MINI.glob("*.yaml"))]
    (root / "policy.yaml").write_text("\n".join(parts), encoding="utf-8")
    return root


SAMPLE_CASES = [
    {"category": "E01-10", "location": "g1", "description": "路边有暴露垃圾",
     "reported_at": "2026-03-09T10:00:00+08:00"},
    {"category": "E01-10", "location": "g2", "description": "井盖松动"},
    {"category": "E01-11", "location": "g3", "attributes": {"households": 320}},
    {"category": "E01-11", "location": "g3", "attributes": {"households": 20}},
    {"category": "E04-06", "location": "g1", "urgency": "urgent",
     "reported_at": "2026-05-01T09:00:00+08:00"},
    {"category": "E04-09", "location": "g2", "reported_at": "2026-03-14T09:00:00+08:00"},
    {"category": "E01", "location": "g1"},
]


def test_a_policy_split_across_files_loads_the_same_as_one_file(tmp_path: Path) -> None:
    split = load_policy(MINI, today=TODAY)
    single = load_policy(single_file_copy(tmp_path / "one"), today=TODAY)
    assert single.version != split.version  # different bytes, different files
    for attr in ("levels", "tiers", "units", "departments", "categories", "attributes",
                 "channels", "name"):
        assert getattr(single.registry, attr) == getattr(split.registry, attr), attr
    assert [[r.rule_id for r in t] for t in single.router.rules] == \
        [[r.rule_id for r in t] for t in split.router.rules]
    assert [t.name for t in single.tests] == [t.name for t in split.tests]
    assert [r.passed for r in single.run_tests()] == [True] * 4
    ignore = {"source", "policy_version", "hits"}
    for case in SAMPLE_CASES:
        a = split.route(case).model_dump(exclude=ignore)
        b = single.route(case).model_dump(exclude=ignore)
        assert a == b, case


def test_split_policy_decisions_name_the_file_and_line_of_the_rule() -> None:
    policy = load_policy(MINI, today=TODAY)
    d = policy.route(SAMPLE_CASES[0])
    line, _ = position(MINI / "routing.yaml", "- id: garbage")
    assert d.source.endswith(f"routing.yaml:{line}")
    assert d.hits[0].source == d.source


def test_missing_directory_and_empty_directory(tmp_path: Path) -> None:
    err = load_errors(tmp_path / "nope")
    assert "does not exist" in str(err)
    (tmp_path / "empty").mkdir()
    err = load_errors(tmp_path / "empty")
    assert "no *.yaml rule files" in str(err)


def test_no_organisation_anywhere(tmp_path: Path) -> None:
    root = make_policy(tmp_path / "p", remove=("organisation.yaml",))
    err = load_errors(root)
    (p,) = [p for p in err.problems if "no 'organisation' section" in p.message]
    assert (p.path, p.line, p.col) == (str(root), 1, 1)  # the directory: no file has it


@pytest.mark.parametrize(
    ("edit", "cause"),
    [
        (("departments.yaml", "departments:", "departmens:"), "unknown key 'departmens'"),
        (("departments.yaml", "departments:", "departments:\n  - {id: [}"), "YAML syntax"),
    ],
    ids=["misspelt-section", "unreadable-file"],
)
def test_missing_departments_are_said_once_not_at_every_use(
    edit: Edit, cause: str, tmp_path: Path
) -> None:
    root = make_policy(tmp_path / "p", (edit,))
    err = load_errors(root)
    messages = [p.message for p in err.errors]
    assert any(cause in m for m in messages), messages
    (p,) = [p for p in err.errors if "no departments defined" in p.message]
    assert p.path == str(root)
    assert not any("unknown department" in m for m in messages), messages
    assert len(messages) == 2, messages


def test_missing_categories_are_said_once_not_at_every_use(tmp_path: Path) -> None:
    root = make_policy(tmp_path / "p", remove=("categories.yaml",))
    messages = [p.message for p in load_errors(root).errors]
    assert any("no categories defined" in m for m in messages), messages
    assert not any("unknown category" in m for m in messages), messages


def test_an_unreadable_file_does_not_pin_the_calendar_warning_elsewhere(tmp_path: Path) -> None:
    root = make_policy(tmp_path / "p", (("policy.yaml", "  name: mini", "  name: [mini"),))
    err = load_errors(root, today=dt.date(2026, 12, 1))
    assert not any(p.severity == "warning" for p in err.problems), str(err)
    # with every file readable, the built-in calendar's end is a warning of the directory
    plain = make_policy(tmp_path / "q")
    (w,) = load_policy(plain, today=dt.date(2026, 12, 1)).warnings
    assert (w.path, w.line, w.col) == (str(plain), 1, 1) and "2026-12-31" in w.message


def test_a_single_file_can_be_loaded_directly(tmp_path: Path) -> None:
    root = single_file_copy(tmp_path / "one")
    policy = load_policy(root / "policy.yaml", today=TODAY)
    assert policy.name == "mini"


def test_unsafe_yaml_in_a_rule_file_is_a_located_definition_error(tmp_path: Path) -> None:
    root = make_policy(tmp_path / "p", (
        ("policy.yaml", "  name: mini", "  name: !!python/object/apply:os.system ['false']"),
    ))
    err = load_errors(root)
    line, col = position(root / "policy.yaml", "!!python")
    (p,) = errors_of(err)
    assert (p.path, p.line, p.col) == (str(root / "policy.yaml"), line, col)
    assert "unsupported YAML tag" in p.message


def test_copied_fixture_is_independent_of_the_original(tmp_path: Path) -> None:
    # guard for the helpers above: edits never touch tests/policies/mini
    before = {f.name: f.read_bytes() for f in MINI.glob("*.yaml")}
    make_policy(tmp_path / "p", (("policy.yaml", "mini", "maxi"),))
    assert {f.name: f.read_bytes() for f in MINI.glob("*.yaml")} == before
