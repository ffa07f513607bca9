"""Scenario tests written from the seed stories (BRIEF §3/§4, /work/shared/seeds).

They run on the example district (examples/wujin); the escalation stories use the test
policy in tests/policies/engine (wujin plus escalation on overdue and summoning at the
district tier), because wujin itself declares no escalation settings.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import pytest

from gridflow import Actor, Engine
from gridflow.clock import ManualClock
from gridflow.errors import CaseValidationError, TransitionNotAllowed
from tests.test_engine import (
    CIVIL,
    CLERK,
    CST,
    DISPATCHER,
    DUTY_CHIEF,
    ENGINE_POLICY,
    GRID_CHIEF,
    LIAISON,
    POLICE,
    RESIDENT,
    REVIEWER,
    SUPERVISOR,
    assert_consistent,
    load_case,
    to_state,
)


def test_tianjin_elderly_certificate(gridflow_engine: Engine, gridflow_clock: ManualClock) -> None:
    """Seed 002 (天津东丽): the grid worker collects the papers at home, the grid chief reviews
    and files, the district civil affairs bureau issues the certificate."""
    engine, clock = gridflow_engine, gridflow_clock
    worker = Actor("gw-dongfang-2", "grid_worker", department="grid-worker", unit="dongfang-g2")
    view = engine.report(load_case("08-elderly-card"), worker, idempotency_key="app:778")
    assert view.state == "reported" and view.location == "dongfang-g2"
    clock.advance(minutes=30)
    view = engine.file(view.id, Actor("chief-dongfang", "grid_chief"), note="papers checked")
    assert view.state == "filed"
    view = engine.dispatch(view.id, DISPATCHER)
    assert (view.lead, view.tier, view.assist) == ("district-civil", "district", ("grid-worker",))
    assert view.due_at == datetime(2026, 3, 16, 9, 30, tzinfo=CST)  # 5 working days
    clock.advance(days=1)
    engine.accept(view.id, CIVIL)
    clock.advance(days=2)
    engine.feedback(view.id, CIVIL, evidence=["https://img/card-issued.jpg"],
                    note="certificate issued, delivered by the grid worker")
    engine.verify(view.id, worker)
    engine.close(view.id, SUPERVISOR)
    view = engine.evaluate(view.id, RESIDENT, "satisfied")
    assert view.state == "evaluated" and not view.warned and not view.overdue
    assert engine.tick(clock.now() + timedelta(days=30)) == []
    assert [(e.type, e.actor_role) for e in engine.history(view.id)] == [
        ("reported", "grid_worker"), ("file", "grid_chief"), ("dispatch", "dispatcher"),
        ("accept", "handler"), ("feedback", "handler"), ("verify", "grid_worker"),
        ("close", "supervisor"), ("evaluate", "resident"),
    ]
    assert_consistent(engine, view.id)


def test_hangzhou_slot_machine_in_grid_four(
    gridflow_engine: Engine, gridflow_clock: ManualClock
) -> None:
    """Seed 001: "第四网格有个老虎机，需立即整治" — reported in the grid chat, rectified
    at once."""
    engine, clock = gridflow_engine, gridflow_clock
    worker = Actor("gw-dongfang-4", "grid_worker", department="grid-worker", unit="dongfang-g4")
    view = engine.report(load_case("12-slot-machine"), worker)
    engine.file(view.id, DUTY_CHIEF)
    view = engine.dispatch(view.id, DISPATCHER)
    assert view.lead == "police-station" and view.decision is not None
    assert view.decision["time_limit"] == "1wd"
    clock.advance(hours=1)
    engine.accept(view.id, POLICE)
    clock.advance(hours=1)
    engine.feedback(view.id, POLICE, evidence=["https://img/slot-machine-seized.jpg"])
    engine.verify(view.id, worker)
    view = engine.close(view.id, SUPERVISOR)
    assert view.closed_at is not None and view.due_at is not None
    assert view.closed_at < view.due_at  # rectified within the limit
    assert engine.overdue(view.due_at + timedelta(hours=1)) == []


def test_pinggu_missing_person_broadcast(
    gridflow_engine: Engine, gridflow_clock: ManualClock
) -> None:
    """Seed 004 (平谷): a missing person is broadcast to every grid of the street."""
    engine, clock = gridflow_engine, gridflow_clock
    view = engine.report(load_case("09-missing-person"), RESIDENT)
    engine.file(view.id, CLERK)
    view = engine.dispatch(view.id, Actor("system", "system"))
    assert view.lead == "police-station"
    broadcasts = [n for n in view.data["notify"] if n["kind"] == "broadcast"]
    assert len(broadcasts) == 1
    grids = engine.policy.registry.descendants_at("qishuyan", "grid")
    assert sorted(broadcasts[0]["units"]) == sorted(grids) and len(grids) == 35
    assert view.due_at == clock.now() + timedelta(hours=2)  # wall-clock hours: an emergency
    with engine.store.transaction() as tx:
        messages = [m for m in tx.outbox_fetch(100) if m.case_id == view.id]
    dispatch = next(m for m in messages if m.type == "dispatch")
    assert len(dispatch.payload["payload"]["decision"]["notify"][0]["units"]) == 35


def test_misrouted_twice_then_escalated_with_departments_summoned(
    gridflow_engine_factory: Callable[..., Engine],
) -> None:
    engine = gridflow_engine_factory(ENGINE_POLICY)
    cid = to_state(engine, "handling", "10-dog-nuisance")
    community = Actor("cs-1", "handler", department="community-station")
    engine.return_case(cid, community, "the dog's owner lives in another community")
    view = engine.dispatch(cid, DISPATCHER)
    assert view.lead == "street-command"
    view = engine.return_case(cid, Actor("sc-1", "handler", department="street-command"),
                              "needs enforcement powers")
    assert view.state == "filed" and view.tier == "district"
    assert view.escalations[-1]["cause"] == "repeated returns"
    # Routing alone would send it back to the command centre (the default route is never
    # excluded); the duty chief overrides and the liaison blows the whistle.
    assert engine.policy.route(view.data["case"], exclude=list(view.returned_by)).default
    view = engine.dispatch(cid, DUTY_CHIEF, override=("district-cg", "escalated after returns"))
    assert view.tier == "district" and view.lead == "district-cg"
    view = engine.summon(cid, LIAISON, ["police-station", "community-station"], "joint handling")
    assert view.summoned == ("police-station", "community-station")
    engine.accept(cid, Actor("lead-1", "handler", department=view.lead))
    engine.feedback(cid, POLICE, evidence=["https://img/dog-leashed.jpg"])
    engine.verify(cid, SUPERVISOR)
    assert engine.close(cid, SUPERVISOR).state == "closed"
    assert_consistent(engine, cid)


def test_overdue_case_warned_then_escalated(gridflow_engine_factory: Callable[..., Engine]) -> None:
    engine = gridflow_engine_factory(ENGINE_POLICY)
    cid = to_state(engine, "handling", "01-goods-on-sidewalk")
    view = engine.get(cid)
    assert view.warn_at is not None and view.due_at is not None
    assert [e.type for e in engine.tick(view.warn_at)] == ["warn"]
    assert engine.get(cid).warned and [v.id for v in engine.near_due("1wh", view.warn_at)] == [cid]
    fired = engine.tick(view.due_at)
    assert [(e.type, e.reason) for e in fired] == [
        ("mark_overdue", None), ("escalate", "overdue at tier 'grid'")]
    view = engine.get(cid)
    assert view.overdue and view.tier == "community"
    assert [v.id for v in engine.overdue(view.due_at)] == [cid]
    assert engine.tick(view.due_at + timedelta(days=1)) == []
    assert_consistent(engine, cid)


# --------------------------------------------------------------------------- appeals


@pytest.mark.parametrize("upheld", [True, False])
def test_routing_appeal(gridflow_engine: Engine, upheld: bool) -> None:
    engine = gridflow_engine
    cid = to_state(engine, "handling")
    engine.appeal(cid, CIVIL, "routing", "elderly cards are issued by the street office")
    if not upheld:
        with pytest.raises(CaseValidationError):
            engine.decide_appeal(cid, REVIEWER, upheld=False)
        view = engine.decide_appeal(cid, REVIEWER, upheld=False, reason="the district issues them")
        assert view.state == "handling" and view.lead == "district-civil"
        assert view.appeals[-1]["upheld"] is False and view.exemptions == ()
        return
    with pytest.raises(TransitionNotAllowed):
        engine.decide_appeal(cid, GRID_CHIEF, upheld=True)
    view = engine.decide_appeal(cid, REVIEWER, upheld=True)
    assert view.state == "filed" and view.pending_appeal is None
    assert view.exemptions[-1]["kind"] == "routing"
    assert view.exemptions[-1]["department"] == "district-civil"
    view = engine.dispatch(cid, DISPATCHER)
    assert view.lead != "district-civil"  # re-routed without the department
    assert view.returned_by == ()  # an upheld appeal is not a "return" failure
    assert_consistent(engine, cid)


@pytest.mark.parametrize("upheld", [True, False])
def test_score_appeal(gridflow_engine: Engine, upheld: bool) -> None:
    engine = gridflow_engine
    cid = to_state(engine, "evaluated")
    engine.appeal(cid, CIVIL, "score", "the resident was away, callback impossible")
    view = engine.decide_appeal(cid, REVIEWER, upheld=upheld,
                                reason=None if upheld else "callback was possible")
    assert view.state == "evaluated" and view.pending_appeal is None
    assert view.appeals[-1]["upheld"] is upheld
    if upheld:
        assert view.exemptions[-1] == {
            "kind": "score", "department": "district-civil", "filed_by": CIVIL.id,
            "reason": "the resident was away, callback impossible"}
    else:
        assert view.exemptions == ()


@pytest.mark.parametrize("upheld", [True, False])
def test_resident_appeal(gridflow_engine: Engine, upheld: bool) -> None:
    engine = gridflow_engine
    cid = to_state(engine, "closed")
    with pytest.raises(TransitionNotAllowed):
        engine.appeal(cid, CIVIL, "resident", "not the resident")
    engine.appeal(cid, RESIDENT, "resident", "the certificate has a wrong birth date")
    view = engine.decide_appeal(cid, REVIEWER, upheld=upheld,
                                reason=None if upheld else "the date matches the ID card")
    if upheld:
        assert view.state == "handling" and view.reopen_count == 1 and view.closed_at is None
        engine.feedback(cid, CIVIL, evidence=["https://img/corrected.jpg"])
        engine.verify(cid, SUPERVISOR)
        assert engine.close(cid, SUPERVISOR).state == "closed"
    else:
        assert view.state == "closed" and view.appeals[-1]["upheld"] is False
    assert_consistent(engine, cid)
