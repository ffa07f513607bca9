"""History conditions (BRIEF §5: "≥3 cases of the same category at the same address
within 30 days"): the rule-file syntax, the counts routing reads from an in-memory
history, from the store (every backend, inside and outside a batch) and from a log."""

from __future__ import annotations

import shutil
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gridflow import Actor, Engine, load_policy
from gridflow.clock import ManualClock
from gridflow.conditions import describe
from gridflow.errors import CaseValidationError, DefinitionError, GridflowError, RoutingError
from gridflow.history import History, HistorySpec, window_of
from gridflow.importer import LogRecord
from gridflow.policy import Policy
from gridflow.replay import LifecycleReplay, RouteMemo, replay, replay_routing, to_json
from gridflow.schema import CaseIn
from gridflow.shards import ShardedLifecycleReplay, history_key, shard_of, shardable
from gridflow.store import Store

MINI = Path(__file__).resolve().parent / "policies" / "mini"
SH = ZoneInfo("Asia/Shanghai")
T = datetime(2026, 3, 16, 10, 0, tzinfo=SH)
HISTORY_RULE = """\
routing:
  tables:
    - id: repeat
      hit: first
      rules:
        - id: same-address-thrice
          description: 30 日内同一地址同类问题第 3 次反映：指挥中心督办
          when:
            category: {prefix: E01}
            history: {same: [category, address], within: 30d, at_least: 3}
          then: {lead: centre, tags: [重复投诉]}
"""
REPORTER = Actor("gw-1", "grid_worker")
DISPATCHER = Actor("disp-1", "dispatcher")
CLERK = Actor("clerk-1", "clerk")


def _policy_dir(tmp: Path, extra: str = HISTORY_RULE, name: str = "a-history.yaml") -> Path:
    root = tmp / "p"
    shutil.copytree(MINI, root)
    (root / name).write_text(extra, "utf-8")
    return root


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    return load_policy(_policy_dir(tmp_path_factory.mktemp("history")))


ADDRESS = "常州市武进区湖塘镇1号"


def case(policy: Policy, at: datetime, *, category: str = "E01-10",
         address: str | None = ADDRESS, location: str = "g1",
         reporter: str | None = None) -> CaseIn:
    data: dict[str, Any] = {"category": category, "location": location, "description": "垃圾",
                            "reported_at": at.isoformat()}
    if address is not None:
        data["address"] = address
    if reporter is not None:
        data["reporter"] = reporter
    return policy.validate_case(data)


# ------------------------------------------------------------------------ rule files


def test_history_condition_lowers_to_a_count_test(policy: Policy) -> None:
    assert policy.router.history_specs == (
        HistorySpec(("category", "address"), timedelta(days=30)),
    )
    rule = policy.router.rules[0][0]
    assert "history(same category+address, within 30d) gte 3" in describe(rule.cond)


@pytest.mark.parametrize(
    ("history", "message", "suggestion"),
    [
        ("{within: 2wd, at_least: 3}", "a history window counts calendar time", None),
        ("{same: [adress], within: 30d, at_least: 3}", "Input should be", "address"),
        ("{within: 30d, at_least: 1}", "greater than or equal to 2", None),
        ("{same: [address, address], within: 30d, at_least: 3}", "a field is listed twice",
         None),
        ("{within: 30d}", "at_least", None),
    ],
)
def test_bad_history_conditions_are_reported_at_their_place(
    tmp_path: Path, history: str, message: str, suggestion: str | None
) -> None:
    text = HISTORY_RULE.replace("{same: [category, address], within: 30d, at_least: 3}", history)
    root = _policy_dir(tmp_path, text)
    with pytest.raises(DefinitionError) as err:
        load_policy(root)
    found = [p for p in err.value.problems if message in p.message]
    assert found, str(err.value)
    assert found[0].path.endswith("a-history.yaml") and found[0].line == 10
    if suggestion is not None:
        assert suggestion in str(err.value)


def test_window_counts_calendar_time_only() -> None:
    assert window_of("30d") == timedelta(days=30)
    assert window_of("72h") == timedelta(hours=72)
    with pytest.raises(ValueError, match="calendar time"):
        window_of("4wh")


