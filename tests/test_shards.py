"""Sharded life-cycle replay: N worker processes give the one-process report and store;
records survive the trip to the workers; stores are gathered whole or not at all."""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from gridflow import load_policy
from gridflow.errors import ConcurrencyConflict
from gridflow.generate import Settings, write_log
from gridflow.importer import LogReader, LogRecord
from gridflow.replay import CaseOutcome, LifecycleReplay, RouteMemo, replay, to_json
from gridflow.shards import (
    PIPE_BYTES,
    ReplayWorkerError,
    ShardedLifecycleReplay,
    _Packer,
    _unpack,
    _widen,
    shard_of,
    tuned_gc,
)
from gridflow.store import Store
from gridflow.store.transfer import absorb
from gridflow.strategies import log_records

ROOT = Path(__file__).resolve().parent.parent
WUJIN_DIR = ROOT / "examples" / "wujin"
WUJIN = load_policy(WUJIN_DIR)


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[LogRecord]:
    """A generated month (returns, rework, extensions, deferrals) plus bad records: one
    without a report time, one out of order, one reusing an open case's id."""
    path = tmp_path_factory.mktemp("log") / "log.csv"
    write_log(path, WUJIN, 500, seed=7, settings=Settings(days=20),
              route=RouteMemo(WUJIN).route)
    recs = list(LogReader(path, policy=WUJIN))
    first, mid = recs[0], recs[len(recs) // 2]
    late = dataclasses.replace(first, row=10_001, case=first.case.model_copy(
        update={"id": "LATE-1"}))
    no_time = dataclasses.replace(first, row=10_002, case=first.case.model_copy(
        update={"id": "NO-TIME", "reported_at": None}))
    again = dataclasses.replace(mid, row=10_003)  # same id, still open then
    k = len(recs) // 2 + 1
    return [*recs[:k], again, late, no_time, *recs[k:]]


def _stored(store: Store) -> dict[str, Any]:
    with store.transaction(readonly=True) as tx:
        cases = list(tx.iter_cases())
        return {
            c.case_id: (
                c.version, c.state, c.data, c.due_at, c.lead_department, c.tier,
                [(e.seq, e.type, e.actor_id, e.actor_role, e.at, e.reason, e.payload,
                  e.policy_version) for e in tx.history(c.case_id)],
                sorted((t.kind, t.due_at, t.fired_at) for t in tx.timers(c.case_id)),
            )
            for c in cases
        }


def _file_store(path: Path) -> Store:
    store = Store(f"sqlite:///{path}", outbox=False)
    store.create_all()
    return store


def test_sharded_replay_gives_the_one_process_report_and_store(
    records: list[LogRecord], tmp_path: Path
) -> None:
    one_store, many_store = _file_store(tmp_path / "one.db"), _file_store(tmp_path / "many.db")
    one_seen: list[CaseOutcome] = []
    many_seen: list[CaseOutcome] = []
    one = LifecycleReplay(WUJIN, one_store, batch_size=300, on_outcome=one_seen.append)
    many = ShardedLifecycleReplay(WUJIN, many_store, jobs=3, batch_size=300,
                                  on_outcome=many_seen.append, chunk=17)
    doc = _replay_both(one, many, records)
    assert doc["errors"] >= 3 and doc["errors_by_step"]["admit"] >= 2  # the bad records
    assert {e["case_id"] for e in doc["error_list"]} >= {"LATE-1", "NO-TIME"}
    assert to_json(many.to_dict()) == to_json(doc)
    stored = _stored(one_store)
    assert len(stored) == one.cases
    assert any(len(v[7]) for v in stored.values())  # timers were stored
    assert _stored(many_store) == stored
    assert sorted(many_seen, key=lambda o: o.row) == sorted(one_seen, key=lambda o: o.row)
    one_store.dispose()
    many_store.dispose()


def test_replay_with_jobs_writes_the_same_json(
    records: list[LogRecord], tmp_path: Path
) -> None:
    root = tmp_path / "wujin"
    shutil.copytree(WUJIN_DIR, root)
    cats = root / "categories.yaml"
    old = "{code: E01-10, name: 暴露垃圾, name_en: exposed garbage, time_limit: 4wh}"
    cats.write_text(cats.read_text("utf-8").replace(old, old.replace("4wh", "1wh")), "utf-8")
    other = load_policy(root)
    docs = [replay(WUJIN, records, mode="lifecycle", compare=other, jobs=jobs)
            for jobs in (1, 2)]
    assert docs[0]["compare"]["lifecycle"]["changed"].get("due_at", 0) > 0
    assert to_json(docs[0]) == to_json(docs[1])


def test_a_worker_that_fails_stops_the_replay_with_its_error(
    records: list[LogRecord]
) -> None:
    moved = dataclasses.replace(WUJIN, version="not-this-version")
    run = ShardedLifecycleReplay(moved, None, jobs=2)
    with pytest.raises(ReplayWorkerError, match="changed during the replay"):
        for rec in records:
            run.feed(rec)
        run.finish()
    run.close()


def test_jobs_must_be_positive() -> None:
    with pytest.raises(ValueError, match="jobs"):
        ShardedLifecycleReplay(WUJIN, None, jobs=0)
    with pytest.raises(ValueError, match="jobs"):
        replay(WUJIN, [], mode="lifecycle", jobs=0)


def test_shards_are_stable_and_spread() -> None:
    ids = [f"G{i:07d}" for i in range(3000)]
    shards = [shard_of(i, 4) for i in ids]
    assert shards == [shard_of(i, 4) for i in ids]
    counts = [shards.count(k) for k in range(4)]
    assert min(counts) > 600, counts


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recs=log_records(WUJIN, max_size=8))
def test_records_survive_the_trip_to_a_worker(recs: list[LogRecord]) -> None:
    zones, packed = _Packer().chunk(recs)
    back = _unpack(zones, packed)
    assert back == recs
    for a, b in zip(back, recs, strict=True):
        assert a.case.model_fields_set == b.case.model_fields_set
        assert a.case.reported_at is not None and b.case.reported_at is not None
        assert a.case.reported_at.utcoffset() == b.case.reported_at.utcoffset()


