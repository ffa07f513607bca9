"""A unit of work: the engine's batch mode for replays and bulk loads.

Outside a batch every engine command is one store transaction. Inside
``with engine.batch() as uow:`` commands work on an in-memory working set instead:

* a case is read from the store once and then kept in memory;
* each command's events, new projection and timers are buffered;
* :meth:`UnitOfWork.flush` writes what is buffered into ONE open store transaction (one
  insert or update per case, whatever the number of commands), and
  :meth:`UnitOfWork.commit` (every ``size`` commands, and at the end of the batch)
  commits it.

Reads that the working set cannot answer — ``history``, worklist queries, claiming due
timers — flush first and then ask the store, inside the same transaction, so they see
every earlier command. The events, projections and timers stored are those the engine
would store command by command (``tests/test_replay.py`` checks it); what differs is
only the grouping into transactions, hence the event ids, and that a failing *flush*
rolls back everything since the last commit.

A command that fails inside a batch changes nothing, as outside one: the engine
buffers a command's writes only after all of its checks passed, and a block that fails
after buffering is undone from a journal. Claiming timers marks rows in the database; a
block that fails after a claim cannot be undone in memory, so the whole uncommitted
batch is rolled back and :class:`BatchAborted` is raised.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from gridflow.errors import CaseNotFound, ConcurrencyConflict, GridflowRuntimeError
from gridflow.store.core import IdempotencyConflict, Store, StoreTx
from gridflow.store.records import CaseRecord, EventRecord, NewEvent, TimerRecord

__all__ = ["BatchAborted", "UnitOfWork"]


class BatchAborted(GridflowRuntimeError):
    """A batch could not be kept consistent and was rolled back to its last commit."""


@dataclass
class _Entry:
    record: CaseRecord  # the latest projection (what the store will hold)
    base_version: int  # the version the store holds now (0: not stored yet)
    new: bool  # not in the store yet: insert, not update
    events: list[NewEvent] = field(default_factory=list)
    timers: list[tuple[str, datetime]] | None = None  # pending set_timers, if any


@dataclass(frozen=True)
class _Saved:
    record: CaseRecord
    n_events: int
    timers: list[tuple[str, datetime]] | None


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
        self._keys: dict[str, str] = {}  # idempotency key → case id, for buffered new cases
        self._journal: dict[str, _Saved | None] | None = None  # open block: case → before
        self._claimed = False  # the open block claimed timers in the database
        self._commands = 0  # buffered writes since the last commit
        self.flushes = 0
        self.commits = 0

    # -- transactions ---------------------------------------------------------------------

    def _db(self) -> StoreTx:
        if self._tx is None:
            cm = self.store.transaction()
            self._tx = cm.__enter__()
            self._cm = cm
        return self._tx

    @contextmanager
    def transaction(self, *, readonly: bool = False) -> Iterator[UnitOfWork]:
        """One engine transaction inside the batch: undone from the journal if it fails."""
        if self._journal is not None:  # nested: part of the enclosing block
            yield self
            return
        self._journal = {}
        self._claimed = False
        try:
            yield self
        except BaseException:
            journal, self._journal = self._journal, None
            if self._claimed:
                self.rollback()
                raise BatchAborted(
                    "a command failed after claiming timers inside a batch; the batch was "
                    "rolled back to its last commit"
                ) from None
            self._undo(journal)
            raise
        self._journal = None
        if self._commands >= self.size:
            self.commit()

    def _undo(self, journal: dict[str, _Saved | None]) -> None:
        for case_id, saved in journal.items():
            if saved is None:
                entry = self._entries.pop(case_id, None)
                if entry is not None and entry.record.idempotency_key is not None:
                    self._keys.pop(entry.record.idempotency_key, None)
                continue
            entry = self._entries[case_id]
            entry.record = saved.record
            del entry.events[saved.n_events:]
            entry.timers = saved.timers

    def _touch(self, case_id: str) -> None:
        journal = self._journal
        if journal is None or case_id in journal:
            return
        entry = self._entries.get(case_id)
        journal[case_id] = (
            None if entry is None else _Saved(entry.record, len(entry.events), entry.timers)
        )

    def flush(self) -> None:
        """Write everything buffered into the open store transaction (not committed)."""
        dirty = [(cid, e) for cid, e in self._entries.items() if e.events or e.timers is not None]
        if not dirty:
            return
        tx = self._db()
        for case_id, entry in dirty:
            if entry.events:
                record = replace(entry.record)  # the store sets version/updated_at on it
                if entry.new:
                    tx.insert_case(record, entry.events)
                else:
                    tx.append(record, entry.base_version, entry.events)
                entry.record = record
                entry.base_version = record.version
                entry.new = False
                entry.events = []
            if entry.timers is not None:
                tx.set_timers(case_id, entry.timers)
                entry.timers = None
        self._keys.clear()
        self.flushes += 1

    def commit(self) -> None:
        """Flush and commit; the working set is emptied (cases are read again if needed)."""
        self.flush()
        cm, self._cm, self._tx = self._cm, None, None
        if cm is not None:
            cm.__exit__(None, None, None)
            self.commits += 1
        self._entries.clear()
        self._keys.clear()
        self._commands = 0

    def rollback(self) -> None:
        """Drop everything since the last commit."""
        cm, self._cm, self._tx = self._cm, None, None
        self._entries.clear()
        self._keys.clear()
        self._commands = 0
        if cm is not None:
            err = BatchAborted("batch rolled back")
            try:
                cm.__exit__(BatchAborted, err, None)
            except BatchAborted:
                pass

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
        existing = self.get_case(record.case_id)
        if existing is not None:
            raise ConcurrencyConflict(record.case_id, 0, existing.version)
        self._touch(record.case_id)
        record.updated_at = events[-1].at.astimezone(UTC)
        self._entries[record.case_id] = _Entry(record, 0, True, list(events))
        if key is not None:
            self._keys[key] = record.case_id
        self._commands += 1
        return self._records(record.case_id, 0, events)

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
        self._commands += 1
        return self._records(record.case_id, expected_version, events)

    def set_timers(self, case_id: str, timers: Sequence[tuple[str, datetime]]) -> None:
        # Buffering the last call is exact: the store's result depends only on the last
        # wanted set and on which timers fired, and timers are only claimed after a flush.
        self._touch(case_id)
        entry = self._entries.get(case_id)
        if entry is None:
            self.require_case(case_id)
            entry = self._entries[case_id]
        entry.timers = list(timers)

    def claim_due_timers(self, now: datetime, limit: int = 100) -> list[TimerRecord]:
        self.flush()
        claimed = self._db().claim_due_timers(now, limit)
        if claimed:
            self._claimed = True
        return claimed

    def history(self, case_id: str) -> list[EventRecord]:
        self.flush()
        return self._db().history(case_id)

    def query_cases(self, **kwargs: Any) -> list[CaseRecord]:
        self.flush()
        return self._db().query_cases(**kwargs)

    def timers(self, case_id: str) -> list[TimerRecord]:
        self.flush()
        return self._db().timers(case_id)

    @staticmethod
    def _records(case_id: str, base: int, events: Sequence[NewEvent]) -> list[EventRecord]:
        """The events as they will be stored (id 0: assigned when the batch is flushed)."""
        return [
            EventRecord(0, case_id, base + i, ev.type, ev.actor_id, ev.actor_role,
                        ev.at.astimezone(UTC), ev.reason, dict(ev.payload), ev.policy_version)
            for i, ev in enumerate(events, start=1)
        ]