# --------------------------------------------------------------- routing with counts


@pytest.mark.parametrize(
    ("earlier", "lead"),
    [
        pytest.param([], "sanitation", id="first report"),
        pytest.param([{"days": 3}], "sanitation", id="second report"),
        pytest.param([{"days": 3}, {"days": 20}], "centre", id="third within 30 days"),
        pytest.param([{"days": 3}, {"days": 30}], "centre", id="window start is included"),
        pytest.param([{"days": 3}, {"days": 31}], "sanitation", id="31 days ago is outside"),
        pytest.param([{"days": 3}, {"days": 0}], "sanitation", id="same instant is not earlier"),
        pytest.param([{"days": 3}, {"days": 5, "address": "湖塘镇2号"}], "sanitation",
                     id="other address"),
        pytest.param([{"days": 3}, {"days": 5, "category": "E01-11"}], "sanitation",
                     id="other category"),
        pytest.param([{"days": 3}, {"days": 5, "location": "g3"}], "centre",
                     id="other grid, same address"),
        pytest.param([{"days": 3}, {"days": 5, "address": None}], "sanitation",
                     id="earlier case without address"),
        pytest.param([{"days": -1}, {"days": 5}], "sanitation", id="later case not counted"),
    ],
)
def test_history_counts_decide_the_route(
    policy: Policy, earlier: list[dict[str, Any]], lead: str
) -> None:
    past = [case(policy, T - timedelta(days=e.pop("days")), **e) for e in map(dict, earlier)]
    decision = policy.route(case(policy, T), history=History(past))
    assert decision.lead == lead
    assert ("重复投诉" in decision.tags) == (lead == "centre")


def test_without_a_history_only_the_case_itself_counts(policy: Policy) -> None:
    decision = policy.route(case(policy, T))
    assert decision.lead == "sanitation"
    seen = policy.route(case(policy, T), history=History([case(policy, T - timedelta(days=1))] * 2))
    hit = seen.hits[0]
    assert hit.rule == "same-address-thrice"
    assert any("history" in c.condition and c.seen == 3 for c in hit.conditions)


def test_a_history_takes_case_documents_as_route_does(policy: Policy) -> None:
    docs = [{"category": "E01-10", "location": "g1", "address": ADDRESS, "description": "垃圾",
             "reported_at": (T - timedelta(days=d)).isoformat()} for d in (1, 2)]
    doc = {**docs[0], "reported_at": T.isoformat()}
    assert policy.route(doc, history=History(docs)).lead == "centre"
    assert policy.route(doc, history=History(docs[:1])).lead == "sanitation"
    with pytest.raises(CaseValidationError) as info:
        History([*docs, {"category": "E01-10", "reported_at": "2026-03-15T10:00:00"}])
    assert info.value.fields == ("location", "reported_at")
    assert str(info.value).startswith("history: invalid case: location: required field missing")


def test_a_case_without_address_never_matches_same_address(policy: Policy) -> None:
    past = [case(policy, T - timedelta(days=d)) for d in (1, 2, 3)]
    assert policy.route(case(policy, T, address=None), history=History(past)).lead == "sanitation"


def test_rule_tests_route_with_their_earlier_cases(tmp_path: Path) -> None:
    tests = textwrap.dedent("""\
        tests:
          - name: 第三次反映
            case: {category: E01-10, location: g1, description: 垃圾, address: 湖塘镇1号,
                   reported_at: "2026-03-16T10:00:00+08:00"}
            earlier:
              - {category: E01-10, location: g2, address: 湖塘镇1号,
                 reported_at: "2026-03-01T10:00:00+08:00"}
              - {category: E01-10, location: g1, address: 湖塘镇1号,
                 reported_at: "2026-03-10T10:00:00+08:00"}
            expect: {lead: centre, rule: same-address-thrice}
          - name: 第二次反映
            case: {category: E01-10, location: g1, description: 垃圾, address: 湖塘镇1号,
                   reported_at: "2026-03-16T10:00:00+08:00"}
            earlier:
              - {category: E01-10, location: g1, address: 湖塘镇1号,
                 reported_at: "2026-03-10T10:00:00+08:00"}
            expect: {lead: sanitation}
        """)
    root = _policy_dir(tmp_path)
    (root / "z-history-tests.yaml").write_text(tests, "utf-8")
    results = {r.name: r for r in load_policy(root).run_tests()}
    assert results["第三次反映"].passed, results["第三次反映"].failures
    assert results["第二次反映"].passed, results["第二次反映"].failures


