"""The engine facade: every command's happy path and refusals, timers, escalation, appeals."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

import gridflow
from gridflow import Actor, Engine
from gridflow.clock import ManualClock
from gridflow.errors import (
    CaseNotFound,
    CaseValidationError,
    ConcurrencyConflict,
    RoleNotAllowed,
    TransitionNotAllowed,
)
from gridflow.handle import PolicyHandle
from gridflow.projection import project
from gridflow.store import Store
from gridflow.store.core import StoreTx

ROOT = Path(__file__).resolve().parent.parent
WUJIN = ROOT / "examples" / "wujin"
ENGINE_POLICY = Path(__file__).resolve().parent / "policies" / "engine"
CST = ZoneInfo("Asia/Shanghai")

GRID_WORKER = Actor("gw-chen", "grid_worker", department="grid-worker", unit="qdj-g3")
GRID_CHIEF = Actor("gc-1", "grid_chief")
CLERK = Actor("clerk-1", "clerk")
DISPATCHER = Actor("disp-1", "dispatcher")
DUTY_CHIEF = Actor("duty-1", "duty_chief")
LIAISON = Actor("liaison-1", "liaison", department="liaison")
SUPERVISOR = Actor("sup-1", "supervisor")
RESIDENT = Actor("res-1", "resident")
REVIEWER = Actor("rev-1", "reviewer")
CIVIL = Actor("civil-1", "handler", department="district-civil")
POLICE = Actor("police-1", "handler", department="police-station")


def load_case(name: str, **changes: Any) -> dict[str, Any]:
    case: dict[str, Any] = json.loads((WUJIN / "cases" / f"{name}.json").read_text("utf-8"))
    case.pop("id", None)
    case.pop("reported_at", None)
    case.update(changes)
    return case


def handler_for(view: gridflow.engine.CaseView, name: str = "h-1") -> Actor:
    return Actor(name, "handler", department=view.lead)


def snapshot(engine: Engine, case_id: str) -> tuple[int, list[Any], dict[str, Any]]:
    view = engine.get(case_id)
    return view.version, [e.to_dict() for e in engine.history(case_id)], dict(view.data)


def assert_refused(
    engine: Engine, case_id: str, calls: list[tuple[Any, type[Exception], str]]
) -> None:
    """Each call raises its error (message matched) and leaves the case as it was."""
    before = snapshot(engine, case_id)
    for call, error, message in calls:
        with pytest.raises(error, match=message):
            call()
        assert snapshot(engine, case_id) == before


def timers(engine: Engine, case_id: str) -> list[tuple[str, datetime, datetime | None]]:
    with engine.store.transaction() as tx:
        return [(t.kind, t.due_at, t.fired_at) for t in tx.timers(case_id)]


def assert_consistent(engine: Engine, case_id: str) -> None:
    history = engine.history(case_id)
    view = engine.get(case_id)
    assert [e.seq for e in history] == list(range(1, len(history) + 1))
    assert view.version == len(history)
    assert project(history) == view.data


def to_state(engine: Engine, state: str, case: str = "08-elderly-card") -> str:
    """Drive a new case to ``state`` through the main path; returns its id."""
    view = engine.report(load_case(case), GRID_WORKER)
    cid = view.id
    path = ["filed", "dispatched", "handling", "handled", "verified", "closed", "evaluated"]
    for step in path[: path.index(state) + 1] if state != "reported" else []:
        if step == "filed":
            view = engine.file(cid, CLERK)
        elif step == "dispatched":
            view = engine.dispatch(cid, DISPATCHER)
        elif step == "handling":
            h = handler_for(view)
            view = engine.claim(cid, h) if view.pool else engine.accept(cid, h)
        elif step == "handled":
            view = engine.feedback(cid, handler_for(view), evidence=["https://img/1.jpg"])
        elif step == "verified":
            view = engine.verify(cid, SUPERVISOR)
        elif step == "closed":
            view = engine.close(cid, SUPERVISOR)
        elif step == "evaluated":
            view = engine.evaluate(cid, RESIDENT, "satisfied")
    assert view.state == state
    return cid


@pytest.fixture
def engine(gridflow_engine: Engine) -> Engine:
    return gridflow_engine


@pytest.fixture
def clock(gridflow_clock: ManualClock) -> ManualClock:
    return gridflow_clock


@pytest.fixture
def strict_engine(gridflow_engine_factory: Callable[..., Engine]) -> Engine:
    """The engine on the test policy with escalation on overdue at grid/community."""
    return gridflow_engine_factory(ENGINE_POLICY)


# --------------------------------------------------------------------------- happy path


def test_full_seven_step_flow_is_an_event_history(engine: Engine, clock: ManualClock) -> None:
    cid = to_state(engine, "evaluated")
    view = engine.get(cid)
    assert view.satisfaction == "satisfied"
    assert view.verified and view.closed_at is not None
    types = [e.type for e in engine.history(cid)]
    assert types == ["reported", "file", "dispatch", "accept", "feedback", "verify", "close",
                     "evaluate"]
    first = engine.history(cid)[0]
    assert first.actor_id == GRID_WORKER.id and first.actor_role == "grid_worker"
    assert first.at == clock.now()
    assert all(e.policy_version == engine.policy.version for e in engine.history(cid))
    assert_consistent(engine, cid)


def test_exports() -> None:
    assert gridflow.Engine is Engine and gridflow.Actor is Actor
    assert {"Engine", "Actor"} <= set(gridflow.__all__)


def test_engine_accepts_policy_handle_and_host_store(clock: ManualClock, tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'host.sqlite'}")
    store.create_all()
    engine = Engine(PolicyHandle(WUJIN), store, clock)
    cid = to_state(engine, "handling")
    again = Engine(gridflow.load_policy(WUJIN), store, clock)  # another process, same DB
    assert again.get(cid).state == "handling"
    store.dispose()


def test_unknown_case_raises_case_not_found(engine: Engine) -> None:
    with pytest.raises(CaseNotFound):
        engine.get("nope")
    with pytest.raises(CaseNotFound):
        engine.history("nope")
    with pytest.raises(CaseNotFound):
        engine.file("nope", CLERK)


# --------------------------------------------------------------------------- intake


def test_invalid_report_names_fields_and_writes_nothing(engine: Engine) -> None:
    with pytest.raises(CaseValidationError) as err:
        engine.report({"category": "XX-99", "location": "nowhere"}, GRID_WORKER)
    assert set(err.value.fields) == {"category", "location"}
    assert engine.worklist() == []


def test_idempotent_intake_returns_the_same_case(engine: Engine) -> None:
    a = engine.report(load_case("08-elderly-card"), GRID_WORKER, idempotency_key="app-123")
    b = engine.report(load_case("08-elderly-card"), GRID_WORKER, idempotency_key="app-123")
    assert a.id == b.id
    assert len(engine.history(a.id)) == 1
    assert len(engine.worklist()) == 1


def test_idempotent_intake_under_race(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    a = engine.report(load_case("08-elderly-card"), GRID_WORKER, idempotency_key="race")
    # The other writer's row is not visible at the first check: the insert conflicts.
    original = StoreTx.case_by_idempotency_key
    calls: list[str] = []

    def unseen_first(self: StoreTx, key: str) -> Any:
        calls.append(key)
        return None if len(calls) == 1 else original(self, key)

    monkeypatch.setattr(StoreTx, "case_by_idempotency_key", unseen_first)
    b = engine.report(load_case("08-elderly-card"), GRID_WORKER, idempotency_key="race")
    assert b.id == a.id and len(engine.worklist()) == 1
    assert len(calls) == 2


def test_case_ids_from_key_or_factory(gridflow_engine_factory: Callable[..., Engine]) -> None:
    seq = iter(["QSY-1", "QSY-2"])
    engine = gridflow_engine_factory(ids=lambda: next(seq))
    assert engine.report(load_case("08-elderly-card"), GRID_WORKER).id == "QSY-1"
    keyed = engine.report(load_case("08-elderly-card"), GRID_WORKER, idempotency_key="k")
    other = gridflow_engine_factory()
    again = other.report(load_case("08-elderly-card"), GRID_WORKER, idempotency_key="k")
    assert again.id == keyed.id
    assert engine.report(load_case("08-elderly-card", id="GIVEN-7"), GRID_WORKER).id == "GIVEN-7"


def test_report_by_unknown_role_is_refused(engine: Engine) -> None:
    with pytest.raises(RoleNotAllowed):
        engine.report(load_case("08-elderly-card"), Actor("x", "mayor"))


def test_on_the_spot_resolution(engine: Engine) -> None:
    with pytest.raises(CaseValidationError) as err:
        engine.report(load_case("01-goods-on-sidewalk"), GRID_WORKER, on_spot=True)
    assert err.value.fields == ("evidence",)
    with pytest.raises(RoleNotAllowed):
        engine.report(load_case("01-goods-on-sidewalk"), RESIDENT, on_spot=True,
                      evidence=["https://img/a.jpg"])
    view = engine.report(load_case("01-goods-on-sidewalk"), GRID_WORKER, on_spot=True,
                         evidence=["https://img/before.jpg", "https://img/after.jpg"])
    assert view.state == "handled" and view.on_spot
    assert view.lead == "grid-worker" and view.handler == GRID_WORKER.id
    assert view.evidence == ("https://img/before.jpg", "https://img/after.jpg")
    assert [e.type for e in engine.history(view.id)] == ["reported", "resolve_on_spot"]
    engine.verify(view.id, GRID_CHIEF)
    engine.close(view.id, SUPERVISOR)
    assert engine.evaluate(view.id, RESIDENT, "satisfied").state == "evaluated"
    assert_consistent(engine, view.id)


# --------------------------------------------------------------------------- dispatch


def test_dispatch_stores_decision_and_due_time(engine: Engine, clock: ManualClock) -> None:
    cid = to_state(engine, "filed")
    view = engine.dispatch(cid, DISPATCHER)
    assert view.state == "dispatched"
    assert (view.lead, view.tier, view.unit) == ("district-civil", "district", "wujin")
    assert view.assist == ("grid-worker",)
    assert view.decision is not None
    assert view.decision["rule"] == "elderly-card"
    assert view.decision["policy_version"] == engine.policy.version
    assert view.decision["time_limit"] == "5wd"
    # the clock starts at dispatch (Monday 09:00): 5 working days → next Monday 09:00
    assert view.dispatched_at == clock.now()
    assert view.due_at == datetime(2026, 3, 16, 9, 0, tzinfo=CST)
    # warning at 80 % of 37.5 working hours = 30 h → Friday 09:00
    assert view.warn_at == datetime(2026, 3, 13, 9, 0, tzinfo=CST)
    assert [(k, d) for k, d, _ in timers(engine, cid)] == [
        ("warn", view.warn_at), ("overdue", view.due_at)]
    event = engine.history(cid)[-1]
    assert event.type == "dispatch" and event.payload["decision"]["rule"] == "elderly-card"
    assert_consistent(engine, cid)


def test_dispatch_override_needs_reason_and_known_department(engine: Engine) -> None:
    cid = to_state(engine, "filed")
    before = snapshot(engine, cid)
    with pytest.raises(CaseValidationError) as err:
        engine.dispatch(cid, DISPATCHER, override=("social-affairs", ""))
    assert err.value.fields == ("override.reason",)
    with pytest.raises(CaseValidationError):
        engine.dispatch(cid, DISPATCHER, override=("no-such-dept", "because"))
    assert snapshot(engine, cid) == before
    view = engine.dispatch(cid, DUTY_CHIEF, override=("social-affairs", "street handles cards"))
    assert view.lead == "social-affairs" and view.tier == "street"
    assert engine.history(cid)[-1].payload["override"] == {
        "proposed": "district-civil", "lead": "social-affairs", "reason": "street handles cards"}


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("state", "command", "error"),
    [
        ("reported", lambda e, c: e.verify(c, SUPERVISOR), TransitionNotAllowed),
        ("reported", lambda e, c: e.file(c, RESIDENT), RoleNotAllowed),
        ("reported", lambda e, c: e.cancel(c, CLERK, ""), CaseValidationError),
        ("filed", lambda e, c: e.dispatch(c, GRID_WORKER), RoleNotAllowed),
        ("dispatched", lambda e, c: e.accept(c, POLICE), TransitionNotAllowed),
        ("dispatched", lambda e, c: e.accept(c, Actor("x", "handler")), TransitionNotAllowed),
        ("dispatched", lambda e, c: e.claim(c, CIVIL), TransitionNotAllowed),  # not a pool
        ("handling", lambda e, c: e.return_case(c, CIVIL, "  "), CaseValidationError),
        ("handling", lambda e, c: e.return_case(c, POLICE, "not ours"), TransitionNotAllowed),
        ("handling", lambda e, c: e.feedback(c, CIVIL), CaseValidationError),
        ("handling", lambda e, c: e.request_extension(c, CIVIL, "rain", "soon"),
         CaseValidationError),
        ("handling", lambda e, c: e.approve_extension(c, DUTY_CHIEF), TransitionNotAllowed),
        ("handling", lambda e, c: e.defer(c, DUTY_CHIEF, None), CaseValidationError),  # type: ignore[arg-type]
        ("handling", lambda e, c: e.summon(c, LIAISON, ["police-station"]),
         TransitionNotAllowed),  # district tier: summoning is a street-tier tool
        ("handled", lambda e, c: e.rework(c, SUPERVISOR, ""), CaseValidationError),
        ("handled", lambda e, c: e.close(c, SUPERVISOR), TransitionNotAllowed),
        ("closed", lambda e, c: e.evaluate(c, RESIDENT, "great"), CaseValidationError),
        ("closed", lambda e, c: e.evaluate(c, CIVIL, "satisfied"), RoleNotAllowed),
        ("evaluated", lambda e, c: e.decide_appeal(c, REVIEWER, upheld=True),
         TransitionNotAllowed),
        ("evaluated", lambda e, c: e.appeal(c, RESIDENT, "mood", "x"), CaseValidationError),
        ("handling", lambda e, c: e.escalate(c, DUTY_CHIEF, "top"), TransitionNotAllowed),
    ],
)
def test_refused_commands_change_nothing(
    engine: Engine, state: str, command: Callable[[Engine, str], Any], error: type[Exception]
) -> None:
    cid = to_state(engine, state)
    before = snapshot(engine, cid)
    before_timers = timers(engine, cid)
    with pytest.raises(error):
        command(engine, cid)
    assert snapshot(engine, cid) == before
    assert timers(engine, cid) == before_timers


def test_failure_inside_a_command_leaves_the_store_as_before(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    cid = to_state(engine, "filed")
    before, before_timers = snapshot(engine, cid), timers(engine, cid)
    original = StoreTx.append

    def append_then_fail(self: StoreTx, *args: Any, **kwargs: Any) -> Any:
        original(self, *args, **kwargs)  # the row and the events are written ...
        raise RuntimeError("disk on fire")  # ... then the command fails

    monkeypatch.setattr(StoreTx, "append", append_then_fail)
    with pytest.raises(RuntimeError):
        engine.dispatch(cid, DISPATCHER)
    monkeypatch.undo()
    assert snapshot(engine, cid) == before
    assert timers(engine, cid) == before_timers
    with engine.store.transaction() as tx:
        assert all(m.case_id != cid or m.seq <= before[0] for m in tx.outbox_fetch(1000))
    assert engine.dispatch(cid, DISPATCHER).state == "dispatched"  # and it still works


def test_failed_report_writes_nothing(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    original = StoreTx.insert_case

    def insert_then_fail(self: StoreTx, *args: Any, **kwargs: Any) -> Any:
        original(self, *args, **kwargs)
        raise RuntimeError("boom")

    monkeypatch.setattr(StoreTx, "insert_case", insert_then_fail)
    with pytest.raises(RuntimeError):
        engine.report(load_case("08-elderly-card"), GRID_WORKER, idempotency_key="once")
    monkeypatch.undo()
    assert engine.worklist() == []


# --------------------------------------------------------------------------- handling


def test_claim_by_exactly_one(engine: Engine) -> None:
    cid = to_state(engine, "dispatched", "01-goods-on-sidewalk")
    view = engine.get(cid)
    assert view.pool == "patrol" and view.unit == "qdj-g3"
    other_grid = Actor("gw-2", "grid_worker", department="grid-worker", unit="qdj-g1")
    with pytest.raises(TransitionNotAllowed, match="not eligible"):
        engine.claim(cid, other_grid)
    first = Actor("gw-a", "grid_worker", department="grid-worker", unit="qdj-g3")
    second = Actor("gw-b", "grid_worker", department="grid-worker", unit="qdj-g3")
    assert engine.claim(cid, first).handler == "gw-a"
    with pytest.raises(TransitionNotAllowed):
        engine.claim(cid, second)
    assert engine.get(cid).handler == "gw-a"
    assert [e.type for e in engine.history(cid)].count("claim") == 1


def test_a_named_handler_alone_accepts_the_case(engine: Engine) -> None:
    """Rule missing-person names the police station's duty officer (handler:
    duty-officer): the case is on that officer's worklist once dispatched, and another
    officer of the station may not accept it."""
    cid = to_state(engine, "filed", "09-missing-person")
    view = engine.dispatch(cid, DISPATCHER)
    assert (view.lead, view.pool, view.handler) == ("police-station", None, "duty-officer")
    assert view.data["decision"]["handler"] == "duty-officer"
    assert engine.history(cid)[-1].payload["handler"] == "duty-officer"
    assert [c.id for c in engine.worklist(handler="duty-officer")] == [cid]
    before = snapshot(engine, cid)
    with pytest.raises(TransitionNotAllowed, match="assigned to handler 'duty-officer'"):
        engine.accept(cid, POLICE)
    with pytest.raises(TransitionNotAllowed, match="not routed to a pool"):
        engine.claim(cid, Actor("duty-officer", "handler", department="police-station"))
    assert snapshot(engine, cid) == before
    view = engine.accept(cid, Actor("duty-officer", "handler", department="police-station"))
    assert view.state == "handling" and view.handler == "duty-officer"
    assert_consistent(engine, cid)


def test_a_named_handler_goes_with_an_override_or_a_return(engine: Engine) -> None:
    """Overriding the lead drops the rule's named handler; so does a return to dispatch
    (the next dispatch routes again)."""
    cid = to_state(engine, "filed", "09-missing-person")
    view = engine.dispatch(cid, DUTY_CHIEF, override=("street-command", "the station is busy"))
    assert (view.lead, view.handler) == ("street-command", None)
    assert "handler" not in engine.history(cid)[-1].payload
    engine.accept(cid, Actor("sc-1", "handler", department="street-command"))
    assert engine.get(cid).handler == "sc-1"

    cid = to_state(engine, "filed", "09-missing-person")
    engine.dispatch(cid, DISPATCHER)
    view = engine.return_case(cid, POLICE, "not a missing person: a lost dog")
    assert view.state == "filed" and view.handler is None
    assert_consistent(engine, cid)


def test_a_command_on_a_stale_screen_is_refused_when_the_host_asks(engine: Engine) -> None:
    """Two duty chiefs hand over the same case from screens loaded at one version: without
    ``expecting`` both apply (the last one stands); with it the second is a
    ConcurrencyConflict naming both versions, and nothing changes."""
    cid = to_state(engine, "filed", "09-missing-person")
    engine.dispatch(cid, DISPATCHER)
    seen = engine.accept(cid, Actor("duty-officer", "handler", department="police-station"))
    with engine.expecting(cid, seen.version):
        assert engine.reassign(cid, DUTY_CHIEF, "sent to a fire", handler="officer-li").handler \
            == "officer-li"
    before = snapshot(engine, cid)
    with pytest.raises(ConcurrencyConflict) as info, engine.expecting(cid, seen.version):
        engine.reassign(cid, DUTY_CHIEF, "on leave", handler="officer-wang")
    assert (info.value.case_id, info.value.expected_version, info.value.actual_version) == (
        cid, seen.version, seen.version + 1)
    assert snapshot(engine, cid) == before
    # other cases, and commands after the block, are not held to the version
    other = to_state(engine, "filed")
    with engine.expecting(cid, seen.version):
        assert engine.dispatch(other, DISPATCHER).state == "dispatched"
    assert engine.reassign(cid, DUTY_CHIEF, "on leave", handler="officer-wang").handler \
        == "officer-wang"
    for bad in (0, True, "3"):
        with pytest.raises(CaseValidationError) as bad_info:
            engine.expecting(cid, bad).__enter__()  # type: ignore[arg-type]
        assert bad_info.value.fields == ("version",)


def test_a_dispatched_case_is_reassigned_before_anyone_accepts_it(engine: Engine) -> None:
    """改派: the duty chief gives the duty officer's case to the community officer (same
    department, deadline and timers); bad requests are refused and change nothing; once
    accepted, the case is handed over to a person only (see the next test)."""
    cid = to_state(engine, "filed", "09-missing-person")
    dispatched = engine.dispatch(cid, DISPATCHER)
    bad: list[tuple[Any, type[Exception], str]] = [
        (lambda: engine.reassign(cid, DUTY_CHIEF, "busy", handler="nobody"),
         CaseValidationError, "handlers: duty-officer, community-officer"),
        (lambda: engine.reassign(cid, DUTY_CHIEF, "busy", pool="patrol"),
         CaseValidationError, "not a pool of department 'police-station' .pools: none."),
        (lambda: engine.reassign(cid, DUTY_CHIEF, "busy", handler="community-officer",
                                 pool="patrol"), CaseValidationError, "not both"),
        (lambda: engine.reassign(cid, DUTY_CHIEF, "", handler="community-officer"),
         CaseValidationError, "reason"),
        (lambda: engine.reassign(cid, POLICE, "busy", handler="community-officer"),
         RoleNotAllowed, "reassign"),
        (lambda: engine.reassign(cid, DUTY_CHIEF, "busy", handler="duty-officer"),
         TransitionNotAllowed, "already assigned"),
    ]
    assert_refused(engine, cid, bad)
    view = engine.reassign(cid, DUTY_CHIEF, "the duty officer is at a traffic accident",
                           handler="community-officer")
    assert (view.state, view.lead, view.handler) == ("dispatched", "police-station",
                                                     "community-officer")
    assert view.due_at == dispatched.due_at and view.tier == dispatched.tier
    event = engine.history(cid)[-1]
    assert (event.type, event.payload["from_handler"]) == ("reassign", "duty-officer")
    assert [c.id for c in engine.worklist(handler="community-officer")] == [cid]
    assert engine.worklist(handler="duty-officer") == []
    with pytest.raises(TransitionNotAllowed, match="assigned to handler 'community-officer'"):
        engine.accept(cid, Actor("duty-officer", "handler", department="police-station"))
    # to the department as a whole: any officer of the station accepts it
    assert engine.reassign(cid, DISPATCHER, "whoever is free", handler=None).handler is None
    view = engine.accept(cid, POLICE)
    assert (view.state, view.handler) == ("handling", POLICE.id)
    before = snapshot(engine, cid)
    with pytest.raises(CaseValidationError, match="who takes over the case being handled"):
        engine.reassign(cid, DUTY_CHIEF, "back to the station", handler=None)
    assert snapshot(engine, cid) == before
    assert_consistent(engine, cid)


def test_a_case_being_handled_is_handed_over_to_a_colleague(engine: Engine) -> None:
    """转交: the officer who accepted is sent elsewhere; the duty chief hands the case to a
    colleague. It stays accepted (state, department, deadline, timers); the colleague's
    worklist has it; bad requests are refused and change nothing; once handled, no more."""
    cid = to_state(engine, "filed", "09-missing-person")
    engine.dispatch(cid, DISPATCHER)
    accepted = engine.accept(cid, Actor("duty-officer", "handler", department="police-station"))
    with engine.store.transaction(readonly=True) as tx:
        timers = tx.timers(cid)
    bad: list[tuple[Any, type[Exception], str]] = [
        (lambda: engine.reassign(cid, DUTY_CHIEF, "busy"), CaseValidationError,
         "handler: is required: who takes over"),
        (lambda: engine.reassign(cid, DUTY_CHIEF, "busy", pool="patrol"),
         CaseValidationError, "handed over to a person"),
        (lambda: engine.reassign(cid, DUTY_CHIEF, "busy", handler="  "),
         CaseValidationError, "handler: is required"),
        (lambda: engine.reassign(cid, DUTY_CHIEF, "busy", handler="x" * 129),
         CaseValidationError, "longer than 128"),
        (lambda: engine.reassign(cid, DUTY_CHIEF, "busy", handler="duty-officer"),
         TransitionNotAllowed, "'duty-officer' is already handling the case"),
        (lambda: engine.reassign(cid, POLICE, "busy", handler="officer-wang"),
         RoleNotAllowed, "reassign"),
        (lambda: engine.reassign(cid, DUTY_CHIEF, None, handler="officer-wang"),  # type: ignore[arg-type]
         CaseValidationError, "reason"),
    ]
    assert_refused(engine, cid, bad)
    view = engine.reassign(cid, DUTY_CHIEF, "the duty officer went to a traffic accident",
                           handler="officer-wang")
    assert (view.state, view.lead, view.handler) == ("handling", "police-station",
                                                     "officer-wang")
    assert (view.due_at, view.tier, view.pool) == (accepted.due_at, accepted.tier,
                                                   accepted.pool)
    event = engine.history(cid)[-1]
    assert (event.type, event.payload["from_handler"], event.reason) == (
        "reassign", "duty-officer", "the duty officer went to a traffic accident")
    with engine.store.transaction(readonly=True) as tx:
        assert tx.timers(cid) == timers
    assert [c.id for c in engine.worklist(handler="officer-wang")] == [cid]
    assert engine.worklist(handler="duty-officer") == []
    view = engine.feedback(cid, Actor("officer-wang", "handler", department="police-station"),
                           evidence=["https://img/found.jpg"])
    assert view.state == "handled"
    with pytest.raises(TransitionNotAllowed):
        engine.reassign(cid, DUTY_CHIEF, "too late", handler="duty-officer")
    assert_consistent(engine, cid)


def test_claim_race_raises_concurrency_conflict(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    cid = to_state(engine, "dispatched", "01-goods-on-sidewalk")
    with engine.store.transaction() as tx:
        stale = tx.require_case(cid)  # what the slower worker read
    engine.claim(cid, Actor("gw-a", "grid_worker", department="grid-worker"))
    monkeypatch.setattr(StoreTx, "require_case", lambda self, case_id, for_update=False: stale)
    with pytest.raises(ConcurrencyConflict):
        engine.claim(cid, Actor("gw-b", "grid_worker", department="grid-worker"))
    monkeypatch.undo()
    assert engine.get(cid).handler == "gw-a"
    assert_consistent(engine, cid)


def test_extension_moves_the_deadline(engine: Engine) -> None:
    cid = to_state(engine, "handling")
    due = engine.get(cid).due_at
    assert due is not None
    engine.request_extension(cid, CIVIL, "applicant abroad", "2wd")
    with pytest.raises(TransitionNotAllowed, match="already pending"):
        engine.request_extension(cid, CIVIL, "again", "1wd")
    view = engine.approve_extension(cid, DUTY_CHIEF)
    assert view.due_at == datetime(2026, 3, 18, 9, 0, tzinfo=CST)  # +2 working days
    assert view.extensions[0]["status"] == "approved" and view.pending_extension is None
    assert ("overdue", view.due_at) in [(k, d) for k, d, _ in timers(engine, cid)]
    engine.request_extension(cid, CIVIL, "more", "1wd")
    view = engine.deny_extension(cid, DUTY_CHIEF)
    assert view.due_at == datetime(2026, 3, 18, 9, 0, tzinfo=CST)
    assert [x["status"] for x in view.extensions] == ["approved", "denied"]
    assert_consistent(engine, cid)


def test_defer_resume_cancel(engine: Engine) -> None:
    cid = to_state(engine, "handling")
    assert engine.defer(cid, DUTY_CHIEF, "needs funding next year").state == "deferred"
    assert engine.resume(cid, DISPATCHER).state == "handling"
    other = to_state(engine, "filed")
    view = engine.cancel(other, CLERK, "duplicate of an earlier report")
    assert view.state == "cancelled" and view.data["cancel_reason"].startswith("duplicate")
    with pytest.raises(TransitionNotAllowed):
        engine.dispatch(other, DISPATCHER)


def test_worklists_and_queries(engine: Engine, clock: ManualClock) -> None:
    a = to_state(engine, "handling")
    b = to_state(engine, "dispatched", "01-goods-on-sidewalk")
    c = to_state(engine, "evaluated")
    assert [v.id for v in engine.worklist(department="district-civil")] == [a]
    assert [v.id for v in engine.worklist(pool="patrol")] == [b]
    assert [v.id for v in engine.worklist(handler="h-1")] == [a]
    assert [v.id for v in engine.worklist(unit="qdj-g3")] == [b]
    assert [v.id for v in engine.worklist(states=["evaluated"])] == [c]
    assert {v.id for v in engine.worklist(states=["dispatched", "handling"])} == {a, b}
    assert c not in {v.id for v in engine.worklist()}  # the default: open cases only
    assert engine.overdue() == []
    assert [v.id for v in engine.near_due("2wh")] == [b]  # due 11:00, now 09:00
    clock.advance(hours=3)
    assert [v.id for v in engine.overdue()] == [b]


# --------------------------------------------------------------------------- supervision


def test_tick_warns_then_marks_overdue_once(engine: Engine, clock: ManualClock) -> None:
    cid = to_state(engine, "handling")
    view = engine.get(cid)
    assert view.warn_at is not None and view.due_at is not None
    assert engine.tick(view.warn_at - timedelta(seconds=1)) == []
    fired = engine.tick(view.warn_at)
    assert [e.type for e in fired] == ["warn"]
    # the warning carries its own time and the deadline it warns of
    when = {k: datetime.fromisoformat(v) for k, v in fired[0].payload.items()}
    assert when == {"warn_at": view.warn_at, "due_at": view.due_at}
    assert engine.tick(view.warn_at) == []  # idempotent
    assert engine.get(cid).warned and not engine.get(cid).overdue
    fired = engine.tick(view.due_at + timedelta(hours=1))
    assert [(e.type, e.actor_role) for e in fired] == [("mark_overdue", "system")]
    assert datetime.fromisoformat(fired[0].payload["due_at"]) == view.due_at
    assert engine.tick(view.due_at + timedelta(hours=1)) == []
    assert engine.get(cid).overdue
    assert engine.get(cid).tier == "district"  # wujin does not escalate on overdue
    assert_consistent(engine, cid)


def test_tick_refuses_a_limit_that_would_never_end(engine: Engine) -> None:
    """``limit`` below 1 claimed nothing forever inside a batch; it is refused, in a batch
    and out of one, by the engine and by the store, and nothing fires."""
    cid = to_state(engine, "handling")
    warn_at = engine.get(cid).warn_at
    assert warn_at is not None
    for bad in (0, -5, True, 1.5):
        for batched in (False, True):
            with (engine.batch() if batched else contextlib.nullcontext(),
                  pytest.raises(CaseValidationError) as info):
                engine.tick(warn_at, limit=bad)  # type: ignore[arg-type]
            assert info.value.fields == ("limit",)
            assert str(info.value).startswith("invalid argument: limit: ")
        with engine.batch() as uow, pytest.raises(CaseValidationError) as info:
            uow.claim_due_timers(warn_at, bad)  # type: ignore[arg-type]
        assert str(info.value).startswith("store: invalid input: limit: ")
        with engine.store.transaction() as tx, pytest.raises(CaseValidationError) as info:
            tx.claim_due_timers(warn_at, bad)  # type: ignore[arg-type]
        assert str(info.value).startswith("store: invalid input: limit: ")
    with engine.batch() as uow, pytest.raises(CaseValidationError) as info:
        uow.set_timers(cid, [("warn", warn_at.replace(tzinfo=None))])
    assert info.value.fields == ("timers[0].due_at",)  # as the store outside a batch
    assert [e.type for e in engine.tick(warn_at)] == ["warn"]  # nothing was used up


def test_tick_ignores_finished_cases(engine: Engine) -> None:
    cid = to_state(engine, "handled")
    assert [k for k, _, _ in timers(engine, cid)] == ["warn", "overdue"]  # left armed ...
    assert engine.tick(datetime(2027, 1, 1, tzinfo=CST)) == []  # ... and skipped
    assert all(fired is not None for _, _, fired in timers(engine, cid))
    assert engine.get(cid).version == len(engine.history(cid)) == 5


def test_tick_uses_the_clock_by_default(engine: Engine, clock: ManualClock) -> None:
    cid = to_state(engine, "dispatched", "01-goods-on-sidewalk")
    clock.advance(hours=5)
    assert [e.type for e in engine.tick()] == ["warn", "mark_overdue"]
    assert engine.get(cid).overdue


# --------------------------------------------------------------------------- escalation


def test_escalation_by_timeout(strict_engine: Engine) -> None:
    engine = strict_engine
    cid = to_state(engine, "handling", "01-goods-on-sidewalk")
    view = engine.get(cid)
    assert view.tier == "grid" and view.due_at == datetime(2026, 3, 9, 11, 0, tzinfo=CST)
    assert view.warn_at == datetime(2026, 3, 9, 10, 30, tzinfo=CST)  # warn_at: 0.75
    fired = engine.tick(view.due_at)
    assert [e.type for e in fired] == ["warn", "mark_overdue", "escalate"]
    view = engine.get(cid)
    assert view.tier == "community" and view.unit == "qdj"
    assert view.escalations[-1]["cause"] == "overdue"
    assert_consistent(engine, cid)


def test_a_returned_case_takes_the_tier_of_its_new_route(engine: Engine) -> None:
    """One return is not an escalation: the elderly card goes back from the district's
    civil affairs bureau and is routed to the street command centre, at the street tier
    (its route's), not at the district tier of the department that returned it. An
    escalation does hold over the next route (see the next test)."""
    cid = to_state(engine, "dispatched", "08-elderly-card")
    assert (engine.get(cid).lead, engine.get(cid).tier) == ("district-civil", "district")
    engine.return_case(cid, CIVIL, "cards are issued by the street")
    view = engine.dispatch(cid, DISPATCHER)
    assert (view.lead, view.tier, view.escalations) == ("street-command", "street", ())
    decision = engine.history(cid)[-1].payload["decision"]
    assert (view.tier, view.unit) == (decision["tier"], decision["unit"])
    assert_consistent(engine, cid)


def test_escalation_by_repeated_returns(engine: Engine) -> None:
    cid = to_state(engine, "dispatched", "10-dog-nuisance")
    assert engine.get(cid).lead == "community-station"
    community = Actor("cs-1", "handler", department="community-station")
    view = engine.return_case(cid, community, "owner lives in another community")
    assert view.state == "filed" and view.returned_by == ("community-station",)
    assert view.escalations == ()
    view = engine.dispatch(cid, DISPATCHER)
    assert view.lead == "street-command"  # re-routed without the department that returned it
    view = engine.return_case(cid, Actor("sc-1", "handler", department="street-command"),
                              "needs the police")
    assert view.returned_by == ("community-station", "street-command")
    assert view.tier == "district" and view.escalations[-1]["cause"] == "repeated returns"
    assert [e.type for e in engine.history(cid)][-2:] == ["return_case", "escalate"]
    # re-dispatch keeps the escalated tier
    assert engine.dispatch(cid, DISPATCHER).tier == "district"
    assert_consistent(engine, cid)


def test_escalation_by_repeated_rework(strict_engine: Engine) -> None:
    engine = strict_engine
    cid = to_state(engine, "handled", "01-goods-on-sidewalk")
    view = engine.rework(cid, SUPERVISOR, "goods are back on the pavement")
    assert view.state == "handling" and view.rework_count == 1 and view.tier == "grid"
    h = Actor("gw-chen", "grid_worker", department="grid-worker")
    engine.feedback(cid, h, evidence=["https://img/2.jpg"])
    view = engine.rework(cid, GRID_CHIEF, "still there")
    assert view.rework_count == 2 and view.tier == "community"
    assert view.escalations[-1]["cause"] == "repeated rework"
    assert view.lead == "grid-worker"  # rework stays with the same department


def test_escalation_by_a_person(engine: Engine) -> None:
    cid = to_state(engine, "dispatched", "01-goods-on-sidewalk")
    with pytest.raises(CaseValidationError):
        engine.escalate(cid, GRID_CHIEF, "")
    view = engine.escalate(cid, GRID_CHIEF, "shop owner refuses")
    assert view.tier == "community" and view.escalations[-1]["by"] == GRID_CHIEF.id
    engine.escalate(cid, DUTY_CHIEF, "still refuses")
    view = engine.escalate(cid, DUTY_CHIEF, "district please")
    assert view.tier == "district"
    before = snapshot(engine, cid)
    with pytest.raises(TransitionNotAllowed, match="top of the escalation path"):
        engine.escalate(cid, DUTY_CHIEF, "higher")
    assert snapshot(engine, cid) == before


def test_escalation_while_the_feedback_waits_for_verification(engine: Engine) -> None:
    """BRIEF §4: escalation at any open step, so also between feedback and verification
    (the verifier finds the fix needs a higher tier); the case stays handled, the timers
    stay off (the time limit stopped at feedback), verification goes on as before."""
    cid = to_state(engine, "handled", "01-goods-on-sidewalk")
    before = engine.get(cid)
    view = engine.escalate(cid, GRID_CHIEF, "the stall keeps coming back: community please")
    assert view.state == "handled" and view.tier == "community" != before.tier
    assert view.escalations[-1]["by"] == GRID_CHIEF.id
    assert view.due_at == before.due_at  # the stopped time limit is not re-armed
    assert engine.verify(cid, SUPERVISOR).state == "verified"
    assert_consistent(engine, cid)


def test_summon_at_street_tier(engine: Engine) -> None:
    cid = to_state(engine, "dispatched", "11-bulky-waste")
    assert engine.get(cid).tier == "street"
    with pytest.raises(CaseValidationError):
        engine.summon(cid, LIAISON, ["no-such"])
    view = engine.summon(cid, LIAISON, ["district-cg", "district-housing"], "whistle")
    assert view.summoned == ("district-cg", "district-housing")
    joint = Actor("cg-1", "handler", department="district-cg")
    engine.accept(cid, Actor("san-1", "handler", department="sanitation"))
    assert engine.feedback(cid, joint, note="bulky waste removed").state == "handled"


# --------------------------------------------------------------------------- appeals, reopen


def test_appeal_windows(engine: Engine, clock: ManualClock) -> None:
    cid = to_state(engine, "handling")
    clock.advance(days=3)  # Thursday: 3 working days after dispatch > 2wd
    with pytest.raises(TransitionNotAllowed, match="routing appeal window"):
        engine.appeal(cid, CIVIL, "routing", "not ours")
    fresh = to_state(engine, "handling")
    with pytest.raises(TransitionNotAllowed):
        engine.appeal(fresh, POLICE, "routing", "not even assigned to us")
    engine.appeal(fresh, CIVIL, "routing", "cards are issued by the street")
    with pytest.raises(TransitionNotAllowed, match="already pending"):
        engine.appeal(fresh, CIVIL, "routing", "again")
    assert engine.get(fresh).pending_appeal is not None
    # score window: 5 working days after evaluation
    done = to_state(engine, "evaluated")
    clock.advance(days=8)
    with pytest.raises(TransitionNotAllowed, match="score appeal window"):
        engine.appeal(done, CIVIL, "score", "rain")
    # resident window: 7 days after closure
    with pytest.raises(TransitionNotAllowed, match="resident appeal window"):
        engine.appeal(done, RESIDENT, "resident", "still broken")


def test_score_appeal_names_the_contested_criteria(engine: Engine) -> None:
    """The criteria are checked, kept in the pending appeal (in the fixed order, once each)
    and, upheld, put into the exemption; without them the exemption names none (all)."""
    done = to_state(engine, "evaluated")
    for bad in (["timeliness", "speed"], [], 42):
        with pytest.raises(CaseValidationError) as info:
            engine.appeal(done, CIVIL, "score", "rain", criteria=bad)  # type: ignore[arg-type]
        assert info.value.fields == ("criteria",)
    handling = to_state(engine, "handling")
    with pytest.raises(CaseValidationError) as info:
        engine.appeal(handling, CIVIL, "routing", "not ours", criteria=["timeliness"])
    assert info.value.fields == ("criteria",)
    assert engine.get(done).pending_appeal is None  # nothing was recorded
    view = engine.appeal(done, CIVIL, "score", "暴雨",
                         criteria=["quality", "timeliness", "quality"])
    assert view.pending_appeal is not None
    assert view.pending_appeal["criteria"] == ["timeliness", "quality"]
    assert engine.history(done)[-1].payload["criteria"] == ["timeliness", "quality"]
    view = engine.decide_appeal(done, REVIEWER, upheld=True)
    assert view.appeals[-1]["criteria"] == ["timeliness", "quality"]
    ruling = engine.history(done)[-1]
    assert ruling.type == "uphold_score_appeal"
    assert ruling.payload["exemption"]["criteria"] == ["timeliness", "quality"]
    # a single name is one criterion; no criteria: the exemption names none
    one = to_state(engine, "evaluated")
    engine.appeal(one, CIVIL, "score", "暴雨", criteria="satisfaction")
    engine.decide_appeal(one, REVIEWER, upheld=True)
    assert engine.history(one)[-1].payload["exemption"]["criteria"] == ["satisfaction"]
    whole = to_state(engine, "evaluated")
    view = engine.appeal(whole, CIVIL, "score", "暴雨")
    assert view.pending_appeal is not None and "criteria" not in view.pending_appeal
    engine.decide_appeal(whole, REVIEWER, upheld=True)
    assert "criteria" not in engine.history(whole)[-1].payload["exemption"]
    assert_consistent(engine, done)


def test_a_pending_appeal_is_decided_before_the_case_moves_out_of_its_reach(
    engine: Engine,
) -> None:
    """Reopening while a resident appeal waits, or handing in feedback while the department
    contests the routing, would leave an appeal that could only be rejected: refused,
    nothing changed, until the reviewer decides. Moves that keep it decidable go on."""
    closed = to_state(engine, "closed")
    engine.appeal(closed, RESIDENT, "resident", "the pothole is still there")
    before = snapshot(engine, closed)
    with pytest.raises(TransitionNotAllowed, match="resident appeal is pending: decide it first"):
        engine.reopen(closed, RESIDENT, "still broken")
    assert snapshot(engine, closed) == before
    # evaluating keeps the appeal decidable (it may be upheld from 'evaluated' too)
    assert engine.evaluate(closed, RESIDENT, "satisfied").state == "evaluated"
    assert engine.decide_appeal(closed, REVIEWER, upheld=True).state == "handling"

    handling = to_state(engine, "handling")
    engine.appeal(handling, CIVIL, "routing", "cards are issued by the street")
    before = snapshot(engine, handling)
    with pytest.raises(TransitionNotAllowed, match="routing appeal is pending"):
        engine.feedback(handling, CIVIL, evidence=["https://img/1.jpg"])
    assert snapshot(engine, handling) == before
    engine.decide_appeal(handling, REVIEWER, upheld=False, reason="it is yours")
    assert engine.feedback(handling, CIVIL, evidence=["https://img/1.jpg"]).state == "handled"
    assert_consistent(engine, closed)
    assert_consistent(engine, handling)


def test_a_bad_argument_is_named_as_an_argument_not_a_case(engine: Engine) -> None:
    cid = to_state(engine, "dispatched")
    with pytest.raises(CaseValidationError) as info:
        engine.escalate(cid, GRID_CHIEF, "")
    assert info.value.fields == ("reason",) and info.value.subject == "argument"
    assert str(info.value).startswith("invalid argument: reason: ")


def test_close_records_how_the_case_was_resolved(engine: Engine) -> None:
    """``resolution`` is a key of the scoring ``resolution`` table (the example district
    keeps the default one); ``normal`` is not recorded (scoring derives it)."""
    cid = to_state(engine, "verified")
    for bad in ("solved", "", None):
        with pytest.raises(CaseValidationError) as info:
            engine.close(cid, SUPERVISOR, resolution=bad)  # type: ignore[arg-type]
        assert info.value.fields == ("resolution",)
    assert engine.get(cid).state == "verified"
    assert engine.close(cid, SUPERVISOR, resolution="special").state == "closed"
    assert engine.history(cid)[-1].payload["resolution"] == "special"
    plain = to_state(engine, "verified")
    engine.close(plain, SUPERVISOR, resolution="normal")
    assert "resolution" not in engine.history(plain)[-1].payload
    assert_consistent(engine, cid)


def test_reopen_window(engine: Engine, clock: ManualClock) -> None:
    cid = to_state(engine, "evaluated")
    clock.advance(days=2)
    view = engine.reopen(cid, RESIDENT, "the card never arrived")
    assert view.state == "handling" and view.reopen_count == 1 and not view.verified
    assert view.due_at is not None and view.due_at > clock.now()
    late = to_state(engine, "closed")
    clock.advance(days=8)
    with pytest.raises(TransitionNotAllowed, match="reopen window"):
        engine.reopen(late, RESIDENT, "late")


def test_a_view_reads_every_field_from_its_projection() -> None:
    """CaseView.from_data fills fields on first read: each equals the eager conversion."""
    import dataclasses

    from gridflow.engine import CaseView
    from gridflow.projection import initial, parse_time

    data = initial()
    data.update(id="v1", state="dispatched", version=3, lead="sanitation", tier="street",
                assist=["police"], due_at="2026-03-10T01:00:00+00:00", warned=True,
                escalations=[{"from": "grid", "to": "street"}])
    view = CaseView.from_data(data)
    for f in dataclasses.fields(CaseView):
        raw = data.get(f.name) if f.name != "data" else data
        if f.name.endswith("_at"):
            want: Any = parse_time(str(raw) if raw is not None else None)
        elif isinstance(raw, list):
            want = tuple(raw)
        else:
            want = raw
        assert getattr(view, f.name) == want, f.name
    assert view == CaseView(**{f.name: getattr(view, f.name) for f in dataclasses.fields(view)})
    with pytest.raises(AttributeError):
        view.nothing  # type: ignore[attr-defined]  # noqa: B018


@pytest.mark.parametrize("given_time", [True, False], ids=["reported_at given", "clock time"])
def test_a_case_reported_without_a_time_is_routed_on_the_clocks(
    engine: Engine, clock: ManualClock, given_time: bool
) -> None:
    """Routing's time conditions read the report time, also when the clock supplied it
    (the Wujin after-hours rule: urgent matters after hours get the street duty office)."""
    night = datetime(2026, 3, 10, 21, 30, tzinfo=CST)  # a Tuesday, after working hours
    clock.set(night)
    data: dict[str, Any] = {"category": "E01-10", "location": "qdj-g3", "urgency": "urgent",
                            "description": "垃圾堆在路口"}
    if given_time:
        data["reported_at"] = night.isoformat()
    view = engine.report(data, GRID_WORKER)
    assert view.data["case"]["reported_at"] == night.isoformat()
    engine.file(view.id, CLERK)
    decision = engine.dispatch(view.id, DISPATCHER).data["decision"]
    assert "非工作时间" in decision["tags"]
    assert "after-hours-urgent" in decision["matched"]
