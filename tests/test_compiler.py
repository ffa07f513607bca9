"""The durable_rules compiler: regex translation, sharding, engine limits, isolation."""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridflow import load_policy
from gridflow.compiler import (
    MAX_PREDICATES_PER_RULESET,
    CompiledRules,
    RuleSpec,
    TableSpec,
    check_regex,
)
from gridflow.conditions import CATEGORY, DESCRIPTION, AllOf, Predicate
from tests import strategies as gs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from policygen import sample_cases, write_policy


def _single(op: str, value: str) -> CompiledRules:
    rule = RuleSpec("r", Predicate(DESCRIPTION, op, value, "description"))  # type: ignore[arg-type]
    return CompiledRules([TableSpec("t", "first", (rule,))], category_groups={"E01": "E01"})


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=gs.regexes(), texts=st.lists(gs.texts(), min_size=1, max_size=6))
def test_regex_conditions_match_exactly_like_python_search(pattern: str, texts: list[str]) -> None:
    compiled = _single("regex", pattern)
    for text in texts:
        want = re.search(pattern, text, re.ASCII) is not None
        assert (compiled.match({CATEGORY: "E01", DESCRIPTION: text}) == [[0]]) == want


@pytest.mark.parametrize(
    ("literal", "text"),
    [("axa", "xaxax"), ("盖井垃盖", "-圾盖井垃盖井"), ("1井盖1", "盖11井盖1井盖盖")],
)
def test_contains_is_exact_where_the_engine_regex_is_not(literal: str, text: str) -> None:
    """durable_rules' own ``$mt`` says no to these (fuzzed); gridflow must say yes."""
    assert _single("contains", literal).match({CATEGORY: "E01", DESCRIPTION: text}) == [[0]]
    assert _single("contains", literal + "!").match({CATEGORY: "E01", DESCRIPTION: text}) == [[]]


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("(?<=a", "missing ), unterminated subpattern"),
        ("[", "unterminated character set"),
        ("a{2,1}", "min repeat greater than max repeat"),
    ],
)
def test_invalid_regexes_are_refused_with_a_reason(pattern: str, message: str) -> None:
    problem = check_regex(pattern)
    assert problem is not None and message in problem
    assert check_regex("(井盖|窨井)[0-9]+") is None


def test_a_missing_text_field_matches_nothing() -> None:
    compiled = _single("regex", ".*")
    assert compiled.match({CATEGORY: "E01"}) == [[]]
    assert compiled.match({CATEGORY: "E01", DESCRIPTION: ""}) == [[0]]


def test_no_ruleset_exceeds_the_shard_size() -> None:
    rules = tuple(
        RuleSpec(
            f"r{i}",
            AllOf(
                (
                    Predicate(CATEGORY, "eq", "E01-01", "category"),
                    Predicate(DESCRIPTION, "contains", f"词{i}号", "d"),
                )
            ),
        )
        for i in range(1200)
    )
    compiled = CompiledRules(
        [TableSpec("t", "first", rules)],
        category_groups={"E01-01": "E01"},
        max_rules_per_ruleset=200,
    )
    # 200 rules per ruleset, but each rule brings its own text test and a message holds
    # fewer than 256 properties: shards also stop at MAX_PREDICATES_PER_RULESET
    assert compiled.largest_ruleset == MAX_PREDICATES_PER_RULESET == 150
    assert compiled.ruleset_count == 8
    # the lowest index over all shards wins, as one big ruleset would decide
    fact = {CATEGORY: "E01-01", DESCRIPTION: "词1100号 和 词950号 和 词1199号"}
    assert compiled.match(fact) == [[950]]
    with pytest.raises(ValueError):
        CompiledRules([], category_groups={}, max_rules_per_ruleset=600)


@pytest.mark.slow
def test_a_5000_rule_policy_loads_and_routes_like_the_plain_python_baseline(tmp_path: Path) -> None:
    shape = write_policy(tmp_path, 5000)
    policy = load_policy(tmp_path)
    assert policy.router.compiled.largest_ruleset <= 256
    index: dict[str, list[tuple[str, str]]] = {}
    for r in shape["rules"]:
        index.setdefault(r["when"]["category"], []).append(
            (r["when"]["description"], r["then"]["lead"])
        )
    for case in sample_cases(shape, 400):
        want = next(
            (lead for word, lead in index[case["category"]] if word in case["description"]),
            "centre",
        )
        assert policy.route(case).lead == want


def test_engine_is_serialised_across_threads(tmp_path: Path) -> None:
    shape = write_policy(tmp_path, 300)
    policy = load_policy(tmp_path)
    cases = sample_cases(shape, 200)
    expected = [policy.route(c).lead for c in cases]
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append([policy.route(c).lead for c in cases])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [expected] * 4


def test_session_state_stays_empty_after_many_cases(tmp_path: Path) -> None:
    """Events are consumed and facts retracted: no per-case state accumulates."""
    import durable_rules_engine

    shape = write_policy(tmp_path, 100)
    policy = load_policy(tmp_path)
    for case in sample_cases(shape, 500):
        policy.route(case)
    compiled = policy.router.compiled
    for handle in compiled._handles.values():
        assert durable_rules_engine.get_facts(handle, "0") in ("[]", "{}")