def test_a_bad_earlier_case_is_reported_at_its_field(tmp_path: Path) -> None:
    tests = textwrap.dedent("""\
        tests:
          - name: 坏的历史
            case: {category: E01-10, location: g1}
            earlier:
              - {category: E01-10, location: g9}
            expect: {lead: centre}
        """)
    root = _policy_dir(tmp_path)
    (root / "z-history-tests.yaml").write_text(tests, "utf-8")
    with pytest.raises(DefinitionError) as err:
        load_policy(root)
    assert "z-history-tests.yaml:5:" in str(err.value)
    assert "test '坏的历史': earlier[0]: location: unknown unit 'g9'" in str(err.value)


# ---------------------------------------------------------------- in-memory history


_ADDRESSES = st.sampled_from(["1号", "2号", None])
_CATS = st.sampled_from(["E01-10", "E01-11"])


@settings(max_examples=60, deadline=None)
@given(
    past=st.lists(st.tuples(st.integers(0, 60 * 24 * 45), _CATS, _ADDRESSES), max_size=25),
    window_h=st.integers(1, 24 * 40),
    only=st.booleans(),
)
def test_history_counts_what_a_plain_filter_counts(
    past: list[tuple[int, str, str | None]], window_h: int, only: bool
) -> None:
    cases = [CaseIn(category=c, location="g1", address=a,
                    reported_at=T - timedelta(minutes=m)) for m, c, a in past]
    same = ("category", "address")
    history = History(cases, only=[same] if only else None)
    since = T - timedelta(hours=window_h)
    for cat in ("E01-10", "E01-11"):
        for addr in ("1号", "2号"):
            want = sum(1 for x in cases if x.category == cat and x.address == addr
                       and x.reported_at is not None and since <= x.reported_at < T)
            assert history.count_reported(same, (cat, addr), since, T) == want
    assert len(history) == len(cases)
    if only:
        with pytest.raises(ValueError, match="no counts by address"):
            history.count_reported(("address",), ("1号",), since, T)


@settings(max_examples=60, deadline=None)
@given(
    past=st.lists(st.tuples(st.integers(0, 60 * 24 * 45), _CATS, _ADDRESSES), max_size=25),
    forget_h=st.integers(0, 24 * 45),
    window_h=st.integers(1, 24 * 45),
    only=st.booleans(),
)
@example(past=[(60, "E01-10", "1号")], forget_h=1, window_h=1, only=True)  # at the horizon
@example(past=[(60, "E01-10", "1号")], forget_h=1, window_h=1, only=False)
def test_a_history_that_forgets_counts_exactly_what_it_still_reaches(
    past: list[tuple[int, str, str | None]], forget_h: int, window_h: int, only: bool
) -> None:
    """After forget_before(h), a window starting at or after h counts what the whole
    history counts; one starting before h raises instead of counting too few."""
    cases = [CaseIn(category=c, location="g1", address=a,
                    reported_at=T - timedelta(minutes=m)) for m, c, a in past]
    same = ("category", "address")
    whole = History(cases, only=[same] if only else None)
    kept = History(cases, only=[same] if only else None)
    horizon = T - timedelta(hours=forget_h)
    kept.forget_before(horizon)
    kept.forget_before(horizon - timedelta(days=1))  # forgetting never goes back
    with pytest.raises(ValueError, match="naive datetime"):
        kept.forget_before(horizon.replace(tzinfo=None))
    kept.add(CaseIn(category="E01-10", location="g1", address="1号",
                    reported_at=horizon - timedelta(minutes=1)))  # too old to be kept
    since = T - timedelta(hours=window_h)
    for cat in ("E01-10", "E01-11"):
        for addr in ("1号", "2号"):
            if since >= horizon:
                assert (kept.count_reported(same, (cat, addr), since, T)
                        == whole.count_reported(same, (cat, addr), since, T))
            else:
                with pytest.raises(RoutingError, match="sort the log by reported_at"):
                    kept.count_reported(same, (cat, addr), since, T)


