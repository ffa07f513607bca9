"""Replay: routing replay = route case by case; life-cycle replay = driving the engine by
hand; batch mode = command by command; deterministic reports; what-if comparison; CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from gridflow import (
    Actor,
    DefinitionError,
    Engine,
    GridflowError,
    GridflowRuntimeError,
    load_policy,
)
from gridflow.cli import main
from gridflow.clock import ManualClock
from gridflow.generate import write_log
from gridflow.importer import LogReader, LogRecord
from gridflow.policy import Policy
from gridflow.replay import (
    LifecycleReplay,
    RouteMemo,
    _Cast,
    in_time_order,
    plan,
    replay,
    replay_routing,
    to_html,
    to_json,
)
from gridflow.schema import CaseIn
from gridflow.shards import ShardedLifecycleReplay
from gridflow.store import Store
from gridflow.store.unitofwork import BatchAborted
from gridflow.strategies import case_ins, log_records
from tests import strategies as gs

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
WUJIN_DIR = ROOT / "examples" / "wujin"
SH = ZoneInfo("Asia/Shanghai")
WUJIN = load_policy(WUJIN_DIR)
_FIELDS = ("lead", "lead_name", "tier", "assist", "rule", "source", "time_limit", "unit", "pool",
           "priority", "tags", "summon", "notify", "default", "urgency", "policy_version",
           "category")


def _same_as_route(policy: Policy, memo: RouteMemo, case: CaseIn) -> None:
    try:
        want = policy.route(case)
    except GridflowError as exc:
        with pytest.raises(type(exc)) as got:
            memo.route(case)
        assert str(got.value) == str(exc)
        return
    routed = memo.route(case)
    for name in _FIELDS:
        assert getattr(routed.template, name) == getattr(want, name), (name, case)
    assert routed.due_at() == want.due_at


# --------------------------------------------------------------------------- routing


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=gs.policies(), cases=st.lists(gs.cases(), min_size=1, max_size=10))
def test_routing_replay_equals_route_on_generated_policies(
    policy: dict[str, Any], cases: list[dict[str, Any]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "policy.yaml").write_text(json.dumps(policy, ensure_ascii=False), "utf-8")
        try:
            compiled = load_policy(tmp, strict=False)
        except DefinitionError:
            reject()
        memo = RouteMemo(compiled)
        validated = []
        for raw in cases:
            try:
                validated.append(compiled.validate_case(raw))
            except GridflowError:
                continue
        # the same cases at other addresses: keys that differ only there
        validated += [c.model_copy(update={"address": a}) for c in validated[:3]
                      for a in (None, "景荣小区1号楼", "蓝天路")]
        # … and by other reporters
        validated += [c.model_copy(update={"reporter": r}) for c in validated[:3]
                      for r in (None, "gw-chen", "12345-0031")]
        for case in validated + validated[::-1]:  # the second pass hits the memo
            _same_as_route(compiled, memo, case)


def test_the_memo_keys_on_the_address_and_the_reporter(tmp_path: Path) -> None:
    """Cases that differ only in the address or the reporter route apart when a rule
    tests them (the generated policies above draw such rules only now and then)."""
    rules = [
        {"id": "hotline", "when": {"reporter": {"prefix": "12345-"}},
         "then": {"lead": "urban-mgmt"}},
        {"id": "jingrong", "when": {"address": "景荣小区"}, "then": {"lead": "grid-team"}},
        {"id": "deputy", "when": {"reporter": ["人大代表 王芳"]}, "then": {"lead": "sanitation"}},
    ]
    doc = {"policy": {"name": "memo-keys"}, "organisation": gs.ORGANISATION,
           "departments": gs.DEPARTMENTS, "categories": gs.CATEGORIES,
           "routing": {"default": {"lead": "centre", "time_limit": "1wd"},
                       "tables": [{"id": "t", "hit": "first", "rules": rules}]}}
    (tmp_path / "policy.yaml").write_text(json.dumps(doc, ensure_ascii=False), "utf-8")
    policy = load_policy(tmp_path, strict=False)
    memo = RouteMemo(policy)
    leads = set()
    for _ in range(2):  # the second round is served from the memo
        for reporter in (None, "12345-0031", "gw-chen", "人大代表 王芳"):
            for address in (None, "景荣小区1号楼", "蓝天路"):
                case = policy.validate_case({"category": "E01-10", "location": "g1",
                                             "reporter": reporter, "address": address})
                _same_as_route(policy, memo, case)
                leads.add(memo.route(case).lead)
    assert leads == {"urban-mgmt", "grid-team", "sanitation", "centre"}
    assert memo.misses == 12 and memo.hits > 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases=st.lists(case_ins(WUJIN), min_size=1, max_size=30))
def test_routing_replay_equals_route_on_the_example_district(cases: list[CaseIn]) -> None:
    memo = RouteMemo(WUJIN)
    for case in cases + cases:
        _same_as_route(WUJIN, memo, case)
    records = [LogRecord(i, c, department=None) for i, c in enumerate(cases)]
    stats = replay_routing(WUJIN, records)
    assert stats.cases + stats.errors == len(cases)


def test_due_time_outside_the_calendar_raises_as_route_does() -> None:
    memo = RouteMemo(WUJIN)
    ok = WUJIN.validate_case({"category": "E01-10", "location": "qdj-g3",
                              "reported_at": "2027-06-01T10:00:00+08:00"})
    late = WUJIN.validate_case({"category": "E01-10", "location": "qdj-g3",
                                "reported_at": "2027-12-31T16:00:00+08:00"})
    _same_as_route(WUJIN, memo, ok)  # fills the memo for the key
    _same_as_route(WUJIN, memo, late)  # same key, but 2028 is not covered: raises


def test_agreement_per_department_and_confusion() -> None:
    def rec(row: int, category: str, actual: str | None) -> LogRecord:
        case = WUJIN.validate_case({"category": category, "location": "qdj-g3"})
        return LogRecord(row, case, department=actual)

    lead = WUJIN.route({"category": "E01-10", "location": "qdj-g3"}).lead
    records = [rec(1, "E01-10", lead), rec(2, "E01-10", lead), rec(3, "E01-10", "cg-squad"),
               rec(4, "E01-10", None)]
    doc = replay_routing(WUJIN, records).to_dict()
    assert (doc["cases"], doc["with_actual"], doc["agree"]) == (4, 3, 2)
    assert doc["agreement"] == round(2 / 3, 6)
    assert doc["by_department"][lead]["routed"] == 4
    assert doc["by_department"]["cg-squad"] == {
        "name": None, "routed": 0, "actual": 1, "agree": 0, "agreement": 0.0}
    assert doc["confusion"] == [{"actual": "cg-squad", "routed": lead, "count": 1,
                                 "share_of_actual": 1.0}]


# --------------------------------------------------------------------------- life cycle


def _hand_driven(policy: Policy, records: list[LogRecord]) -> Engine:
    """The life cycle of the records driven command by command, outside any batch."""
    clock = ManualClock(datetime(2000, 1, 1, tzinfo=SH))
    engine = Engine(policy, None, clock)
    cast = _Cast(engine)
    steps = []
    for admission, rec in enumerate(records, start=1):
        for i, (when, what) in enumerate(plan(rec)):
            steps.append((when, admission, i, rec, what))
    steps.sort(key=lambda s: (s[0], s[1], s[2]))
    reported: list[str] = []
    stopped: set[str] = set()

    def next_timer() -> datetime | None:
        """The earliest unfired timer the store holds (a host ticks all the time)."""
        with engine.store.transaction(readonly=True) as tx:
            return min((t.due_at for cid in reported for t in tx.timers(cid)
                        if t.fired_at is None), default=None)

    def fire_until(t: datetime, inclusive: bool) -> None:
        while (due := next_timer()) is not None and (due < t or (inclusive and due == t)):
            when = max(due, clock.now())  # one armed already due fires at once
            clock.set(when)
            engine.tick(when)

    for when, _adm, _i, rec, what in steps:
        cid = rec.case.id
        assert cid is not None
        if cid in stopped:
            continue
        fire_until(when, inclusive=False)
        clock.set(when)
        row = f"row {rec.row}"
        try:
            view = engine.get(cid) if cid in reported else None
            lead = view.lead if view is not None else None
            if what == "report":
                engine.report(rec.case, cast.reporter(rec.case))
                reported.append(cid)
            elif what == "report_on_spot":
                who = cast.reporter(rec.case)
                engine.report(rec.case, Actor(who.id, cast.roles["resolve_on_spot"],
                                              unit=who.unit, department="grid-worker"),
                              on_spot=True, evidence=[f"replay:{row}"])
                reported.append(cid)
            elif what == "file":
                engine.file(cid, cast.actor("file"))
            elif what == "cancel":
                engine.cancel(cid, cast.actor("cancel"), f"cancelled in the log ({row})")
            elif what == "dispatch":
                engine.dispatch(cid, cast.actor("dispatch"))
            elif what == "return":
                engine.return_case(cid, cast.actor("return_case", lead),
                                   f"returned in the log ({row})")
            elif what == "accept":
                assert view is not None
                if view.pool is not None:
                    engine.claim(cid, cast.actor("claim", lead))
                else:  # as the handler a rule named, if any (who alone may accept)
                    engine.accept(cid, cast.actor("accept", lead, named=view.handler))
            elif what == "extend":
                engine.request_extension(cid, cast.actor("request_extension", lead),
                                         f"extension in the log ({row})", rec.extension or "1wd")
                engine.approve_extension(cid, cast.actor("approve_extension"))
            elif what == "defer":
                engine.defer(cid, cast.actor("defer"), f"deferred in the log ({row})")
            elif what == "feedback":
                engine.feedback(cid, cast.actor("feedback", lead), evidence=[f"replay:{row}"])
            elif what == "rework":
                engine.rework(cid, cast.actor("rework"), f"rework in the log ({row})")
            elif what == "verify":
                engine.verify(cid, cast.actor("verify"))
            elif what == "close":
                engine.close(cid, cast.actor("close"))
            elif what == "evaluate":
                assert rec.satisfaction is not None
                engine.evaluate(cid, cast.actor("evaluate"), rec.satisfaction)
        except GridflowError:
            stopped.add(cid)
    if steps:
        fire_until(max(s[0] for s in steps), inclusive=True)
    return engine


def _histories(engine: Engine, ids: list[str]) -> dict[str, Any]:
    out = {}
    for cid in ids:
        try:
            events = engine.history(cid)
        except GridflowError:
            continue
        with engine.store.transaction(readonly=True) as tx:  # when each timer was used up
            timers = sorted((t.kind, t.due_at, t.fired_at) for t in tx.timers(cid))
        out[cid] = (
            [(e.seq, e.type, e.actor_id, e.actor_role, e.at, e.reason, e.payload,
              e.policy_version) for e in events],
            engine.get(cid).data,
            timers,
        )
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=log_records(WUJIN, min_size=1, max_size=6, days=10))
def test_lifecycle_replay_equals_driving_the_engine_by_hand(records: list[LogRecord]) -> None:
    run = LifecycleReplay(WUJIN, batch_size=7)  # small batches: commits in between
    for rec in records:
        run.feed(rec)
    run.finish()
    ids = [r.case.id for r in records if r.case.id is not None]
    by_hand = _hand_driven(WUJIN, records)
    assert _histories(run.engine, ids) == _histories(by_hand, ids)
    assert run.cases == len(_histories(by_hand, ids))


def _generated(tmp: Path, n: int, seed: int = 3, days: int = 60) -> Path:
    from gridflow.generate import Settings

    path = tmp / f"log-{n}-{seed}.csv"
    if not path.exists():
        write_log(path, WUJIN, n, seed=seed, settings=Settings(days=days),
                  route=RouteMemo(WUJIN).route)
    return path


@pytest.fixture(scope="module")
def log600(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generated(tmp_path_factory.mktemp("logs"), 600)


@pytest.fixture(scope="module")
def changed_policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    """The example district with garbage going to the squad and a shorter road limit."""
    root = tmp_path_factory.mktemp("policy") / "wujin"
    shutil.copytree(WUJIN_DIR, root)
    main_table = root / "routing" / "10-main.yaml"
    text = main_table.read_text("utf-8")
    assert "lead: construction-office" in text
    main_table.write_text(text.replace("lead: construction-office", "lead: cg-squad", 1),
                          "utf-8")
    cats = root / "categories.yaml"
    text = cats.read_text("utf-8")
    old = "{code: E01-10, name: 暴露垃圾, name_en: exposed garbage, time_limit: 4wh}"
    assert old in text
    cats.write_text(text.replace(old, old.replace("4wh", "2wh")), "utf-8")
    return load_policy(root)


def test_lifecycle_replay_counts_indicators(log600: Path) -> None:
    doc = replay(WUJIN, LogReader(log600, policy=WUJIN))
    assert doc["mode"] == "lifecycle"
    life = doc["lifecycle"]
    ind = life["indicators"]
    assert ind["reported"] == life["cases"] == 600 and life["errors"] == 0
    assert 0.99 <= ind["completion_rate"] <= 1.0
    assert ind["closed"] <= ind["should_close"] <= ind["reported"]
    assert life["events"]["reported"] == 600
    assert sum(v["reported"] for v in life["by_department"].values()) == 600
    assert doc["routing"]["with_actual"] > 500 and 0.85 < doc["routing"]["agreement"] < 1


def test_a_matter_resolved_on_the_spot_is_the_grid_worker_s(log600: Path) -> None:
    """The example district has one department at the grid tier (grid-worker): a case
    the grid worker solved on the spot is theirs in the figures, whatever its category
    would be routed to (a fire put out at once is not the fire brigade's case)."""
    store = Store(outbox=False)
    store.create_all()
    run = LifecycleReplay(WUJIN, store)
    records = [r for r in LogReader(log600, policy=WUJIN)]
    on_spot = [r for r in records if r.on_spot]
    assert len(on_spot) > 50
    for rec in records:
        run.feed(rec)
    run.finish()
    with store.transaction(readonly=True) as tx:
        leads = {tx.require_case(str(r.case.id)).data["lead"] for r in on_spot}
    assert leads == {"grid-worker"}
    routed = {WUJIN.route(r.case).lead for r in on_spot}
    assert len(routed) > 1  # (their routes differ: the department is not the route's)


def test_replay_into_a_database_store(log600: Path, tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'replay.db'}", outbox=False)
    store.create_all()
    try:
        doc = replay(WUJIN, LogReader(log600, policy=WUJIN), store=store)
        with store.transaction(readonly=True) as tx:
            cases = list(tx.iter_cases())
            # rule missing-person names a handler: the replay accepts as that handler
            accepted_by = {e.actor_id for c in cases if c.category == "P01-01"
                           for e in tx.history(c.case_id) if e.type == "accept"}
        assert len(cases) == doc["lifecycle"]["cases"] == 600
        assert accepted_by == {"duty-officer"}
    finally:
        store.dispose()


def test_same_inputs_give_byte_identical_reports(
    tmp_path: Path, changed_policy: Policy
) -> None:
    log = _generated(tmp_path, 200, seed=9, days=20)
    a = to_json(replay(WUJIN, LogReader(log, policy=WUJIN), compare=changed_policy))
    b = to_json(replay(WUJIN, LogReader(log, policy=WUJIN), compare=changed_policy))
    assert a == b
    assert json.loads(a)["gridflow_replay"] == 1
    # and in other processes, whose str hashes differ (an order that followed hash() —
    # a set of department names, say — would show here, not within one process)
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"seed{seed}.json"
        subprocess.run(
            [sys.executable, "-m", "gridflow", "replay", str(WUJIN_DIR), str(log), "--compare",
             str(changed_policy.root), "--json", str(out)],
            check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed},
        )
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert json.loads(outs[0])["lifecycle"] == json.loads(a)["lifecycle"]


