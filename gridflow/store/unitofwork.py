"""A unit of work: the engine's batch mode for replays and bulk loads.

Outside a batch every engine command is one store transaction. Inside
``with engine.batch() as uow:`` commands work on an in-memory working set instead:

* a case is read from the store once and then kept in memory;
* each command's events, new projection and timers are buffered;
* supervision timers of the cases in the working set are kept — and claimed by ``tick``
  — in memory; timers of other cases are claimed in the database as usual;
* :meth:`UnitOfWork.flush` writes what is buffered into ONE open store transaction, in
  bulk (:meth:`StoreTx.write_many`: one multi-row insert of the new cases, one update
  statement per set of changed columns, one insert of all the events — a store with an
  outbox writes case by case, as its rows need the event ids), and
  :meth:`UnitOfWork.commit` (every ``size`` commands, and at the end of the batch)
  commits it and empties the working set.

Reads the working set cannot answer (``history``, worklist queries) flush first and then
ask the store, inside the same transaction, so they see every earlier command. The
events, projections and timers stored are those the engine stores command by command
(``tests/test_replay.py`` checks it); what differs is only the grouping into
transactions, hence the row ids, and that a failing *flush* or commit (a conflict with
another writer, a value the database refuses) rolls back everything since the last commit
and raises — :class:`BatchAborted` when a command's own transaction was what flushed.
A new case's id is looked up in the store, unless the store held no case when the batch
first inserted one: the batch then knows every case there (its own), and a case of the
same id that another writer stores meanwhile makes the flush fail, not the command.

A command that fails inside a batch changes nothing, as outside one: the engine buffers
a command's writes only after all of its checks passed, and a block that fails after
buffering is undone from a journal. Claiming timers *in the database* cannot be undone in
memory: a block that fails after such a claim rolls back the whole uncommitted batch and
raises :class:`BatchAborted`.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast, overload

import sqlalchemy as sa

from gridflow.errors import (
    CaseNotFound,
    ConcurrencyConflict,
    FieldError,
    GridflowError,
    GridflowRuntimeError,
)
from gridflow.history import History
from gridflow.store.core import (
    IdempotencyConflict,
    Store,
    StoreTx,
    _check_time,
    _raise_invalid,
)
from gridflow.store.records import CaseRecord, EventRecord, NewEvent, TimerRecord
from gridflow.store.statements import intake_values

__all__ = ["BatchAborted", "UnitOfWork"]

Pair = tuple[str, datetime]  # (kind, due_at in UTC)


class BatchAborted(GridflowRuntimeError):
    """A batch could not be kept consistent and was rolled back to its last commit."""


@dataclass
class _Entry:
    record: CaseRecord  # the latest projection (what the store will hold)
    base_version: int  # the version the store holds now (0: not stored yet)
    new: bool  # not in the store yet: insert, not update
    events: list[NewEvent] = field(default_factory=list)
    # Timers, once owned (the store's unfired rows of the case were taken into memory):
    owned: bool = False
    unfired: dict[Pair, None] = field(default_factory=dict)
    fired: dict[Pair, tuple[datetime, bool]] = field(default_factory=dict)  # → (at, stored)


class _Saved(NamedTuple):  # a tuple: one is made per case and command
    record: CaseRecord
    n_events: int
    owned: bool
    unfired: dict[Pair, None]
    fired: dict[Pair, tuple[datetime, bool]]


_UNKNOWN: Any = object()


def _copy(record: CaseRecord) -> CaseRecord:
    """A shallow copy (what ``copy.copy`` makes, without its reduce protocol)."""
    twin = object.__new__(CaseRecord)
    twin.__dict__.update(record.__dict__)
    return twin


def _aborted(exc: Exception) -> BatchAborted:
    return BatchAborted(
        f"writing the batch failed ({type(exc).__name__}: {exc}); the batch was rolled "
        "back to its last commit"
    )


class _Block:
    """The context manager of one engine transaction inside a batch (re-entrant)."""

    __slots__ = ("_outer", "_uow")

    def __init__(self, uow: UnitOfWork):
        self._uow = uow
        self._outer: list[bool] = []

    def __enter__(self) -> UnitOfWork:
        self._outer.append(self._uow._begin())
        return self._uow

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        outer = self._outer.pop()
        if not outer:
            return
        if exc_type is not None:
            self._uow._fail()  # may raise BatchAborted instead of the original error
        else:
            self._uow._done()


class UnitOfWork:
    """Buffers an engine's writes (see the module docstring). Obtain it from
    :meth:`gridflow.Engine.batch`; it implements the part of :class:`StoreTx` the engine
    uses, so engine code runs unchanged inside a batch."""

    def __init__(self, store: Store, *, size: int = 20_000):
        if size < 1:
            raise ValueError("size must be at least 1")
        self.store = store
        self.size = size
        self._cm: AbstractContextManager[StoreTx] | None = None
        self._tx: StoreTx | None = None
        self._entries: dict[str, _Entry] = {}
        self._dirty: dict[str, _Entry] = {}  # entries with buffered writes, in write order
        self._pending: History | None = None  # the new cases in _dirty, by history fields
        self._keys: dict[str, str] = {}  # idempotency key → case id, for buffered new cases
        self._journal: dict[str, _Saved | None] | None = None  # open block: case → before
        self._claimed = False  # the open block claimed timers in the database
        self._commands = 0  # buffered writes since the last commit
        self._block_events: list[tuple[str, Sequence[NewEvent]]] = []
        self._heap: list[tuple[datetime, int, str, str]] = []  # owned unfired timers
        # timers used up (use_timer) that are still unfired rows of the database
        self._used: list[tuple[str, str, datetime, datetime]] = []
        self._seq = 0
        self._db_next_due: Any = _UNKNOWN  # earliest unfired timer in the database
        self._block = _Block(self)
        self._empty: bool | None = None  # the store held no case at the first insert
        self._ours: set[str] = set()  # the cases inserted since (when it held none)
        self.flushes = 0
        self.commits = 0
        #: called with (case id, events) after each successful engine transaction, for
        #: every case it appended events to (in order) — replays fold facts from it
        self.listener: Callable[[str, Sequence[NewEvent]], None] | None = None

    # -- transactions ---------------------------------------------------------------------

    def _db(self) -> StoreTx:
        if self._tx is None:
            cm = self.store.transaction()
            self._tx = cm.__enter__()
            self._cm = cm
        return self._tx

    def transaction(self, *, readonly: bool = False) -> _Block:
        """One engine transaction inside the batch: undone from the journal if it fails."""
        return self._block

    def _begin(self) -> bool:
        if self._journal is not None:  # nested: part of the enclosing block
            return False
        self._journal = {}
        self._claimed = False
        self._block_events = []
        return True

    def _fail(self) -> None:
        self._block_events = []
        journal, self._journal = self._journal, None
        if self._claimed:
            self.rollback()
            raise BatchAborted(
                "a command failed after claiming timers inside a batch; the batch was "
                "rolled back to its last commit"
            ) from None
        if journal is not None:
            self._undo(journal)
            self._pending = None

    def _done(self) -> None:
        self._journal = None
        listener, done, self._block_events = self.listener, self._block_events, []
        if listener is not None:
            for case_id, events in done:
                listener(case_id, events)
        if self._commands >= self.size:
            try:
                self.commit()
            except BatchAborted:
                raise
            except GridflowError as exc:  # the command's writes were lost with the batch
                raise _aborted(exc) from exc

    def _undo(self, journal: dict[str, _Saved | None]) -> None:
        for case_id, saved in journal.items():
            if saved is None:
                self._ours.discard(case_id)
                self._dirty.pop(case_id, None)
                entry = self._entries.pop(case_id, None)
                if entry is not None and entry.record.idempotency_key is not None:
                    self._keys.pop(entry.record.idempotency_key, None)
                continue
            entry = self._entries[case_id]
            entry.record = saved.record
            del entry.events[saved.n_events:]
            entry.owned, entry.unfired, entry.fired = saved.owned, saved.unfired, saved.fired
            for kind_due in entry.unfired:  # claims undone: the heap must offer them again
                self._push(case_id, kind_due)

    def _touch(self, case_id: str) -> None:
        journal = self._journal
        if journal is None or case_id in journal:
            return
        entry = self._entries.get(case_id)
        # the timer dicts are replaced, never changed in place: no copies needed
        journal[case_id] = None if entry is None else _Saved(
            entry.record, len(entry.events), entry.owned, entry.unfired, entry.fired
        )

    def flush(self) -> None:
        """Write everything buffered into the open store transaction (not committed): the
        cases in bulk (:meth:`StoreTx.write_many`), then the timers of the owned ones.

        If writing fails, everything since the last commit is rolled back (the working set
        is emptied) and the error is raised. Inside an engine transaction a gridflow error
        (a conflict, a value the store refuses) is raised as :class:`BatchAborted`, chained
        to it: the command must not seem to have failed alone."""
        dirty, self._dirty = self._dirty, {}
        if not dirty and not self._used:
            return
        self._pending = None
        try:
            self._write(dirty)
        except BaseException as exc:
            inside = self._journal is not None
            self.rollback()
            if inside and isinstance(exc, GridflowError):
                raise _aborted(exc) from exc
            raise
        self.flushes += 1

    def _write(self, dirty: dict[str, _Entry]) -> None:
        tx = self._db()
        inserts: list[tuple[CaseRecord, Sequence[NewEvent]]] = []
        appends: list[tuple[CaseRecord, int, Sequence[NewEvent]]] = []
        written: list[tuple[_Entry, CaseRecord]] = []
        timer_rows: list[dict[str, Any]] = []
        for case_id, entry in dirty.items():
            if entry.events:
                record = _copy(entry.record)  # the store sets version/updated_at on it
                if entry.new:
                    inserts.append((record, entry.events))
                else:
                    appends.append((record, entry.base_version, entry.events))
                written.append((entry, record))
            if entry.owned:
                timer_rows += [
                    {"case_id": case_id, "kind": kind, "due_at": due, "fired_at": None}
                    for kind, due in entry.unfired
                ]
                timer_rows += [
                    {"case_id": case_id, "kind": kind, "due_at": due, "fired_at": at}
                    for (kind, due), (at, stored) in entry.fired.items() if not stored
                ]
        tx.write_many(inserts, appends)
        self._write_used()
        for entry, record in written:
            entry.record = record
            entry.base_version = record.version
            entry.new = False
            entry.events = []
        if timer_rows:  # after the case rows they belong to
            tx.write_timer_rows(timer_rows)
            self._db_next_due = _UNKNOWN
        for entry in dirty.values():
            if entry.owned:
                entry.owned = False  # the store holds them again
                entry.unfired, entry.fired = {}, {}
        self._heap = []  # owned timers were all written out
        self._keys.clear()

    def commit(self) -> None:
        """Flush and commit; the working set is emptied (cases are read again if needed).
        A failing commit leaves nothing of the batch since the last commit either."""
        self.flush()
        cm, self._cm, self._tx = self._cm, None, None
        try:
            if cm is not None:
                cm.__exit__(None, None, None)
                self.commits += 1
        finally:
            self._reset()

    def _reset(self) -> None:
        self._pending = None
        self._entries.clear()
        self._dirty.clear()
        self._keys.clear()
        self._heap = []
        self._used = []
        self._commands = 0
        self._db_next_due = _UNKNOWN

    def rollback(self) -> None:
        """Drop everything since the last commit."""
        cm, self._cm, self._tx = self._cm, None, None
        self._reset()
        self._empty = None  # what the store holds is asked again
        self._ours.clear()
        # an engine transaction still open has nothing left to undo
        self._journal, self._claimed, self._block_events = None, False, []
        if cm is not None:
            err = BatchAborted("batch rolled back")
            with suppress(BatchAborted):
                cm.__exit__(BatchAborted, err, None)

    # -- the StoreTx surface the engine uses ----------------------------------------------

    def get_case(self, case_id: str, *, for_update: bool = False) -> CaseRecord | None:
        entry = self._entries.get(case_id)
        if entry is not None:
            return entry.record
        record = self._db().get_case(case_id, for_update=for_update)
        if record is not None:
            self._entries[case_id] = _Entry(record, record.version, False)
        return record

    def require_case(self, case_id: str, *, for_update: bool = False) -> CaseRecord:
        record = self.get_case(case_id, for_update=for_update)
        if record is None:
            raise CaseNotFound(case_id)
        return record

    def case_by_idempotency_key(self, key: str) -> CaseRecord | None:
        case_id = self._keys.get(key)
        if case_id is not None:
            return self._entries[case_id].record
        record = self._db().case_by_idempotency_key(key)
        if record is None:
            return None
        entry = self._entries.get(record.case_id)
        return entry.record if entry is not None else record

    def insert_case(self, record: CaseRecord, events: Sequence[NewEvent]) -> list[EventRecord]:
        if record.version != len(events) or not events:
            raise GridflowRuntimeError("insert_case: version must equal the number of events")
        key = record.idempotency_key
        if key is not None:
            owner = self.case_by_idempotency_key(key)
            if owner is not None and owner.case_id != record.case_id:
                raise IdempotencyConflict(
                    key, owner.case_id, attempted_case_id=record.case_id,
                    existing_version=owner.version,
                )
        entry = self._entries.get(record.case_id)
        existing = entry.record if entry is not None else (
            self.get_case(record.case_id) if self._may_exist(record.case_id) else None
        )
        if existing is not None:
            raise ConcurrencyConflict(record.case_id, 0, existing.version)
        self._touch(record.case_id)
        if self._empty:
            self._ours.add(record.case_id)
        record.updated_at = events[-1].at.astimezone(UTC)
        # a new case has no timers in the store: its (empty) timers are owned from the start
        entry = self._entries[record.case_id] = _Entry(record, 0, True, list(events), owned=True)
        self._dirty[record.case_id] = entry
        if key is not None:
            self._keys[key] = record.case_id
        self._commands += 1
        self._block_events.append((record.case_id, events))
        self._remember_new(record)
        return self._records(record.case_id, 0, events)

    def _may_exist(self, case_id: str) -> bool:
        """Whether the store may hold ``case_id`` (if not, a new case needs no lookup): a
        store that held no case when the batch first inserted one holds only the cases
        the batch wrote since — but for another writer's, which the flush finds."""
        if self._empty is None:
            self._empty = next(iter(self._db().iter_cases(batch=1)), None) is None
        return not self._empty or case_id in self._ours

    def append(
        self, record: CaseRecord, expected_version: int, events: Sequence[NewEvent]
    ) -> list[EventRecord]:
        entry = self._entries.get(record.case_id)
        if entry is None:
            stored = self.get_case(record.case_id)
            if stored is None:
                raise CaseNotFound(record.case_id)
            entry = self._entries[record.case_id]
        if entry.record.version != expected_version:
            raise ConcurrencyConflict(record.case_id, expected_version, entry.record.version)
        self._touch(record.case_id)
        record.version = expected_version + len(events)
        record.updated_at = events[-1].at.astimezone(UTC)
        entry.record = record
        entry.events.extend(events)
        self._dirty[record.case_id] = entry
        self._commands += 1
        self._block_events.append((record.case_id, events))
        return self._records(record.case_id, expected_version, events)

    def _write_used(self) -> bool:
        """Write the timers :meth:`use_timer` marked in the database; whether there were
        any (the earliest unfired one is then asked again)."""
        used, self._used = self._used, []
        if not used:
            return False
        self._db().use_timer_rows(used)
        self._db_next_due = _UNKNOWN
        return True

    def _own(self, case_id: str, entry: _Entry) -> None:
        """Take the case's timers into memory: its unfired rows leave the database (they
        are written back at the flush), its fired ones are remembered."""
        self._write_used()
        tx = self._db()
        unfired: dict[Pair, None] = {}
        fired: dict[Pair, tuple[datetime, bool]] = {}
        for t in tx.timers(case_id):
            pair = (t.kind, t.due_at.astimezone(UTC))
            if t.fired_at is None:
                unfired[pair] = None
            else:
                fired[pair] = (t.fired_at, True)
        if unfired:
            tm = self.store.tables.timers
            tx.connection.execute(
                sa.delete(tm).where(tm.c.case_id == case_id, tm.c.fired_at.is_(None))
            )
        entry.owned, entry.unfired, entry.fired = True, unfired, fired
        for pair in unfired:
            self._push(case_id, pair)
        journal = self._journal
        saved = journal.get(case_id) if journal is not None else None
        if journal is not None and saved is not None:  # the block's "before" is owned too
            journal[case_id] = _Saved(saved.record, saved.n_events, True, unfired, fired)
        self._dirty[case_id] = entry

    def _push(self, case_id: str, pair: Pair) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (pair[1], self._seq, case_id, pair[0]))

    def set_timers(self, case_id: str, timers: Sequence[tuple[str, datetime]]) -> None:
        """As :meth:`StoreTx.set_timers`: ``timers`` become the case's unfired timers, except
        pairs that already fired."""
        entry = self._entries.get(case_id)
        if entry is None:
            self.require_case(case_id)
            entry = self._entries[case_id]
        if not entry.owned:
            self._own(case_id, entry)
        self._touch(case_id)
        errors: list[FieldError] = []
        for i, (_kind, due) in enumerate(timers):
            _check_time(errors, f"timers[{i}].due_at", due, required=True)
        _raise_invalid(errors)  # (as the store outside a batch)
        wanted: dict[Pair, None] = {}
        for kind, due in timers:
            pair = (kind, due.astimezone(UTC))
            if pair not in entry.fired:
                wanted[pair] = None
        for pair in wanted:
            if pair not in entry.unfired:
                self._push(case_id, pair)
        entry.unfired = wanted
        self._dirty[case_id] = entry

    def claim_due_timers(self, now: datetime, limit: int = 100) -> list[TimerRecord]:
        """Due timers: those of the working set are claimed in memory, the others in the
        database (only when it has some due)."""
        errors: list[FieldError] = []
        _check_time(errors, "now", now, required=True)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            errors.append(FieldError("limit", "must be a positive integer"))
        _raise_invalid(errors)  # (as the store outside a batch)
        claimed: list[TimerRecord] = []
        heap = self._heap
        when = now.astimezone(UTC)
        while heap and heap[0][0] <= when:
            due, _seq, case_id, kind = heapq.heappop(heap)
            entry = self._entries.get(case_id)
            pair = (kind, due)
            if entry is None or not entry.owned or pair not in entry.unfired:
                continue  # re-planned or fired since it was queued
            self._touch(case_id)
            entry.unfired = {p: None for p in entry.unfired if p != pair}
            entry.fired = {**entry.fired, pair: (when, False)}
            self._dirty[case_id] = entry
            claimed.append(TimerRecord(0, case_id, kind, due, when))
        if self._db_has_due(when) and (not self._write_used() or self._db_has_due(when)):
            from_db = self._db().claim_due_timers(now, limit)
            if from_db:
                self._claimed = True
                self._db_next_due = _UNKNOWN
            claimed += from_db
        return claimed

    def use_timer(self, case_id: str, kind: str, due_at: datetime, at: datetime) -> None:
        """Mark the case's unfired timer ``(kind, due_at)`` fired at ``at`` without firing
        it: what a tick at ``at`` does with the timer of a case out of supervision, for a
        replay that knows the case will not come back to it (no tick, no other timer
        claimed). Nothing happens if there is no such timer. Timers held in memory are
        marked at once; rows of the database in bulk at the next write, or before the
        database is asked for due timers or a case's timers."""
        pair = (kind, due_at.astimezone(UTC))
        entry = self._entries.get(case_id)
        if entry is None or not entry.owned:  # (a new case's timers are owned from the start)
            # its timers are rows of the database: marked at the next write (or before the
            # database is asked for timers) — loading them costs a query or two per case
            self._used.append((case_id, pair[0], pair[1], at.astimezone(UTC)))
            return
        if pair not in entry.unfired:
            return
        self._touch(case_id)
        entry.unfired = {p: None for p in entry.unfired if p != pair}
        entry.fired = {**entry.fired, pair: (at.astimezone(UTC), False)}
        self._dirty[case_id] = entry

    def _db_has_due(self, when: datetime) -> bool:
        if self._db_next_due is _UNKNOWN:
            tm = self.store.tables.timers
            earliest = self._db().connection.execute(
                sa.select(sa.func.min(tm.c.due_at)).where(tm.c.fired_at.is_(None))
            ).scalar()
            self._db_next_due = (
                None if earliest is None else
                earliest.replace(tzinfo=UTC) if earliest.tzinfo is None else earliest
            )
        return self._db_next_due is not None and self._db_next_due <= when

    def history(self, case_id: str) -> list[EventRecord]:
        self.flush()
        return self._db().history(case_id)

    def count_reported(
        self, same: Sequence[str], values: Sequence[str], since: datetime, before: datetime
    ) -> int:
        """:meth:`StoreTx.count_reported`: the store's count plus the new cases of the
        working set not written yet."""
        pending = self._pending
        if pending is None:  # rebuilt after a flush or an undone block
            pending = self._pending = History()
            for entry in self._dirty.values():
                if entry.new:
                    self._remember_new(entry.record)
        return (self._db().count_reported(same, values, since, before)
                + pending.count_reported(same, values, since, before))

    def _remember_new(self, record: CaseRecord) -> None:
        if self._pending is not None and record.reported_at is not None:
            self._pending.add_fields(
                record.reported_at, {"category": record.category, **intake_values(record.data)}
            )

    def query_cases(self, **kwargs: Any) -> list[CaseRecord]:
        self.flush()
        return self._db().query_cases(**kwargs)

    def timers(self, case_id: str) -> list[TimerRecord]:
        self.flush()
        return self._db().timers(case_id)

    @staticmethod
    def _records(case_id: str, base: int, events: Sequence[NewEvent]) -> list[EventRecord]:
        """The events as they will be stored (id 0: assigned when the batch is flushed),
        built only if the caller looks at them (``tick`` does, commands do not)."""
        return cast("list[EventRecord]", _LazyRecords(case_id, base, events))


class _LazyRecords(Sequence[EventRecord]):
    __slots__ = ("_args", "_built")

    def __init__(self, case_id: str, base: int, events: Sequence[NewEvent]):
        self._args = (case_id, base, events)
        self._built: list[EventRecord] | None = None

    def _list(self) -> list[EventRecord]:
        if self._built is None:
            case_id, base, events = self._args
            self._built = [
                EventRecord(0, case_id, base + i, ev.type, ev.actor_id, ev.actor_role,
                            ev.at.astimezone(UTC), ev.reason, dict(ev.payload),
                            ev.policy_version)
                for i, ev in enumerate(events, start=1)
            ]
        return self._built

    def __len__(self) -> int:
        return len(self._args[2])

    @overload
    def __getitem__(self, index: int) -> EventRecord: ...
    @overload
    def __getitem__(self, index: slice) -> list[EventRecord]: ...
    def __getitem__(self, index: int | slice) -> EventRecord | list[EventRecord]:
        return self._list()[index]

    def __iter__(self) -> Iterator[EventRecord]:
        return iter(self._list())
