"""The event store on every backend (see conftest.py for the ``store`` fixture)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

from gridflow.errors import CaseNotFound, CaseValidationError, ConcurrencyConflict
from gridflow.store import (
    CaseRecord,
    EventRecord,
    IdempotencyConflict,
    NewEvent,
    Store,
    StoreTx,
    TransactionConflict,
)
from gridflow.store.unitofwork import BatchAborted, UnitOfWork

if TYPE_CHECKING:
    from tests.conftest import TestDatabase

CST = timezone(timedelta(hours=8), "CST")
T0 = datetime(2025, 3, 3, 9, 0, tzinfo=CST)  # a Monday morning in Beijing
T = TypeVar("T")


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def new_case(case_id: str | None = None, *, version: int = 1, **kw: Any) -> CaseRecord:
    kw.setdefault("state", "reported")
    kw.setdefault("data", {"description": "小区门口暴露垃圾", "location": "湖塘镇-网格4"})
    return CaseRecord(case_id or uuid.uuid4().hex, version, **kw)


def ev(type_: str = "report", hours: float = 0, **kw: Any) -> NewEvent:
    kw.setdefault("actor_id", "w-001")
    kw.setdefault("actor_role", "grid_worker")
    return NewEvent(type_, at=at(hours), **kw)


def count(store: Store, table: str, case_id: str | None = None) -> int:
    t = getattr(store.tables, table)
    stmt = sa.select(sa.func.count()).select_from(t)
    if case_id is not None and table == "outbox":  # the outbox holds event ids only
        events = store.tables.events
        stmt = stmt.join(events, events.c.id == t.c.event_id).where(events.c.case_id == case_id)
    elif case_id is not None:
        stmt = stmt.where(t.c.case_id == case_id)
    with store.transaction(readonly=True) as tx:
        return int(tx.connection.execute(stmt).scalar_one())


def create(store: Store, record: CaseRecord, events: list[NewEvent] | None = None) -> None:
    with store.transaction() as tx:
        tx.insert_case(record, events or [ev()])


def run_threads(n: int, fn: Callable[[int], T]) -> list[T | BaseException]:
    """Run ``fn(i)`` in ``n`` threads; results or the exceptions they raised."""

    def guarded(i: int) -> T | BaseException:
        try:
            return fn(i)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(guarded, range(n)))


# ------------------------------------------------------------------------ round trip


def test_case_and_events_round_trip(store: Store) -> None:
    record = new_case(
        "WJ-2025-000001",
        idempotency_key="app:张三:20250303-0900",
        category="01-10 暴露垃圾",
        unit="武进区/湖塘镇/花园社区/网格4",
        lead_department="区城管局",
        pool="环卫一队",
        tier="grid",
        due_at=at(4),
        warn_at=at(3.2),
        reported_at=at(0),
        policy_version="sha256:abc",
        data={"描述": "垃圾桶满溢 🗑️", "photos": ["https://x/1.jpg"], "n": 3, "ok": True},
    )
    first = NewEvent(
        "report",
        "w-李四",
        "网格员",
        at(0),
        reason=None,
        payload={"渠道": "巡查", "nested": {"list": [1, 2.5, None, "𠀀"]}},
        policy_version="sha256:abc",
    )
    with store.transaction() as tx:
        written = tx.insert_case(record, [first])
    assert [e.seq for e in written] == [1]
    assert written[0].at == at(0) and written[0].at.tzinfo is UTC

    with store.transaction() as tx:
        got = tx.require_case("WJ-2025-000001")
        assert got.version == 1
        assert got.data == record.data
        assert got.due_at == at(4) and got.due_at is not None and got.due_at.tzinfo is UTC
        assert got.updated_at == at(0)
        for name in ("idempotency_key", "category", "unit", "lead_department", "pool", "tier",
                     "warn_at", "reported_at", "policy_version"):
            assert getattr(got, name) == getattr(record, name), name
        assert tx.case_by_idempotency_key("app:张三:20250303-0900") == got
        got.state = "filed"
        got.handler = "h-王五"
        more = tx.append(got, 1, [ev("file", 0.5, actor_role="受理员", reason="立案 ✔")])
        assert got.version == 2

    with store.transaction() as tx:
        history = tx.history("WJ-2025-000001")
        assert history == written + more
        assert history[1].reason == "立案 ✔"
        assert history[0].payload == first.payload
        assert tx.require_case("WJ-2025-000001").handler == "h-王五"
        assert tx.get_case("nope") is None
        assert tx.case_by_idempotency_key("nope") is None
        with pytest.raises(CaseNotFound):
            tx.require_case("nope")


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=12)
    | st.sampled_from(["暴露垃圾", "占道经营", "网格长", "𠀀𠀁", "😀"])
)
json_values = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=8), inner, max_size=4),
    max_leaves=12,
)
plain_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)
zones = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
aware = st.datetimes(
    min_value=datetime(1900, 1, 2), max_value=datetime(2200, 1, 1), timezones=zones
)
new_events = st.builds(
    NewEvent,
    type=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1,
                 max_size=64),
    actor_id=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1,
                     max_size=128),
    actor_role=st.sampled_from(["网格员", "grid_worker", "dispatcher", "受理员"]),
    at=aware,
    reason=st.none() | plain_text,
    payload=st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    policy_version=st.none() | st.text(st.characters(codec="utf-8", exclude_characters="\x00"),
                                       max_size=64),
)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    due_at=st.none() | aware,
    first=new_events,
    batches=st.lists(st.lists(new_events, min_size=1, max_size=3), max_size=3),
)
def test_round_trip_property(
    store: Store,
    data: dict[str, Any],
    due_at: datetime | None,
    first: NewEvent,
    batches: list[list[NewEvent]],
) -> None:
    case_id = uuid.uuid4().hex
    record = new_case(case_id, data=data, due_at=due_at)
    written: list[EventRecord] = []
    with store.transaction() as tx:
        written += tx.insert_case(record, [first])
    for batch in batches:
        with store.transaction() as tx:
            current = tx.require_case(case_id)
            written += tx.append(current, current.version, batch)
    with store.transaction(readonly=True) as tx:
        stored = tx.require_case(case_id)
        history = tx.history(case_id)
    assert stored.data == data
    assert stored.due_at == due_at
    assert stored.version == len(history) == 1 + sum(len(b) for b in batches)
    assert history == written
    assert [e.seq for e in history] == list(range(1, len(history) + 1))
    for original, got in zip([first, *[e for b in batches for e in b]], history, strict=True):
        assert (got.type, got.actor_id, got.reason, got.policy_version) == (
            original.type, original.actor_id, original.reason, original.policy_version
        )
        assert got.at == original.at and got.at.tzinfo is UTC
        assert got.payload == original.payload


def test_unicode_keys_are_exact(store: Store) -> None:
    """utf8mb4 and binary collation on MariaDB: 4-byte characters, case-sensitive keys."""
    create(store, new_case("a", idempotency_key="Key-😀"))
    create(store, new_case("b", idempotency_key="key-😀"))
    create(store, new_case("c", idempotency_key="Key-😁"))
    create(store, new_case("A", idempotency_key="键-𠀀"))
    with store.transaction() as tx:
        assert tx.require_case("a").idempotency_key == "Key-😀"
        assert tx.require_case("A").idempotency_key == "键-𠀀"
        found = tx.case_by_idempotency_key("key-😀")
        assert found is not None and found.case_id == "b"
        found = tx.case_by_idempotency_key("Key-😁")
        assert found is not None and found.case_id == "c"


# ------------------------------------------------------------------------ sequences


def test_sequence_numbers_are_gap_free(store: Store) -> None:
    create(store, new_case("c1", version=2), [ev("report"), ev("auto_file", 0.1)])
    for i in range(5):
        with store.transaction() as tx:
            rec = tx.require_case("c1")
            batch = [ev(f"step{i}", i + 1)] if i % 2 else [ev(f"step{i}a", i), ev(f"step{i}b", i)]
            written = tx.append(rec, rec.version, batch)
            assert [e.seq for e in written] == list(
                range(rec.version - len(batch) + 1, rec.version + 1)
            )
    with store.transaction() as tx:
        history = tx.history("c1")
        assert [e.seq for e in history] == list(range(1, len(history) + 1))
        assert tx.require_case("c1").version == len(history) == 10
        assert [e.id for e in history] == sorted(e.id for e in history)
    assert count(store, "outbox", "c1") == 10


# ------------------------------------------------------------------------ concurrency


def test_stale_version_conflicts_and_writes_nothing(store: Store) -> None:
    create(store, new_case("c1"))
    with store.transaction() as tx:
        stale = tx.require_case("c1")
    with store.transaction() as tx:
        fresh = tx.require_case("c1")
        fresh.state = "filed"
        tx.append(fresh, 1, [ev("file", 1)])
    stale.state = "cancelled"
    with pytest.raises(ConcurrencyConflict) as info, store.transaction() as tx:
        tx.append(stale, 1, [ev("cancel", 1), ev("note", 1)])
    assert (info.value.case_id, info.value.expected_version, info.value.actual_version) == (
        "c1", 1, 2,
    )
    assert count(store, "events", "c1") == 2
    assert count(store, "outbox", "c1") == 2
    with store.transaction() as tx:
        assert tx.require_case("c1").state == "filed"


def test_append_to_missing_case(store: Store) -> None:
    with pytest.raises(CaseNotFound), store.transaction() as tx:
        tx.append(new_case("ghost"), 0, [ev()])
    assert count(store, "events") == 0


def test_concurrent_appends_exactly_one_wins(concurrent_store: Store) -> None:
    store = concurrent_store
    create(store, new_case("c1"))
    workers = 4
    barrier = threading.Barrier(workers)

    def advance(i: int) -> int:
        record = new_case("c1", state=f"s{i}")
        barrier.wait(timeout=30)
        with store.transaction() as tx:
            tx.append(record, 1, [ev(f"by{i}", 1, actor_id=f"w{i}"), ev("again", 1)])
        return i

    results = run_threads(workers, advance)
    winners = [r for r in results if isinstance(r, int)]
    losers = [r for r in results if not isinstance(r, int)]
    assert len(winners) == 1, results
    assert all(isinstance(r, ConcurrencyConflict) for r in losers), losers
    with store.transaction() as tx:
        history = tx.history("c1")
        case = tx.require_case("c1")
    assert [e.seq for e in history] == [1, 2, 3]
    assert history[1].type == f"by{winners[0]}"
    assert case.state == f"s{winners[0]}" and case.version == 3
    assert count(store, "outbox", "c1") == 3


def test_blocked_writer_sees_conflict_after_commit(concurrent_store: Store) -> None:
    """The second writer waits for the first (row lock, or SQLite's write lock) and then
    finds the version moved on."""
    store = concurrent_store
    create(store, new_case("c1"))
    outcome: list[BaseException | None] = []
    started = threading.Event()

    def second() -> None:
        started.set()
        try:
            with store.transaction() as tx:
                tx.append(new_case("c1", state="second"), 1, [ev("second", 2)])
            outcome.append(None)
        except Exception as exc:
            outcome.append(exc)

    with store.transaction() as tx:
        tx.append(new_case("c1", state="first"), 1, [ev("first", 1)])
        thread = threading.Thread(target=second)
        thread.start()
        started.wait(10)
        time.sleep(0.3)  # let it block on the lock
        assert not outcome
    thread.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], ConcurrencyConflict)
    with store.transaction() as tx:
        assert [e.type for e in tx.history("c1")] == ["report", "first"]
    assert count(store, "outbox", "c1") == 2


def test_failure_inside_transaction_rolls_everything_back(store: Store) -> None:
    create(store, new_case("a"))
    create(store, new_case("b"))
    with pytest.raises(ConcurrencyConflict), store.transaction() as tx:
        rec = tx.require_case("a")
        tx.append(rec, 1, [ev("file", 1)])
        tx.set_timers("a", [("overdue", at(5))])
        tx.insert_case(new_case("c"), [ev()])
        tx.append(new_case("b"), 7, [ev("file", 1)])  # stale: raises
    assert count(store, "events", "a") == 1
    assert count(store, "outbox") == 2
    assert count(store, "timers") == 0
    with store.transaction() as tx:
        assert tx.require_case("a").version == 1
        assert tx.get_case("c") is None


def test_exception_in_block_rolls_back(store: Store) -> None:
    with pytest.raises(RuntimeError, match="boom"), store.transaction() as tx:
        tx.insert_case(new_case("c1"), [ev()])
        tx.set_timers("c1", [("warn", at(1))])
        raise RuntimeError("boom")
    assert count(store, "cases") == count(store, "events") == 0
    assert count(store, "outbox") == count(store, "timers") == 0


# ------------------------------------------------------------------------ idempotency


def test_idempotency_key_conflict_carries_existing_case(store: Store) -> None:
    create(store, new_case("first", idempotency_key="hotline:12345:778"))
    with store.transaction() as tx:
        with pytest.raises(IdempotencyConflict) as info:
            tx.insert_case(new_case("second", idempotency_key="hotline:12345:778"), [ev()])
        err = info.value
        assert isinstance(err, ConcurrencyConflict)
        assert err.existing_case_id == err.case_id == "first"
        assert err.attempted_case_id == "second"
        assert "first" in str(err)
        # the transaction is still usable after the refused insert
        existing = tx.case_by_idempotency_key("hotline:12345:778")
        assert existing is not None and existing.case_id == "first"
        tx.insert_case(new_case("third", idempotency_key="other"), [ev()])
    assert count(store, "cases") == 2
    assert count(store, "events", "second") == 0
    assert count(store, "outbox", "second") == 0


def test_duplicate_case_id_is_a_conflict(store: Store) -> None:
    create(store, new_case("dup"))
    with pytest.raises(ConcurrencyConflict) as info, store.transaction() as tx:
        tx.insert_case(new_case("dup"), [ev()])
    assert not isinstance(info.value, IdempotencyConflict)
    assert info.value.actual_version == 1
    assert count(store, "events", "dup") == 1


def test_concurrent_intake_with_one_key_yields_one_case(concurrent_store: Store) -> None:
    store = concurrent_store
    workers = 4
    barrier = threading.Barrier(workers)

    def intake(i: int) -> str:
        barrier.wait(timeout=30)
        with store.transaction() as tx:
            tx.insert_case(new_case(f"case-{i}", idempotency_key="same-report"), [ev()])
        return f"case-{i}"

    results = run_threads(workers, intake)
    winners = [r for r in results if isinstance(r, str)]
    assert len(winners) == 1, results
    for r in results:
        if not isinstance(r, str):
            assert isinstance(r, IdempotencyConflict), r
            assert r.existing_case_id == winners[0]
    assert count(store, "cases") == 1
    assert count(store, "events") == count(store, "outbox") == 1


# ------------------------------------------------------------------------ timers


def test_timers_fire_once_and_in_order(store: Store) -> None:
    create(store, new_case("a"))
    create(store, new_case("b"))
    with store.transaction() as tx:
        tx.set_timers("a", [("warn", at(3)), ("overdue", at(4)), ("warn", at(3))])
        tx.set_timers("b", [("overdue", at(2))])
    with store.transaction() as tx:
        assert tx.claim_due_timers(at(1)) == []
        fired = tx.claim_due_timers(at(3))
    assert [(t.case_id, t.kind, t.due_at) for t in fired] == [
        ("b", "overdue", at(2)), ("a", "warn", at(3)),
    ]
    assert all(t.fired_at == at(3) for t in fired)
    with store.transaction() as tx:
        assert tx.claim_due_timers(at(3)) == []  # tick(now) twice: nothing the second time
        # re-planning the same deadlines does not re-arm what already fired
        tx.set_timers("a", [("warn", at(3)), ("overdue", at(4)), ("escalate", at(6))])
        assert [(t.kind, t.fired_at is not None) for t in tx.timers("a")] == [
            ("warn", True), ("overdue", False), ("escalate", False),
        ]
        before = tx.timers("a")
        tx.set_timers("a", [("escalate", at(6)), ("overdue", at(4))])  # same plan: no writes
        assert tx.timers("a") == before
        # an extension moves the deadline: unfired timers are replaced
        tx.set_timers("a", [("overdue", at(8))])
        assert [(t.kind, t.due_at) for t in tx.timers("a")] == [
            ("warn", at(3)), ("overdue", at(8)),
        ]
        assert tx.claim_due_timers(at(7)) == []
        assert [t.kind for t in tx.claim_due_timers(at(100))] == ["overdue"]
        tx.set_timers("b", [])
        assert len(tx.timers("b")) == 1


def test_claim_limit(store: Store) -> None:
    create(store, new_case("a"))
    with store.transaction() as tx:
        tx.set_timers("a", [(f"k{i}", at(i / 10)) for i in range(7)])
    claimed: list[str] = []
    while True:
        with store.transaction() as tx:
            batch = tx.claim_due_timers(at(10), limit=3)
        if not batch:
            break
        assert len(batch) <= 3
        claimed += [t.kind for t in batch]
    assert claimed == [f"k{i}" for i in range(7)]


def test_timers_claimed_exactly_once_by_concurrent_workers(concurrent_store: Store) -> None:
    store = concurrent_store
    cases = [f"c{i}" for i in range(10)]
    for case_id in cases:
        create(store, new_case(case_id))
    with store.transaction() as tx:
        for i, case_id in enumerate(cases):
            tx.set_timers(case_id, [("warn", at(i / 10)), ("overdue", at(1 + i / 10))])

    def worker(_: int) -> list[int]:
        mine: list[int] = []
        while True:
            with store.transaction() as tx:
                batch = tx.claim_due_timers(at(5), limit=2)
            if not batch:
                return mine
            mine += [t.id for t in batch]

    results = run_threads(4, worker)
    ids = [i for r in results if isinstance(r, list) for i in r]
    assert all(isinstance(r, list) for r in results), results
    assert len(ids) == len(set(ids)) == 20


def test_skip_locked_lets_workers_claim_side_by_side(server_store: Store) -> None:
    """PostgreSQL/MariaDB: while one worker holds its claimed cases (uncommitted), another
    claims the timers of other cases without waiting. (SQLite serializes writers.)"""
    store = server_store
    create(store, new_case("a"))
    create(store, new_case("b"))
    with store.transaction() as tx:
        tx.set_timers("a", [(f"k{i}", at(i)) for i in range(3)])
        tx.set_timers("b", [(f"k{i}", at(i)) for i in range(3, 6)])
    barrier = threading.Barrier(2)

    def worker(_: int) -> list[str]:
        with store.transaction() as tx:
            kinds = [t.kind for t in tx.claim_due_timers(at(10), limit=3)]
            barrier.wait(timeout=20)  # both hold their locks here
        return kinds

    results = run_threads(2, worker)
    assert all(isinstance(r, list) and r for r in results), results  # neither waited
    kinds = [k for r in results if isinstance(r, list) for k in r]
    # InnoDB may also lock (and so skip) the row after a worker's LIMIT; such a timer is
    # still unfired and goes to the next claim — never to two workers
    with store.transaction() as tx:
        kinds += [t.kind for t in tx.claim_due_timers(at(10), limit=10)]
    assert sorted(kinds) == [f"k{i}" for i in range(6)]


# ------------------------------------------------------------------------ outbox


def test_outbox_in_order_and_ack(store: Store) -> None:
    create(store, new_case("a"), [ev("report", 0)])
    create(store, new_case("b"), [ev("report", 0.1)])
    with store.transaction() as tx:
        a = tx.require_case("a")
        tx.append(a, 1, [ev("file", 1), ev("dispatch", 1, payload={"部门": "城管"})])
    with store.transaction() as tx:
        msgs = tx.outbox_fetch()
    assert [(m.case_id, m.seq) for m in msgs] == [("a", 1), ("b", 1), ("a", 2), ("a", 3)]
    assert [m.id for m in msgs] == sorted(m.id for m in msgs)
    assert msgs[3].payload["payload"] == {"部门": "城管"}
    assert msgs[3].payload["seq"] == 3 and msgs[3].type == "dispatch"
    assert msgs[3].payload["at"] == at(1).astimezone(UTC).isoformat()
    with store.transaction() as tx:
        history = tx.history("a")
    assert msgs[3].payload == history[2].to_dict()
    assert msgs[3].event_id == history[2].id

    with store.transaction() as tx:
        first_two = tx.outbox_fetch(limit=2)
        assert [m.id for m in first_two] == [m.id for m in msgs[:2]]
        assert tx.outbox_ack([m.id for m in first_two], at(2)) == 2
    with store.transaction() as tx:
        assert tx.outbox_pending() == 2
        rest = tx.outbox_fetch()
        assert [m.id for m in rest] == [m.id for m in msgs[2:]]
        assert tx.outbox_ack([m.id for m in rest]) == 2
        assert tx.outbox_ack([m.id for m in rest]) == 0  # acking twice is harmless
        assert tx.outbox_fetch() == []
        assert tx.outbox_ack([]) == 0
        with pytest.raises(CaseValidationError):
            tx.outbox_fetch(0)
        with pytest.raises(CaseValidationError):
            tx.outbox_ack([1], datetime(2025, 1, 1))  # naive
    assert count(store, "outbox") == 0
    assert count(store, "events") == 4  # the events stay


def test_outbox_rolled_back_publication_comes_again(store: Store) -> None:
    """At-least-once: a publisher that fails before its commit acknowledges nothing."""
    create(store, new_case("a"))
    with pytest.raises(RuntimeError), store.transaction() as tx:
        got = tx.outbox_fetch()
        tx.outbox_ack([m.id for m in got])
        raise RuntimeError("broker down")
    sent: list[list[int]] = []

    def fail(messages: list[Any]) -> None:
        raise RuntimeError("broker down")

    with pytest.raises(RuntimeError):
        store.publish_outbox(fail)
    assert store.publish_outbox(lambda ms: sent.append([m.seq for m in ms])) == 1
    assert store.publish_outbox(lambda ms: sent.append([m.seq for m in ms])) == 0
    assert sent == [[1]]


def test_outbox_fetch_keeps_case_order_across_publishers(server_store: Store) -> None:
    """While one publisher holds case a's first messages, another gets none of case a's
    later messages (they would overtake), but does get other cases'. (On SQLite publishers
    are serialized.)"""
    store = server_store
    create(store, new_case("a"), [ev("report", 0)])
    with store.transaction() as tx:
        tx.append(tx.require_case("a"), 1, [ev("file", 1), ev("dispatch", 2)])
    create(store, new_case("b"), [ev("report", 3)])
    held = threading.Event()
    release = threading.Event()

    def first_publisher() -> None:
        with store.transaction() as tx:
            got = tx.outbox_fetch(limit=1)
            assert [(m.case_id, m.seq) for m in got] == [("a", 1)]
            held.set()
            release.wait(20)

    thread = threading.Thread(target=first_publisher)
    thread.start()
    try:
        assert held.wait(20)
        with store.transaction() as tx:
            got = tx.outbox_fetch(limit=10)
        assert [(m.case_id, m.seq) for m in got] == [("b", 1)]
    finally:
        release.set()
        thread.join(30)
    with store.transaction() as tx:
        got = tx.outbox_fetch(limit=10)
    assert [(m.case_id, m.seq) for m in got] == [("a", 1), ("a", 2), ("a", 3), ("b", 1)]


def test_outbox_can_be_turned_off(store: Store, server_db: TestDatabase | None) -> None:
    quiet = (
        Store(server_db.engine, schema=server_db.schema, outbox=False)
        if server_db is not None
        else Store(store.engine, outbox=False)
    )
    create(quiet, new_case("replayed"))
    with quiet.transaction() as tx:
        rec = tx.require_case("replayed", for_update=True)
        tx.append(rec, 1, [ev("file", 1)])
        assert tx.outbox_fetch() == []
        assert [e.seq for e in tx.history("replayed")] == [1, 2]


# ------------------------------------------------------------------------ queries


def test_worklist_queries(store: Store) -> None:
    specs = [
        ("c1", "handling", "城管局", "p1", "u1", "h1", at(5), at(4), None),
        ("c2", "handling", "城管局", "p1", "u2", None, at(2), at(1), None),
        ("c3", "dispatched", "环保局", "p2", "u1", None, None, None, None),
        ("c4", "closed", "城管局", "p1", "u1", "h1", at(1), at(0.5), at(3)),
    ]
    for cid, state, dept, pool, unit, handler, due, warn, closed in specs:
        create(store, new_case(cid, state=state, lead_department=dept, pool=pool, unit=unit,
                               handler=handler, due_at=due, warn_at=warn, closed_at=closed))
    with store.transaction(readonly=True) as tx:
        def ids(**kw: Any) -> list[str]:
            return [c.case_id for c in tx.query_cases(**kw)]

        assert ids() == ["c4", "c2", "c1", "c3"]  # by due time, no due time last
        assert ids(order_by_due=False) == ["c1", "c2", "c3", "c4"]
        assert ids(lead_department="城管局", open_only=True) == ["c2", "c1"]
        assert ids(states=["handling", "dispatched"], unit="u1") == ["c1", "c3"]
        assert ids(pool="p1", handler="h1") == ["c4", "c1"]
        assert ids(due_before=at(2), open_only=True) == ["c2"]
        assert ids(warn_before=at(4)) == ["c4", "c2", "c1"]
        assert ids(states=[]) == []
        assert ids(limit=2) == ["c4", "c2"]
        assert [c.case_id for c in tx.iter_cases(batch=3)] == ["c1", "c2", "c3", "c4"]
        assert [c.case_id for c in tx.iter_cases(batch=2)] == ["c1", "c2", "c3", "c4"]


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: (new_case("x", reported_at=datetime(2025, 1, 1)), [ev()]), "reported_at"),
        (lambda: (new_case("x"), [NewEvent("r", "a", "b", datetime(2025, 1, 1))]),
         "events[0].at"),
        (lambda: (new_case("x" * 65), [ev()]), "case_id"),
        (lambda: (new_case("x", lead_department="部" * 129), [ev()]), "lead_department"),
        (lambda: (new_case("x"), [ev(reason="a\x00b")]), "events[0].reason"),
        (lambda: (new_case("x", version=2), [ev()]), "version"),
        (lambda: (new_case("x", version=0), []), "events"),
        (lambda: (new_case("x", data={"when": datetime(2025, 1, 1, tzinfo=UTC)}), [ev()]),
         "data/payload"),
        (lambda: (new_case("x"), [ev(payload={"obj": object()})]), "data/payload"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(
    store: Store, make: Callable[[], tuple[CaseRecord, list[NewEvent]]], field: str
) -> None:
    record, events = make()
    with pytest.raises(CaseValidationError) as info, store.transaction() as tx:
        tx.insert_case(record, events)
    assert field in info.value.fields
    assert count(store, "cases") == count(store, "events") == count(store, "outbox") == 0


def test_naive_timer_and_now_are_refused(store: Store) -> None:
    create(store, new_case("a"))
    with store.transaction() as tx:
        with pytest.raises(CaseValidationError):
            tx.set_timers("a", [("warn", datetime(2025, 1, 1))])
        with pytest.raises(CaseValidationError):
            tx.claim_due_timers(datetime(2025, 1, 1))


# ------------------------------------------------------------------------ embedding


def _host_engine(store: Store, db: TestDatabase | None) -> tuple[sa.Engine, bool]:
    """A plain engine the way a host would make it (no gridflow settings), and whether the
    test owns it."""
    if db is not None:
        return sa.create_engine(db.url), True
    assert store.engine is not None
    if store.engine.url.database in (None, "", ":memory:"):
        return store.engine, False  # the one shared in-memory connection
    return sa.create_engine(store.engine.url), True


@pytest.mark.parametrize("host_commits", [False, True])
def test_host_connection_transaction_decides(
    store: Store, server_db: TestDatabase | None, host_commits: bool
) -> None:
    engine, owned = _host_engine(store, server_db)
    schema = store.tables.schema
    try:
        with engine.connect() as conn:
            outer = conn.begin()
            hosted = Store(conn, schema=schema)
            with hosted.transaction() as tx:
                tx.insert_case(new_case("hosted"), [ev()])
                tx.set_timers("hosted", [("warn", at(1))])
            with pytest.raises(RuntimeError), hosted.transaction() as tx:  # savepoint only
                tx.insert_case(new_case("doomed"), [ev()])
                raise RuntimeError("fail inside")
            with hosted.transaction() as tx:
                assert tx.get_case("hosted") is not None
                assert tx.get_case("doomed") is None
            assert conn.in_transaction()  # gridflow did not end the host's transaction
            if host_commits:
                outer.commit()
            else:
                outer.rollback()
            hosted.dispose()
    finally:
        if owned:
            engine.dispose()
    expected = 1 if host_commits else 0
    assert count(store, "cases") == count(store, "events") == expected
    assert count(store, "outbox") == count(store, "timers") == expected


def test_host_session(store: Store, server_db: TestDatabase | None) -> None:
    engine, owned = _host_engine(store, server_db)
    try:
        with Session(engine) as session:
            hosted = Store(session, schema=store.tables.schema)
            with hosted.transaction() as tx:
                tx.insert_case(new_case("s1"), [ev()])
            session.rollback()
            with hosted.transaction() as tx:
                tx.insert_case(new_case("s2"), [ev()])
            session.commit()
    finally:
        if owned:
            engine.dispose()
    with store.transaction() as tx:
        assert tx.get_case("s1") is None
        assert tx.get_case("s2") is not None


def test_host_connection_without_transaction_commits_its_own(
    store: Store, server_db: TestDatabase | None
) -> None:
    engine, owned = _host_engine(store, server_db)
    try:
        with engine.connect() as conn:
            hosted = Store(conn, schema=store.tables.schema)
            with hosted.transaction() as tx:
                tx.insert_case(new_case("own"), [ev()])
            assert not conn.in_transaction()
    finally:
        if owned:
            engine.dispose()
    assert count(store, "cases") == 1


def test_table_prefix_is_respected(store: Store, server_db: TestDatabase | None) -> None:
    if server_db is not None:
        other = server_db.store(table_prefix="city_gf_")
    else:
        assert store.engine is not None
        other = Store(store.engine, table_prefix="city_gf_")
    assert {t.name for t in other.metadata.sorted_tables} == {
        "city_gf_cases", "city_gf_events", "city_gf_outbox", "city_gf_timers",
    }
    other.create_all()
    try:
        create(other, new_case("p1"))
        with other.transaction() as tx:
            inspector = sa.inspect(tx.connection)
            names = set(inspector.get_table_names(schema=store.tables.schema))
            assert {"city_gf_cases", "city_gf_events", "city_gf_timers", "city_gf_outbox"} <= (
                names
            )
            indexes = inspector.get_indexes("city_gf_cases", schema=store.tables.schema)
            assert indexes
            assert all(str(i["name"]).startswith(("ix_city_gf_", "uq_city_gf_")) for i in indexes)
        assert count(other, "cases") == 1
        assert count(store, "cases") == 0
    finally:
        other.drop_all()
        other.dispose()


def test_transaction_type() -> None:
    with Store() as s:
        s.create_all()
        with s.transaction() as tx:
            assert isinstance(tx, StoreTx)
        assert "sqlite" in repr(s)
    with pytest.raises(TypeError):
        Store(42)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ case cache


def test_cached_rows_are_checked_against_the_database(tmp_path: Path) -> None:
    """SQLite keeps the rows it wrote; another writer (a second store, another process)
    moves the version on, and the next read sees the database, not the cache."""
    url = f"sqlite:///{tmp_path / 'cache.db'}"
    with Store(url) as mine, Store(url) as other:
        mine.create_all()
        assert mine._cache is not None
        create(mine, new_case("c1"))
        with other.transaction() as tx:
            rec = tx.require_case("c1")
            rec.state, rec.data = "filed", {"by": "other"}
            tx.append(rec, 1, [ev("file", 1)])
        with mine.transaction() as tx:
            got = tx.require_case("c1")
            assert (got.version, got.state, got.data) == (2, "filed", {"by": "other"})
            got.data["changed"] = True  # callers get their own copy
            got.state = "mutated"
        with mine.transaction() as tx:
            again = tx.require_case("c1")
            assert (again.state, again.data) == ("filed", {"by": "other"})
            again.state = "handling"
            tx.append(again, 2, [ev("accept", 2)])
        with pytest.raises(RuntimeError), mine.transaction() as tx:  # rolled back
            rec = tx.require_case("c1")
            rec.state = "ghost"
            tx.append(rec, 3, [ev("ghost", 3)])
            raise RuntimeError("abort")
        with mine.transaction() as tx:
            assert tx.require_case("c1").state == "handling"
            assert [e.type for e in tx.history("c1")] == ["report", "file", "accept"]
        with other.transaction() as tx:
            assert tx.require_case("c1").version == 3


def test_no_cache_under_a_host_transaction(store: Store, server_db: TestDatabase | None) -> None:
    engine, owned = _host_engine(store, server_db)
    try:
        with engine.connect() as conn:
            assert Store(conn, schema=store.tables.schema)._cache is None
        assert Store(engine, schema=store.tables.schema, case_cache=0)._cache is None
    finally:
        if owned:
            engine.dispose()


def test_store_connections_per_thread(tmp_path: Path) -> None:
    """A file SQLite store with its own engine keeps a connection per thread; a read
    inside a write transaction on the same thread uses another one."""
    with Store(f"sqlite:///{tmp_path / 't.db'}") as store:
        store.create_all()
        create(store, new_case("c1"))
        with store.transaction() as tx:
            rec = tx.require_case("c1")
            rec.state = "filed"
            tx.append(rec, 1, [ev("file", 1)])
            with store.transaction(readonly=True) as inner:  # not yet committed
                assert inner.require_case("c1").version == 1
        results = run_threads(4, lambda i: count(store, "events", "c1"))
        assert results == [2, 2, 2, 2]


# ------------------------------------------------------------------------ conflicts


def test_busy_database_is_a_transaction_conflict(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'busy.db'}"
    with Store(url) as first, Store.from_url(url, connect_args={"timeout": 0.2}) as second:
        first.create_all()
        with first.transaction(), pytest.raises(TransactionConflict) as info, \
                second.transaction():
            pass
        assert isinstance(info.value, ConcurrencyConflict)
        assert "locked" in info.value.detail
        with second.transaction() as tx:  # the lock is gone, and so is the conflict
            tx.insert_case(new_case("after"), [ev()])


def test_deadlock_is_a_transaction_conflict(server_store: Store) -> None:
    """Two transactions lock two cases in opposite orders: the database aborts one of
    them; it surfaces as TransactionConflict (retry), the other commits."""
    store = server_store
    create(store, new_case("a"))
    create(store, new_case("b"))
    barrier = threading.Barrier(2)

    def worker(i: int) -> str:
        first, second = ("a", "b") if i == 0 else ("b", "a")
        with store.transaction() as tx:
            tx.require_case(first, for_update=True)
            barrier.wait(timeout=20)
            tx.require_case(second, for_update=True)
        return "committed"

    results = run_threads(2, worker)
    assert sorted(type(r).__name__ for r in results) == ["TransactionConflict", "str"]
    conflict = next(r for r in results if isinstance(r, TransactionConflict))
    assert conflict.detail == "deadlock"


def test_a_deadlock_with_the_hosts_own_locks_is_a_transaction_conflict(
    server_store: Store,
) -> None:
    """Host transaction A updates a row of its own, then a gridflow command in it waits
    for a case that host transaction B (gridflow wrote it there) holds, while B waits for
    A's row. The database aborts one; when it is A's gridflow command, A gets
    TransactionConflict — on MariaDB the abort takes the whole transaction and its
    savepoint with it, which must not surface as a driver error about the savepoint."""
    store = server_store
    assert store.engine is not None
    schema = store.tables.schema
    create(store, new_case("a"))
    md = sa.MetaData()
    host = sa.Table(f"host_{uuid.uuid4().hex[:8]}", md, sa.Column("id", sa.Integer,
                    primary_key=True, autoincrement=False), sa.Column("v", sa.Integer),
                    schema=schema)
    md.create_all(store.engine)
    try:
        with store.engine.begin() as conn:
            conn.execute(host.insert().values(id=1, v=0))
        b_holds_the_case, a_waits = threading.Event(), threading.Event()

        def a() -> str:
            with store.engine.connect() as conn, conn.begin():
                conn.execute(host.update().values(v=host.c.v + 1))
                b_holds_the_case.wait(timeout=20)
                a_waits.set()
                with Store(conn, schema=schema).transaction() as tx:
                    tx.require_case("a", for_update=True)
            return "a committed"

        def b() -> str:
            with store.engine.connect() as conn, conn.begin():
                with Store(conn, schema=schema).transaction() as tx:
                    rec = tx.require_case("a", for_update=True)
                    rec.state = "filed"
                    tx.append(rec, 1, [ev("file", 1)])  # (more undo than A: not the victim)
                b_holds_the_case.set()
                a_waits.wait(timeout=20)
                time.sleep(0.3)  # A is waiting for the case now
                conn.execute(host.update().values(v=host.c.v + 10))
            return "b committed"

        results = run_threads(2, lambda i: (a, b)[i]())
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1, results  # one was aborted, the other committed
        if isinstance(results[0], BaseException):  # A's gridflow command was the victim
            assert isinstance(results[0], TransactionConflict), repr(results[0])
            if store.dialect_name == "mysql":  # (the rollback took the host's update too)
                assert results[0].detail == ("deadlock: the database rolled back the whole "
                                             "transaction, the host's work included")
    finally:
        md.drop_all(store.engine)


def test_a_statement_timeout_is_a_transaction_conflict(postgres: Store) -> None:
    """A host's ``statement_timeout`` cuts a command waiting for a row lock: retryable."""
    create(postgres, new_case("held"))
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with postgres.transaction() as tx:
            tx.require_case("held", for_update=True)
            holding.set()
            done.wait(timeout=20)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        holding.wait(timeout=20)
        with pytest.raises(TransactionConflict) as info, postgres.transaction() as tx:
            tx.connection.exec_driver_sql("SET LOCAL statement_timeout = 200")
            tx.require_case("held", for_update=True)
        assert info.value.detail == "statement timeout or cancel"
    finally:
        done.set()
        holder.join()