def test_compare_reports_what_changes(log600: Path, changed_policy: Policy) -> None:
    doc = replay(WUJIN, LogReader(log600, policy=WUJIN), compare=changed_policy)
    cmp_doc = doc["compare"]
    assert cmp_doc["policy"]["version"] == changed_policy.version != WUJIN.version
    routing = cmp_doc["routing"]
    assert routing["changed"]["lead"] > 0 and routing["changed"]["time_limit"] > 0
    per = routing["per_department"]
    assert per["cg-squad"]["change"] > 0 and per["construction-office"]["change"] < 0
    assert sum(v["change"] for v in per.values()) == 0
    rows = [c["row"] for c in routing["cases"]]
    assert rows == sorted(rows)
    lead_change = next(c for c in routing["cases"] if "lead" in c["changed"])
    assert lead_change["after"]["lead"] == "cg-squad"
    garbage = next(c for c in routing["cases"] if c["changed"] == ["time_limit", "due_at"])
    assert (garbage["before"]["time_limit"], garbage["after"]["time_limit"]) == ("4wh", "2wh")
    life = cmp_doc["lifecycle"]
    assert life["compared"] == 600
    # cancelled cases never get a lead, returned ones end with another department, the
    # ones solved on the spot stay the grid worker's
    assert 0.75 * routing["changed"]["lead"] <= life["changed"]["lead"] <= routing["changed"][
        "lead"]
    assert life["changed"]["due_at"] > 0
    moves = life["indicators"]
    assert moves["reported"] == {"before": 600, "after": 600, "change": 0}
    assert moves["on_time"]["change"] is not None
    html_text = to_html(doc)
    assert "What-if" in html_text and "cg-squad" in html_text


