"""Scoring on the 4 criteria (BRIEF §8): each criterion from a case's event history, appeal
exemptions (§7), who is scored, and the stored score history with policy versions.

Histories are driven through the engine on the example district (examples/wujin) with a
manual clock; every expected figure is computed by hand in the test's docstring or comment.
Working hours: 08:30–12:00 and 13:30–17:30; Monday 2026-03-09 is a workday. Exposed garbage
(E01-10) goes to the street sanitation office with a 4-working-hour limit: dispatched Monday
09:00, it is due at 14:30 (3 h in the morning, 1 h after lunch).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gridflow import Actor, Engine, load_policy
from gridflow.clock import ManualClock
from gridflow.engine import CaseView
from gridflow.indicators import current_scores, refresh, score_history
from gridflow.policy import Policy
from gridflow.schema import CurvePoint, ScoringSpec
from gridflow.scoring import (
    CaseFacts,
    Subject,
    case_facts,
    curve_value,
    score_case,
    subjects,
    validate_spec,
)
from gridflow.store import NewEvent

ROOT = Path(__file__).resolve().parents[1]
WUJIN = ROOT / "examples" / "wujin"
CST = ZoneInfo("Asia/Shanghai")

GW = Actor("gw-chen", "grid_worker", department="grid-worker", unit="qdj-g3")
GW2 = Actor("gw-wang", "grid_worker", department="grid-worker", unit="qdj-g4")
CHIEF = Actor("gc-qdj", "grid_chief")
CLERK = Actor("clerk-1", "clerk")
DISPATCHER = Actor("disp-1", "dispatcher")
DUTY = Actor("duty-1", "duty_chief")
SUPERVISOR = Actor("sup-1", "supervisor")
RESIDENT = Actor("res-1", "resident")
REVIEWER = Actor("rev-1", "reviewer")


def at(day: int, hour: int, minute: int = 0) -> datetime:
    """A local time in March 2026 (9 = Monday)."""
    return datetime(2026, 3, day, hour, minute, tzinfo=CST)


class Desk:
    """Drives cases through the engine at given local times."""

    def __init__(self, engine: Engine, clock: ManualClock):
        self.engine = engine
        self.clock = clock

    def at(self, when: datetime) -> Desk:
        self.clock.set(when)
        return self

    def handler(self, cid: str, name: str = "h-1") -> Actor:
        return Actor(name, "handler", department=self.engine.get(cid).lead)

    def report(self, case_id: str, when: datetime, *, category: str = "E01-10",
               location: str = "qdj-g3", reporter: Actor = GW, channel: str = "patrol",
               **kw: Any) -> str:
        self.at(when)
        case = {"id": case_id, "category": category, "location": location, "channel": channel,
                "description": "暴露垃圾"}
        return self.engine.report(case, reporter, **kw).id

    def dispatch(self, cid: str, when: datetime, *, file: bool = True) -> CaseView:
        self.at(when)
        if file:
            self.engine.file(cid, CLERK)
        view = self.engine.dispatch(cid, DISPATCHER)
        h = self.handler(cid)
        return self.engine.claim(cid, h) if view.pool else self.engine.accept(cid, h)

    def feedback(self, cid: str, when: datetime) -> None:
        self.at(when).engine.feedback(cid, self.handler(cid), evidence=["https://img/done.jpg"])

    def close(self, cid: str, when: datetime, answer: str | None = "satisfied") -> CaseView:
        """Feedback, verify and close at ``when``; evaluate with ``answer`` (None: not yet)."""
        if self.engine.get(cid).state == "handling":
            self.feedback(cid, when)
        self.at(when)
        self.engine.verify(cid, SUPERVISOR)
        view = self.engine.close(cid, SUPERVISOR)
        if answer is not None:
            view = self.engine.evaluate(cid, RESIDENT, answer)
        return view

    def simple(self, case_id: str, close_at: datetime, answer: str | None = "satisfied",
               **kw: Any) -> str:
        """Reported and dispatched Monday 09:00, closed at ``close_at``."""
        cid = self.report(case_id, at(9, 9), **kw)
        self.dispatch(cid, at(9, 9))
        self.close(cid, close_at, answer)
        return cid

    def facts(self, cid: str, policy: Policy | None = None) -> CaseFacts:
        policy = policy or self.engine.policy
        return case_facts(self.engine.history(cid), policy.calendar, policy.registry)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(at(9, 9))


@pytest.fixture(scope="session")
def wujin() -> Policy:
    return load_policy(WUJIN)


def policy_with_scoring(tmp_path: Path, scoring_yaml: str) -> Policy:
    """The example district plus a ``scoring`` section (another policy version)."""
    target = tmp_path / "policy"
    shutil.copytree(WUJIN, target, ignore=shutil.ignore_patterns("cases"))
    (target / "scoring.yaml").write_text(scoring_yaml, encoding="utf-8")
    return load_policy(target)


@pytest.fixture
def desk(clock: ManualClock, wujin: Policy) -> Iterator[Desk]:
    engine = Engine(wujin, clock=clock)
    yield Desk(engine, clock)
    engine.dispose()


def criteria(desk: Desk, cid: str, spec: ScoringSpec | None = None) -> dict[str, float]:
    score = score_case(desk.facts(cid), spec)
    assert score is not None
    return {**score.criteria, "composite": score.composite}


# --------------------------------------------------------------------------- curves, spec


def test_curve_is_linear_between_points_and_flat_outside() -> None:
    pts = [CurvePoint(x=0, score=1), CurvePoint(x=1, score=0.7), CurvePoint(x=3, score=0)]
    assert curve_value(pts, 0) == 1
    assert curve_value(pts, 0.5) == pytest.approx(0.85)
    assert curve_value(pts, 2) == pytest.approx(0.35)
    assert curve_value(pts, 9) == 0
    assert curve_value(pts, float("inf")) == 0
    assert curve_value([CurvePoint(x=0.5, score=0.9)], 0) == 0.9
    assert curve_value([], 3) == 1


def test_spec_validation_rejects_what_cannot_be_scored() -> None:
    assert validate_spec(ScoringSpec()) == []
    bad = ScoringSpec(
        weights={"timeliness": 50, "resolution": 30, "quality": 20, "satisfaction": 20},
        timeliness_curve=[CurvePoint(x=0, score=0.5), CurvePoint(x=1, score=0.8)],
        rework_curve=[CurvePoint(x=1, score=1), CurvePoint(x=1, score=0.5)],
        resolution={"normal": 1.0},
        satisfaction={"satisfied": 1.0, "dissatisfied": 0.0},
        rankings={"cases": {"period": "fortnight", "top": -1}, "teams": {"top": 3}},
    )
    problems = {(path, msg.split(" (")[0]) for path, msg in validate_spec(bad)}
    assert (("weights",), "weights must sum to 100") in problems
    assert (("timeliness_curve", 1, "score"),
            "timeliness_curve must not increase") in problems
    assert (("rework_curve", 1, "x"), "rework_curve points must have increasing x") in problems
    assert (("resolution",), "resolution needs a score for 'deferred'") in problems
    assert (("satisfaction",),
            "satisfaction needs a score for the callback answer 'basically_satisfied'") in problems
    assert any(p == ("rankings", "cases", "period") for p, _ in problems)
    assert any(p == ("rankings", "cases", "top") for p, _ in problems)
    assert any(p == ("rankings", "teams") for p, _ in problems)


def test_a_bad_scoring_section_fails_the_load(tmp_path: Path) -> None:
    from gridflow.errors import DefinitionError

    with pytest.raises(DefinitionError) as err:
        policy_with_scoring(tmp_path, "scoring:\n  weights: {timeliness: 60, resolution: 60}\n")
    assert "weights must sum to 100" in str(err.value)
    assert "scoring.yaml:2:" in str(err.value)


# --------------------------------------------------------------------------- the criteria


def test_on_time_and_satisfied_scores_100(desk: Desk) -> None:
    cid = desk.simple("QSY-1", at(9, 14))  # due 14:30
    f = desk.facts(cid)
    assert (f.closed, f.on_time, f.overdue_share, f.handling_hours) == (True, True, 0.0, 3.5)
    assert criteria(desk, cid) == {"timeliness": 1.0, "resolution": 1.0, "quality": 1.0,
                                   "satisfaction": 1.0, "composite": 100.0}


def test_overdue_share_on_the_timeliness_curve(desk: Desk) -> None:
    """Closed 16:30: 2 working hours late on a 4-hour limit → share 0.5 → timeliness 0.5;
    basically satisfied 0.9. Composite 30·0.5 + 30 + 20 + 20·0.9 = 83."""
    cid = desk.simple("QSY-2", at(9, 16, 30), "basically_satisfied")
    f = desk.facts(cid)
    assert (f.on_time, f.overdue_share, f.handling_hours) == (False, 0.5, 6.0)
    assert criteria(desk, cid) == {"timeliness": 0.5, "resolution": 1.0, "quality": 1.0,
                                   "satisfaction": 0.9, "composite": 83.0}


def test_very_late_and_dissatisfied(desk: Desk) -> None:
    """Closed Tuesday 10:00: 3 + 1.5 = 4.5 working hours late, share 1.125 → 0 (the default
    curve ends at share 1 with 0). Dissatisfied 0 → 30 + 20 = 50."""
    cid = desk.simple("QSY-3", at(10, 10), "dissatisfied")
    assert desk.facts(cid).overdue_share == pytest.approx(1.125)
    assert criteria(desk, cid)["composite"] == 50.0


def test_approved_extension_moves_the_limit(desk: Desk) -> None:
    """+2 working hours approved: due 16:30, closed 16:30 → on time."""
    cid = desk.report("QSY-4", at(9, 9))
    desk.dispatch(cid, at(9, 9))
    desk.at(at(9, 10)).engine.request_extension(cid, desk.handler(cid), "车辆故障", "2wh")
    desk.at(at(9, 10, 5)).engine.approve_extension(cid, DUTY)
    desk.close(cid, at(9, 16, 30))
    f = desk.facts(cid)
    assert (f.on_time, f.extensions, f.extended) == (True, 1, True)
    assert f.due_at == at(9, 16, 30)
    assert criteria(desk, cid)["timeliness"] == 1.0


def test_denied_extension_does_not(desk: Desk) -> None:
    cid = desk.report("QSY-5", at(9, 9))
    desk.dispatch(cid, at(9, 9))
    desk.at(at(9, 10)).engine.request_extension(cid, desk.handler(cid), "车辆故障", "2wh")
    desk.at(at(9, 10, 5)).engine.deny_extension(cid, DUTY)
    desk.close(cid, at(9, 16, 30))
    f = desk.facts(cid)
    assert (f.on_time, f.extensions) == (False, 0)


def test_rework_lowers_quality(desk: Desk) -> None:
    """Two reworks → rework curve at 2 = 0.4: 30 + 30 + 20·0.4 + 20 = 88."""
    cid = desk.report("QSY-6", at(9, 9))
    desk.dispatch(cid, at(9, 9))
    for t in (10, 11):
        desk.feedback(cid, at(9, t))
        desk.at(at(9, t, 30)).engine.rework(cid, SUPERVISOR, "垃圾未清理干净")
    desk.close(cid, at(9, 14))
    f = desk.facts(cid)
    assert (f.rework_count, f.on_time) == (2, True)
    assert criteria(desk, cid) == {"timeliness": 1.0, "resolution": 1.0, "quality": 0.4,
                                   "satisfaction": 1.0, "composite": 88.0}


def test_deferral_stops_the_clock_and_lowers_resolution(desk: Desk) -> None:
    """Deferred Monday 10:00, resumed Tuesday 09:00 (6.5 working hours paused), closed
    Tuesday 11:00: 5.5 working hours after the deadline minus 6.5 paused → on time.
    Resolution 'deferred' 0.6: 30 + 18 + 20 + 20 = 88. Handling 9.5 − 6.5 = 3 hours."""
    cid = desk.report("QSY-7", at(9, 9))
    desk.dispatch(cid, at(9, 9))
    desk.at(at(9, 10)).engine.defer(cid, DUTY, "需协调产权单位")
    f = desk.facts(cid)
    assert (f.deferred, f.filed, f.closed) == (True, True, False)
    assert not f.should_close(at(13, 12))  # deferred cases are out of the disposal rates
    before = desk.engine.get(cid)
    view = desk.at(at(10, 9)).engine.resume(cid, DUTY)
    # the engine moves the deadline by the paused time too (Monday 14:30 → Tuesday 12:00),
    # so supervision agrees with the score: not overdue at 09:30, no warning fired then
    assert (before.due_at, view.due_at) == (at(9, 14, 30), at(10, 12))
    assert desk.facts(cid).due_at == view.due_at
    assert desk.engine.overdue(at(10, 9, 30)) == []
    assert [e.type for e in desk.engine.tick(at(10, 9, 30))] == []
    with desk.engine.store.transaction(readonly=True) as tx:  # re-armed at the new times
        armed = sorted(t.due_at for t in tx.timers(cid) if t.fired_at is None)
    assert armed == sorted(t for t in (view.warn_at, view.due_at) if t is not None)
    desk.close(cid, at(10, 11))
    f = desk.facts(cid)
    assert (f.ever_deferred, f.deferred, f.on_time, f.resolution) == (True, False, True,
                                                                       "deferred")
    assert f.handling_hours == pytest.approx(3.0)
    assert criteria(desk, cid) == {"timeliness": 1.0, "resolution": 0.6, "quality": 1.0,
                                   "satisfaction": 1.0, "composite": 88.0}


def test_routing_appeal_upheld_exempts_the_time_before_the_reroute(desk: Desk) -> None:
    """Sanitation appeals at 10:00; upheld at 15:00 (after its deadline of 14:30). The case is
    re-dispatched to the street command centre (4wh from 15:00: due Tuesday 10:00) and closed
    Tuesday 09:30 → on time. The 4.5 working hours before the re-route are exempt: handling
    8 − 4.5 = 3.5 hours."""
    cid = desk.report("QSY-8", at(9, 9))
    desk.dispatch(cid, at(9, 9))
    desk.at(at(9, 10)).engine.appeal(cid, desk.handler(cid), "routing", "非环卫职责，应由物业处理")
    desk.at(at(9, 15)).engine.decide_appeal(cid, REVIEWER, upheld=True)
    view = desk.dispatch(cid, at(9, 15), file=False)
    assert view.lead == "street-command"
    desk.close(cid, at(10, 9, 30))
    f = desk.facts(cid)
    assert (f.lead, f.on_time, f.exempt_hours) == ("street-command", True, 4.5)
    assert f.handling_hours == pytest.approx(3.5)
    assert criteria(desk, cid)["composite"] == 100.0
    assert subjects(f) == (Subject("department", "street-command", "lead"),
                           Subject("worker", "gw-chen", "reporter"))


def test_routing_appeal_rejected_keeps_the_clock(desk: Desk) -> None:
    """Rejected: sanitation keeps the case; closed Tuesday 10:00 it is 4.5 hours late
    (share 1.125 → timeliness 0)."""
    cid = desk.report("QSY-9", at(9, 9))
    desk.dispatch(cid, at(9, 9))
    desk.at(at(9, 10)).engine.appeal(cid, desk.handler(cid), "routing", "非环卫职责")
    desk.at(at(9, 15)).engine.decide_appeal(cid, REVIEWER, upheld=False, reason="属环卫职责")
    desk.close(cid, at(10, 10))
    f = desk.facts(cid)
    assert (f.lead, f.on_time, f.exempt_hours) == ("sanitation", False, 0.0)
    assert criteria(desk, cid)["timeliness"] == 0.0


def test_score_appeal_upheld_exempts_and_rescoring_keeps_the_history(desk: Desk) -> None:
    """Late (83), then sanitation's score appeal (暴雨) is upheld: the appeal names no
    criterion, so every deduction is exempt → 100. The store keeps both revisions."""
    engine = desk.engine
    cid = desk.simple("QSY-10", at(9, 16, 30), "basically_satisfied")
    refresh(engine.store, engine.policy)
    desk.at(at(9, 17)).engine.appeal(cid, desk.handler(cid), "score", "暴雨导致清运延误")
    assert refresh(engine.store, engine.policy).revisions == 0  # pending: no change
    desk.at(at(10, 9)).engine.decide_appeal(cid, REVIEWER, upheld=True)
    f = desk.facts(cid)
    assert (f.exempt, f.score_appeals, f.on_time) == (
        ("timeliness", "resolution", "quality", "satisfaction"), 1, True)
    score = score_case(f)
    assert score is not None
    assert score.raw["timeliness"] == 0.5 and score.criteria["timeliness"] == 1.0
    assert score.composite == 100.0
    stats = refresh(engine.store, engine.policy)
    assert (stats.cases, stats.revisions) == (1, 1)
    history = score_history(engine.store, cid)
    lead = [r for r in history if r.subject.role == "lead"]
    assert [(r.revision, r.current, r.composite, r.reason) for r in lead] == [
        (1, False, 83.0, "evaluated"),
        (2, True, 100.0, "score appeal upheld: 暴雨导致清运延误"),
    ]
    assert lead[1].exempt == ("timeliness", "resolution", "quality", "satisfaction")
    assert lead[1].details["raw"]["timeliness"] == 0.5
    assert refresh(engine.store, engine.policy).cases == 0  # idempotent


def test_score_appeal_naming_a_criterion_exempts_only_that(desk: Desk) -> None:
    """An exemption that names its criterion (``criteria``/``criterion`` in the event's
    exemption) makes only that criterion full: 30 + 30 + 20 + 18 = 98."""
    cid = desk.simple("QSY-11", at(9, 16, 30), "basically_satisfied")
    history = list(desk.engine.history(cid))
    ruling = NewEvent("uphold_score_appeal", REVIEWER.id, REVIEWER.role, at(10, 9), None,
                      {"kind": "score", "upheld": True,
                       "exemption": {"kind": "score", "criterion": "timeliness",
                                     "reason": "暴雨"}})
    policy = desk.engine.policy
    f = case_facts([*history, ruling], policy.calendar, policy.registry)
    assert f.exempt == ("timeliness",)
    score = score_case(f)
    assert score is not None and score.composite == 98.0


def test_score_appeal_contesting_timeliness_exempts_only_timeliness(desk: Desk) -> None:
    """Late (83: 30·0.5 + 30 + 20 + 20·0.9); sanitation contests timeliness only, upheld:
    timeliness is full, the 'basically satisfied' 0.9 stays → 30 + 30 + 20 + 18 = 98, and
    the case now counts as on time."""
    engine = desk.engine
    cid = desk.simple("QSY-12", at(9, 16, 30), "basically_satisfied")
    refresh(engine.store, engine.policy)
    desk.at(at(9, 17)).engine.appeal(cid, desk.handler(cid), "score", "暴雨导致清运延误",
                                     criteria=["timeliness"])
    desk.at(at(10, 9)).engine.decide_appeal(cid, REVIEWER, upheld=True)
    f = desk.facts(cid)
    assert (f.exempt, f.score_appeals, f.on_time) == (("timeliness",), 1, True)
    assert criteria(desk, cid) == {"timeliness": 1.0, "resolution": 1.0, "quality": 1.0,
                                   "satisfaction": 0.9, "composite": 98.0}
    assert refresh(engine.store, engine.policy).revisions == 1
    lead = [r for r in current_scores(engine.store, cid, engine.policy.version)
            if r.subject.role == "lead"]
    assert [(r.revision, r.composite, r.exempt) for r in lead] == [(2, 98.0, ("timeliness",))]


def test_score_appeal_contesting_satisfaction_keeps_the_lateness(desk: Desk) -> None:
    """Late (83); the appeal contests satisfaction only, upheld: 30·0.5 + 30 + 20 + 20 = 85,
    still late (timeliness 0.5, not on time)."""
    cid = desk.simple("QSY-13", at(9, 16, 30), "basically_satisfied")
    desk.at(at(9, 17)).engine.appeal(cid, desk.handler(cid), "score", "回访对象有误",
                                     criteria=["satisfaction"])
    desk.at(at(10, 9)).engine.decide_appeal(cid, REVIEWER, upheld=True)
    f = desk.facts(cid)
    assert (f.exempt, f.on_time) == (("satisfaction",), False)
    assert criteria(desk, cid) == {"timeliness": 0.5, "resolution": 1.0, "quality": 1.0,
                                   "satisfaction": 1.0, "composite": 85.0}


def test_rejected_score_appeal_with_criteria_exempts_nothing(desk: Desk) -> None:
    """Late (83); the appeal names timeliness but is rejected: still 83."""
    cid = desk.simple("QSY-14", at(9, 16, 30), "basically_satisfied")
    desk.at(at(9, 17)).engine.appeal(cid, desk.handler(cid), "score", "暴雨",
                                     criteria=["timeliness"])
    desk.at(at(10, 9)).engine.decide_appeal(cid, REVIEWER, upheld=False, reason="非不可抗力")
    f = desk.facts(cid)
    assert (f.exempt, f.score_appeals) == ((), 0)
    assert criteria(desk, cid)["composite"] == 83.0


@pytest.mark.parametrize(
    ("resolution", "value", "composite"),
    [("special", 0.8, 94.0), ("deferred", 0.6, 88.0), ("normal", 1.0, 100.0)],
)
def test_close_resolution_sets_the_resolution_criterion(
    desk: Desk, resolution: str, value: float, composite: float
) -> None:
    """Dispatched Monday 09:00, closed 11:00 (on time), satisfied; closed as ``special``
    (0.8): 30 + 30·0.8 + 20 + 20 = 94; as ``deferred`` (0.6): 30 + 18 + 20 + 20 = 88;
    ``normal``: 100."""
    engine = desk.engine
    cid = desk.report(f"QSY-R-{resolution}", at(9, 9))
    desk.dispatch(cid, at(9, 9))
    desk.feedback(cid, at(9, 11))
    engine.verify(cid, SUPERVISOR)
    engine.close(cid, SUPERVISOR, resolution=resolution)
    engine.evaluate(cid, RESIDENT, "satisfied")
    f = desk.facts(cid)
    assert (f.on_time, f.resolution, f.ever_deferred) == (True, resolution, False)
    assert criteria(desk, cid) == {"timeliness": 1.0, "resolution": value, "quality": 1.0,
                                   "satisfaction": 1.0, "composite": composite}


def test_a_score_exemption_covers_the_evaluation_it_contested_not_a_reopened_round(
    desk: Desk,
) -> None:
    """Late and exempted (暴雨): timeliness full. The resident reopens it; the second round
    is closed Wednesday, far past its new deadline: that lateness counts (the exemption was
    for the first round), and the case is no longer on time."""
    cid = desk.simple("QSY-13", at(9, 16, 30))
    desk.at(at(9, 17)).engine.appeal(cid, desk.handler(cid), "score", "暴雨导致清运延误",
                                     criteria=["timeliness"])
    desk.at(at(10, 9)).engine.decide_appeal(cid, REVIEWER, upheld=True)
    assert (desk.facts(cid).exempt, desk.facts(cid).on_time) == (("timeliness",), True)
    desk.at(at(10, 10)).engine.reopen(cid, RESIDENT, "垃圾又堆起来了")
    desk.close(cid, at(11, 17))
    f = desk.facts(cid)
    assert (f.exempt, f.on_time, f.reopens) == ((), False, 1)
    assert criteria(desk, cid)["timeliness"] < 1.0


def test_resident_appeal_reopens_and_counts_as_rework(desk: Desk) -> None:
    """Dissatisfied (30 + 30 + 20 + 0 = 80); the upheld resident appeal reopens the case (a
    new 4wh limit from Tuesday 10:00: due 15:30), which is not scored until evaluated again;
    then quality is the rework curve at 1 = 0.7: 30 + 30 + 14 + 20 = 94."""
    engine = desk.engine
    cid = desk.simple("QSY-12", at(9, 14), "dissatisfied")
    refresh(engine.store, engine.policy)
    desk.at(at(10, 9)).engine.appeal(cid, RESIDENT, "resident", "垃圾又堆起来了")
    desk.at(at(10, 10)).engine.decide_appeal(cid, REVIEWER, upheld=True)
    f = desk.facts(cid)
    assert (f.closed, f.scored, f.rework_count, f.reopens) == (False, False, 1, 1)
    assert f.due_at == at(10, 15, 30)
    stats = refresh(engine.store, engine.policy)
    assert (stats.retired, current_scores(engine.store, cid, engine.policy.version)) == (1, [])
    desk.close(cid, at(10, 11))
    f = desk.facts(cid)
    assert f.handling_hours == pytest.approx(3.5 + 1.0)  # two handling rounds
    assert criteria(desk, cid)["composite"] == 94.0
    refresh(engine.store, engine.policy)
    lead = [r for r in score_history(engine.store, cid) if r.subject.role == "lead"]
    assert [(r.revision, r.current, r.composite, r.reason) for r in lead] == [
        (1, False, 80.0, "evaluated"), (2, True, 94.0, "re-evaluated after reopening")]


def test_cancelled_and_unevaluated_cases_are_not_scored(desk: Desk) -> None:
    engine = desk.engine
    cid = desk.report("QSY-13", at(9, 9), reporter=RESIDENT, channel="hotline")
    desk.at(at(9, 9, 10)).engine.cancel(cid, CLERK, "重复上报")
    f = desk.facts(cid)
    assert (f.cancelled, f.filed, f.scored, f.reporter) == (True, False, False, None)
    assert score_case(f) is None and subjects(f) == ()
    closed = desk.simple("QSY-14", at(9, 14), answer=None)
    f = desk.facts(closed)
    assert (f.closed, f.evaluated, f.scored) == (True, False, False)
    assert score_case(f) is None
    refresh(engine.store, engine.policy)
    assert score_history(engine.store, cid) == score_history(engine.store, closed) == []


def test_on_the_spot_resolution_is_scored_for_the_grid(desk: Desk) -> None:
    """就地解决: no deadline to miss; handled from the resolution to the closure."""
    engine = desk.engine
    cid = desk.report("QSY-15", at(9, 9), category="E04-05", on_spot=True,
                      evidence=["https://img/spot.jpg"])
    desk.at(at(9, 9, 30))
    engine.verify(cid, CHIEF)
    engine.close(cid, SUPERVISOR)
    engine.evaluate(cid, RESIDENT, "satisfied")
    f = desk.facts(cid)
    assert (f.on_spot, f.filed, f.lead, f.on_time, f.handling_hours) == (
        True, True, "grid-worker", True, 0.5)
    assert criteria(desk, cid)["composite"] == 100.0


# --------------------------------------------------------------------------- who is scored


def test_who_is_scored_follows_the_policy(desk: Desk) -> None:
    """Elderly card: lead district-civil, assisted by the grid workers' department."""
    cid = desk.report("QSY-16", at(9, 9), category="S01-01")
    desk.dispatch(cid, at(9, 9))
    desk.close(cid, at(9, 11))
    f = desk.facts(cid)
    assert f.assist == ("grid-worker",)
    assert subjects(f) == (Subject("department", "district-civil", "lead"),
                           Subject("worker", "gw-chen", "reporter"))
    spec = ScoringSpec(score_assisting=True, score_reporter=False)
    assert subjects(f, spec) == (Subject("department", "district-civil", "lead"),
                                 Subject("department", "grid-worker", "assist"))
    resident_case = desk.simple("QSY-17", at(9, 11), reporter=RESIDENT, channel="app")
    assert [s.kind for s in subjects(desk.facts(resident_case))] == ["department"]