def test_a_routing_replay_forgets_what_its_windows_no_longer_reach(policy: Policy) -> None:
    """A memo that forgets every 4 cases routes a time-ordered log as one that keeps
    everything; a row more than `late` out of order is a routing error, not a low count;
    one row dated years ahead does not make it forget what the next rows need."""
    start = T - timedelta(days=200)
    rows = [case(policy, start + timedelta(days=d, hours=h), address=f"{d % 7}号")
            for d in range(0, 180, 3) for h in (0, 5)]
    keeping = RouteMemo(policy, forget_every=1_000_000)
    forgetting = RouteMemo(policy, forget_every=4)
    leads = [keeping.route(c).lead for c in rows]
    assert [forgetting.route(c).lead for c in rows] == leads
    assert 0 < leads.count("centre") < len(rows)  # the history rule decides some of them
    late = case(policy, rows[-1].reported_at - timedelta(days=40))  # type: ignore[operator]
    assert keeping.route(late).lead  # keeps everything: still counted
    with pytest.raises(RoutingError, match="sort the log by reported_at"):
        forgetting.route(late)
    ahead = RouteMemo(policy, forget_every=2)
    first = case(policy, T - timedelta(days=10))
    ahead.route(first)
    with pytest.raises(GridflowError):  # a typo in the year: beyond the calendar
        ahead.route(case(policy, T + timedelta(days=3650)))
    ahead.route(case(policy, T - timedelta(days=9)))
    # the case after them still counts the two before it (window: 30 days)
    assert ahead.route(case(policy, T - timedelta(days=8))).lead == "centre"


def test_the_memo_keys_a_count_by_the_thresholds_it_reaches(policy: Policy) -> None:
    """Under `at_least: 3`, counts 1 and 2 route alike and so do 3, 4, 5: two routings
    with durable_rules for five cases, each decision the one `Policy.route` makes with the
    whole history."""
    memo = RouteMemo(policy)
    cases = [case(policy, T + timedelta(days=d)) for d in range(5)]
    leads = [memo.route(c).lead for c in cases]
    want = [policy.route(c, history=History(cases[:i])).lead for i, c in enumerate(cases)]
    assert leads == want == ["sanitation", "sanitation", "centre", "centre", "centre"]
    assert (memo.misses, memo.hits) == (2, 3)


# ------------------------------------------------------------------ engine and store


def _engine(policy: Policy, store: Store) -> tuple[Engine, ManualClock]:
    clock = ManualClock(T - timedelta(days=40))
    return Engine(policy, store, clock), clock


def _report_and_dispatch(engine: Engine, clock: ManualClock, policy: Policy,
                         at: datetime, **kw: Any) -> str:
    clock.set(at)
    view = engine.report(case(policy, at, **kw), REPORTER)
    engine.file(view.id, CLERK)
    return engine.dispatch(view.id, DISPATCHER).lead or ""


def test_the_engine_counts_in_its_store(policy: Policy, store: Store) -> None:
    engine, clock = _engine(policy, store)
    leads = [_report_and_dispatch(engine, clock, policy, T - timedelta(days=d))
             for d in (35, 10, 2, 1)]
    # 35 days ago is outside the window of the third: the third counts 2, the fourth 3
    assert leads == ["sanitation", "sanitation", "sanitation", "centre"]
    with store.transaction(readonly=True) as tx:
        assert tx.count_reported(("category", "address"), ("E01-10", ADDRESS),
                                 T - timedelta(days=30), T) == 3
        assert tx.count_reported(("location", "address"), ("g1", ADDRESS),
                                 T - timedelta(days=40), T) == 4
        assert tx.count_reported(("reporter",), ("nobody",), T - timedelta(days=40), T) == 0
        with pytest.raises(ValueError, match="cannot compare"):
            tx.count_reported(("description",), ("x",), T - timedelta(days=40), T)


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_a_batch_counts_what_it_has_not_written_yet(policy: Policy, size: int) -> None:
    store = Store(outbox=False)
    store.create_all()
    engine, clock = _engine(policy, store)
    leads = []
    with engine.batch(size=size):
        for d in (10, 3, 2, 1):
            leads.append(_report_and_dispatch(engine, clock, policy, T - timedelta(days=d)))
    assert leads == ["sanitation", "sanitation", "centre", "centre"]


