"""Indicators (BRIEF §8) on a small fixed district history, computed by hand; the SQL
aggregation of the store equals the in-Python definition on SQLite, PostgreSQL and MariaDB.

The district (all E01-10 exposed garbage, 4 working hours, sanitation, unless noted; times
are local, Monday 2026-03-09 is the 9th; the report is judged at Friday 13th 12:00):

====  ======================================================  ========  ========  =========
case  story                                                   closed    on time   composite
====  ======================================================  ========  ========  =========
N     Fri 6th (week 10), closed 11:00                         yes       yes       100
A     closed Mon 14:00                                        yes       yes       100
B     closed Mon 16:30, basically satisfied                   yes       no        83
C     qdj-g4 (gw-wang), +2wh extension, closed 16:30          yes       yes       100
D     qdj-g4 (gw-wang), reworked twice, closed 14:00          yes       yes       88
E     deferred Mon 10:00, still deferred                      no        —         —
F     deferred Mon 10:00–Tue 09:00, closed Tue 11:00          yes       yes       88
G     resident hotline report, cancelled                      —         —         —
H     dispatched Mon 09:00, still handling (overdue)          no        no        —
I     reported Fri 13th 09:00, due 14:30 (not yet due)        no        —         —
J     routing appeal upheld, street command, closed Tue 09:30 yes       yes       100
K     like B, then score appeal upheld (暴雨)                  yes       yes       100
L     reported, never filed                                   —         —         —
M     on-the-spot resolution (E04-05), closed 09:30           yes       yes       100
====  ======================================================  ========  ========  =========

Handling hours of the closed cases: N 2, A 3.5, B 6, C 6, D 3.5, F 3, J 3.5, K 6, M 0.5.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gridflow import Engine, load_policy
from gridflow.clock import ManualClock
from gridflow.indicators import (
    FactsSource,
    Indicators,
    Period,
    StoreSource,
    Tally,
    facts_from_store,
    rank_cases,
    rank_units,
    ranking_window,
    refresh,
)
from gridflow.policy import Policy
from gridflow.report import build_report, headline
from gridflow.schema import ScoringSpec
from gridflow.scoring import CaseFacts
from gridflow.store import Store
from gridflow.store import aggregates as agg
from tests.test_scoring import (
    CHIEF,
    CLERK,
    DUTY,
    GW2,
    RESIDENT,
    REVIEWER,
    SUPERVISOR,
    WUJIN,
    Desk,
    at,
)

CST = ZoneInfo("Asia/Shanghai")
AS_OF = at(13, 12)
ALL = Period.all()


def build_district(desk: Desk) -> None:
    """The fixed history of the module docstring (case ids QSY-A … QSY-N)."""
    e = desk.engine
    # N: the week before
    cid = desk.report("QSY-N", at(6, 9))
    desk.dispatch(cid, at(6, 9))
    desk.close(cid, at(6, 11))
    desk.simple("QSY-A", at(9, 14))
    desk.simple("QSY-B", at(9, 16, 30), "basically_satisfied")
    # C: extension
    cid = desk.report("QSY-C", at(9, 9), location="qdj-g4", reporter=GW2)
    desk.dispatch(cid, at(9, 9))
    desk.at(at(9, 10)).engine.request_extension(cid, desk.handler(cid), "车辆故障", "2wh")
    desk.at(at(9, 10, 5)).engine.approve_extension(cid, DUTY)
    desk.close(cid, at(9, 16, 30))
    # D: two reworks
    cid = desk.report("QSY-D", at(9, 9), location="qdj-g4", reporter=GW2)
    desk.dispatch(cid, at(9, 9))
    for t in (10, 11):
        desk.feedback(cid, at(9, t))
        desk.at(at(9, t, 30)).engine.rework(cid, SUPERVISOR, "未清理干净")
    desk.close(cid, at(9, 14))
    # E: deferred, still deferred
    cid = desk.report("QSY-E", at(9, 9))
    desk.dispatch(cid, at(9, 9))
    desk.at(at(9, 10)).engine.defer(cid, DUTY, "需协调产权单位")
    # F: deferred and resumed
    cid = desk.report("QSY-F", at(9, 9))
    desk.dispatch(cid, at(9, 9))
    desk.at(at(9, 10)).engine.defer(cid, DUTY, "需协调产权单位")
    desk.at(at(10, 9)).engine.resume(cid, DUTY)
    desk.close(cid, at(10, 11))
    # G: cancelled resident report
    cid = desk.report("QSY-G", at(9, 9), reporter=RESIDENT, channel="hotline")
    desk.at(at(9, 9, 10)).engine.cancel(cid, CLERK, "重复上报")
    # H: open, overdue
    cid = desk.report("QSY-H", at(9, 9))
    desk.dispatch(cid, at(9, 9))
    # I: open, not yet due
    cid = desk.report("QSY-I", at(13, 9))
    desk.dispatch(cid, at(13, 9))
    # J: routing appeal upheld
    cid = desk.report("QSY-J", at(9, 9))
    desk.dispatch(cid, at(9, 9))
    desk.at(at(9, 10)).engine.appeal(cid, desk.handler(cid), "routing", "非环卫职责")
    desk.at(at(9, 15)).engine.decide_appeal(cid, REVIEWER, upheld=True)
    desk.dispatch(cid, at(9, 15), file=False)
    desk.close(cid, at(10, 9, 30))
    # K: late, score appeal upheld
    cid = desk.simple("QSY-K", at(9, 16, 30), "basically_satisfied")
    desk.at(at(9, 17)).engine.appeal(cid, desk.handler(cid), "score", "暴雨")
    desk.at(at(10, 9)).engine.decide_appeal(cid, REVIEWER, upheld=True)
    # L: reported only
    desk.report("QSY-L", at(9, 9))
    # M: on the spot
    cid = desk.report("QSY-M", at(9, 9), category="E04-05", on_spot=True,
                      evidence=["https://img/spot.jpg"])
    desk.at(at(9, 9, 30))
    e.verify(cid, CHIEF)
    e.close(cid, SUPERVISOR)
    e.evaluate(cid, RESIDENT, "satisfied")


@pytest.fixture(scope="session")
def wujin() -> Policy:
    return load_policy(WUJIN)


def clean_aggregates(store: Store) -> None:
    """Empty the derived tables (server databases keep them between tests)."""
    t = agg.ensure_aggregate_tables(store)
    with store.transaction() as tx:
        for table in (t.scores, t.units, t.facts):
            tx.connection.execute(table.delete())


@pytest.fixture(scope="module")
def district_facts(wujin: Policy) -> list[CaseFacts]:
    """The district folded in Python from a private in-memory store."""
    clock = ManualClock(at(9, 9))
    engine = Engine(wujin, clock=clock)
    try:
        build_district(Desk(engine, clock))
        return facts_from_store(engine.store, wujin)
    finally:
        engine.dispose()


@pytest.fixture
def python(district_facts: list[CaseFacts], wujin: Policy) -> FactsSource:
    return FactsSource.from_policy(district_facts, wujin)


@pytest.fixture
def district_store(store: Store, wujin: Policy) -> Iterator[Store]:
    """The district on every backend of ``store``, refreshed."""
    clean_aggregates(store)
    clock = ManualClock(at(9, 9))
    engine = Engine(wujin, store=store, clock=clock)
    build_district(Desk(engine, clock))
    refresh(store, wujin, batch=5)
    yield store


def ind(source: Any, by: str | None, period: Period = ALL, as_of: datetime = AS_OF,
        spec: ScoringSpec | None = None) -> dict[str | None, dict[str, Any]]:
    return {k: Indicators.of(t, spec or ScoringSpec()).to_dict()
            for k, t in source.tally(by, period, as_of).items()}


# --------------------------------------------------------------------------- periods


@pytest.mark.parametrize(("text", "kind", "label", "first", "end"), [
    ("2026", "year", "2026", date(2026, 1, 1), date(2027, 1, 1)),
    ("2026-Q1", "quarter", "2026-Q1", date(2026, 1, 1), date(2026, 4, 1)),
    ("2026-q4", "quarter", "2026-Q4", date(2026, 10, 1), date(2027, 1, 1)),
    ("2026-03", "month", "2026-03", date(2026, 3, 1), date(2026, 4, 1)),
    ("2026-12", "month", "2026-12", date(2026, 12, 1), date(2027, 1, 1)),
    ("2026-W10", "week", "2026-W10", date(2026, 3, 2), date(2026, 3, 9)),
    ("2026-W01", "week", "2026-W01", date(2025, 12, 29), date(2026, 1, 5)),
    ("2026-03-09", "day", "2026-03-09", date(2026, 3, 9), date(2026, 3, 10)),
    ("2026-03-01..2026-03-31", "range", "2026-03-01..2026-03-31", date(2026, 3, 1),
     date(2026, 4, 1)),
    ("all", "all", "all", None, None),
    (None, "all", "all", None, None),
])
def test_periods(text: str | None, kind: str, label: str, first: date | None,
                 end: date | None) -> None:
    p = Period.parse(text)
    assert (p.kind, p.label, p.start, p.end) == (kind, label, first, end)


@pytest.mark.parametrize("text", ["2026-13", "2026-W54", "26-03", "2026-03-31..2026-03-01",
                                  "2026-02-30", "last month"])
def test_bad_periods_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid period"):
        Period.parse(text)


def test_period_bounds_are_local_midnights() -> None:
    start, end = Period.parse("2026-03-09").bounds(CST)
    assert start == datetime(2026, 3, 8, 16, tzinfo=UTC)
    assert end == datetime(2026, 3, 9, 16, tzinfo=UTC)
    assert Period.parse("2026-03-09").contains(at(9, 0), CST)
    assert not Period.parse("2026-03-09").contains(at(10, 0), CST)


def test_ranking_window_is_the_policy_period_clipped_to_the_report() -> None:
    march = Period.parse("2026-03")
    w = ranking_window("week", march, at(13, 12), CST)
    assert (w.label, w.start, w.end) == ("2026-W11", date(2026, 3, 9), date(2026, 3, 16))
    # as_of after the period: the period's last week, clipped to March
    w = ranking_window("week", march, datetime(2026, 5, 1, tzinfo=CST), CST)
    assert (w.label, w.start, w.end) == ("2026-W14", date(2026, 3, 30), date(2026, 4, 1))
    w = ranking_window("month", Period.all(), at(13, 12), CST)
    assert (w.label, w.start, w.end) == ("2026-03", date(2026, 3, 1), date(2026, 4, 1))


# --------------------------------------------------------------------------- definitions


def test_totals_by_hand(python: FactsSource) -> None:
    total = ind(python, None)[None]
    assert total == {
        "reported": 14, "filed": 12, "cancelled": 1, "deferred": 1,
        "should_close": 10, "closed": 9, "on_time": 8, "overdue": 2,
        "reworked": 1, "extended": 1, "evaluated": 9, "scored": 9,
        "completion_rate": 0.9, "on_time_rate": 0.8, "overdue_rate": 0.2,
        "rework_rate": 0.111111, "extension_rate": 0.1,
        "satisfaction_rate": 0.977778,  # (7 · 1 + 2 · 0.9) / 9
        "avg_handling_hours": 3.78,  # 34 / 9
        "composite": 95.44,  # 859 / 9
    }


def test_week_11_by_hand(python: FactsSource) -> None:
    """Without N (week 10): 13 reported, 8 closed of 9 should-close."""
    total = ind(python, None, Period.parse("2026-W11"))[None]
    assert (total["reported"], total["should_close"], total["closed"], total["on_time"]) == (
        13, 9, 8, 7)
    assert total["satisfaction_rate"] == 0.975  # (6 + 1.8) / 8
    assert total["avg_handling_hours"] == 4.0  # 32 / 8
    assert total["composite"] == 94.88  # 759 / 8 = 94.875


def test_as_of_decides_which_open_cases_are_due(python: FactsSource) -> None:
    """At Friday 15:00 case I (due 14:30) is overdue too."""
    later = ind(python, None, as_of=at(13, 15))[None]
    assert (later["should_close"], later["overdue"]) == (11, 3)
    earlier = ind(python, None, as_of=at(9, 14))[None]  # H not yet due on Monday 14:00
    assert earlier["should_close"] == 9


def test_by_department(python: FactsSource) -> None:
    rows = ind(python, "department")
    assert set(rows) == {"sanitation", "street-command", "grid-worker", None}
    san = rows["sanitation"]
    assert (san["reported"], san["filed"], san["deferred"], san["should_close"], san["closed"],
            san["on_time"], san["overdue"]) == (10, 10, 1, 8, 7, 6, 2)
    assert (san["completion_rate"], san["on_time_rate"], san["composite"]) == (
        0.875, 0.75, 94.14)  # 659 / 7
    assert rows["street-command"]["composite"] == 100.0
    assert rows["grid-worker"]["closed"] == 1
    assert (rows[None]["reported"], rows[None]["cancelled"], rows[None]["should_close"]) == (
        2, 1, 0)


def test_by_grid_worker_and_levels(python: FactsSource) -> None:
    workers = ind(python, "worker")
    assert {k: v["reported"] for k, v in workers.items()} == {
        "gw-chen": 11, "gw-wang": 2, None: 1}
    assert workers["gw-wang"]["composite"] == 94.0
    grids = ind(python, "level:grid")
    assert {k: v["reported"] for k, v in grids.items()} == {"qdj-g3": 12, "qdj-g4": 2}
    assert grids["qdj-g4"]["extension_rate"] == 0.5
    assert ind(python, "level:community")["qdj"]["reported"] == 14
    assert ind(python, "level:street")["qishuyan"]["closed"] == 9


def test_rows_add_up_to_the_totals(python: FactsSource) -> None:
    total = python.tally(None, Period.all(), AS_OF)[None]
    for by in ("department", "worker", "week", "level:grid", "level:community"):
        rows = python.tally(by, Period.all(), AS_OF).values()
        for f in fields(Tally):
            if f.name in ("answers", "scored", "composite_centi"):
                continue
            assert sum(getattr(t, f.name) for t in rows) == getattr(total, f.name), (by, f.name)


def test_on_time_and_overdue_rates_add_up(python: FactsSource) -> None:
    for row in ind(python, "department").values():
        if row["should_close"]:
            assert row["on_time"] + row["overdue"] == row["should_close"]


def test_rankings_by_hand(python: FactsSource) -> None:
    week = Period.parse("2026-W11")
    workers = rank_units(python.tally("worker", week, AS_OF), 5)
    assert [(r.rank, r.key, r.composite, r.scored) for r in workers] == [
        (1, "gw-chen", 95.17, 6), (2, "gw-wang", 94.0, 2)]  # 571 / 6; 188 / 2
    departments = rank_units(python.tally("department", Period.parse("2026-03"), AS_OF), 0)
    assert [(r.key, r.composite) for r in departments] == [
        ("grid-worker", 100.0), ("street-command", 100.0), ("sanitation", 94.14)]
    cases = rank_cases(python.top_cases(Period.parse("2026-03"), 10), 10)
    assert [c.case_id.removeprefix("QSY-") for c in cases] == list("NMACKJDFB")
    assert [c.case_id for c in rank_cases(python.top_cases(Period.parse("2026-03"), 2), 2)] == [
        "QSY-N", "QSY-M"]


def test_seed_figures_reproduced() -> None:
    """Seed 000: "上报事项22107条，办结率为99.85%" — 22,074 of 22,107 closed."""
    start = datetime(2019, 1, 7, 9, tzinfo=CST)
    base = CaseFacts("x", 1, "closed", start, start, filed=True, closed=True, closed_at=start,
                     due_at=start, on_time=True, handling_hours=1.0)
    facts = [replace(base, case_id=f"C{i:05d}") for i in range(22074)]
    facts += [replace(base, case_id=f"O{i:05d}", state="handling", closed=False,
                      closed_at=None, on_time=None, handling_hours=None) for i in range(33)]
    source = FactsSource(facts)
    totals = Indicators.of(source.tally(None, Period.all(), start + timedelta(days=1))[None],
                           ScoringSpec()).to_dict()
    assert headline(totals) == {"zh": "上报事项 22,107 件，办结率 99.85%",
                                "en": "22,107 matters reported, completion rate 99.85%"}


# --------------------------------------------------------------------------- SQL = Python


GROUPINGS = [None, "department", "worker", "week", "level:grid", "level:community",
             "level:street"]
PERIODS = ["all", "2026-W11", "2026-W10", "2026-03-09", "2026-03-06..2026-03-10", "2025"]


def test_store_equals_definition(district_store: Store, wujin: Policy,
                                 python: FactsSource) -> None:
    sql = StoreSource.from_policy(district_store, wujin)
    for text in PERIODS:
        period = Period.parse(text)
        for by in GROUPINGS:
            for as_of in (AS_OF, at(9, 14)):
                assert sql.tally(by, period, as_of) == python.tally(by, period, as_of), (
                    text, by, as_of)
        assert rank_cases(sql.top_cases(period, 3), 3) == rank_cases(
            python.top_cases(period, 0), 3)
    assert sql.latest() == python.latest() == at(13, 9)
    def by_id(f: CaseFacts) -> str:
        return f.case_id

    assert sorted(facts_from_store(district_store, wujin), key=by_id) == sorted(
        (f for f, _ in python.cases), key=by_id)


def test_store_report_equals_definition_report(district_store: Store, wujin: Policy,
                                               python: FactsSource) -> None:
    sql = StoreSource.from_policy(district_store, wujin)
    for by in ("department", "grid", "worker"):
        a = build_report(sql, policy=wujin, by=by, as_of=AS_OF)
        b = build_report(python, policy=wujin, by=by, as_of=AS_OF)
        assert a == b
    assert build_report(sql, policy=wujin) == build_report(python, policy=wujin)


def test_refresh_is_incremental(district_store: Store, wujin: Policy) -> None:
    assert refresh(district_store, wujin).cases == 0
    engine = Engine(wujin, store=district_store, clock=ManualClock(at(13, 10)))
    engine.file("QSY-L", CLERK)
    stats = refresh(district_store, wujin)
    assert (stats.cases, stats.revisions) == (1, 0)
    total = StoreSource.from_policy(district_store, wujin).tally(None, Period.all(), AS_OF)
    assert total[None].filed == 13


def test_store_source_without_a_policy_reads_the_stored_version(
    district_store: Store, wujin: Policy
) -> None:
    bare = StoreSource(district_store)
    assert bare.policy_version == wujin.version
    assert bare.tally("department", Period.all(), AS_OF) == StoreSource.from_policy(
        district_store, wujin).tally("department", Period.all(), AS_OF)


def test_unknown_grouping_is_refused(python: FactsSource) -> None:
    with pytest.raises(ValueError, match="unknown grouping"):
        python.tally("team", Period.all(), AS_OF)


def test_seed_figures_from_the_store() -> None:
    """The same 22,107 / 99.85% through SQL (facts rows written directly)."""
    from gridflow.indicators import _facts_row

    start = datetime(2019, 1, 7, 9, tzinfo=CST)
    base = CaseFacts("x", 1, "closed", start, start, filed=True, closed=True, closed_at=start,
                     due_at=start, on_time=True, handling_hours=1.0)
    rows = [_facts_row(replace(base, case_id=f"C{i:05d}"), None, "v", CST)
            for i in range(22074)]
    rows += [_facts_row(replace(base, case_id=f"O{i:05d}", state="handling", closed=False,
                                closed_at=None, on_time=None, handling_hours=None), None, "v",
                        CST) for i in range(33)]
    with Store() as store:
        store.create_all()
        t = agg.ensure_aggregate_tables(store)
        with store.transaction() as tx:
            agg.write_facts(tx, t, rows, [])
        doc = build_report(StoreSource(store), as_of=start + timedelta(days=1))
    assert doc["headline"]["zh"] == "上报事项 22,107 件，办结率 99.85%"
    assert doc["totals"]["completion_rate"] == 0.998507