def test_lists_and_due_timers_use_the_partial_indexes(tmp_path: Path) -> None:
    """SQLite uses a partial index only when the query implies its condition: check the
    plans of the real queries (bound parameters included)."""
    with Store(f"sqlite:///{tmp_path / 'plans.db'}") as store:
        store.create_all()

        def plan(stmt: Any) -> str:
            def explain(conn: Any, cursor: Any, sql: str, params: Any, context: Any,
                        many: bool) -> tuple[str, Any]:
                return "EXPLAIN QUERY PLAN " + sql, params

            with store.transaction(readonly=True) as tx:
                sa.event.listen(tx.connection, "before_cursor_execute", explain, retval=True)
                try:
                    rows = tx.connection.execute(stmt).context.cursor.fetchall()
                finally:
                    sa.event.remove(tx.connection, "before_cursor_execute", explain)
            return " | ".join(str(r[3]) for r in rows)

        with store.transaction(readonly=True) as tx:
            q = tx._cases_query
            common: dict[str, Any] = dict(
                pool=None, unit=None, handler=None, warn_before=None, limit=None,
                order_by_due=True,
            )
            overdue = q(states=["dispatched", "handling"], lead_department=None,
                        due_before=at(5), open_only=True, **common)
            worklist = q(states=["handling"], lead_department="城管局", due_before=None,
                         open_only=False, **common)
        assert "USING INDEX ix_gf_cases_closed_at_due_at" in plan(overdue)
        assert "USING INDEX ix_gf_cases_lead_department" in plan(worklist)
        due = store._stmts.due_timers.params(b_now=at(5), b_limit=10)
        assert "INDEX ix_gf_timers_fired_at_due_at" in plan(due)