def test_on_the_spot_resolution_routes_with_the_store_history(policy: Policy) -> None:
    store = Store(outbox=False)
    store.create_all()
    engine, clock = _engine(policy, store)
    for d in (3, 2):
        _report_and_dispatch(engine, clock, policy, T - timedelta(days=d))
    clock.set(T)
    view = engine.report(case(policy, T), Actor("gw-1", "grid_worker"), on_spot=True,
                         evidence=["https://example.org/1.jpg"])
    assert view.data["decision"]["rule"] == "same-address-thrice"


# --------------------------------------------------------------------------- replays


def _records(policy: Policy) -> list[LogRecord]:
    times = [T - timedelta(days=d) for d in (12, 9, 5, 4, 1)]
    hour = timedelta(hours=1)
    out = [LogRecord(i + 2, case(policy, t).model_copy(update={"id": f"c{i}"}),
                     dispatched_at=t + hour) for i, t in enumerate(times)]
    out.append(LogRecord(9, case(policy, T, address="别处").model_copy(update={"id": "c9"}),
                         dispatched_at=T + hour))
    return out


def test_routing_replay_counts_the_logs_earlier_rows(policy: Policy) -> None:
    leads: list[str] = []
    stats = replay_routing(policy, _records(policy),
                           on_case=lambda _r, routed: leads.append(routed.lead))
    assert leads == ["sanitation", "sanitation", "centre", "centre", "centre", "sanitation"]
    assert stats.cases == 6
    # a fresh memo: routing a case alone counts only itself
    assert RouteMemo(policy).route(_records(policy)[4].case).lead == "sanitation"


def test_lifecycle_replay_routes_with_the_stores_history(policy: Policy) -> None:
    leads = {}
    run = LifecycleReplay(policy, on_outcome=lambda o: leads.__setitem__(o.case_id, o.lead))
    with run:
        for rec in _records(policy):
            run.feed(rec)
    assert [leads[f"c{i}"] for i in (0, 1, 2, 3, 4, 9)] == [
        "sanitation", "sanitation", "centre", "centre", "centre", "sanitation"]


def _feed(run: Any, records: list[LogRecord]) -> str:
    for rec in records:
        run.feed(rec)
    run.finish()
    return to_json(run.to_dict())


def test_a_sharded_replay_keeps_the_history_counts_in_one_shard(
    policy: Policy, tmp_path: Path
) -> None:
    """Shards by the fields every history condition compares: the five cases at one
    address (which shard by case id would split) meet in one shard and count each other
    as in one process; the stores hold the same cases."""
    records = _records(policy)
    assert len({shard_of(r.case_id, 2) for r in records[:5]}) == 2
    assert history_key(policy) == ("category", "address")
    # c0 again, elsewhere (another shard by its address), while c0 is still open: refused
    # where c0 is replayed, as one process refuses it
    again = case(policy, T + timedelta(hours=2), address="别处").model_copy(update={"id": "c0"})
    assert shard_of("E01-10\x1f别处", 2) != shard_of(f"E01-10\x1f{ADDRESS}", 2)
    records.append(LogRecord(10, again))
    stores = [Store(f"sqlite:///{tmp_path / name}", outbox=False) for name in ("1.db", "2.db")]
    for store in stores:
        store.create_all()
    one_leads: dict[str, Any] = {}
    many_leads: dict[str, Any] = {}
    one_doc = _feed(LifecycleReplay(policy, stores[0], on_outcome=lambda o: one_leads.update(
        {o.case_id: o.lead})), records)
    many_doc = _feed(ShardedLifecycleReplay(policy, stores[1], jobs=2, on_outcome=lambda o:
                                            many_leads.update({o.case_id: o.lead})), records)
    assert [one_leads[f"c{i}"] for i in (0, 1, 2, 3, 4, 9)] == [
        "sanitation", "sanitation", "centre", "centre", "centre", "sanitation"]
    assert many_leads == one_leads and many_doc == one_doc
    assert '"case_id": "c0"' in one_doc and "already being replayed" in one_doc
    stored = []
    for store in stores:
        with store.transaction(readonly=True) as tx:
            stored.append({c.case_id: (c.lead_department, c.data) for c in tx.iter_cases()})
        store.dispose()
    assert stored[0] == stored[1] and len(stored[0]) == 6
    one_doc2 = replay(policy, records, mode="lifecycle", jobs=1)
    assert replay(policy, records, mode="lifecycle", jobs=2)["lifecycle"] == one_doc2["lifecycle"]