def test_out_of_order_rows_are_reported_not_dropped() -> None:
    base = datetime(2026, 3, 9, 9, 0, tzinfo=SH)

    def rec(row: int, hours: float) -> LogRecord:
        case = WUJIN.validate_case({"id": f"o{row}", "category": "E01-10", "location": "qdj-g3",
                                    "reported_at": (base + timedelta(hours=hours)).isoformat()})
        return LogRecord(row, case)

    records = [rec(2, 0), rec(3, 30), rec(4, 29), rec(5, 60), rec(6, 2)]  # 6 is 58 h late
    late: list[LogRecord] = []
    ordered = list(in_time_order(records, window=timedelta(hours=12), on_late=late.append))
    assert [r.row for r in ordered] == [2, 4, 3, 5] and [r.row for r in late] == [6]
    doc = replay(WUJIN, records, mode="lifecycle", window=timedelta(hours=12))
    life = doc["lifecycle"]
    assert life["cases"] == 4 and life["errors"] == 1
    assert life["error_list"][0]["row"] == 6 and "out of order" in life["error_list"][0]["message"]
    assert doc["routing"]["cases"] == 5  # routing needs no order


# --------------------------------------------------------------------------- batch mode


def _script(engine: Engine, clock: ManualClock) -> list[str]:
    """Commands, some of them refused, over a few cases."""
    gw = Actor("gw", "grid_worker")
    ids = []
    for i, path in enumerate(sorted((WUJIN_DIR / "cases").glob("*.json"))[:6]):
        doc = json.loads(path.read_text("utf-8"))
        doc.pop("reported_at", None)
        doc["id"] = f"b{i}"
        ids.append(engine.report(doc, gw).id)
    for cid in ids:
        clock.advance(minutes=7)
        engine.file(cid, Actor("c", "clerk"))
        view = engine.dispatch(cid, Actor("d", "dispatcher"))
        handler = Actor("h", "handler", department=view.lead)
        with pytest.raises(GridflowError):
            engine.verify(cid, Actor("s", "supervisor"))  # not allowed from dispatched
        with pytest.raises(GridflowError):
            engine.accept(cid, Actor("x", "handler", department="nobody"))
        if view.pool is not None:
            engine.claim(cid, handler)
        else:
            engine.accept(cid, handler)
    clock.advance(days=3)
    engine.tick()  # warnings and overdue marks
    for cid in ids[:3]:
        view = engine.get(cid)
        engine.feedback(cid, Actor("h", "handler", department=view.lead), note="done")
        engine.verify(cid, Actor("s", "supervisor"))
        engine.close(cid, Actor("s", "supervisor"))
    return ids


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_batch_mode_stores_what_commands_store_one_by_one(size: int) -> None:
    start = datetime(2026, 3, 9, 9, 0, tzinfo=SH)
    plain_clock, batch_clock = ManualClock(start), ManualClock(start)
    plain = Engine(WUJIN, None, plain_clock)
    batched = Engine(WUJIN, None, batch_clock)
    ids = _script(plain, plain_clock)
    with batched.batch(size=size) as uow:
        assert _script(batched, batch_clock) == ids
        assert batched.get(ids[0]).state == "closed"  # reads see buffered writes
    assert uow.commits >= 1
    assert _histories(batched, ids) == _histories(plain, ids)

    def timers(engine: Engine) -> list[tuple[str, datetime, bool]]:
        with engine.store.transaction(readonly=True) as tx:
            return [(t.kind, t.due_at, t.fired_at is not None) for cid in ids
                    for t in tx.timers(cid)]

    assert timers(batched) == timers(plain)


