"""Loaded policies and PolicyHandle: atomic reload, versioned decisions, isolation, rule tests."""

from __future__ import annotations

import datetime as dt
import shutil
import threading
from pathlib import Path

import pytest

from gridflow.errors import DefinitionError
from gridflow.handle import PolicyHandle
from gridflow.loader import load_policy
from gridflow.policy import Policy

MINI = Path(__file__).parent / "policies" / "mini"
TODAY = dt.date(2026, 3, 1)
GARBAGE = {"category": "E01-10", "location": "g1", "description": "路边有暴露垃圾"}
GARBAGE_THEN = "then: {lead: sanitation, pool: east}"


def copy_mini(dest: Path) -> Path:
    shutil.copytree(MINI, dest)
    return dest


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"fixture drifted: {old!r}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def handle_for(root: Path) -> PolicyHandle:
    return PolicyHandle(root, today=lambda: TODAY)


# --- PolicyHandle --------------------------------------------------------------------------


def test_handle_loads_the_directory_and_routes() -> None:
    handle = handle_for(MINI)
    assert isinstance(handle.current, Policy)
    d = handle.route(GARBAGE)
    assert d.lead == "sanitation"
    assert d.policy_version == handle.current.version


def test_reload_with_a_broken_directory_raises_and_keeps_the_old_policy(tmp_path: Path) -> None:
    root = copy_mini(tmp_path / "p")
    handle = handle_for(root)
    old = handle.current
    edit(root / "routing.yaml", GARBAGE_THEN, "then: {lead: sanitaton, pool: east}")
    with pytest.raises(DefinitionError) as info:
        handle.reload()
    assert "unknown department 'sanitaton'" in str(info.value)
    assert handle.current is old
    assert handle.current.version == old.version
    d = handle.route(GARBAGE)
    assert (d.lead, d.rule, d.policy_version) == ("sanitation", "garbage", old.version)


def test_reload_after_the_directory_disappears_keeps_the_old_policy(tmp_path: Path) -> None:
    root = copy_mini(tmp_path / "p")
    handle = handle_for(root)
    old = handle.current
    shutil.rmtree(root)
    with pytest.raises(DefinitionError):
        handle.reload()
    assert handle.current is old
    assert handle.route(GARBAGE).lead == "sanitation"


def test_a_valid_change_swaps_and_each_decision_names_its_version(tmp_path: Path) -> None:
    root = copy_mini(tmp_path / "p")
    handle = handle_for(root)
    first = handle.current
    before = handle.route(GARBAGE)
    edit(root / "routing.yaml", GARBAGE_THEN, "then: {lead: grid-team}")
    fresh = handle.reload()
    assert handle.current is fresh
    assert fresh.version != first.version
    after = handle.route(GARBAGE)
    assert (before.lead, before.policy_version) == ("sanitation", first.version)
    assert (after.lead, after.policy_version) == ("grid-team", fresh.version)
    # a policy object taken before the reload keeps deciding under its own version
    late = first.route(GARBAGE)
    assert (late.lead, late.policy_version) == ("sanitation", first.version)


def test_failed_reload_after_a_successful_one_keeps_the_newest(tmp_path: Path) -> None:
    root = copy_mini(tmp_path / "p")
    handle = handle_for(root)
    edit(root / "routing.yaml", GARBAGE_THEN, "then: {lead: grid-team}")
    second = handle.reload()
    edit(root / "policy.yaml", "  description:", "  descripton:")
    with pytest.raises(DefinitionError):
        handle.reload()
    assert handle.current is second
    assert handle.route(GARBAGE).lead == "grid-team"


def test_reload_without_changes_keeps_the_version(tmp_path: Path) -> None:
    root = copy_mini(tmp_path / "p")
    handle = handle_for(root)
    version = handle.current.version
    assert handle.reload().version == version


def test_decisions_during_reloads_match_the_version_they_name(tmp_path: Path) -> None:
    """Routing from a thread while the directory flips between two valid versions."""
    root = copy_mini(tmp_path / "p")
    handle = handle_for(root)
    routing = root / "routing.yaml"
    text_a = routing.read_text(encoding="utf-8")
    text_b = text_a.replace(GARBAGE_THEN, "then: {lead: grid-team}")
    version_a = handle.current.version
    routing.write_text(text_b, encoding="utf-8")
    version_b = handle.reload().version
    lead_of = {version_a: "sanitation", version_b: "grid-team"}

    stop = threading.Event()
    seen: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def router() -> None:
        try:
            while not stop.is_set():
                d = handle.route(GARBAGE)
                seen.append((d.policy_version, d.lead))
        except BaseException as exc:  # reported below
            errors.append(exc)

    worker = threading.Thread(target=router)
    worker.start()
    try:
        for i in range(6):
            routing.write_text(text_a if i % 2 == 0 else text_b, encoding="utf-8")
            handle.reload()
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not worker.is_alive()
    assert errors == []
    assert seen
    for version, lead in seen:
        assert lead_of[version] == lead


def test_handle_passes_todays_date_to_the_loader() -> None:
    handle = PolicyHandle(MINI, today=lambda: dt.date(2026, 12, 1))
    assert len(handle.current.warnings) == 1
    assert "2026-12-31" in handle.current.warnings[0].message


# --- several policies in one process --------------------------------------------------------