def test_many_threads_on_one_sqlite_store(tmp_path: Path) -> None:
    """One connection per thread, and no pool limit to run into (the default pool holds
    15): 24 threads each advance their own case."""
    with Store(f"sqlite:///{tmp_path / 'threads.db'}") as store:
        store.create_all()
        for i in range(24):
            create(store, new_case(f"t{i}"))
        barrier = threading.Barrier(24)

        def advance(i: int) -> int:
            with store.transaction(readonly=True) as tx:  # every thread holds a connection
                rec = tx.require_case(f"t{i}")
                barrier.wait(timeout=30)
            for step in range(3):
                with store.transaction() as tx:
                    rec = tx.require_case(f"t{i}")
                    tx.append(rec, rec.version, [ev(f"s{step}", step)])
            return rec.version

        assert run_threads(24, advance) == [4] * 24


# ------------------------------------------------------------------------ bulk writes


def _prefixed(store: Store, db: TestDatabase | None, prefix: str, **kw: Any) -> Store:
    """Another store on the same database and schema, with its own tables."""
    if db is not None:
        other = Store(db.engine, table_prefix=prefix, schema=db.schema, **kw)
    else:
        assert store.engine is not None
        other = Store(store.engine, table_prefix=prefix, **kw)
    other.create_all()
    return other