def test_history_conditions_without_a_common_field_replay_in_one_process(
    tmp_path: Path,
) -> None:
    """Counts by category and counts by reporter cannot both stay inside shards: the
    sharded replay refuses, ``replay`` runs in one process."""
    extra = HISTORY_RULE + """        - id: same-reporter-twice
          when:
            category: {prefix: E01}
            history: {same: [reporter], within: 7d, at_least: 2}
          then: {lead: centre}
"""
    split = load_policy(_policy_dir(tmp_path, extra))
    with pytest.raises(ValueError, match="no field in common"):
        ShardedLifecycleReplay(split, None, jobs=2)
    assert not shardable(split, None)
    records = _records(split)
    one = replay(split, records, mode="lifecycle", jobs=1)
    assert replay(split, records, mode="lifecycle", jobs=2)["lifecycle"] == one["lifecycle"]


def test_a_sharded_history_replay_needs_an_empty_store(policy: Policy) -> None:
    """The shards count in stores of their own: cases already in the target would be
    missed, so a store holding any is refused (``replay`` then runs in one process)."""
    store = Store(outbox=False)
    store.create_all()
    Engine(policy, store, ManualClock(T)).report(case(policy, T - timedelta(days=2)), REPORTER)
    with pytest.raises(ValueError, match="already holds"):
        ShardedLifecycleReplay(policy, store, jobs=2)
    assert not shardable(policy, store) and shardable(policy, None)
    store.dispose()


def test_utc_and_local_times_count_alike(policy: Policy) -> None:
    past = [case(policy, (T - timedelta(days=d)).astimezone(UTC)) for d in (1, 2)]
    assert policy.route(case(policy, T), history=History(past)).lead == "centre"


@settings(max_examples=25, deadline=None)
@given(past=st.lists(st.tuples(st.integers(0, 60 * 24 * 45), _CATS, _ADDRESSES,
                                st.sampled_from(["g1", "g2"])), max_size=20),
       window_h=st.integers(1, 24 * 40))
def test_the_store_counts_what_an_in_memory_history_counts(
    policy: Policy, past: list[tuple[int, str, str | None, str]], window_h: int
) -> None:
    """Round trip: cases reported through an engine, counted by the store's columns, give
    the counts of a History of the same cases, for every combination of fields."""
    store = Store(outbox=False)
    store.create_all()
    engine, clock = _engine(policy, store)
    cases = []
    for minutes, cat, addr, loc in past:
        at = T - timedelta(minutes=minutes)
        clock.set(at)
        cases.append(case(policy, at, category=cat, address=addr, location=loc))
        engine.report(cases[-1], REPORTER)
    history = History(cases)
    since = T - timedelta(hours=window_h)
    with store.transaction(readonly=True) as tx:
        for same, values in [(("category", "address"), ("E01-10", "1号")),
                             (("address",), ("2号",)), (("location",), ("g1",)),
                             (("category", "location", "address"), ("E01-11", "g2", "1号"))]:
            want = history.count_reported(same, values, since, T)
            assert tx.count_reported(same, values, since, T) == want
    store.dispose()
