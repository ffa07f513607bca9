"""Located, safe YAML reading (gridflow.yamlsrc): positions, refusals and limits."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from gridflow.errors import Problem
from gridflow.yamlsrc import Limits, read_yaml


def only_problem(text: str | bytes, limits: Limits | None = None) -> Problem:
    _located, problems = read_yaml("rules/f.yaml", text, limits)
    assert len(problems) == 1, problems
    return problems[0]


def at(problem: Problem) -> tuple[int, int]:
    return problem.line, problem.col


# --- data and positions -------------------------------------------------------------------

NESTED = """\
policy:
  name: 测试
departments:
  - id: a
    pools: [{id: east}, {id: west}]
  - {id: b, tier: grid}
"""


def test_plain_data_comes_back_as_dicts_lists_and_scalars() -> None:
    located, problems = read_yaml("f.yaml", NESTED)
    assert problems == []
    assert located.data == {
        "policy": {"name": "测试"},
        "departments": [
            {"id": "a", "pools": [{"id": "east"}, {"id": "west"}]},
            {"id": "b", "tier": "grid"},
        ],
    }
    assert type(located.data) is dict
    assert type(located.data["departments"]) is list


def test_values_are_located_one_based_in_nested_maps_and_lists() -> None:
    located, _ = read_yaml("f.yaml", NESTED)
    v = located.values
    assert v[("policy", "name")] == (2, 9)
    assert v[("departments",)] == (4, 3)
    assert v[("departments", 0)] == (4, 5)
    assert v[("departments", 0, "id")] == (4, 9)
    assert v[("departments", 0, "pools")] == (5, 12)
    assert v[("departments", 0, "pools", 1)] == (5, 25)
    assert v[("departments", 0, "pools", 1, "id")] == (5, 30)
    assert v[("departments", 1, "tier")] == (6, 19)


def test_keys_are_located_one_based() -> None:
    located, _ = read_yaml("f.yaml", NESTED)
    k = located.keys
    assert k[("policy",)] == (1, 1)
    assert k[("policy", "name")] == (2, 3)
    assert k[("departments", 0, "pools")] == (5, 5)
    assert k[("departments", 0, "pools", 1, "id")] == (5, 26)
    assert k[("departments", 1, "tier")] == (6, 13)


def test_where_falls_back_to_the_nearest_located_ancestor() -> None:
    located, _ = read_yaml("f.yaml", NESTED)
    assert located.where(("departments", 1, "no-such-key")) == (6, 5)
    assert located.where(("departments", 0, "pools"), key=True) == (5, 5)
    problem = located.problem(("departments", 0, "id"), "bad id", suggestion="aa")
    assert str(problem) == "f.yaml:4:9: bad id (did you mean 'aa'?)"


def test_scalars_are_typed_by_the_yaml_core_schema() -> None:
    located, problems = read_yaml(
        "f.yaml", "a: 2026-03-09\nb: 1.5\nc: true\nd: null\ne: 12\nf: '12'\n"
    )
    assert problems == []
    assert located.data == {
        "a": dt.date(2026, 3, 9), "b": 1.5, "c": True, "d": None, "e": 12, "f": "12",
    }


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "--- ~\n"])
def test_empty_file_is_an_empty_mapping(text: str) -> None:
    located, problems = read_yaml("f.yaml", text)
    assert problems == []
    assert located.data == {}


def test_bytes_input_is_decoded_as_utf8() -> None:
    located, problems = read_yaml("f.yaml", "name: 网格员\n".encode())
    assert problems == []
    assert located.data == {"name": "网格员"}


# --- refused constructs -------------------------------------------------------------------


def test_duplicate_key_is_reported_at_the_second_occurrence() -> None:
    p = only_problem("a: 1\nb:\n  c: 1\n  c: 2\n")
    assert at(p) == (4, 3)
    assert "duplicate key 'c'" in p.message
    assert str(p).startswith("rules/f.yaml:4:3: ")


def test_duplicate_key_in_flow_mapping() -> None:
    p = only_problem("a: {b: 1, b: 2}\n")
    assert at(p) == (1, 11)
    assert "duplicate key 'b'" in p.message


@pytest.mark.parametrize(
    "text",
    [
        "a: !!python/object/apply:os.system ['echo pwned']\n",
        "a: !!python/object/apply:os.system {args: ['echo pwned']}\n",
        "a: !!python/object:collections.OrderedDict {}\n",
        "a: !!python/object/new:dict {}\n",
        "a: !!python/name:os.system\n",
        "a: !!python/module:os\n",
        "a: !custom x\n",
        "a: !custom [1, 2]\n",
        "a: !!binary aGVsbG8=\n",
        "a: !!set {x, y}\n",
        "a: !!omap [x: 1]\n",
    ],
)
def test_custom_tags_are_refused_and_nothing_is_constructed(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    def boom(*_a: object, **_k: object) -> int:
        raise AssertionError("os.system was called")

    monkeypatch.setattr(os, "system", boom)
    located, problems = read_yaml("f.yaml", text)
    assert len(problems) == 1, problems
    assert at(problems[0]) == (1, 4)
    assert "unsupported YAML tag" in problems[0].message
    # nothing of the tagged value survives into the data
    assert located.data is None or located.data.get("a") is None


def test_tagged_key_is_refused() -> None:
    p = only_problem("!!python/name:os.system : 1\n")
    assert at(p) == (1, 1)
    assert "plain scalars" in p.message


def test_complex_key_is_refused() -> None:
    p = only_problem("? [a, b]\n: 1\n")
    assert "plain scalars" in p.message


def test_merge_keys_are_refused() -> None:
    p = only_problem("base: &b {x: 1}\nd:\n  <<: *b\n  y: 2\n")
    assert at(p) == (3, 3)
    assert "merge keys" in p.message


def test_plain_aliases_are_allowed() -> None:
    located, problems = read_yaml("f.yaml", "a: &x [1]\nb: *x\nc: *x\n")
    assert problems == []
    assert located.data == {"a": [1], "b": [1], "c": [1]}


def test_a_reused_anchor_is_a_located_error_not_a_warning() -> None:
    # pytest turns warnings into errors: a warning would fail this test too
    p = only_problem("a: &x 1\nb: &x [2]\nc: *x\n")
    assert at(p) == (2, 4)
    assert "duplicate anchor" in p.message and "(line 1)" in p.message


def test_yaml_1_2_scalars_yes_and_sexagesimal_stay_strings() -> None:
    located, problems = read_yaml("f.yaml", "a: yes\nb: on\nc: 9:30\nd: true\ne: 010\nf: 1.5\n")
    assert problems == []
    assert located.data == {"a": "yes", "b": "on", "c": "9:30", "d": True, "e": 10, "f": 1.5}


# --- limits -------------------------------------------------------------------------------


def billion_laughs(levels: int = 9) -> str:
    lines = ["lol0: &lol0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        refs = ", ".join([f"*lol{i - 1}"] * 10)
        lines.append(f"lol{i}: &lol{i} [{refs}]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_hits_the_node_limit_quickly() -> None:
    text = billion_laughs()  # 10**9 values once expanded, a few hundred bytes of text
    started = time.perf_counter()
    located, problems = read_yaml("f.yaml", text)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"took {elapsed:.2f}s"
    assert len(problems) == 1
    assert "expands to more than 500000 values" in problems[0].message
    assert "alias" in problems[0].message
    assert located.data is None
    # located at the anchor whose expansion first crosses the limit (lol5: 10**6 values)
    assert at(problems[0]) == (6, 7)


def test_node_limit_is_configurable() -> None:
    ok, problems = read_yaml("f.yaml", "a: [1, 2, 3]\n", Limits(max_nodes=5))
    assert problems == [] and ok.data == {"a": [1, 2, 3]}
    p = only_problem("a: [1, 2, 3, 4]\n", Limits(max_nodes=5))
    assert "more than 5 values" in p.message


def test_recursive_alias_is_refused() -> None:
    p = only_problem("a: &a [1, *a]\n")
    assert "refusing to load it" in p.message


def test_nesting_deeper_than_the_limit() -> None:
    assert read_yaml("f.yaml", "a: [[[1]]]\n", Limits(max_depth=4))[1] == []
    p = only_problem("a: [[[1]]]\n", Limits(max_depth=3))
    assert "nesting deeper than 3 levels" in p.message
    assert at(p) == (1, 7)


def block_nesting(levels: int) -> str:
    return "".join("  " * i + f"k{i}:\n" for i in range(levels)) + "  " * levels + "leaf\n"


def test_block_nesting_is_located_at_the_first_value_too_deep() -> None:
    text = block_nesting(6)  # 'leaf' (line 7, col 13) is 6 levels below the root
    assert read_yaml("f.yaml", text, Limits(max_depth=6))[1] == []
    p = only_problem(text, Limits(max_depth=5))
    assert at(p) == (7, 13)
    p = only_problem(text, Limits(max_depth=2))
    assert at(p) == (4, 7)


def test_block_nesting_deeper_than_the_default_limit() -> None:
    p = only_problem(block_nesting(60))
    assert "nesting deeper than 48 levels" in p.message
    assert at(p) == (50, 99)


def test_deeply_nested_complex_key_is_refused_without_recursion_error() -> None:
    p = only_problem("? " + "[" * 600 + "]" * 600 + "\n: 1\n")
    assert "nesting deeper than 48 levels" in p.message


def test_pathological_nesting_is_refused_without_recursion_error() -> None:
    text = "a: " + "[" * 600 + "]" * 600 + "\n"
    p = only_problem(text)  # a RecursionError here would escape as an exception
    assert "nesting deeper than 48 levels" in p.message
    assert p.line == 1


def test_deep_aliases_count_towards_the_nesting_limit() -> None:
    # each level is shallow on the page but the expansion is 3 levels deep per alias
    text = "a: &a [[[1]]]\nb: &b [[[*a]]]\nc: [[[*b]]]\n"
    assert read_yaml("f.yaml", text, Limits(max_depth=12))[1] == []
    p = only_problem(text, Limits(max_depth=8))
    assert "nesting deeper than 8 levels" in p.message


def test_file_over_max_bytes() -> None:
    p = only_problem("a: 12345\n", Limits(max_bytes=8))
    assert at(p) == (1, 1)
    assert "9 bytes" in p.message and "limit of 8" in p.message
    assert read_yaml("f.yaml", "a: 1234\n", Limits(max_bytes=8))[1] == []


def test_max_bytes_counts_utf8_bytes_not_characters() -> None:
    text = "a: 网格\n"  # 6 characters, 10 bytes
    p = only_problem(text, Limits(max_bytes=9))
    assert "10 bytes" in p.message


def test_non_utf8_bytes() -> None:
    p = only_problem(b"a: ok\nb: \xff\xfe\n")
    assert "not UTF-8" in p.message
    assert (p.line, p.col) == (2, 4)  # the first byte that is not UTF-8
    assert "GBK" not in p.message


def test_gbk_encoded_file_is_not_utf8() -> None:
    p = only_problem("a: 1\nname: 网格员\n".encode("gbk"))
    assert "not UTF-8" in p.message
    assert "it looks like GBK: save the file as UTF-8" in p.message
    assert at(p) == (2, 7)


# --- values YAML cannot construct -----------------------------------------------------------


def test_an_impossible_date_is_reported_where_it_is_and_the_rest_is_read() -> None:
    located, problems = read_yaml("f.yaml", "a: 1\nb: [2027-01-01, 2027-02-30]\nc: 网格\n")
    (p,) = problems
    assert at(p) == (2, 17)
    assert p.message == "invalid date '2027-02-30': day is out of range for month"
    # kept as its text (so its schema check does not report it again), the rest as usual
    assert located.data == {"a": 1, "b": [dt.date(2027, 1, 1), "2027-02-30"], "c": "网格"}
    assert located.bad == {("b", 1)}


# --- full-width punctuation (a Chinese input method left on) ---------------------------------


def test_a_full_width_colon_after_a_key_is_pointed_at() -> None:
    text = "policy:\n  name： mini\n  description: x\nrouting:\n  default：{lead: a}\n"
    _located, problems = read_yaml("f.yaml", text)
    assert [(at(p), p.message) for p in problems] == [
        ((2, 7), "full-width colon '：' after 'name': YAML needs the ASCII colon ':'"),
        ((5, 10), "full-width colon '：' after 'default': YAML needs the ASCII colon ':'"),
    ]


def test_full_width_punctuation_inside_text_is_text() -> None:
    text = "policy:\n  name: 说明：网格\n  description: |\n    Note：\n    \u3000\u3000据报道\n"
    located, problems = read_yaml("f.yaml", text)
    assert problems == []
    assert located.data["policy"]["name"] == "说明：网格"


def test_a_full_width_space_in_the_indentation_is_pointed_at() -> None:
    p = only_problem("policy:\n  name: a\n\u3000\u3000description: b\n  x: 1\n")
    assert at(p) == (3, 1)  # not line 4, where YAML gives up
    assert "full-width space (U+3000) in the indentation" in p.message
    for text in ("policy:\n  name: a\n\u3000description: b\n",  # YAML reads '　description'
                 "policy:\n  name: a\n\u3000 description: b\n"):
        p = only_problem(text)
        assert at(p) == (3, 1)
        assert p.message.startswith("full-width space (U+3000) before 'description'")


# --- syntax errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("a: 1\nb: [1, 2\nc: 3\n", (3, 2)),
        ("a:\n  b: 1\n c: 2\n", (3, 2)),
        ("a: 1\nb: 'unterminated\n", (3, 1)),
        ("a: 1\n\tb: 2\n", (2, 1)),
        ("a: *nowhere\n", (1, 4)),
    ],
)
def test_syntax_error_is_located(text: str, where: tuple[int, int]) -> None:
    p = only_problem(text)
    assert p.message.startswith("YAML")
    assert at(p) == where
    assert str(p).startswith(f"rules/f.yaml:{where[0]}:{where[1]}: ")