def _stored_rows(store: Store, table: str, case_ids: list[str]) -> list[tuple[Any, ...]]:
    """The rows of the cases as the driver returns them (no SQLAlchemy type processing:
    the JSON text and time format the database holds), without the event ids."""
    t = getattr(store.tables, table)
    cols = [c for c in t.c if c.name != "id"]
    order = [t.c.case_id, t.c.seq] if table == "events" else [t.c.case_id]
    stmt = (
        sa.select(*[sa.type_coerce(c, sa.String).label(c.name) for c in cols])
        .where(t.c.case_id.in_(case_ids))
        .order_by(*order)
    )
    with store.transaction(readonly=True) as tx:
        return [tuple(r) for r in tx.connection.execute(stmt)]


short_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
case_columns = st.fixed_dictionaries(
    {
        "state": st.text(st.characters(codec="utf-8", exclude_characters="\x00"),
                         min_size=1, max_size=12),
        "data": st.dictionaries(st.text(max_size=8), json_values, max_size=4),
        "category": st.none() | short_text,
        "unit": st.none() | short_text,
        "lead_department": st.none() | st.sampled_from(["城管局", "环保局"]),
        "pool": st.none() | st.sampled_from(["p1", "p2"]),
        "handler": st.none() | short_text,
        "tier": st.none() | st.sampled_from(["grid", "street"]),
        "due_at": st.none() | aware,
        "warn_at": st.none() | aware,
        "reported_at": st.none() | aware,
        "dispatched_at": st.none() | aware,
        "closed_at": st.none() | aware,
        "policy_version": st.none() | short_text,
    }
)
event_lists = st.lists(new_events, min_size=1, max_size=3)
# a case: its first columns and events, whether it has an idempotency key, and maybe a
# later append (new columns, events, and whether the writer reads the case first)
case_plans = st.tuples(
    case_columns,
    event_lists,
    st.booleans(),
    st.none() | st.tuples(case_columns, event_lists, st.booleans()),
)


