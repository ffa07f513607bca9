"""Shared Hypothesis strategies: small policies, rule conditions and cases.

Policies are generated as plain dicts (valid rule-file content) over a fixed
organisation, so the same vocabulary feeds conditions and cases and matches
actually happen.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import strategies as st

SH = ZoneInfo("Asia/Shanghai")

ORGANISATION: dict[str, Any] = {
    "levels": [{"id": "district"}, {"id": "street"}, {"id": "community"}, {"id": "grid"}],
    "units": [
        {
            "id": "d1",
            "name": "武进区",
            "level": "district",
            "children": [
                {
                    "id": "s1",
                    "name": "戚墅堰街道",
                    "level": "street",
                    "children": [
                        {
                            "id": "c1",
                            "name": "戚大街社区",
                            "level": "community",
                            "children": [
                                {"id": "g1", "name": "第一网格", "level": "grid"},
                                {"id": "g2", "name": "第二网格", "level": "grid"},
                            ],
                        },
                        {
                            "id": "c2",
                            "name": "丁堰社区",
                            "level": "community",
                            "children": [
                                {"id": "g3", "name": "第三网格", "level": "grid"},
                                {"id": "g4", "name": "第四网格", "level": "grid"},
                            ],
                        },
                    ],
                }
            ],
        }
    ],
}
DEPARTMENTS = [
    {"id": "grid-team", "name": "网格工作站", "tier": "grid", "pools": [{"id": "p1"}]},
    {"id": "community-office", "name": "社区居委会", "tier": "community"},
    {"id": "sanitation", "name": "环卫所", "tier": "street"},
    {"id": "urban-mgmt", "name": "城管中队", "tier": "street"},
    {"id": "civil-affairs", "name": "民政局", "tier": "district"},
    {"id": "centre", "name": "联动指挥中心", "tier": "district"},
]
DEPT_IDS = [d["id"] for d in DEPARTMENTS]
CATEGORIES = [
    {
        "code": "E01",
        "name": "市容环境",
        "children": [
            {"code": "E01-01", "name": "私搭乱建"},
            {"code": "E01-10", "name": "暴露垃圾", "time_limit": "4wh"},
            {"code": "E01-11", "name": "楼道堆物"},
        ],
    },
    {
        "code": "E04",
        "name": "街面秩序",
        "children": [
            {"code": "E04-06", "name": "占道经营"},
            {"code": "E04-09", "name": "机动车乱停放", "urgency": "urgent"},
        ],
    },
    {"code": "S01", "name": "代办服务", "children": [{"code": "S01-01", "name": "老年证"}]},
]
CODES = ["E01", "E01-01", "E01-10", "E01-11", "E04", "E04-06", "E04-09", "S01", "S01-01"]
PREFIXES = ["E", "E0", "E01", "E01-1", "E04-", "S"]
ATTRIBUTES = [
    {"name": "households", "type": "integer"},
    {"name": "needy", "type": "boolean"},
    {"name": "kind", "type": "string", "values": ["a", "b", "c"]},
]
WORDS = ["井盖", "垃圾", "占道", "漏水", "楼道", "a1", "b2", "老人"]
CHANNELS = ["patrol", "hotline", "app", "video"]
UNITS = ["d1", "s1", "c1", "c2", "g1", "g2", "g3", "g4"]
TIMES = [
    datetime(2026, 3, 9, 10, 0, tzinfo=SH),  # Monday, working hours
    datetime(2026, 3, 9, 20, 30, tzinfo=SH),  # Monday evening
    datetime(2026, 3, 14, 9, 0, tzinfo=SH),  # Saturday
    datetime(2026, 10, 1, 10, 0, tzinfo=SH),  # National Day
    datetime(2026, 9, 27, 10, 0, tzinfo=SH),  # a Sunday
    datetime(2026, 2, 14, 11, 0, tzinfo=SH),  # make-up Saturday before Spring Festival
    datetime(2031, 5, 6, 20, 0, tzinfo=SH),  # no holiday data: decided only if it cannot matter
]

# --- regexes the engine can express (Python syntax, search semantics) -------------------

_ATOMS = ["井", "盖", "垃", "圾", "a", "1", ".", "[ab]", "[^a]", "[0-9]", "\\d", "(井盖|垃圾)"]
_QUANT = ["", "", "*", "+", "?", "{1,2}", "{2}"]


@st.composite
def regexes(draw: st.DrawFn) -> str:
    def seq() -> str:
        n = draw(st.integers(1, 3))
        return "".join(
            draw(st.sampled_from(_ATOMS)) + draw(st.sampled_from(_QUANT)) for _ in range(n)
        )

    body = seq()
    if draw(st.booleans()):
        body = f"{body}|{seq()}"
        return body
    return ("^" if draw(st.booleans()) else "") + body + ("$" if draw(st.booleans()) else "")


def texts() -> st.SearchStrategy[str]:
    alphabet = st.sampled_from(["井", "盖", "垃", "圾", "a", "b", "1", "2", " ", "x"])
    return st.lists(alphabet, max_size=8).map("".join)


# --- conditions and rules ------------------------------------------------------------------


def _category() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(CODES),
        st.lists(st.sampled_from(CODES), min_size=1, max_size=3, unique=True),
        st.builds(lambda p: {"prefix": p}, st.sampled_from(PREFIXES)),
        st.builds(lambda c: {"ne": c}, st.sampled_from(CODES)),
        st.builds(
            lambda cs: {"not_in": cs},
            st.lists(st.sampled_from(CODES), min_size=1, max_size=2, unique=True),
        ),
    )


def _description() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(WORDS),
        st.lists(st.sampled_from(WORDS), min_size=1, max_size=3, unique=True),
        st.builds(lambda r: {"regex": r}, regexes()),
    )


ADDRESS_WORDS = ["景荣小区", "1号楼", "蓝天路"]


def addresses() -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from([*ADDRESS_WORDS, "井盖", " ", "a"]), min_size=1,
                    max_size=3).map("".join)


def _address() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(ADDRESS_WORDS),
        st.lists(st.sampled_from(ADDRESS_WORDS), min_size=1, max_size=2, unique=True),
        st.builds(lambda p: {"prefix": p}, st.sampled_from(ADDRESS_WORDS)),
        st.builds(lambda a: {"eq": a}, addresses()),
        st.builds(lambda r: {"regex": r}, regexes()),
    )


REPORTERS = ["gw-chen", "gw-li", "12345-0031", "人大代表 王芳"]


def reporters() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(REPORTERS), st.sampled_from(["gw-", "12345-"]).flatmap(
        lambda p: st.sampled_from(["0", "chen", "99"]).map(lambda s: p + s)))


def _reporter() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(REPORTERS),
        st.lists(st.sampled_from(REPORTERS), min_size=1, max_size=2, unique=True),
        st.builds(lambda p: {"prefix": p}, st.sampled_from(["gw-", "12345-"])),
        st.builds(lambda r: {"ne": r}, st.sampled_from(REPORTERS)),
        st.builds(lambda r: {"not_in": [r]}, st.sampled_from(REPORTERS)),
        st.builds(lambda c: {"contains": c}, st.sampled_from(["chen", "人大代表", "0"])),
        st.builds(lambda r: {"regex": r}, regexes()),
    )


def _attributes() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "households": st.one_of(
                st.builds(lambda v: {"gte": v}, st.integers(0, 500)),
                st.builds(lambda v: {"lt": v}, st.integers(0, 500)),
                st.integers(0, 500),
            ),
            "needy": st.booleans(),
            "kind": st.one_of(
                st.sampled_from(["a", "b", "c"]),
                st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=2, unique=True),
            ),
        },
    )


def _reported() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "working_hours": st.booleans(),
            "weekend": st.booleans(),
            "holiday": st.booleans(),
            "workday": st.booleans(),
            "hour": st.one_of(
                st.builds(lambda h: {"gte": h}, st.integers(0, 23)), st.integers(0, 23)
            ),
            "weekday": st.lists(st.integers(1, 7), min_size=1, max_size=3, unique=True),
        },
    )


def _when_fields() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "category": _category(),
            "description": _description(),
            "address": _address(),
            "reporter": _reporter(),
            "channel": st.one_of(
                st.sampled_from(CHANNELS),
                st.lists(st.sampled_from(CHANNELS), min_size=1, max_size=2, unique=True),
            ),
            "urgency": st.sampled_from(["normal", "urgent", "emergency"]),
            "location": st.one_of(
                st.builds(lambda c: {"community": c}, st.sampled_from(["c1", "c2"])),
                st.builds(
                    lambda g: {"grid": g},
                    st.lists(
                        st.sampled_from(["g1", "g2", "g3", "g4"]),
                        min_size=1,
                        max_size=2,
                        unique=True,
                    ),
                ),
            ),
            "reported": _reported(),
            "attributes": _attributes(),
        },
    )


@st.composite
def whens(draw: st.DrawFn) -> dict[str, Any]:
    when = draw(_when_fields())
    if draw(st.integers(0, 5)) == 0:
        when["any"] = draw(st.lists(_when_fields(), min_size=1, max_size=2))
    return when


@st.composite
def outcomes(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {"lead": draw(st.sampled_from(DEPT_IDS))}
    if draw(st.booleans()):
        out["assist"] = draw(st.lists(st.sampled_from(DEPT_IDS), max_size=2, unique=True))
    if draw(st.integers(0, 3)) == 0:
        out["tier"] = draw(st.sampled_from(["grid", "community", "street", "district"]))
    if draw(st.integers(0, 3)) == 0:
        out["tags"] = draw(st.lists(st.sampled_from(["t1", "t2", "t3"]), max_size=2, unique=True))
    if draw(st.integers(0, 4)) == 0:
        out["summon"] = draw(st.lists(st.sampled_from(DEPT_IDS), max_size=2, unique=True))
    return out


@st.composite
def policies(draw: st.DrawFn, max_tables: int = 3, max_rules: int = 8) -> dict[str, Any]:
    """Content of one rule file for a whole policy (lint findings allowed)."""
    tables = []
    n_tables = draw(st.integers(1, max_tables))
    for t in range(n_tables):
        rules = [
            {"id": f"t{t}r{r}", "when": draw(whens()), "then": draw(outcomes())}
            for r in range(draw(st.integers(0, max_rules)))
        ]
        tables.append(
            {
                "id": f"t{t}",
                "hit": draw(st.sampled_from(["first", "first", "collect", "unique"])),
                "rules": rules,
            }
        )
    return {
        "policy": {"name": "generated", "max_rules_per_ruleset": draw(st.sampled_from([16, 256]))},
        "organisation": ORGANISATION,
        "departments": DEPARTMENTS,
        "categories": CATEGORIES,
        "attributes": ATTRIBUTES,
        "routing": {"default": {"lead": "centre", "time_limit": "1wd"}, "tables": tables},
    }


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    """Valid case documents for the generated policies."""
    case: dict[str, Any] = {
        "category": draw(st.sampled_from(CODES)),
        "location": draw(st.sampled_from(UNITS)),
        "description": " ".join(draw(st.lists(st.sampled_from([*WORDS, "x"]), max_size=4))),
        "channel": draw(st.sampled_from(CHANNELS)),
    }
    if draw(st.booleans()):
        case["urgency"] = draw(st.sampled_from(["normal", "urgent", "emergency"]))
    if draw(st.booleans()):
        case["reported_at"] = draw(st.sampled_from(TIMES)).isoformat()
    if draw(st.booleans()):
        case["address"] = draw(addresses())
    if draw(st.booleans()):
        case["reporter"] = draw(reporters())
    case["attributes"] = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "households": st.integers(0, 500),
                "needy": st.booleans(),
                "kind": st.sampled_from(["a", "b", "c"]),
            },
        )
    )
    return case