# --------------------------------------------------------------------------- absorb


def _shard_store(tmp_path: Path, records: list[LogRecord], n: int) -> Store:
    source = _file_store(tmp_path / "shard.db")
    run = LifecycleReplay(WUJIN, source)
    for rec in records[:n]:
        run.feed(rec)
    run.finish()
    return source


def test_absorb_copies_every_case_whole(
    store: Store, records: list[LogRecord], tmp_path: Path
) -> None:
    source = _shard_store(tmp_path, records, 60)
    want = _stored(source)
    assert absorb(store, source) == len(want) > 0
    assert _stored(store) == want
    with store.transaction(readonly=True) as tx:
        cid = next(iter(want))
        assert [e.seq for e in tx.history(cid)] == list(range(1, want[cid][0] + 1))
    source.dispose()


def test_absorb_copies_nothing_when_a_case_is_already_there(
    store: Store, records: list[LogRecord], tmp_path: Path
) -> None:
    source = _shard_store(tmp_path, records, 30)
    absorb(store, source)
    before = _stored(store)
    with pytest.raises(ConcurrencyConflict):
        absorb(store, source)
    assert _stored(store) == before
    source.dispose()


def test_tuned_gc_restores_the_collector_settings() -> None:
    before = gc.get_threshold()
    with tuned_gc():
        assert gc.get_threshold() != before
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_tuned_gc_does_not_rescan_a_replay_batch(records: list[LogRecord]) -> None:
    """What the thresholds are for: the objects a batch keeps alive until its commit are
    not scanned by young collections over and over (the default thresholds ran dozens)."""
    young: list[int] = []
    replaying = [False]

    def count(phase: str, info: dict[str, int]) -> None:
        if replaying[0] and phase == "start" and info["generation"] < 2:
            young.append(info["generation"])

    def replay_all() -> int:
        young.clear()
        replaying[0] = True
        run = LifecycleReplay(WUJIN, batch_size=5_000)
        for rec in records:
            run.feed(rec)
        run.finish()
        replaying[0] = False
        run.store.dispose()
        return len(young)

    gc.callbacks.append(count)
    try:
        untuned = replay_all()
        with tuned_gc():
            tuned = replay_all()
    finally:
        gc.callbacks.remove(count)
    assert untuned > 20 and tuned == 0


@pytest.mark.skipif(sys.platform != "linux", reason="pipe sizes are set on Linux only")
def test_the_pipe_to_a_worker_is_widened() -> None:
    import fcntl

    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "rb") as reader, os.fdopen(write_fd, "wb") as writer:
        default = fcntl.fcntl(writer.fileno(), fcntl.F_GETPIPE_SZ)
        assert _widen(writer)
        size = fcntl.fcntl(writer.fileno(), fcntl.F_GETPIPE_SZ)
        assert default < size <= PIPE_BYTES
        assert reader.fileno() >= 0


def _replay_both(one: LifecycleReplay, many: ShardedLifecycleReplay,
                 records: list[LogRecord]) -> dict[str, Any]:
    """Feed the same records to both replays; their reports must be the same (returned)."""
    for rec in records:
        one.feed(rec)
        many.feed(rec)
    one.finish()
    many.finish()
    doc = one.to_dict()
    assert to_json(many.to_dict()) == to_json(doc)
    return doc