def test_write_many_stores_what_one_by_one_calls_store(
    store: Store, server_db: TestDatabase | None
) -> None:
    """Two stores (table prefixes) are fed the same cases: one with insert_case/append,
    one with write_many. The rows they hold — the JSON text and the time encoding
    included — the versions, update times and what a read returns are the same."""
    one = _prefixed(store, server_db, "one_gf_", outbox=False)
    bulk = _prefixed(store, server_db, "bulk_gf_", outbox=False)

    @settings(
        max_examples=15,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        plans=st.lists(case_plans, min_size=1, max_size=4),
        fresh=st.lists(case_plans, max_size=2),
    )
    def check(plans: list[Any], fresh: list[Any]) -> None:
        tag = uuid.uuid4().hex[:12]

        def record(i: int, columns: dict[str, Any], version: int, keyed: bool) -> CaseRecord:
            key = f"{tag}-key{i}" if keyed else None
            return CaseRecord(f"{tag}-{i}", version, idempotency_key=key, **columns)

        first = [(record(i, cols, len(evs), keyed), evs)
                 for i, (cols, evs, keyed, _) in enumerate(plans)]
        later = [(i, plan[3]) for i, plan in enumerate(plans) if plan[3] is not None]
        new = [(record(len(plans) + i, cols, len(evs), keyed), evs)
               for i, (cols, evs, keyed, _) in enumerate(fresh)]
        ids = [r.case_id for r, _ in first + new]

        def feed(target: Store, bulk_write: bool) -> list[CaseRecord]:
            inserted = [(replace(r), evs) for r, evs in first]
            with target.transaction() as tx:
                if bulk_write:
                    tx.write_many(inserted, [])
                else:
                    for r, evs in inserted:
                        tx.insert_case(r, evs)
            appended = []
            with target.transaction() as tx:
                for i, (cols, evs, read_first) in later:
                    version = inserted[i][0].version
                    if read_first:  # the store then writes only the changed columns
                        version = tx.require_case(f"{tag}-{i}").version
                    appended.append((record(i, cols, version, plans[i][2]), version, evs))
                created = [(replace(r), evs) for r, evs in new]
                if bulk_write:
                    tx.write_many(created, appended)
                else:
                    for r, evs in created:
                        tx.insert_case(r, evs)
                    for r, version, evs in appended:
                        tx.append(r, version, evs)
            return [r for r, _ in inserted] + [r for r, _, _ in appended] + [
                r for r, _ in created
            ]

        expected, got = feed(one, False), feed(bulk, True)
        assert [(r.version, r.updated_at) for r in got] == [
            (r.version, r.updated_at) for r in expected
        ]
        assert all(r.updated_at is not None and r.updated_at.tzinfo is UTC for r in got)
        for table in ("cases", "events"):
            rows = _stored_rows(bulk, table, ids)
            assert rows == _stored_rows(one, table, ids)
            assert len(rows) == (len(ids) if table == "cases" else sum(
                len(evs) for _, evs in first + new) + sum(len(p[1]) for _, p in later))
        with one.transaction(readonly=True) as tx_one, \
                bulk.transaction(readonly=True) as tx_bulk:  # SQLite: from the cache
            for case_id in ids:
                assert tx_bulk.require_case(case_id) == tx_one.require_case(case_id)
                assert [e.seq for e in tx_bulk.history(case_id)] == [
                    e.seq for e in tx_one.history(case_id)
                ]

    try:
        check()
    finally:
        for other in (one, bulk):
            other.drop_all()
            other.dispose()


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (lambda: ([(new_case("x", reported_at=datetime(2025, 1, 1)), [ev()])], []),
         "reported_at"),
        (lambda: ([(new_case("x", version=2), [ev()])], []), "version"),
        (lambda: ([(new_case("x", version=0), [])], []), "events"),
        (lambda: ([(new_case("x"), [NewEvent("r", "a", "b", datetime(2025, 1, 1))])], []),
         "events[0].at"),
        (lambda: ([(new_case("x", data={"when": at(0)}), [ev()])], []), "data/payload"),
        (lambda: ([], [(new_case("a", lead_department="部" * 129), 1, [ev("file", 1)])]),
         "lead_department"),
        (lambda: ([], [(new_case("a"), 1, [ev("file", 1, payload={"o": object()})])]),
         "data/payload"),
        (lambda: ([], [(new_case("a"), 1, [ev("file", 1, actor_id="")])]),
         "events[0].actor_id"),
    ],
)
def test_write_many_refuses_a_bad_record_before_writing_anything(
    store: Store,
    server_db: TestDatabase | None,
    bad: Callable[[], tuple[list[Any], list[Any]]],
    field: str,
) -> None:
    """The bad record comes last: nothing of the good ones before it is written, and the
    transaction is still usable."""
    bulk = (
        Store(server_db.engine, schema=server_db.schema, outbox=False)
        if server_db is not None
        else Store(store.engine, outbox=False)
    )
    create(bulk, new_case("a"))
    bad_inserts, bad_appends = bad()
    good_inserts = [(new_case("g1"), [ev()]), (new_case("g2", version=2), [ev(), ev("f", 1)])]
    good_appends = [(new_case("a", state="filed"), 1, [ev("file", 1)])] if not bad_appends else []
    with bulk.transaction() as tx:
        with pytest.raises(CaseValidationError) as info:
            tx.write_many(good_inserts + bad_inserts, good_appends + bad_appends)
        assert field in info.value.fields
        events = bulk.tables.events
        assert tx.connection.execute(
            sa.select(sa.func.count()).select_from(events)
        ).scalar_one() == 1
        assert tx.get_case("g1") is None and tx.get_case("g2") is None
        assert tx.require_case("a").version == 1
        tx.write_many([(new_case("after"), [ev()])], [])
    assert count(bulk, "cases") == 2
    assert count(bulk, "events") == 2