# --------------------------------------------------------------------------- policy versions


SCORING_V2 = """\
scoring:
  weights: {timeliness: 40, resolution: 20, quality: 20, satisfaction: 20}
  satisfaction: {satisfied: 1.0, basically_satisfied: 0.8, dissatisfied: 0.0}
  score_assisting: true
"""


def test_rescoring_under_a_new_policy_leaves_old_scores_readable(
    desk: Desk, tmp_path: Path
) -> None:
    """v1 (defaults): 83. v2: 40·0.5 + 20 + 20 + 20·0.8 = 76. Both stay stored."""
    engine = desk.engine
    cid = desk.simple("QSY-18", at(9, 16, 30), "basically_satisfied")
    v1 = engine.policy
    refresh(engine.store, v1)
    v2 = policy_with_scoring(tmp_path, SCORING_V2)
    assert v2.version != v1.version
    stats = refresh(engine.store, v2)
    assert (stats.cases, stats.revisions) == (1, 1)
    old = current_scores(engine.store, cid, v1.version)
    new = current_scores(engine.store, cid, v2.version)
    assert {r.composite for r in old} == {83.0} and {r.composite for r in new} == {76.0}
    assert {r.reason for r in new} == {f"rescored under policy {v2.version} (was {v1.version})"}
    assert [r.policy_version for r in score_history(engine.store, cid)] == [
        v1.version, v1.version, v2.version, v2.version]
    # back to v1: its rows are still current, nothing new is written
    assert refresh(engine.store, v1).revisions == 0
    assert len(score_history(engine.store, cid)) == 4


def test_facts_need_a_history_that_starts_with_the_report(wujin: Policy) -> None:
    with pytest.raises(ValueError, match="starts with 'reported'"):
        case_facts([NewEvent("file", "c", "clerk", at(9, 9))], wujin.calendar)
    with pytest.raises(ValueError, match="empty history"):
        case_facts([], wujin.calendar)


def test_scoring_is_a_pure_function_of_the_history(desk: Desk) -> None:
    cid = desk.simple("QSY-19", at(9, 16, 30), "basically_satisfied")
    a, b = desk.facts(cid), desk.facts(cid)
    assert a == b and score_case(a) == score_case(b)
    assert replace(a, satisfaction="satisfied") != a