def _with_other_case(store: Store) -> None:
    """A case that is not in the log (so the store is not empty)."""
    from datetime import datetime

    from gridflow import Actor, Engine
    from gridflow.clock import ManualClock

    clock = ManualClock(datetime.fromisoformat("2026-01-05T09:00:00+08:00"))
    engine = Engine(WUJIN, store, clock)
    engine.report({"id": "OTHER-1", "category": "E01-10", "location": "yunhe-g5",
                   "description": "暴露垃圾", "channel": "patrol"},
                  Actor("gw-1", "grid_worker", unit="yunhe-g5"))


@pytest.mark.parametrize("other_case", [False, True], ids=["empty", "holding-a-case"])
def test_sharded_replay_into_a_store_with_or_without_cases(
    records: list[LogRecord], tmp_path: Path, other_case: bool, wujin_without_history: Path
) -> None:
    """An empty store gets this process's shard written directly; one holding cases gets
    every shard copied in (a policy without history conditions: with them, a store
    holding cases is refused). Either way: what one process stores."""
    policy = load_policy(wujin_without_history)
    one_store, many_store = _file_store(tmp_path / "one.db"), _file_store(tmp_path / "many.db")
    if other_case:
        _with_other_case(one_store)
        _with_other_case(many_store)
    one = LifecycleReplay(policy, one_store)
    many = ShardedLifecycleReplay(policy, many_store, jobs=2)
    assert (many._paths[0] is None) is not other_case  # this process's shard writes directly
    _replay_both(one, many, records[:200])
    stored = _stored(one_store)
    assert ("OTHER-1" in stored) is other_case
    assert _stored(many_store) == stored
    one_store.dispose()
    many_store.dispose()


def test_sharded_replay_into_a_memory_store(records: list[LogRecord]) -> None:
    """A store no worker can open (in-memory SQLite) gets this process's shard directly
    and the workers' copied in: what one process stores."""
    one_store, many_store = Store(outbox=False), Store(outbox=False)
    one_store.create_all()
    many_store.create_all()
    one = LifecycleReplay(WUJIN, one_store)
    many = ShardedLifecycleReplay(WUJIN, many_store, jobs=2)
    assert many._paths[0] is None and many._paths[1] is not None
    _replay_both(one, many, records[:150])
    assert _stored(many_store) == _stored(one_store)


def test_a_replay_closed_before_it_finishes_keeps_only_committed_batches(
    records: list[LogRecord], tmp_path: Path
) -> None:
    """Closing a sharded replay half-way stops the workers and rolls back the batch this
    process has not committed: the store holds whole batches (here: none), never part of
    one."""
    store = _file_store(tmp_path / "t.db")
    many = ShardedLifecycleReplay(WUJIN, store, jobs=2, batch_size=10_000)
    for rec in records[:200]:
        many.feed(rec)
    assert many._local.cases > 0
    many.close()
    assert _stored(store) == {}
    assert many._procs == [] and many._tmp is None
    store.dispose()


def test_sharded_replay_into_a_database_server(
    server_store: Store, records: list[LogRecord]
) -> None:
    """This process's shard writes into the server store (its prefix and schema); the
    worker's shard is copied in through SQLAlchemy."""
    assert server_store.engine is not None
    one_store = Store(server_store.engine, table_prefix="one_",
                      schema=server_store.tables.schema, outbox=False)
    one_store.create_all()
    try:
        one = LifecycleReplay(WUJIN, one_store)
        many = ShardedLifecycleReplay(WUJIN, server_store, jobs=2)
        assert many._paths[0] is None and many._paths[1] is not None
        _replay_both(one, many, records[:120])
        stored = _stored(one_store)
        assert len(stored) > 100
        assert _stored(server_store) == stored
    finally:
        one_store.metadata.drop_all(server_store.engine)


def test_a_worker_keeps_stray_output_out_of_its_pipe() -> None:
    """Whatever else a worker prints (Python or C code on fd 1) goes to stderr; the pipe
    to the parent carries only the pickles."""
    import pickle
    import subprocess
    import sys

    code = (
        "import os\n"
        "from gridflow import shards\n"
        "def work(pipe):\n"
        "    print('noise from print')\n"
        "    os.write(1, b'noise on fd 1\\n')\n"
        "    pipe.send(('ok', 42))\n"
        "shards._work = work\n"
        "shards._main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                          check=True)
    assert done.stdout == pickle.dumps(("ok", 42), protocol=pickle.HIGHEST_PROTOCOL)
    assert b"noise from print" in done.stderr and b"noise on fd 1" in done.stderr
