"""An example harness: property tests and replays of a policy with gridflow's pytest plugin.

Installing gridflow registers the plugin (fixtures ``gridflow_policy``, ``gridflow_engine``,
``gridflow_clock``, ``gridflow_replay``, ``gridflow_case_strategy``, ...). Run it with
``pytest examples/harness`` from a source checkout (the fixtures default to the example
district, examples/wujin; a host sets ``gridflow_policy = <its rules>`` in its pytest
configuration). See docs/testing.md.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridflow import Actor
from gridflow.replay import to_json
from gridflow.testing import EXAMPLE_POLICY  # examples/wujin

HERE = Path(__file__).resolve().parent
LOG, MAP = HERE / "cases.csv", HERE / "map.yaml"


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_valid_case_gets_a_known_department(gridflow_policy, gridflow_case_strategy, data):
    case = data.draw(gridflow_case_strategy(gridflow_policy))
    decision = gridflow_policy.route(case)
    assert decision.lead in gridflow_policy.registry.departments
    assert decision.tier in gridflow_policy.registry.tiers
    assert decision.policy_version == gridflow_policy.version


def test_an_unhandled_case_becomes_overdue(gridflow_engine, gridflow_clock):
    worker = Actor("gw-1", "grid_worker")
    case = gridflow_engine.report(
        {"category": "E01-10", "location": "qdj-g3", "description": "菜场门口垃圾堆放"}, worker)
    gridflow_engine.file(case.id, Actor("clerk-1", "clerk"))
    view = gridflow_engine.dispatch(case.id, Actor("disp-1", "dispatcher"))
    assert view.lead == "sanitation" and view.due_at is not None  # 4 working hours
    gridflow_clock.advance(timedelta(days=1))
    gridflow_engine.tick()
    assert gridflow_engine.get(case.id).overdue


def test_replay_of_a_command_centre_export(gridflow_replay):
    report = gridflow_replay(EXAMPLE_POLICY, LOG, map=MAP)
    assert report["input"]["bad_rows"] == 1
    assert report["input"]["errors"][0]["row"] == 10  # the line of the row in the file
    routing = report["routing"]
    assert routing["cases"] == 11 and routing["with_actual"] == 11
    assert routing["agreement"] >= 0.7
    indicators = report["lifecycle"]["indicators"]
    assert indicators["reported"] == 11
    assert indicators["completion_rate"] == 1.0  # the open dispute is not due yet


def test_replays_are_deterministic(gridflow_replay):
    first = gridflow_replay(EXAMPLE_POLICY, LOG, map=MAP)
    again = gridflow_replay(EXAMPLE_POLICY, LOG, map=MAP)
    assert to_json(first) == to_json(again)
