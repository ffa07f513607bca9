"""Random triggers by random actors at random times (Hypothesis stateful testing).

Invariants after every step, for every case: a refused command changes nothing; the stored
state equals the projection of the events; sequence numbers are gap-free; every open
dispatched case has exactly one lead department; a closed case passed verification;
deadlines never precede dispatch; event times never go backwards.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

from gridflow import Actor, Engine, load_policy
from gridflow.clock import ManualClock
from gridflow.errors import GridflowRuntimeError
from gridflow.projection import project

ROOT = Path(__file__).resolve().parent.parent
POLICY = load_policy(Path(__file__).resolve().parent / "policies" / "engine")
CASES = []
for _f in sorted((ROOT / "examples" / "wujin" / "cases").glob("*.json")):
    _case = json.loads(_f.read_text("utf-8"))
    _case.pop("id", None)
    _case.pop("reported_at", None)
    CASES.append(_case)

ROLES = ("grid_worker", "grid_chief", "liaison", "dispatcher", "duty_chief", "clerk",
         "handler", "supervisor", "resident", "reviewer", "system")
DEPARTMENT_MODES = ("lead", "other", "none")

Command = Callable[[Engine, str, Actor, str | None], Any]
COMMANDS: dict[str, Command] = {
    "file": lambda e, c, a, r: e.file(c, a),
    "cancel": lambda e, c, a, r: e.cancel(c, a, r),  # type: ignore[arg-type]
    "dispatch": lambda e, c, a, r: e.dispatch(c, a),
    "accept": lambda e, c, a, r: e.accept(c, a),
    "claim": lambda e, c, a, r: e.claim(c, a),
    # 改派 to the department as a whole; 转交 (being handled) to a colleague
    "reassign": lambda e, c, a, r: e.reassign(  # type: ignore[arg-type]
        c, a, r, handler="colleague-1" if e.get(c).state == "handling" else None),
    "return_case": lambda e, c, a, r: e.return_case(c, a, r),  # type: ignore[arg-type]
    "request_extension": lambda e, c, a, r: e.request_extension(c, a, r, "1wd"),  # type: ignore[arg-type]
    "approve_extension": lambda e, c, a, r: e.approve_extension(c, a),
    "deny_extension": lambda e, c, a, r: e.deny_extension(c, a),
    "defer": lambda e, c, a, r: e.defer(c, a, r),  # type: ignore[arg-type]
    "resume": lambda e, c, a, r: e.resume(c, a),
    "feedback": lambda e, c, a, r: e.feedback(c, a, evidence=["https://img/x.jpg"]),
    "verify": lambda e, c, a, r: e.verify(c, a),
    "rework": lambda e, c, a, r: e.rework(c, a, r),  # type: ignore[arg-type]
    "close": lambda e, c, a, r: e.close(c, a),
    "evaluate": lambda e, c, a, r: e.evaluate(c, a, "basically_satisfied"),
    "reopen": lambda e, c, a, r: e.reopen(c, a, r),  # type: ignore[arg-type]
    "escalate": lambda e, c, a, r: e.escalate(c, a, r),  # type: ignore[arg-type]
    "summon": lambda e, c, a, r: e.summon(c, a, ["police-station"], r),
    "appeal_routing": lambda e, c, a, r: e.appeal(c, a, "routing", r),  # type: ignore[arg-type]
    "appeal_score": lambda e, c, a, r: e.appeal(c, a, "score", r),  # type: ignore[arg-type]
    "appeal_resident": lambda e, c, a, r: e.appeal(c, a, "resident", r),  # type: ignore[arg-type]
    "uphold": lambda e, c, a, r: e.decide_appeal(c, a, upheld=True, reason=r),
    "reject": lambda e, c, a, r: e.decide_appeal(c, a, upheld=False, reason=r),
}
OPEN_DISPATCHED = ("dispatched", "handling", "deferred")
RESETS_VERIFICATION = ("dispatch", "rework", "reopen", "uphold_resident_appeal")


def _command_of(trigger: str) -> str | None:
    if trigger.startswith("uphold_"):
        return "uphold"
    if trigger == "reject_appeal":
        return "reject"
    return trigger if trigger in COMMANDS else None


def _trigger_of(command: str, data: dict[str, Any]) -> str:
    pending = data.get("pending_appeal") or {}
    if command == "uphold":
        return f"uphold_{pending.get('kind', 'routing')}_appeal"
    if command == "reject":
        return "reject_appeal"
    return command


class EngineMachine(RuleBasedStateMachine):
    cases = Bundle("cases")

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock(datetime(2026, 3, 9, 9, 0, tzinfo=ZoneInfo("Asia/Shanghai")))
        self.engine = Engine(POLICY, clock=self.clock)
        self.ids: list[str] = []
        self.refused = 0
        self.done: dict[str, int] = {}

    def teardown(self) -> None:
        self.engine.dispose()

    def _snapshot(self, cid: str) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
        view = self.engine.get(cid)
        return view.version, [e.to_dict() for e in self.engine.history(cid)], dict(view.data)

    @precondition(lambda self: len(self.ids) < 4)
    @rule(target=cases, index=st.integers(0, len(CASES) - 1), on_spot=st.booleans())
    def report(self, index: int, on_spot: bool) -> str:
        worker = Actor("gw", "grid_worker", department="grid-worker")
        if on_spot:
            view = self.engine.report(CASES[index], worker, on_spot=True,
                                      evidence=["https://img/spot.jpg"])
        else:
            view = self.engine.report(CASES[index], worker)
        self.ids.append(view.id)
        return view.id

    @rule(cid=cases, data=st.data(), steps=st.integers(1, 6))
    def act(self, cid: str, data: st.DataObject, steps: int) -> None:
        """A few commands in a row on one case (so cases travel far)."""
        for _ in range(steps):
            self._act_once(cid, data)

    def _act_once(self, cid: str, data: st.DataObject) -> None:
        """Mostly a trigger the graph allows now by a role allowed to fire it, sometimes
        anything by anyone (to exercise refusals)."""
        view = self.engine.get(cid)
        graph = self.engine.workflow().graph
        allowed = [_command_of(t) for t in self.engine.workflow().allowed_triggers(view.state)]
        allowed = [c for c in allowed if c is not None]
        if allowed and data.draw(st.integers(0, 9), label="bias") < 8:
            command = data.draw(st.sampled_from(allowed), label="command")
            roles = graph.roles_for(_trigger_of(command, view.data))
            role = data.draw(st.sampled_from(roles), label="role")
            mode = data.draw(st.sampled_from(["lead"] * 4 + list(DEPARTMENT_MODES)), label="dept")
            reason = data.draw(st.sampled_from(["a reason"] * 4 + [None, ""]), label="reason")
        else:
            command = data.draw(st.sampled_from(sorted(COMMANDS)), label="command")
            role = data.draw(st.sampled_from(ROLES), label="role")
            mode = data.draw(st.sampled_from(DEPARTMENT_MODES), label="dept")
            reason = data.draw(st.sampled_from([None, "", "a reason"]), label="reason")
        department = {"lead": view.lead, "other": "judicial", "none": None}[mode]
        actor = Actor(f"{role}-1", role, department=department)
        before = self._snapshot(cid)
        try:
            COMMANDS[command](self.engine, cid, actor, reason)
        except GridflowRuntimeError:
            self.refused += 1
            assert self._snapshot(cid) == before, f"refused {command} changed the case"
        else:
            self.done[command] = self.done.get(command, 0) + 1

    @rule(minutes=st.integers(0, 3 * 24 * 60))
    def advance(self, minutes: int) -> None:
        self.clock.advance(minutes=minutes)

    @rule()
    def tick(self) -> None:
        self.engine.tick()
        assert self.engine.tick() == []  # idempotent at the same time

    @invariant()
    def every_case_is_consistent(self) -> None:
        registry = self.engine.policy.registry
        for cid in self.ids:
            history = self.engine.history(cid)
            view = self.engine.get(cid)
            assert [e.seq for e in history] == list(range(1, len(history) + 1))
            assert view.version == len(history)
            assert project(history) == view.data
            times = [e.at for e in history]
            assert times == sorted(times)
            if view.state in OPEN_DISPATCHED:
                assert isinstance(view.lead, str) and view.lead in registry.departments
                assert view.lead not in view.summoned
            if view.state == "dispatched" and view.handler is not None:  # named, not accepted
                assert view.handler in registry.departments[view.lead].handlers
            if view.due_at is not None and view.dispatched_at is not None:
                assert view.due_at >= view.dispatched_at
            verified = False
            for event in history:
                if event.type == "verify":
                    verified = True
                elif event.type in RESETS_VERIFICATION:
                    verified = False
                elif event.type == "close":
                    assert verified, f"case {cid} closed without verification"
            if view.state in ("verified", "closed", "evaluated"):
                assert view.verified


EngineMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEngineMachine = EngineMachine.TestCase