def test_a_failing_batch_rolls_back_to_its_last_commit() -> None:
    clock = ManualClock(datetime(2026, 3, 9, 9, 0, tzinfo=SH))
    engine = Engine(WUJIN, None, clock)
    gw = Actor("gw", "grid_worker")
    case = {"category": "E01-10", "location": "qdj-g3"}
    with pytest.raises(RuntimeError), engine.batch(size=2):
        engine.report({**case, "id": "r1"}, gw)
        engine.report({**case, "id": "r2"}, gw)  # the batch commits after two writes
        engine.report({**case, "id": "r3"}, gw)
        raise RuntimeError("boom")
    assert engine.get("r1").state == engine.get("r2").state == "reported"
    with pytest.raises(GridflowError):
        engine.get("r3")
    with engine.batch():
        with pytest.raises(GridflowError):
            engine.report({**case, "id": "r1"}, gw)  # duplicate id, refused at once
        assert engine.report({**case, "id": "r4"}, gw).state == "reported"
    assert engine.get("r4").state == "reported"
    with engine.batch(), pytest.raises(RuntimeError, match="already in a batch"):
        engine.batch().__enter__()
    assert issubclass(BatchAborted, GridflowError)


def test_a_replay_stops_when_its_batch_is_lost(
    log600: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush that fails loses the uncommitted batch: the replay must not carry on as
    if only one step had failed."""
    from gridflow.errors import ConcurrencyConflict
    from gridflow.store.core import StoreTx

    def refuse(self: StoreTx, *args: Any, **kwargs: Any) -> None:
        raise ConcurrencyConflict("someone-else", 0)

    monkeypatch.setattr(StoreTx, "write_many", refuse)
    run = LifecycleReplay(WUJIN, batch_size=50)
    with pytest.raises(BatchAborted):
        for rec in LogReader(log600, policy=WUJIN):
            run.feed(rec)
        run.finish()
    assert run.error_count == 0


# --------------------------------------------------------------------------- CLI


def test_cli_generate_and_replay(tmp_path: Path, changed_policy: Policy) -> None:
    runner = CliRunner()
    log = tmp_path / "log.csv"
    result = runner.invoke(main, ["generate", str(WUJIN_DIR), "--cases", "300", "--seed", "5",
                                  "--out", str(log), "--start", "2026-03-01", "--days", "20"])
    assert result.exit_code == 0, result.output
    first = log.read_bytes()
    runner.invoke(main, ["generate", str(WUJIN_DIR), "--cases", "300", "--seed", "5",
                         "--out", str(log), "--start", "2026-03-01", "--days", "20"])
    assert log.read_bytes() == first
    out1, out2, page = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "r.html"
    result = runner.invoke(main, ["replay", str(WUJIN_DIR), str(log), "--json", str(out1),
                                  "--html", str(page), "--compare", str(changed_policy.root)])
    assert result.exit_code == 0, result.output
    assert "completion rate" in result.output and "what-if" in result.output
    result = runner.invoke(main, ["replay", str(WUJIN_DIR), str(log), "--json", str(out2),
                                  "--compare", str(changed_policy.root)])
    assert out1.read_bytes() == out2.read_bytes()
    assert page.read_text("utf-8").startswith("<!doctype html>")
    result = runner.invoke(main, ["replay", str(WUJIN_DIR), str(log), "--mode", "routing",
                                  "--json", "-"])
    assert result.exit_code == 0 and json.loads(result.output)["mode"] == "routing"


def test_cli_what_if_summary_reads_like_the_json(log600: Path, changed_policy: Policy,
                                                 tmp_path: Path) -> None:
    """The terminal summary of --compare states the JSON's counts in words, the moved
    departments, the rates in percent and the first changed cases with local due times."""
    out = tmp_path / "w.json"
    result = CliRunner().invoke(main, ["replay", str(WUJIN_DIR), str(log600), "--json",
                                       str(out), "--compare", str(changed_policy.root)])
    assert result.exit_code == 0, result.output
    cmp_doc = json.loads(out.read_text("utf-8"))["compare"]
    cr, lc = cmp_doc["routing"], cmp_doc["lifecycle"]
    text = result.output
    assert f"routing: {cr['changed']['any']:,} of {cr['compared']:,} cases change (" in text
    assert f"lead department {cr['changed']['lead']:,}" in text
    assert f"life cycle: {lc['changed']['any']:,} of {lc['compared']:,} cases change" in text
    assert "{'any'" not in text  # no raw dicts
    agree = cr["agreement"]
    assert (f"agreement with the log: {agree['before'] * 100:.2f}% → "
            f"{agree['after'] * 100:.2f}%") in text
    for d, v in cr["per_department"].items():
        if v["change"]:
            assert f"{v['change']:+,}" in text and d in text
    rate = lc["indicators"]["on_time_rate"]
    if rate["change"]:
        assert f"{rate['before'] * 100:.2f}%" in text
    # per lead department: the squad gains the construction office's cases
    squad, office = lc["by_department"]["cg-squad"], lc["by_department"]["construction-office"]
    assert squad["reported"]["change"] > 0 and office["reported"]["change"] < 0
    assert squad["reported"]["change"] == -office["reported"]["change"]
    assert f"{squad['reported']['before']:,} → {squad['reported']['after']:,}" in text
    first = lc["cases"][0]
    assert first["case_id"] in text
    due = [c["after"]["due_at"] for c in lc["cases"] if c["after"]["due_at"]]
    assert due and all(d.endswith("+08:00") for d in due)  # the policy's zone, as routing


def test_cli_replay_and_report_with_a_table_prefix_and_jobs(
    log600: Path, tmp_path: Path, wujin_without_history: Path
) -> None:
    """--jobs gives the one-process JSON; --prefix puts the tables under another name,
    and report finds them only with the same prefix."""
    runner = CliRunner()
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    url = f"sqlite:///{tmp_path / 'p.db'}"
    result = runner.invoke(main, ["replay", str(WUJIN_DIR), str(log600), "--json", str(one),
                                  "--db", url, "--prefix", "city_"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["replay", str(WUJIN_DIR), str(log600), "--json", str(two),
                                  "--jobs", "2"])
    assert result.exit_code == 0, result.output
    assert "replaying in one process" not in result.output  # an empty store: shards
    assert one.read_bytes() == two.read_bytes()
    store = Store(url, table_prefix="city_")
    with store.transaction(readonly=True) as tx:
        assert sum(1 for _ in tx.iter_cases()) == json.loads(one.read_text())["lifecycle"][
            "cases"]
    store.dispose()
    result = runner.invoke(main, ["report", "--db", url, "--policy", str(WUJIN_DIR),
                                  "--prefix", "city_", "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["totals"]["reported"] == json.loads(one.read_text())[
        "lifecycle"]["cases"]
    result = runner.invoke(main, ["report", "--db", url, "--policy", str(WUJIN_DIR)])
    assert result.exit_code == 1 and "no gridflow tables" in result.output
    result = runner.invoke(main, ["report", "--db", url, "--prefix", "bad prefix"])
    assert result.exit_code == 2
    bad_url = f"sqlite:///{tmp_path / 'bad.db'}"
    for args in (["--prefix", "bad prefix"], ["--jobs", "0"]):
        result = runner.invoke(main, ["replay", str(WUJIN_DIR), str(log600), "--db", bad_url,
                                      *args])
        assert result.exit_code == 2, (args, result.output)
        assert not (tmp_path / "bad.db").exists()  # refused before anything was written
    # the cases are there already. Wujin's history conditions would not count them in
    # shards: one process replays, and its intake refuses every case id already stored
    result = runner.invoke(main, ["replay", str(WUJIN_DIR), str(log600), "--db", url,
                                  "--prefix", "city_", "--jobs", "2"])
    assert result.exit_code == 0, result.output
    assert "life cycle: 0 reported" in result.output
    assert "step(s) refused by the engine" in result.output
    # the first refusals are listed with their row and case (on stderr)
    assert re.search(r"^  row 2 \(\S+\) \w+: ", result.stderr, re.M), result.stderr
    assert "--jobs 2: replaying in one process" in result.output
    # without history conditions the shards replay, and their copy refuses, naming the case
    result = runner.invoke(main, ["replay", str(wujin_without_history), str(log600), "--db", url,
                                  "--prefix", "city_", "--jobs", "2"])
    assert result.exit_code == 1 and "concurrent update" in result.output



def test_cli_replay_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    bad_map = tmp_path / "map.yaml"
    bad_map.write_text("fields:\n  category: 小类\n  locaton: 网格\n", "utf-8")
    log = tmp_path / "log.csv"
    log.write_text("小类,网格\nE01-10,qdj-g3\nXX,qdj-g3\n", "utf-8")
    result = runner.invoke(main, ["replay", str(WUJIN_DIR), str(log), "--map", str(bad_map)])
    assert result.exit_code == 1
    assert f"{bad_map}:3:3: unknown case field 'locaton' (did you mean 'location'?)" in (
        result.output)
    bad_map.write_text("fields:\n  category: 小类\n  location: 网格\n", "utf-8")
    result = runner.invoke(main, ["replay", str(WUJIN_DIR), str(log), "--map", str(bad_map)])
    assert result.exit_code == 0 and "bad 1" in result.output
    result = runner.invoke(main, ["replay", str(WUJIN_DIR), str(log), "--map", str(bad_map),
                                  "--on-error", "fail"])
    assert result.exit_code == 1 and "log.csv:3: category: unknown category 'XX'" in (
        result.output)


def test_until_before_the_log_is_refused_at_the_first_row_past_it(log600: Path) -> None:
    """Open cases are judged at ``until``: steps after it would count cases closed that
    were still open then. One process and shards refuse alike; a later ``until`` runs."""
    records = list(LogReader(log600, policy=WUJIN))
    first = records[0]
    cut = first.case.reported_at + timedelta(minutes=1)
    assert cut < plan(first)[-1][0]  # the first case is closed after that
    target = Store(outbox=False)
    target.create_all()
    for run in (LifecycleReplay(WUJIN, until=cut),
                ShardedLifecycleReplay(WUJIN, target, jobs=2, until=cut)):
        with pytest.raises(GridflowRuntimeError, match=rf"^row {first.row}: its steps run to "):
            run.feed(first)
        if isinstance(run, ShardedLifecycleReplay):
            run.close()
    later = max(step[0] for r in records for step in plan(r))
    doc = replay(WUJIN, records, mode="lifecycle", until=later + timedelta(days=1))
    assert doc["lifecycle"]["errors"] == 0
    result = CliRunner().invoke(main, ["replay", str(WUJIN_DIR), str(log600), "--until",
                                       cut.isoformat()])
    assert result.exit_code == 1 and f"row {first.row}: its steps run to" in result.output


def test_example_harness_runs_with_the_plugin(pytester: pytest.Pytester) -> None:
    harness = ROOT / "examples" / "harness"
    for f in harness.iterdir():
        if f.is_file():
            shutil.copy(f, pytester.path / f.name)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
