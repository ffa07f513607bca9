"""The life-cycle replay over several processes (``gridflow replay --jobs N``).

Cases do not touch each other in the engine: routing reads the case itself (and, with
history conditions, the earlier cases that share the fields they compare), deadlines
the calendar, supervision fires the case's own timers (at their due time or, when armed
late, at the time of the command that armed them), and the replay admits a record by
comparing it with the previous record of the log only. So the records are split by a
stable hash of the case id — under history conditions, of the values they all compare
(:func:`history_key`), so that cases counting each other meet in one shard — over
shards, each replayed by a
:class:`~gridflow.replay.LifecycleReplay` on a store of its own; their counts are integer
sums. The first shard is replayed in this process (no interpreter to start, no records
to pickle), straight into the target store when it holds no case yet; the others by
worker processes into files of their own, copied in at the end, one transaction each
(:func:`gridflow.store.transfer.absorb`). The report and the stored cases, events and
timers are those of a one-process replay — ``tests/test_shards.py`` checks it — except
the event ids. A replay that fails half-way leaves what a one-process replay would: the
batches committed so far (here: the first shard's).

Workers are fresh interpreters (``python -m gridflow.shards``; nothing is inherited, each
loads the policy from its directory and checks its version) talking pickles over their
stdin/stdout; records go in chunks, their times packed as (local time, zone) pairs:
pickling an aware ``datetime`` costs a tzinfo reduction each.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import subprocess
import sys
import tempfile
import traceback
import zlib
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, tzinfo
from pathlib import Path
from typing import IO, Any

from gridflow.errors import GridflowRuntimeError
from gridflow.history import HISTORY_FIELDS
from gridflow.importer import LogRecord
from gridflow.loader import load_policy
from gridflow.policy import Policy
from gridflow.replay import CaseOutcome, LifecycleReplay, RunCounts, _Counted
from gridflow.schema import CaseIn
from gridflow.store import Store
from gridflow.store.transfer import absorb

__all__ = [
    "ReplayWorkerError",
    "ShardedLifecycleReplay",
    "history_key",
    "shard_of",
    "shardable",
    "tuned_gc",
]

_CASE_FIELDS = tuple(CaseIn.model_fields)
_CASE_TIMES = frozenset(n for n in _CASE_FIELDS if n.endswith("_at"))
_RECORD_FIELDS = tuple(n for n in LogRecord.__dataclass_fields__ if n not in ("row", "case"))
_RECORD_TIMES = frozenset(n for n in _RECORD_FIELDS if n.endswith("_at"))


class ReplayWorkerError(GridflowRuntimeError):
    """A worker of a sharded replay failed (its traceback is in the message) or died."""


def shard_of(case_id: str, jobs: int) -> int:
    """The worker of a case (stable across runs and Python processes)."""
    return zlib.crc32(case_id.encode("utf-8")) % jobs


class _Packer:
    """Records as plain tuples; times as (naive local time, index of its zone)."""

    def __init__(self) -> None:
        self.zones: dict[tzinfo | None, int] = {}

    def time(self, t: datetime | None) -> Any:
        if t is None:
            return None
        zone = self.zones.get(t.tzinfo)
        if zone is None:
            zone = self.zones[t.tzinfo] = len(self.zones)
        return (t.replace(tzinfo=None), zone)

    def record(self, rec: LogRecord) -> tuple[Any, ...]:
        case = rec.case.__dict__
        return (
            rec.row,
            tuple(self.time(case[n]) if n in _CASE_TIMES else case[n] for n in _CASE_FIELDS),
            tuple(rec.case.model_fields_set),
            tuple(self.time(getattr(rec, n)) if n in _RECORD_TIMES else getattr(rec, n)
                  for n in _RECORD_FIELDS),
        )

    def chunk(self, records: Sequence[LogRecord]) -> tuple[list[Any], list[tuple[Any, ...]]]:
        self.zones = {}
        packed = [self.record(r) for r in records]
        return list(self.zones), packed


def _unpack(zones: list[Any], packed: list[tuple[Any, ...]]) -> list[LogRecord]:
    def time(v: Any) -> datetime | None:
        return None if v is None else v[0].replace(tzinfo=zones[v[1]])

    out = []
    for row, case_values, fields_set, values in packed:
        given: dict[str, Any] = {
            n: time(v) if n in _CASE_TIMES else v
            for n, v in zip(_CASE_FIELDS, case_values, strict=True)
        }
        case = CaseIn.model_construct(set(fields_set), **given)
        rest: dict[str, Any] = {n: time(v) if n in _RECORD_TIMES else v
                                for n, v in zip(_RECORD_FIELDS, values, strict=True)}
        out.append(LogRecord(row, case, **rest))
    return out


@contextlib.contextmanager
def tuned_gc() -> Iterator[None]:
    """Garbage-collector settings for a process while it replays (a worker, the CLI):
    what is loaded so far is frozen out of the collections, and young objects are
    collected after 500,000 net allocations instead of 700. A batch of 20,000 commands
    keeps ~150,000 objects alive until its commit and makes almost no cyclic garbage
    (~0.1 object per case); below that size every young collection scanned the batch
    again (measured with gc.callbacks: ~10% of a replay at 700, ~4% at 20,000, 0.15% at
    500,000, peak memory unchanged). Above it, the collector runs only when memory
    really grows. The previous settings come back afterwards."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(500_000, 10, 10)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