def test_two_policies_in_one_process_route_independently(tmp_path: Path) -> None:
    other = copy_mini(tmp_path / "other")
    edit(other / "policy.yaml", "name: mini", "name: other")
    edit(other / "routing.yaml", GARBAGE_THEN, "then: {lead: grid-team}")
    edit(other / "routing.yaml", "then: {lead: urban-mgmt,", "then: {lead: centre,")
    a = load_policy(MINI, today=TODAY)
    b = load_policy(other, today=TODAY)  # same table and rule ids, different outcomes
    assert a.version != b.version
    order = [a, b, b, a, a, b]
    for policy in order:
        d = policy.route(GARBAGE)
        expected = "sanitation" if policy is a else "grid-team"
        assert (d.lead, d.rule, d.policy_version) == (expected, "garbage", policy.version)
        street = policy.route({"category": "E04-06", "location": "g2"})
        assert street.lead == ("urban-mgmt" if policy is a else "centre")
    # unmatched cases still take each policy's own default
    assert a.route({"category": "E01-11", "location": "g1"}).rule == "default"
    assert b.route({"category": "E01-11", "location": "g1"}).rule == "default"


def test_the_same_directory_loaded_twice_gives_two_working_policies() -> None:
    a = load_policy(MINI, today=TODAY)
    b = load_policy(MINI, today=TODAY)
    assert a is not b
    assert a.version == b.version
    assert a.route(GARBAGE) == b.route(GARBAGE)


def test_a_failed_load_does_not_disturb_loaded_policies(tmp_path: Path) -> None:
    a = load_policy(MINI, today=TODAY)
    broken = copy_mini(tmp_path / "broken")
    edit(broken / "routing.yaml", "hit: first", "hit: unique")
    edit(broken / "routing.yaml", "{prefix: E04}", "{prefix: E0}")
    with pytest.raises(DefinitionError):
        load_policy(broken, today=TODAY)
    assert a.route(GARBAGE).lead == "sanitation"


# --- rule tests -----------------------------------------------------------------------------


def test_run_tests_passes_on_the_fixture() -> None:
    results = load_policy(MINI, today=TODAY).run_tests()
    assert [r.passed for r in results] == [True] * 4
    assert all(r.failures == () for r in results)
    assert all(r.decision is not None for r in results)


def test_run_tests_reports_failures_with_messages(tmp_path: Path) -> None:
    root = copy_mini(tmp_path / "p")
    edit(root / "tests.yaml", "expect: {lead: sanitation, tier: street, rule: garbage",
         "expect: {lead: grid-team, tier: grid, rule: garbage")
    edit(root / "tests.yaml", "expect: {lead: urban-mgmt, rule: street-order, time_limit: 2wh}",
         "expect: {lead: urban-mgmt, rule: street-order, time_limit: 1wd}")
    results = load_policy(root, today=TODAY).run_tests()
    by_name = {r.name: r for r in results}
    assert [r.passed for r in results] == [False, True, True, False]
    garbage = by_name["暴露垃圾去环卫所"]
    assert "lead: expected 'grid-team', got 'sanitation'" in garbage.failures
    assert "tier: expected 'grid', got 'street'" in garbage.failures
    assert len(garbage.failures) == 2
    assert garbage.decision is not None and garbage.decision.lead == "sanitation"
    assert garbage.source == f"{root / 'tests.yaml'}:2"
    assert by_name["紧急占道经营"].failures == ("time_limit: expected '1wd', got '2wh'",)


def test_a_rule_names_a_handler_and_rule_tests_check_it(tmp_path: Path) -> None:
    root = copy_mini(tmp_path / "p")
    edit(root / "routing.yaml", GARBAGE_THEN, "then: {lead: sanitation, handler: wang-qiang}")
    edit(root / "tests.yaml", "rule: garbage, pool: east,", "rule: garbage, handler: li-si,")
    policy = load_policy(root, today=TODAY)
    d = policy.route(GARBAGE)
    assert (d.lead, d.pool, d.handler) == ("sanitation", None, "wang-qiang")
    assert d.to_dict()["handler"] == "wang-qiang"
    (failed,) = [r for r in policy.run_tests() if not r.passed]
    assert failed.failures == ("handler: expected 'li-si', got 'wang-qiang'",)


def test_run_tests_compares_lists_as_sets(tmp_path: Path) -> None:
    root = copy_mini(tmp_path / "p")
    edit(root / "tests.yaml", "assist: [community-office]", "assist: [centre]")
    results = load_policy(root, today=TODAY).run_tests()
    (failed,) = [r for r in results if not r.passed]
    assert failed.failures == ("assist: expected ['centre'], got ['community-office']",)


def test_run_tests_reports_a_routing_error_instead_of_crashing(tmp_path: Path) -> None:
    root = copy_mini(tmp_path / "p")
    # 2031 is covered neither by chinese-calendar nor by the policy: the due date cannot be
    # computed, which must fail this test only
    edit(root / "tests.yaml", '"2026-03-09T10:00:00+08:00"', '"2031-03-10T10:00:00+08:00"')
    results = load_policy(root, today=TODAY).run_tests()
    assert [r.passed for r in results] == [False, True, True, True]
    (message,) = results[0].failures
    assert message.startswith("routing raised CalendarRangeError")
    assert "2031-03-10" in message
    assert results[0].decision is None