def test_write_many_version_conflict(store: Store, server_db: TestDatabase | None) -> None:
    bulk = (
        Store(server_db.engine, schema=server_db.schema, outbox=False)
        if server_db is not None
        else Store(store.engine, outbox=False)
    )
    for cid in ("a", "b", "c"):
        create(bulk, new_case(cid))
    record = new_case("b", state="filed")
    with pytest.raises(ConcurrencyConflict) as info, bulk.transaction() as tx:
        tx.write_many(
            [(new_case("new"), [ev()])],
            [
                (new_case("a", state="filed"), 1, [ev("file", 1)]),
                (record, 3, [ev("file", 1)]),  # stale: the store holds version 1
                (new_case("c", state="filed"), 1, [ev("file", 1)]),
            ],
        )
    assert (info.value.case_id, info.value.expected_version, info.value.actual_version) == (
        "b", 3, 1,
    )
    assert record.version == 1 and record.updated_at is None  # the record was not stored
    with pytest.raises(CaseNotFound), bulk.transaction() as tx:
        tx.write_many([], [(new_case("ghost"), 0, [ev()])])
    assert count(bulk, "cases") == 3
    assert count(bulk, "events") == 3
    with bulk.transaction() as tx:
        assert [tx.require_case(cid).state for cid in ("a", "b", "c")] == ["reported"] * 3