#: bytes the pipe to a worker holds before the parent's write blocks (Linux: 64 KiB by
#: default). A worker's batch commit takes a while; meanwhile the parent, blocked on its
#: full pipe, starved the other workers (measured: 2 workers went from ×1.3 to ×1.9).
PIPE_BYTES = 1 << 20


def _widen(stream: IO[bytes], size: int = PIPE_BYTES) -> bool:
    """Ask for a ``size``-byte pipe buffer where the OS allows it (Linux); ``False``
    if it does not (the default size then applies)."""
    if sys.platform != "linux":
        return False
    import fcntl

    while size >= 1 << 16:
        try:
            fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, size)
            return True
        except OSError:  # above /proc/sys/fs/pipe-max-size for this user: try less
            size //= 2
    return False


class _Pipe:
    """Pickled messages over a pair of byte streams."""

    def __init__(self, reader: IO[bytes], writer: IO[bytes]):
        self._reader, self._writer = reader, writer

    def send(self, msg: tuple[Any, ...]) -> None:
        pickle.dump(msg, self._writer, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.flush()

    def recv(self) -> Any:
        return pickle.load(self._reader)


def _work(conn: _Pipe) -> None:
    """A worker: replay the records it is sent into its own store."""
    try:
        root, version, target, batch_size, outcomes = conn.recv()
        policy = load_policy(root, strict=False)
        if policy.version != version:
            raise RuntimeError(f"the policy in {root} changed during the replay (version "
                               f"{policy.version}, expected {version})")
        store = None
        if target is not None:
            url, options = target
            store = Store(url, case_cache=0, **options)
            store.create_all()
        seen: list[CaseOutcome] = []
        run = LifecycleReplay(policy, store, batch_size=batch_size,
                              on_outcome=seen.append if outcomes else None)
        with tuned_gc():
            _serve(conn, run, store, seen)
    except BaseException:  # the parent raises it, with the worker's traceback
        text = traceback.format_exc()
        try:
            conn.send(("error", text))
        except OSError:  # the parent is gone or its pipe broken: say it here at least
            sys.stderr.write(text)
            raise SystemExit(1) from None


def _serve(conn: _Pipe, run: LifecycleReplay, store: Store | None,
           seen: list[CaseOutcome]) -> None:
    while True:
        msg = conn.recv()
        if msg[0] == "records":
            for rec in _unpack(msg[1], msg[2]):
                run.feed(rec)
        elif msg[0] == "latest":
            conn.send(("latest", run.latest_time()))
        else:  # finish
            run.until = msg[1]
            run.finish()
            if store is not None:
                store.dispose()
            conn.send(("done", run.counts(), seen))
            return


def history_key(policy: Policy) -> tuple[str, ...]:
    """The case fields every history condition of ``policy`` compares (``same``), in
    ``HISTORY_FIELDS`` order; ``()`` without history conditions. Cases that count each
    other agree on these fields, so sharding by them keeps every count inside a shard.
    ``ValueError`` when the conditions share no field (no sharding keeps their counts)."""
    specs = policy.router.history_specs
    if not specs:
        return ()
    common = set(HISTORY_FIELDS)
    for spec in specs:
        common &= set(spec.same)
    if not common:
        sames = "; ".join("+".join(spec.same) for spec in specs)
        raise ValueError(
            f"the policy's history conditions compare no field in common ({sames}): a "
            "sharded replay cannot keep their counts inside a shard (use LifecycleReplay)"
        )
    return tuple(name for name in HISTORY_FIELDS if name in common)


def shardable(policy: Policy, store: Store | None) -> bool:
    """Whether a sharded replay of ``policy`` into ``store`` counts what a one-process
    replay counts: yes without history conditions; with them, when they compare a field
    in common (:func:`history_key`) and ``store`` holds no case yet."""
    if not policy.router.history_specs:
        return True
    try:
        history_key(policy)
    except ValueError:
        return False
    return store is None or _empty(store)


def _empty(store: Store) -> bool:
    """Whether ``store`` holds no case (a shard's timers and cases are then all its own
    there: ticking cannot fire another case's timer)."""
    with store.transaction(readonly=True) as tx:
        return next(iter(tx.iter_cases(batch=1)), None) is None


class ShardedLifecycleReplay(_Counted):
    """:class:`~gridflow.replay.LifecycleReplay` over ``jobs`` shards: one in this
    process, the others in worker processes (same interface: :meth:`feed`,
    :meth:`finish`, the counts and the report). Run it under :func:`tuned_gc`, as a
    one-process replay.

    ``store`` receives every case (it must not hold any of the log's case ids: the copy
    then fails with ``ConcurrencyConflict`` and copies nothing); ``None`` keeps nothing.
    When ``store`` holds no case, this process's shard is written into it directly; the
    other shards are copied in at :meth:`finish`. ``workdir``: where the shards'
    databases go meanwhile (default: the system's temporary directory).
    """

    def __init__(
        self,
        policy: Policy,
        store: Store | None = None,
        *,
        jobs: int = 2,
        until: datetime | None = None,
        batch_size: int = 20_000,
        on_outcome: Callable[[CaseOutcome], None] | None = None,
        workdir: str | Path | None = None,
        chunk: int = 256,
    ):
        if not isinstance(jobs, int) or jobs < 1:
            raise ValueError("jobs must be a positive integer")
        self._key_fields = history_key(policy)
        if self._key_fields and store is not None and not _empty(store):
            raise ValueError(
                "the policy has history conditions: replayed in shards, they would not count "
                "the cases the store already holds (replay into an empty store, or use "
                "LifecycleReplay)"
            )
        self._shard_of_id: dict[str, int] = {}  # history-keyed shards: where each id went
        self.policy = policy
        self.store = store
        self.until = until
        self.jobs = jobs
        self.on_outcome = on_outcome
        self.chunk = chunk
        self._counts_init(policy)
        self.finished = False
        self._buffers: list[list[LogRecord]] = [[] for _ in range(jobs)]
        self._packer = _Packer()
        self._tmp = (
            tempfile.TemporaryDirectory(prefix="gridflow-shards-", dir=workdir)
            if store is not None else None
        )
        # where each shard is written: the first one, replayed in this process, straight
        # into the target store when it holds no case yet (nothing to copy afterwards);
        # the others, and the first one otherwise, into files of their own that finish()
        # copies in
        self._paths = [
            str(Path(self._tmp.name) / f"shard{i}.db") if self._tmp is not None else None
            for i in range(jobs)
        ]
        local_store = store
        if store is not None and not _empty(store):
            local_store = Store(f"sqlite:///{self._paths[0]}", outbox=False, case_cache=0)
            local_store.create_all()
        else:
            self._paths[0] = None
        self._local_store = local_store if local_store is not store else None
        self._local_seen: list[CaseOutcome] = []
        self._local = LifecycleReplay(
            policy, local_store, until=until, batch_size=batch_size,
            on_outcome=self._local_seen.append if on_outcome is not None else None,
        )
        self._conns: list[_Pipe] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        # A fresh interpreter per other shard (not multiprocessing's spawn, which re-runs
        # the host's __main__ module), importing gridflow from where this process does.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            for path in self._paths[1:]:
                target = (f"sqlite:///{path}", {"outbox": False}) if path is not None else None
                proc = subprocess.Popen(
                    [sys.executable, "-m", "gridflow.shards"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, env=env,
                )
                assert proc.stdin is not None and proc.stdout is not None
                _widen(proc.stdin)
                self._procs.append(proc)
                conn = _Pipe(proc.stdout, proc.stdin)
                self._conns.append(conn)
                conn.send((str(policy.root), policy.version, target, batch_size,
                           on_outcome is not None))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ShardedLifecycleReplay:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.finish()
        self.close()

    def close(self) -> None:
        """Stop the workers (if still running), drop what this process's shard has not
        committed if it did not finish, and remove the shards' databases."""
        for proc in self._procs:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._conns, self._procs = [], []
        self._local.abandon()
        if self._local_store is not None:
            self._local_store.dispose()
            self._local_store = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def feed(self, record: LogRecord) -> None:
        """Admit one record (as :meth:`LifecycleReplay.feed`)."""
        if self.finished:
            raise RuntimeError("the replay is finished")
        if self._in_order(record) is None:
            return
        shard = self._shard(record)
        if shard == 0:
            self._local.feed(record)
            return
        buffer = self._buffers[shard]
        buffer.append(record)
        if len(buffer) >= self.chunk:
            self._send_records(shard)

    def _shard(self, record: LogRecord) -> int:
        """By case id; under history conditions by the values they compare (a case with
        one missing has no history: by case id), and a case id seen before where it went
        (a duplicate is refused where the first one is replayed, as in one process)."""
        case_id = record.case_id
        fields = self._key_fields
        if not fields:
            return shard_of(case_id, self.jobs)
        shard = self._shard_of_id.get(case_id)
        if shard is None:
            values = [getattr(record.case, name) for name in fields]
            key = ("\x1f".join(values) if all(isinstance(v, str) and v.strip() for v in values)
                   else case_id)
            shard = self._shard_of_id[case_id] = shard_of(key, self.jobs)
        return shard

    def _send_records(self, shard: int) -> None:
        buffer = self._buffers[shard]
        if buffer:
            zones, packed = self._packer.chunk(buffer)
            self._send(shard, ("records", zones, packed))
            buffer.clear()

    def _send(self, shard: int, msg: tuple[Any, ...]) -> None:
        try:
            self._conns[shard - 1].send(msg)
        except OSError:  # the worker is gone: its last words say why
            self._receive(shard, "")

    def _receive(self, shard: int, kind: str) -> tuple[Any, ...]:
        try:
            msg: tuple[Any, ...] = self._conns[shard - 1].recv()
        except (EOFError, OSError, pickle.UnpicklingError):
            self.close()
            raise ReplayWorkerError(f"replay worker {shard} stopped unexpectedly") from None
        if msg[0] == "error":
            self.close()
            raise ReplayWorkerError(f"replay worker {shard} failed:\n{msg[1]}")
        if msg[0] != kind:
            self.close()
            raise ReplayWorkerError(f"replay worker {shard}: unexpected message {msg[0]!r}")
        return msg

    def finish(self) -> None:
        """Run every shard to the end, add their counts up and copy their stores."""
        if self.finished:
            return
        workers = range(1, self.jobs)
        for shard in workers:
            self._send_records(shard)
            self._send(shard, ("latest",))
        latest = [t for s in workers if (t := self._receive(s, "latest")[1])]
        if (t := self._local.latest_time()) is not None:
            latest.append(t)
        until = self.until or (max(latest) if latest else None)
        for shard in workers:
            self._send(shard, ("finish", until))
        self._local.until = until
        self._local.finish()  # meanwhile the workers finish theirs
        self.add_counts(self._local.counts())
        outcomes = self._local_seen
        for shard in workers:
            _, counts, seen = self._receive(shard, "done")
            assert isinstance(counts, RunCounts)
            self.add_counts(counts)
            outcomes += seen
        self.until = until
        if self._local_store is not None:
            self._local_store.dispose()
            self._local_store = None
        if self.store is not None:
            for path in self._paths:
                if path is None:
                    continue  # that shard was written into the target itself
                shard_store = Store(f"sqlite:///{path}", outbox=False, case_cache=0)
                try:
                    absorb(self.store, shard_store)
                finally:
                    shard_store.dispose()
        self.finished = True
        self.close()
        if self.on_outcome is not None:
            for outcome in sorted(outcomes, key=lambda o: o.row):
                self.on_outcome(outcome)


def _main() -> None:
    """A worker's entry point: the parent's pipe keeps the original stdout; anything else
    printed in this process (a library's print, C code writing to fd 1) goes to stderr
    instead of into the pickle stream."""
    pipe_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _work(_Pipe(sys.stdin.buffer, pipe_out))


if __name__ == "__main__":  # a worker: python -m gridflow.shards
    _main()
