"""Several OS processes on one database (file SQLite, PostgreSQL, MariaDB).

Worker processes are started with ``spawn`` (a fresh interpreter, nothing shared but the
database) and kept in one pool for the module. Synchronized tests submit exactly
``WORKERS`` tasks that meet at a barrier, so every worker runs one of them at the same time.

* racing appends: all workers read the same version, then append — exactly one wins, the
  others get ``ConcurrencyConflict``, reload and retry; nothing is lost or duplicated;
* the engine hammered: every worker pushes every case through the life cycle;
* idempotent intake: one key from every worker at once → one case;
* ``tick(now)`` from several workers (while another runs commands) fires each timer once;
* concurrent outbox publishers that sometimes fail: every event published, in order per
  case (at least once);
* a worker SIGKILLed in the middle of its commands leaves every command applied or not.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

import gridflow
from gridflow import Actor, Engine
from gridflow.clock import ManualClock
from gridflow.errors import ConcurrencyConflict, TransitionNotAllowed
from gridflow.projection import project
from gridflow.store import (
    CaseRecord,
    EventRecord,
    IdempotencyConflict,
    NewEvent,
    OutboxMessage,
    Store,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
WUJIN = ROOT / "examples" / "wujin"
CST = ZoneInfo("Asia/Shanghai")
T0 = datetime(2026, 3, 9, 9, 0, tzinfo=CST)
WORKERS = 4

GRID_WORKER = Actor("gw-1", "grid_worker", department="grid-worker")
CLERK = Actor("clerk-1", "clerk")
DISPATCHER = Actor("disp-1", "dispatcher")
SUPERVISOR = Actor("sup-1", "supervisor")
RESIDENT = Actor("res-1", "resident")
STEPS = ["reported", "file", "dispatch", "take", "feedback", "verify", "close", "evaluate"]

# ------------------------------------------------------------------ worker processes

_BARRIER: Any = None
_STORES: dict[tuple[str, str | None], Store] = {}
_POLICY: gridflow.Policy | None = None


def _init(barrier: Any) -> None:
    global _BARRIER
    _BARRIER = barrier


def _store(db: tuple[str, str | None]) -> Store:
    """This process's store for ``(url, schema)`` (earlier tests' stores are closed)."""
    store = _STORES.get(db)
    if store is None:
        for old in _STORES.values():
            old.dispose()
        _STORES.clear()
        url, schema = db
        store = _STORES[db] = Store.from_url(url, schema=schema)
    return store


def _engine(db: tuple[str, str | None], now: datetime = T0) -> Engine:
    global _POLICY
    if _POLICY is None:
        _POLICY = gridflow.load_policy(WUJIN)
    return Engine(_POLICY, _store(db), ManualClock(now))


def _wait() -> None:
    _BARRIER.wait(timeout=60)


def _sample_case(i: int) -> dict[str, Any]:
    files = sorted((WUJIN / "cases").glob("*.json"))
    case: dict[str, Any] = json.loads(files[i % len(files)].read_text("utf-8"))
    case.pop("id", None)
    case.pop("reported_at", None)
    return case


def _advance(engine: Engine, case_id: str) -> str | None:
    """Take the case's next main-path step; the step's name, or None when it is done."""
    view = engine.get(case_id)
    state = view.state
    if state == "reported":
        engine.file(case_id, CLERK)
        return "file"
    if state == "filed":
        engine.dispatch(case_id, DISPATCHER)
        return "dispatch"
    if state == "dispatched":
        handler = Actor("h-1", "handler", department=view.lead)
        if view.pool is not None:
            engine.claim(case_id, handler)
        else:
            engine.accept(case_id, handler)
        return "take"
    if state == "handling":
        engine.feedback(case_id, Actor("h-1", "handler", department=view.lead),
                        evidence=["https://img.example/done.jpg"])
        return "feedback"
    if state == "handled":
        engine.verify(case_id, SUPERVISOR)
        return "verify"
    if state == "verified":
        engine.close(case_id, SUPERVISOR)
        return "close"
    if state == "closed":
        engine.evaluate(case_id, RESIDENT, "satisfied")
        return "evaluate"
    return None


def race_appends(db: tuple[str, str | None], case_ids: list[str], rounds: int,
                 worker: int) -> dict[str, Any]:
    """Each round: read every case, wait for the others, then append one event to each."""
    store = _store(db)
    first_try = conflicts = 0
    for r in range(rounds):
        _wait()  # everyone finished the previous round
        read = {}
        with store.transaction(readonly=True) as tx:
            for case_id in case_ids:
                read[case_id] = tx.require_case(case_id)
        _wait()  # every worker now holds the same versions
        for case_id in case_ids:
            record = read[case_id]
            attempt = 0
            while True:
                record.state = f"w{worker}"
                record.data = {"appends": record.data["appends"] + 1}
                event = NewEvent("touch", f"w{worker}", "worker", T0, payload={"w": worker, "r": r})
                try:
                    with store.transaction() as tx:
                        tx.append(record, record.version, [event])
                    first_try += attempt == 0
                    break
                except ConcurrencyConflict:
                    conflicts += 1
                    attempt += 1
                    with store.transaction(readonly=True) as tx:
                        record = tx.require_case(case_id)
    return {"first_try": first_try, "conflicts": conflicts}


def hammer(db: tuple[str, str | None], case_ids: list[str], seed: int) -> dict[str, Any]:
    """Push every case through the life cycle, in a random order, against the others."""
    engine = _engine(db)
    rng = random.Random(seed)
    todo = list(case_ids)
    done: list[tuple[str, str]] = []
    conflicts = refused = 0
    _wait()
    while todo:
        case_id = rng.choice(todo)
        try:
            step = _advance(engine, case_id)
        except ConcurrencyConflict:
            conflicts += 1
            continue
        except TransitionNotAllowed:
            refused += 1  # another worker took this step between our read and our command
            continue
        if step is None:
            todo.remove(case_id)
        else:
            done.append((case_id, step))
    return {"done": done, "conflicts": conflicts, "refused": refused}


def intake(db: tuple[str, str | None], keys: list[str], worker: int) -> dict[str, Any]:
    engine = _engine(db)
    store = engine.store
    engine_ids: dict[str, str] = {}
    store_results: dict[str, str] = {}
    for i, key in enumerate(keys):
        _wait()
        engine_ids[key] = engine.report(_sample_case(i), GRID_WORKER, idempotency_key=key).id
        _wait()
        record = CaseRecord(f"{key}-by-{worker}", 1, "reported", {"by": worker},
                            idempotency_key=f"store:{key}")
        try:
            with store.transaction() as tx:
                tx.insert_case(record, [NewEvent("reported", f"w{worker}", "worker", T0)])
            store_results[key] = "inserted"
        except IdempotencyConflict as conflict:
            store_results[key] = f"conflict:{conflict.existing_case_id}"
    return {"engine": engine_ids, "store": store_results}


def tick_or_command(db: tuple[str, str | None], role: str, now: datetime,
                    case_ids: list[str]) -> list[tuple[str, str]]:
    """``tick`` role: call ``engine.tick(now)``; ``command`` role: accept the cases."""
    engine = _engine(db, now)
    _wait()
    if role == "tick":
        return [(e.case_id, e.type) for e in engine.tick(now, limit=7)]
    out = []
    for case_id in case_ids:
        view = engine.get(case_id)
        actor = Actor("h-9", "handler", department=view.lead)
        try:
            if view.pool is not None:
                engine.claim(case_id, actor)
            else:
                engine.accept(case_id, actor)
            out.append((case_id, "take"))
        except (ConcurrencyConflict, TransitionNotAllowed):
            pass
    return out


def write_events(db: tuple[str, str | None], case_ids: list[str], n: int,
                 worker: int) -> int:
    """Append ``n`` events to the cases, retrying on conflicts (a writer node)."""
    store = _store(db)
    rng = random.Random(worker)
    written = 0
    _wait()
    while written < n:
        case_id = rng.choice(case_ids)
        try:
            with store.transaction() as tx:
                record = tx.require_case(case_id, for_update=True)
                tx.append(record, record.version,
                          [NewEvent("note", f"w{worker}", "writer", T0, payload={"i": written})])
            written += 1
        except ConcurrencyConflict:
            continue
    return written


def publish(db: tuple[str, str | None], log: str, done_flag: str, worker: int,
            fail_every: int) -> dict[str, int]:
    """A publisher node: hand batches to a "broker" (a log file), sometimes failing after
    sending and before the acknowledgement (then the batch comes again)."""
    store = _store(db)
    batches = sends = failures = 0
    _wait()
    with open(log, "a", encoding="utf-8") as out:

        def send(messages: list[OutboxMessage]) -> None:
            nonlocal failures, sends
            for m in messages:
                out.write(f"{time.monotonic_ns()} {m.case_id} {m.seq} {m.event_id} {worker}\n")
            out.flush()
            sends += 1
            if fail_every and sends % fail_every == 0:
                failures += 1
                raise ConnectionError("broker hiccup")

        idle_after_done = 0
        while idle_after_done < 3:
            batches += 1
            try:
                sent = store.publish_outbox(send, limit=7)
            except (ConnectionError, ConcurrencyConflict):
                continue
            if sent == 0:
                if os.path.exists(done_flag):
                    idle_after_done += 1
                time.sleep(0.005)
            else:
                idle_after_done = 0
    return {"batches": batches, "failures": failures}


def crash_victim(db: tuple[str, str | None], progress: str, pair_case: str) -> None:
    """Run commands until killed: engine commands, and store transactions that append
    two events with a pause between them (a kill there must undo the first)."""
    engine = _engine(db)
    store = engine.store
    i = 0
    while True:
        view = engine.report(_sample_case(i), GRID_WORKER)
        engine.file(view.id, CLERK)
        engine.dispatch(view.id, DISPATCHER)
        with store.transaction() as tx:
            record = tx.require_case(pair_case, for_update=True)
            record.data = {"pairs": record.data["pairs"] + 1}
            tx.append(record, record.version, [NewEvent("pair-a", "v", "victim", T0)])
            _note(progress, f"{i} in")  # the parent kills us now, in the transaction
            time.sleep(0.05)
            tx.append(record, record.version, [NewEvent("pair-b", "v", "victim", T0)])
            tx.set_timers(pair_case, [("overdue", T0 + timedelta(days=1, minutes=i))])
        i += 1
        _note(progress, f"{i} out")


def _note(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------ parent side


@pytest.fixture(scope="module")
def pool() -> Iterator[tuple[Pool, Any]]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    with ctx.Pool(WORKERS, initializer=_init, initargs=(barrier,)) as p:
        yield p, barrier
        p.terminate()


def _db(store: Store) -> tuple[str, str | None]:
    assert store.engine is not None
    return store.engine.url.render_as_string(hide_password=False), store.tables.schema


def _run_all(pool: tuple[Pool, Any], fn: Any, args: list[tuple[Any, ...]],
             timeout: float = 120) -> list[Any]:
    p, barrier = pool
    barrier.reset()
    pending = [p.apply_async(fn, a) for a in args]
    return [r.get(timeout) for r in pending]


def _events(store: Store) -> dict[str, list[EventRecord]]:
    out: dict[str, list[EventRecord]] = {}
    with store.transaction(readonly=True) as tx:
        case_ids = [c.case_id for c in tx.iter_cases()]
        for case_id in case_ids:
            out[case_id] = tx.history(case_id)
    return out


def _assert_consistent(store: Store, *, projected: bool) -> dict[str, list[EventRecord]]:
    """Every case: gap-free history, version = number of events, every event in the
    outbox (nothing was acknowledged), and (engine cases) projection = stored state."""
    histories = _events(store)
    with store.transaction(readonly=True) as tx:
        outbox = {m.event_id for m in tx.outbox_fetch(100_000)}
        for case_id, history in histories.items():
            assert [e.seq for e in history] == list(range(1, len(history) + 1)), case_id
            case = tx.require_case(case_id)
            assert case.version == len(history), case_id
            if projected:
                assert project(history) == case.data, case_id
    all_ids = [e.id for h in histories.values() for e in h]
    assert len(all_ids) == len(set(all_ids))
    if store.outbox:
        assert outbox == set(all_ids)
    return histories


def _new_cases(store: Store, n: int, prefix: str) -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(n)]
    with store.transaction() as tx:
        for case_id in ids:
            tx.insert_case(CaseRecord(case_id, 1, "new", {"appends": 0}),
                           [NewEvent("created", "t", "test", T0)])
    return ids


# ------------------------------------------------------------------ the tests


def test_racing_appends_one_wins_the_others_conflict_and_retry(
    concurrent_store: Store, pool: tuple[Pool, Any]
) -> None:
    store = concurrent_store
    case_ids = _new_cases(store, 2, "race")
    rounds = 4
    results = _run_all(pool, race_appends,
                       [(_db(store), case_ids, rounds, w) for w in range(WORKERS)])
    # per round and case, exactly one worker got through at the first attempt
    assert sum(r["first_try"] for r in results) == rounds * len(case_ids)
    assert sum(r["conflicts"] for r in results) >= rounds * len(case_ids) * (WORKERS - 1)
    histories = _assert_consistent(store, projected=False)
    with store.transaction(readonly=True) as tx:
        for case_id in case_ids:
            touches = [(e.payload["w"], e.payload["r"]) for e in histories[case_id][1:]]
            assert sorted(touches) == sorted(
                (w, r) for w in range(WORKERS) for r in range(rounds)
            )  # every worker's append of every round, once
            assert tx.require_case(case_id).data == {"appends": WORKERS * rounds}


def test_engine_commands_from_several_processes(
    concurrent_store: Store, pool: tuple[Pool, Any]
) -> None:
    store = concurrent_store
    engine = Engine(gridflow.load_policy(WUJIN), store, ManualClock(T0))
    case_ids = [engine.report(_sample_case(i), GRID_WORKER).id for i in range(6)]
    results = _run_all(pool, hammer, [(_db(store), case_ids, seed) for seed in range(WORKERS)])
    steps = Counter(step for r in results for step in r["done"])
    assert set(steps.values()) == {1}  # each step of each case done by exactly one worker
    assert len(steps) == len(case_ids) * (len(STEPS) - 1)
    histories = _assert_consistent(store, projected=True)
    for case_id in case_ids:
        assert engine.get(case_id).state == "evaluated"
        assert len(histories[case_id]) == len(STEPS)


def test_one_idempotency_key_from_several_processes_is_one_case(
    concurrent_store: Store, pool: tuple[Pool, Any]
) -> None:
    store = concurrent_store
    keys = [f"app:张三:{i}" for i in range(3)]
    results = _run_all(pool, intake, [(_db(store), keys, w) for w in range(WORKERS)])
    for key in keys:
        assert len({r["engine"][key] for r in results}) == 1  # every process: the same case
        outcomes = [r["store"][key] for r in results]
        assert outcomes.count("inserted") == 1
        winner = next(f"{key}-by-{w}" for w, o in enumerate(outcomes) if o == "inserted")
        assert sorted(o for o in outcomes if o != "inserted") == [f"conflict:{winner}"] * (
            WORKERS - 1
        )
    histories = _assert_consistent(store, projected=False)
    assert len(histories) == 2 * len(keys)


def test_tick_from_several_processes_fires_each_timer_once(
    concurrent_store: Store, pool: tuple[Pool, Any]
) -> None:
    store = concurrent_store
    engine = Engine(gridflow.load_policy(WUJIN), store, ManualClock(T0))
    case_ids = []
    for i in range(12):
        view = engine.report(_sample_case(i), GRID_WORKER)
        engine.file(view.id, CLERK)
        view = engine.dispatch(view.id, DISPATCHER)
        if view.due_at is not None:
            case_ids.append(view.id)
    assert len(case_ids) >= 6
    later = T0 + timedelta(days=60)
    roles = ["command", "tick", "tick", "tick"]
    results = _run_all(pool, tick_or_command,
                       [(_db(store), role, later, case_ids[::2]) for role in roles])
    fired = [f for r, role in zip(results, roles, strict=True) if role == "tick" for f in r]
    fired += [(e.case_id, e.type) for e in engine.tick(later)]  # what was left locked
    assert len(fired) == len(set(fired))  # no timer fired twice
    histories = _assert_consistent(store, projected=True)
    for case_id in case_ids:
        types = Counter(e.type for e in histories[case_id])
        assert types["warn"] == 1 and types["mark_overdue"] == 1, (case_id, types)
    assert engine.tick(later) == []
    with store.transaction(readonly=True) as tx:
        assert tx.claim_due_timers(later) == []


def test_concurrent_publishers_deliver_everything_in_order(
    concurrent_store: Store, pool: tuple[Pool, Any], tmp_path: Path
) -> None:
    store = concurrent_store
    case_ids = _new_cases(store, 5, "pub")
    done_flag = str(tmp_path / "writers-done")
    logs = [str(tmp_path / f"published-{w}.log") for w in range(2)]
    p, barrier = pool
    barrier.reset()
    writers = [p.apply_async(write_events, (_db(store), case_ids, 40, w)) for w in range(2)]
    publishers = [
        p.apply_async(publish, (_db(store), logs[w], done_flag, w, 4)) for w in range(2)
    ]
    assert [w.get(120) for w in writers] == [40, 40]
    Path(done_flag).touch()
    stats = [pub.get(120) for pub in publishers]
    assert sum(s["failures"] for s in stats) > 0  # some batches did come again
    histories = _events(store)
    lines = [line.split() for log in logs if Path(log).exists()
             for line in Path(log).read_text().splitlines()]
    published = sorted((int(t), case, int(seq), int(eid)) for t, case, seq, eid, _ in lines)
    all_ids = {e.id for h in histories.values() for e in h}
    assert {eid for _, _, _, eid in published} == all_ids  # nothing skipped
    first: dict[str, list[int]] = defaultdict(list)
    seen: set[int] = set()
    for _, case, seq, eid in published:
        if eid not in seen:
            seen.add(eid)
            first[case].append(seq)
    for case_id in case_ids:
        n = len(histories[case_id])
        assert first[case_id] == list(range(1, n + 1)), case_id  # in order per case
    with store.transaction(readonly=True) as tx:
        assert tx.outbox_pending() == 0


def test_sigkill_in_the_middle_leaves_every_command_whole(
    concurrent_store: Store, tmp_path: Path
) -> None:
    store = concurrent_store
    pair_case = _new_cases(store, 1, "pairs")[0]
    with store.transaction() as tx:
        record = tx.require_case(pair_case)
        record.data = {"pairs": 0}
        tx.append(record, 1, [NewEvent("start", "t", "test", T0)])
    progress = tmp_path / "progress"
    ctx = multiprocessing.get_context("spawn")
    victim = ctx.Process(target=crash_victim, args=(_db(store), str(progress), pair_case))
    victim.start()
    try:
        deadline = time.monotonic() + 60
        while True:  # let it commit a few, then kill it inside a transaction
            assert victim.is_alive() and time.monotonic() < deadline
            note = progress.read_text().split() if progress.exists() else ["0", "out"]
            if int(note[0]) >= 3 and note[1] == "in":
                break
            time.sleep(0.001)
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(30)
    finally:
        if victim.is_alive():  # pragma: no cover
            victim.kill()
    assert victim.exitcode == -signal.SIGKILL
    # a new process's view: the database recovered (SQLite replays/discards its WAL)
    check = Store.from_url(_db(store)[0], schema=store.tables.schema)
    try:
        histories = _events(check)
        engine_cases = {k: v for k, v in histories.items() if k != pair_case}
        assert len(engine_cases) >= 3
        for case_id, history in engine_cases.items():
            assert [e.seq for e in history] == list(range(1, len(history) + 1))
            with check.transaction(readonly=True) as tx:
                assert project(history) == tx.require_case(case_id).data
        pairs = [e.type for e in histories[pair_case][2:]]
        assert pairs == ["pair-a", "pair-b"] * (len(pairs) // 2)  # never half a transaction
        # the transaction killed halfway left nothing (unless the kill came just after
        # its commit)
        assert len(pairs) // 2 in (int(note[0]), int(note[0]) + 1)
        with check.transaction(readonly=True) as tx:
            record = tx.require_case(pair_case)
            assert record.data == {"pairs": len(pairs) // 2}
            assert record.version == len(histories[pair_case])
            outbox = {m.event_id for m in tx.outbox_fetch(100_000)}
            timers = tx.timers(pair_case)
        assert outbox == {e.id for h in histories.values() for e in h}
        if pairs:
            assert [t.due_at for t in timers if t.fired_at is None] == [
                T0 + timedelta(days=1, minutes=len(pairs) // 2 - 1)
            ]
        with check.engine.connect() as conn:  # type: ignore[union-attr]
            conn.execute(sa.text("SELECT 1"))
    finally:
        check.dispose()