def test_write_many_duplicate_case_id_and_key(
    store: Store, server_db: TestDatabase | None
) -> None:
    bulk = (
        Store(server_db.engine, schema=server_db.schema, outbox=False)
        if server_db is not None
        else Store(store.engine, outbox=False)
    )
    create(bulk, new_case("dup", idempotency_key="hotline:1"))
    with pytest.raises(ConcurrencyConflict) as info, bulk.transaction() as tx:
        tx.write_many([(new_case("fine"), [ev()]), (new_case("dup"), [ev()])], [])
    assert not isinstance(info.value, IdempotencyConflict)
    assert (info.value.case_id, info.value.actual_version) == ("dup", 1)
    with pytest.raises(IdempotencyConflict) as key_info, bulk.transaction() as tx:
        tx.write_many([(new_case("other", idempotency_key="hotline:1"), [ev()])], [])
    assert key_info.value.existing_case_id == "dup"
    assert key_info.value.attempted_case_id == "other"
    with pytest.raises(IdempotencyConflict) as twice, bulk.transaction() as tx:
        tx.write_many([(new_case("k1", idempotency_key="app:7"), [ev()]),
                       (new_case("k2", idempotency_key="app:7"), [ev()])], [])
    assert (twice.value.existing_case_id, twice.value.attempted_case_id) == ("k1", "k2")
    assert count(bulk, "cases") == count(bulk, "events") == 1


def test_write_many_with_an_outbox_writes_case_by_case(store: Store) -> None:
    """The outbox needs the event ids: every event gets its outbox row."""
    create(store, new_case("a"))
    with store.transaction() as tx:
        tx.write_many(
            [(new_case("b", version=2), [ev(), ev("auto_file", 0.1)])],
            [(new_case("a", state="filed"), 1, [ev("file", 1)])],
        )
    assert count(store, "outbox", "a") == 2
    assert count(store, "outbox", "b") == 2
    with store.transaction() as tx:
        assert tx.require_case("a").state == "filed"
        assert [e.seq for e in tx.history("b")] == [1, 2]


def test_write_many_is_a_few_statements(server_store: Store, request: pytest.FixtureRequest
                                        ) -> None:
    """Whatever the number of cases: a savepoint, one insert of the new cases, one update
    per column set, one insert of the events."""
    backend = "postgres" if server_store.dialect_name == "postgresql" else "mysql"
    db: TestDatabase = request.getfixturevalue(f"{backend}_db")
    bulk = Store(db.engine, schema=db.schema, outbox=False)
    for i in range(10):
        create(bulk, new_case(f"old{i}"))
    statements: list[tuple[str, bool]] = []

    def log(conn: Any, cursor: Any, sql: str, params: Any, context: Any, many: bool) -> None:
        statements.append((sql.split(None, 1)[0].upper(), many))

    with bulk.transaction() as tx:
        sa.event.listen(tx.connection, "before_cursor_execute", log)
        try:
            tx.write_many(
                [(new_case(f"new{i}", version=2), [ev(), ev("auto_file", 1)]) for i in range(10)],
                [(new_case(f"old{i}", state="filed"), 1, [ev("file", 1)]) for i in range(10)],
            )
        finally:
            sa.event.remove(tx.connection, "before_cursor_execute", log)
    assert [s for s, _ in statements] == ["SAVEPOINT", "INSERT", "UPDATE", "INSERT", "RELEASE"]
    assert count(bulk, "cases") == 20
    assert count(bulk, "events") == 40


def _counting_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The case ids the store is asked for (StoreTx.get_case) from now on."""
    asked: list[str] = []
    get_case = StoreTx.get_case

    def counted(self: StoreTx, case_id: str, **kw: Any) -> CaseRecord | None:
        asked.append(case_id)
        return get_case(self, case_id, **kw)

    monkeypatch.setattr(StoreTx, "get_case", counted)
    return asked


def test_a_batch_on_an_empty_store_does_not_look_new_cases_up(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store held no case at the batch's first insert: new case ids need no lookup,
    and a case id the batch already wrote is still refused at the command, before and
    after a commit."""
    asked = _counting_lookups(monkeypatch)
    uow = UnitOfWork(store)
    for name in ("a", "b", "c"):
        uow.insert_case(new_case(name), [ev()])
    assert asked == []
    with pytest.raises(ConcurrencyConflict):
        uow.insert_case(new_case("b"), [ev()])
    uow.commit()
    with pytest.raises(ConcurrencyConflict):
        uow.insert_case(new_case("a"), [ev()])
    uow.insert_case(new_case("d"), [ev()])
    uow.commit()
    assert asked == ["a"]  # its own case: looked up for the conflict, "d" was not
    assert count(store, "cases") == 4
    # a store that holds cases: every new case id is looked up
    later = UnitOfWork(store)
    later.insert_case(new_case("e"), [ev()])
    with pytest.raises(ConcurrencyConflict):
        later.insert_case(new_case("c"), [ev()])
    later.commit()
    assert asked == ["a", "e", "c"]


def test_a_batch_uses_a_timer_up_without_firing_it(store: Store) -> None:
    """``use_timer`` marks one unfired timer fired at the given time — in memory, or in
    the database after a commit — and leaves the others for the next claim."""
    uow = UnitOfWork(store)
    uow.insert_case(new_case("a"), [ev()])
    uow.set_timers("a", [("warn", at(3)), ("overdue", at(4))])
    uow.use_timer("a", "warn", at(3), at(3.5))  # owned by the batch: in memory
    uow.use_timer("a", "warn", at(3), at(9))  # already used: nothing
    uow.use_timer("a", "overdue", at(7), at(9))  # no such timer: nothing
    uow.use_timer("nobody", "warn", at(3), at(9))  # no such case: nothing
    uow.commit()
    uow.insert_case(new_case("b"), [ev()])
    uow.use_timer("a", "overdue", at(4), at(5))  # a stored row: marked before any claim
    assert [t.case_id for t in uow.claim_due_timers(at(10))] == []
    uow.commit()
    with store.transaction(readonly=True) as tx:
        assert sorted((t.kind, t.due_at, t.fired_at) for t in tx.timers("a")) == [
            ("overdue", at(4), at(5)), ("warn", at(3), at(3.5))]
        assert tx.claim_due_timers(at(10)) == []


def test_a_batch_undoing_an_insert_forgets_the_case(store: Store) -> None:
    """A failed block's insert is undone: the case id is free again in the batch."""
    uow = UnitOfWork(store)
    with pytest.raises(RuntimeError), uow.transaction():
        uow.insert_case(new_case("a"), [ev()])
        raise RuntimeError("the command failed after buffering")
    uow.insert_case(new_case("a"), [ev()])
    uow.commit()
    assert count(store, "cases") == 1


def test_another_writers_case_of_the_same_id_fails_the_flush(server_store: Store) -> None:
    """The batch did not look the new case up (the store was empty): another writer's
    case of the same id, stored meanwhile, makes the flush fail and roll back."""
    store = server_store
    uow = UnitOfWork(store)
    uow.insert_case(new_case("mine"), [ev()])
    with store.transaction() as tx:
        tx.insert_case(new_case("taken", state="theirs"), [ev("theirs")])
    uow.insert_case(new_case("taken"), [ev()])
    with pytest.raises(ConcurrencyConflict) as info:
        uow.flush()
    assert info.value.case_id == "taken"
    with store.transaction() as tx:
        assert tx.get_case("mine") is None
        assert tx.require_case("taken").state == "theirs"
    # rolled back: the batch asks the (no longer empty) store again
    with pytest.raises(ConcurrencyConflict):
        uow.insert_case(new_case("taken"), [ev()])
    uow.insert_case(new_case("mine"), [ev()])
    uow.commit()
    assert count(store, "cases") == 2


def test_a_failing_flush_rolls_the_batch_back(server_store: Store) -> None:
    """Another writer moves a case on after the batch read it: the flush raises the
    conflict and everything since the last commit is gone; inside an engine transaction
    the flush failure is a BatchAborted."""
    store = server_store
    create(store, new_case("shared"))
    uow = UnitOfWork(store)
    uow.insert_case(new_case("mine"), [ev()])
    seen = uow.require_case("shared")
    with store.transaction() as tx:  # the other writer (no lock: the batch did not ask)
        tx.append(new_case("shared", state="theirs"), 1, [ev("theirs", 1)])
    seen = replace(seen, state="ours")
    uow.append(seen, 1, [ev("ours", 1)])
    with pytest.raises(ConcurrencyConflict) as info:
        uow.flush()
    assert info.value.case_id == "shared"
    assert uow.flushes == 0
    with store.transaction() as tx:
        assert tx.get_case("mine") is None
        assert tx.require_case("shared").state == "theirs"
    # the batch goes on from the database as it is
    uow.insert_case(new_case("again"), [ev()])
    stale = replace(uow.require_case("shared"), state="ours")
    with store.transaction() as tx:
        tx.append(new_case("shared", state="theirs again"), 2, [ev("theirs", 2)])
    with pytest.raises(BatchAborted) as aborted, uow.transaction():
        uow.append(stale, 2, [ev("ours", 2)])
        uow.history("shared")  # flushes first
    assert isinstance(aborted.value.__cause__, ConcurrencyConflict)
    uow.commit()
    with store.transaction() as tx:
        assert tx.get_case("again") is None
        assert [e.type for e in tx.history("shared")] == ["report", "theirs", "theirs"]
    uow.insert_case(new_case("last"), [ev()])
    uow.commit()
    assert count(store, "cases") == 2


def test_histories_read_many_cases_as_history_reads_one(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One query for many cases (SQLite: in chunks of ids, here 2) gives each case what
    ``history`` gives it, times and payloads converted alike; an unknown id gets []."""
    import gridflow.store.core as core

    monkeypatch.setattr(core, "_IN_CHUNK", 2)
    for i, cid in enumerate(("a", "b", "c")):
        create(store, new_case(cid, version=2), [
            ev("report", i, payload={"n": i, "text": "暴露垃圾", "list": [1.5, None]}),
            ev("file", i + 0.5, reason="立案", policy_version="v1"),
        ])
    with store.transaction(readonly=True) as tx:
        many = tx.histories(["c", "nobody", "a", "b"])
        assert list(many) == ["c", "nobody", "a", "b"]
        assert many == {cid: tx.history(cid) for cid in ("c", "nobody", "a", "b")}
        assert [e.seq for e in many["b"]] == [1, 2] and many["b"][0].at == at(1)
        assert many["c"][0].payload == {"n": 2, "text": "暴露垃圾", "list": [1.5, None]}
        assert tx.histories([]) == {}


def test_insert_rows_writes_plain_rows_as_an_insert_does(store: Store) -> None:
    """Rows of several column sets, times and JSON converted as SQLAlchemy converts them."""
    from gridflow.store.aggregates import ensure_aggregate_tables, score_rows

    t = ensure_aggregate_tables(store)
    base = {"case_id": "a", "policy_version": "v1", "revision": 1, "current": 1,
            "subject_kind": "department", "role": "lead", "timeliness": 1.0,
            "resolution": 0.5, "quality": 1.0, "satisfaction": 0.9, "composite_centi": 9100,
            "exempt": "", "case_version": 3, "reported_at": at(1), "scored_at": at(2)}
    rows = [
        {**base, "subject_id": "sanitation", "reason": "evaluated", "details": {"x": [1, "一"]}},
        {**base, "subject_id": "gw-1", "details": {}, "exempt": "weather"},  # no reason
    ]
    with store.transaction() as tx:
        tx.insert_rows(t.scores, rows)
        tx.insert_rows(t.scores, [])
    with store.transaction(readonly=True) as tx:
        got = score_rows(tx, t, ["a"])
    assert [(r["subject_id"], r["reason"], r["details"], r["exempt"], r["resolution"],
             r["scored_at"]) for r in got] == [
        ("sanitation", "evaluated", {"x": [1, "一"]}, "", 0.5, at(2)),
        ("gw-1", None, {}, "weather", 0.5, at(2)),
    ]
