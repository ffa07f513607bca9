"""The event store: cases, their append-only events, timers and the outbox.

One :class:`Store` is bound to a database (an engine it creates, or the host's engine,
connection or session). All work happens in :meth:`Store.transaction`, which yields a
:class:`StoreTx`: one database transaction that commits when the block ends and rolls
back on any exception. Statements are SQLAlchemy Core, built once per store
(:mod:`gridflow.store.statements`); on SQLite the hot statements of a command run
directly on the ``sqlite3`` connection, a file database keeps one connection per thread,
and recently used case rows are cached (:mod:`gridflow.store.cache`). Batch mode writes
many cases at once with :meth:`StoreTx.write_many` (a few executemany statements).

Concurrency: ``append`` updates the case row only when its ``version`` is the one the
caller read (``ConcurrencyConflict`` otherwise), then inserts the events with the next
sequence numbers and their outbox rows. Row locks are always taken in one order — the
case row, then its timers — so commands and ticks never deadlock each other; due timers
and outbox rows are shared out among workers with ``SELECT … FOR UPDATE SKIP LOCKED`` on
PostgreSQL and MariaDB ≥ 10.6 / MySQL ≥ 8. On SQLite a gridflow transaction takes the
write lock up front (``BEGIN IMMEDIATE``), so writers are serialized. Should the database
still abort a transaction (deadlock, serialization failure, lock or busy timeout), the
store raises :class:`TransactionConflict`, a :class:`ConcurrencyConflict`: retry.
"""

from __future__ import annotations

import operator
import os
import sqlite3
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, StatementError
from sqlalchemy.orm import Session

from gridflow.errors import (
    CaseNotFound,
    CaseValidationError,
    ConcurrencyConflict,
    FieldError,
    GridflowRuntimeError,
)
from gridflow.history import HISTORY_FIELDS
from gridflow.store.cache import CachedCase, CaseCache
from gridflow.store.connect import (
    Caps,
    ThreadConnections,
    family,
    is_memory_sqlite,
    make_engine,
)
from gridflow.store.migrate import version_table
from gridflow.store.records import (
    CaseRecord,
    EventRecord,
    NewEvent,
    OutboxMessage,
    TimerRecord,
)
from gridflow.store.statements import (
    CASE_SCALARS,
    EVENT_COLUMNS,
    Compiled,
    SqliteFast,
    Statements,
    encode_json,
    intake_values,
    time_to_sqlite,
    unstorable,
)
from gridflow.store.tables import MAX_LENGTHS, build_tables

__all__ = ["IdempotencyConflict", "Store", "StoreTx", "TransactionConflict", "make_engine"]

Bind = Engine | Connection | Session | str | URL | None

_CASE_STR_FIELDS = (
    "idempotency_key",
    "category",
    "unit",
    "lead_department",
    "pool",
    "handler",
    "tier",
    "policy_version",
)
_CASE_TIME_FIELDS = ("due_at", "warn_at", "reported_at", "dispatched_at", "closed_at")


class IdempotencyConflict(ConcurrencyConflict):
    """A case with this idempotency key already exists (``case_id`` is the existing case)."""

    def __init__(
        self,
        idempotency_key: str,
        existing_case_id: str,
        *,
        attempted_case_id: str | None = None,
        existing_version: int | None = None,
    ):
        GridflowRuntimeError.__init__(
            self,
            f"idempotency key {idempotency_key!r} already used by case {existing_case_id}",
        )
        self.idempotency_key = idempotency_key
        self.existing_case_id = existing_case_id
        self.attempted_case_id = attempted_case_id
        self.case_id = existing_case_id
        self.expected_version = 0
        self.actual_version = existing_version


class TransactionConflict(ConcurrencyConflict):
    """The database aborted the transaction because of concurrent work (a deadlock, a
    serialization failure, a lock wait or SQLite busy timeout). Nothing was written;
    retry. ``detail`` says which; ``case_id`` is empty (the database does not say)."""

    def __init__(self, detail: str, case_id: str = ""):
        GridflowRuntimeError.__init__(
            self, f"the database aborted the transaction ({detail}); retry"
        )
        self.detail = detail
        self.case_id = case_id
        self.expected_version = 0
        self.actual_version = None


class StoreSchemaError(GridflowRuntimeError):
    """The database does not hold gridflow's tables at the current migration: never set
    up, or left at an older one. Nothing was written. ``detail`` is what the database
    said."""

    def __init__(self, detail: str):
        super().__init__(
            f"the database is not at gridflow's schema ({detail}): bring it there with "
            "`gridflow db upgrade URL` (gridflow.store.upgrade), or Store.create_all() for "
            "tests and embedded SQLite"
        )
        self.detail = detail


_PG_SCHEMA = {"42P01", "42703", "3F000"}  # undefined table, undefined column, no such schema
_MYSQL_SCHEMA = {1146, 1054}  # table doesn't exist, unknown column
_SQLITE_SCHEMA = ("no such table", "no such column", "has no column named")


def _schema_missing(fam: str, exc: DBAPIError) -> str | None:
    """What the database says is missing, when a statement met an older or absent schema."""
    orig = exc.orig
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    if fam == "postgresql":
        return text if str(getattr(orig, "sqlstate", "") or "") in _PG_SCHEMA else None
    if fam == "mysql":
        return text if _mysql_code(orig) in _MYSQL_SCHEMA else None
    if isinstance(orig, sqlite3.OperationalError) and any(m in text for m in _SQLITE_SCHEMA):
        return text
    return None


_PG_RETRYABLE = {
    "40001": "serialization failure",
    "40P01": "deadlock",
    "55P03": "lock not available",
    "57014": "statement timeout or cancel",
}
_MYSQL_RETRYABLE = {1213: "deadlock", 1205: "lock wait timeout"}
_MYSQL_NO_SAVEPOINT = 1305  # SAVEPOINT … does not exist


def _mysql_code(orig: object) -> int | None:
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None
_SQLITE_BUSY = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED


def _retryable(fam: str, exc: DBAPIError) -> str | None:
    """Why the database aborted the transaction, when it is worth a retry."""
    orig = exc.orig
    if fam == "postgresql":
        return _PG_RETRYABLE.get(str(getattr(orig, "sqlstate", "") or ""))
    if fam == "mysql":
        code = _mysql_code(orig)
        if code == _MYSQL_NO_SAVEPOINT:
            # InnoDB rolls back the whole transaction on a deadlock or lock wait timeout
            # (its savepoints too); under a host transaction the rollback to our savepoint
            # then fails and hides the cause, which is the exception it interrupted
            cause = exc.__context__
            while cause is not None and not isinstance(cause, DBAPIError):
                cause = cause.__context__
            first = _MYSQL_RETRYABLE.get(_mysql_code(cause.orig) or 0) if cause else None
            return (f"{first or 'aborted'}: the database rolled back the whole transaction, "
                    "the host's work included")
        return None if code is None else _MYSQL_RETRYABLE.get(code)
    if isinstance(orig, sqlite3.OperationalError) and (
        getattr(orig, "sqlite_errorcode", None) in _SQLITE_BUSY or "locked" in str(orig)
    ):
        return "database is locked"
    return None


# ---------------------------------------------------------------------------- validation


def _check_text(errors: list[FieldError], name: str, value: object, *, required: bool,
                limit: str | None = None) -> None:
    if value is None:
        if required:
            errors.append(FieldError(name, "is required"))
        return
    if not isinstance(value, str):
        errors.append(FieldError(name, f"must be a string, not {type(value).__name__}"))
        return
    if required and not value:
        errors.append(FieldError(name, "must not be empty"))
    if limit is not None and len(value) > MAX_LENGTHS[limit]:
        errors.append(
            FieldError(name, f"is {len(value)} characters long (at most {MAX_LENGTHS[limit]})")
        )
    if "\x00" in value:
        errors.append(FieldError(name, "contains a NUL character"))


def _check_time(errors: list[FieldError], name: str, value: object, *, required: bool) -> None:
    if value is None:
        if required:
            errors.append(FieldError(name, "is required"))
        return
    if not isinstance(value, datetime):
        errors.append(FieldError(name, f"must be a datetime, not {type(value).__name__}"))
    elif value.tzinfo is None or value.utcoffset() is None:
        errors.append(FieldError(name, "must be timezone-aware"))


def _validate_case(
    record: CaseRecord, fields: Collection[str] = CASE_SCALARS
) -> list[FieldError]:
    """Check ``case_id``, ``data`` and the named scalar columns (all by default)."""
    errors: list[FieldError] = []
    _check_text(errors, "case_id", record.case_id, required=True, limit="case_id")
    if "state" in fields:
        _check_text(errors, "state", record.state, required=True, limit="state")
    for name in _CASE_STR_FIELDS:
        if name in fields:
            _check_text(errors, name, getattr(record, name), required=False, limit=name)
    for name in _CASE_TIME_FIELDS:
        if name in fields:
            _check_time(errors, name, getattr(record, name), required=False)
    if not isinstance(record.data, dict):
        errors.append(FieldError("data", "must be a dict"))
    return errors


_L_TYPE, _L_ACTOR, _L_ROLE, _L_VERSION = (
    MAX_LENGTHS["type"], MAX_LENGTHS["actor_id"], MAX_LENGTHS["actor_role"],
    MAX_LENGTHS["policy_version"],
)


def _event_ok(ev: NewEvent) -> bool:
    """The common case of :func:`_validate_events` in one expression (an event the
    engine built); anything else goes through the checks that name the field."""
    t, a, r, why, pv, at, p = (
        ev.type, ev.actor_id, ev.actor_role, ev.reason, ev.policy_version, ev.at, ev.payload
    )
    return (
        type(t) is str and 0 < len(t) <= _L_TYPE and "\x00" not in t
        and type(a) is str and 0 < len(a) <= _L_ACTOR and "\x00" not in a
        and type(r) is str and 0 < len(r) <= _L_ROLE and "\x00" not in r
        and (why is None or (type(why) is str and "\x00" not in why))
        and (pv is None or (type(pv) is str and len(pv) <= _L_VERSION and "\x00" not in pv))
        and type(at) is datetime and at.tzinfo is not None and at.utcoffset() is not None
        and (type(p) is dict or isinstance(p, Mapping))
    )


def _validate_events(events: Sequence[NewEvent], errors: list[FieldError]) -> None:
    if events and all(map(_event_ok, events)):
        return
    if not events:
        errors.append(FieldError("events", "at least one event is required"))
    for i, ev in enumerate(events):
        p = f"events[{i}]."
        _check_text(errors, p + "type", ev.type, required=True, limit="type")
        _check_text(errors, p + "actor_id", ev.actor_id, required=True, limit="actor_id")
        _check_text(errors, p + "actor_role", ev.actor_role, required=True, limit="actor_role")
        _check_text(errors, p + "reason", ev.reason, required=False)
        _check_text(errors, p + "policy_version", ev.policy_version, required=False,
                    limit="policy_version")
        _check_time(errors, p + "at", ev.at, required=True)
        if not isinstance(ev.payload, Mapping):
            errors.append(FieldError(p + "payload", "must be a mapping"))


def _raise_invalid(errors: list[FieldError]) -> None:
    if errors:  # (a record's fields or a call's arguments: "input", not "case")
        raise CaseValidationError(errors, source="store", subject="input")


def _case_from_row(row: Sequence[Any]) -> CaseRecord:
    return CaseRecord(*row)


#: case ids per ``IN (…)`` of :meth:`StoreTx.histories` on SQLite
_IN_CHUNK = 500


def _event_from_row(row: Sequence[Any]) -> EventRecord:
    return EventRecord(*row)


def _outbox_message(row: Sequence[Any]) -> OutboxMessage:
    event = EventRecord(*row)
    return OutboxMessage(
        event.id, event.id, event.case_id, event.seq, event.type, event.to_dict(), event.at
    )


def _new_id(result: sa.CursorResult[Any]) -> int:
    pk = result.inserted_primary_key
    if pk is None or pk[0] is None:  # pragma: no cover - every supported driver reports it
        raise GridflowRuntimeError("the database did not report the new event id")
    return int(pk[0])


_SCALARS = operator.attrgetter(*CASE_SCALARS)


def _json_text(value: Any) -> str:
    try:
        return encode_json(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise unstorable(exc) from exc


def _data_text(record: CaseRecord) -> str:
    return _json_text(record.data)


def _args(stmt: Compiled, values: Mapping[str, Any]) -> list[Any]:
    """``stmt``'s arguments for ``values`` (a value SQLite cannot store: invalid input)."""
    try:
        return stmt.args(values)
    except (TypeError, ValueError, RecursionError) as exc:
        raise unstorable(exc) from exc


class _Undo(Exception):
    """A bulk write hit a conflict: its savepoint is rolled back."""


# bulk writes on the SQLite fast path run in this savepoint (undone on a conflict)
_SAVEPOINT = "SAVEPOINT gridflow_write_many"
_ROLLBACK_TO = "ROLLBACK TO SAVEPOINT gridflow_write_many"
_RELEASE = "RELEASE SAVEPOINT gridflow_write_many"


# ---------------------------------------------------------------------------- transaction


class StoreTx:
    """Operations inside one database transaction (obtained from :meth:`Store.transaction`)."""

    __slots__ = (
        "_cache", "_caps", "_conn", "_fast", "_new_cached", "_outbox", "_raw", "_s", "_seen",
        "_t", "_touched",
    )

    def __init__(
        self,
        store: Store,
        conn: Connection,
        caps: Caps,
        fast: tuple[SqliteFast, sqlite3.Connection] | None = None,
    ):
        self._conn = conn
        self._s = store._stmts
        self._t = store.tables
        self._caps = caps
        self._outbox = store.outbox
        self._fast: SqliteFast | None = None
        self._raw: sqlite3.Connection | None = None
        self._cache: CaseCache | None = None
        if fast is not None:
            self._fast, self._raw = fast
            self._cache = store._cache
        # case_id -> (version, CASE_SCALARS values) as last read or written here
        self._seen: dict[str, tuple[int, tuple[Any, ...]]] = {}
        # rows to cache when the transaction commits; ids to forget if it rolls back
        self._new_cached: dict[str, CachedCase] = {}
        self._touched: set[str] = set()

    @property
    def connection(self) -> Connection:
        """The SQLAlchemy connection this transaction runs on (for host-side joins)."""
        return self._conn

    # -- cases ------------------------------------------------------------------------

    def get_case(self, case_id: str, *, for_update: bool = False) -> CaseRecord | None:
        """The case, or ``None``. ``for_update`` also locks its row (PostgreSQL/MariaDB)."""
        fast, raw = self._fast, self._raw
        if fast is not None and raw is not None:
            record = self._get_case_sqlite(fast, raw, case_id)
        else:
            stmt = self._s.select_case_locked if for_update and self._caps.row_locks else (
                self._s.select_case
            )
            found = self._conn.execute(stmt, {"b_case_id": case_id}).first()
            record = None if found is None else _case_from_row(found)
        if record is not None:
            self._remember(record)
        return record

    def _get_case_sqlite(
        self, fast: SqliteFast, raw: sqlite3.Connection, case_id: str
    ) -> CaseRecord | None:
        cache = self._cache
        if cache is not None:
            self._touched.add(case_id)
            hit = cache.get(case_id)
            if hit is not None:
                found = fast.execute(raw, fast.select_version.sql, (case_id,)).fetchone()
                if found is not None and found[0] == hit.version:
                    return hit.record()
        row = fast.execute(raw, fast.select_case.sql, (case_id,)).fetchone()
        if row is None:
            return None
        record = fast.case_from_row(row)
        if cache is not None:
            self._new_cached[case_id] = CachedCase.of(record, row[3])
        return record

    def _remember(self, record: CaseRecord) -> None:
        self._seen[record.case_id] = (record.version, _SCALARS(record))

    def require_case(self, case_id: str, *, for_update: bool = False) -> CaseRecord:
        record = self.get_case(case_id, for_update=for_update)
        if record is None:
            raise CaseNotFound(case_id)
        return record

    def case_by_idempotency_key(self, key: str) -> CaseRecord | None:
        row = self._conn.execute(self._s.select_by_key, {"b_key": key}).first()
        if row is None:
            return None
        record = _case_from_row(row)
        self._remember(record)
        return record

    def insert_case(self, record: CaseRecord, events: Sequence[NewEvent]) -> list[EventRecord]:
        """Create a case with its first events (``record.version`` must be ``len(events)``).

        Raises :class:`IdempotencyConflict` (carrying the existing case id) when the
        idempotency key is taken, :class:`ConcurrencyConflict` when the case id is.
        """
        errors = _validate_case(record)
        _validate_events(events, errors)
        if record.version != len(events):
            errors.append(
                FieldError("version", f"must equal the number of events ({len(events)})")
            )
        _raise_invalid(errors)
        values = self._case_values(record, events[-1].at.astimezone(UTC))
        fam = self._caps.family
        fast, raw = self._fast, self._raw
        text: str | None = None
        if fast is not None and raw is not None:
            text = values["data"] = _data_text(record)
            inserted = fast.run(raw, fast.insert_case, values).rowcount == 1
        elif fam in ("postgresql", "sqlite"):
            stmt = self._s.insert_case_pg if fam == "postgresql" else self._s.insert_case_sqlite
            inserted = self._execute_write(stmt, values).rowcount == 1
        else:
            # MariaDB/MySQL roll back just the failed statement; others need a savepoint.
            guard = nullcontext() if fam == "mysql" else self._conn.begin_nested()
            try:
                with guard:
                    self._execute_write(self._s.insert_case, values)
                inserted = True
            except IntegrityError:
                inserted = False
        if not inserted:
            self._raise_duplicate(record)
        written = self._write_events(record.case_id, 0, events)
        record.updated_at = values["updated_at"]
        self._remember(record)
        if text is not None and self._cache is not None:
            self._touched.add(record.case_id)
            self._new_cached[record.case_id] = CachedCase.of(record, text)
        return written

    def append(
        self, record: CaseRecord, expected_version: int, events: Sequence[NewEvent]
    ) -> list[EventRecord]:
        """Store the new projection and append events, if the case is still at
        ``expected_version``; otherwise raise :class:`ConcurrencyConflict` (or
        :class:`CaseNotFound`). Sets ``record.version`` to ``expected_version + len(events)``.
        """
        new_version = expected_version + len(events)
        scalars = _SCALARS(record)
        changed = self._changed(record.case_id, expected_version, scalars)
        errors = _validate_case(record, changed)
        _validate_events(events, errors)
        _raise_invalid(errors)
        columns = ("version", "data", "updated_at", *changed)
        values: dict[str, Any] = {name: getattr(record, name) for name in changed}
        values["version"] = new_version
        values["updated_at"] = events[-1].at.astimezone(UTC)
        values["b_case_id"] = record.case_id
        values["b_expected"] = expected_version
        fast, raw = self._fast, self._raw
        text: str | None = None
        if fast is not None and raw is not None:
            text = values["data"] = _data_text(record)
            rowcount = fast.run(raw, fast.update(columns), values).rowcount
        else:
            values["data"] = record.data
            rowcount = self._execute_write(self._s.update_case, values).rowcount
        if rowcount != 1:
            if self._cache is not None:
                self._touched.add(record.case_id)
            actual = self._conn.execute(
                self._s.select_version, {"b_case_id": record.case_id}
            ).scalar()
            if actual is None:
                raise CaseNotFound(record.case_id)
            raise ConcurrencyConflict(record.case_id, expected_version, actual)
        self._seen[record.case_id] = (new_version, scalars)
        written = self._write_events(record.case_id, expected_version, events)
        record.version = new_version
        record.updated_at = values["updated_at"]
        if text is not None and self._cache is not None:
            self._touched.add(record.case_id)
            self._new_cached[record.case_id] = CachedCase.of(record, text)
        return written

    def write_many(
        self,
        inserts: Sequence[tuple[CaseRecord, Sequence[NewEvent]]] = (),
        appends: Sequence[tuple[CaseRecord, int, Sequence[NewEvent]]] = (),
    ) -> None:
        """Create cases and append to existing ones in bulk (batch mode's flush).

        ``inserts`` are ``(record, events)`` pairs as :meth:`insert_case` takes them,
        ``appends`` ``(record, expected_version, events)`` triples as :meth:`append` takes
        them. They are written with a few statements — one multi-row insert of the new
        case rows, one update per set of changed columns, one insert of every event — and
        store exactly what calling :meth:`insert_case` for each insert and then
        :meth:`append` for each append would: the same rows and values, ``version`` and
        ``updated_at`` set on the records in the same way. Only the event ids differ (in
        another order, and not returned: build :class:`EventRecord` s yourself if needed).

        Every record is checked before anything is written (:class:`CaseValidationError`
        for the first invalid one, naming its fields). A conflict — a case id or
        idempotency key already taken, a case no longer at ``expected_version`` or gone —
        undoes the bulk statements (a savepoint) and then writes the cases one call at a
        time, so the first conflicting case raises what its own call raises
        (:class:`IdempotencyConflict`, :class:`ConcurrencyConflict`,
        :class:`CaseNotFound`), with the cases before it written: roll back.

        A store with an outbox (whose rows need every event's id), or a case named more
        than once, is written one call at a time to begin with (each record is then
        checked by its own call).
        """
        if not inserts and not appends:
            return
        if self._outbox or not self._distinct(inserts, appends):
            self._write_each(inserts, appends)
            return
        fast, raw = self._fast, self._raw
        sqlite_fast = fast is not None and raw is not None
        case_rows: list[Any] = []  # argument lists (SQLite fast path) or dicts
        updates: dict[tuple[str, ...], list[Any]] = {}  # one statement per column set
        event_rows: list[Any] = []
        texts: list[str] = []  # the stored ``data`` JSON (fast path), for the cache
        inserted: list[tuple[CaseRecord, datetime]] = []
        appended: list[tuple[CaseRecord, int, tuple[Any, ...], datetime]] = []
        for record, events in inserts:
            errors = _validate_case(record)
            _validate_events(events, errors)
            if record.version != len(events):
                errors.append(
                    FieldError("version", f"must equal the number of events ({len(events)})")
                )
            _raise_invalid(errors)
            updated_at = events[-1].at.astimezone(UTC)
            values = self._case_values(record, updated_at)
            if fast is not None and raw is not None:
                text = values["data"] = _data_text(record)
                texts.append(text)
                case_rows.append(_args(fast.insert_case, values))
            else:
                case_rows.append(values)
            self._event_rows(record.case_id, 0, events, event_rows, sqlite_fast)
            inserted.append((record, updated_at))
        for record, expected_version, events in appends:
            scalars = _SCALARS(record)
            changed = self._changed(record.case_id, expected_version, scalars)
            errors = _validate_case(record, changed)
            _validate_events(events, errors)
            _raise_invalid(errors)
            columns = ("version", "data", "updated_at", *changed)
            updated_at = events[-1].at.astimezone(UTC)
            values = {name: getattr(record, name) for name in changed}
            values["version"] = expected_version + len(events)
            values["updated_at"] = updated_at
            values["b_case_id"] = record.case_id
            values["b_expected"] = expected_version
            rows = updates.setdefault(columns, [])
            if fast is not None and raw is not None:
                text = values["data"] = _data_text(record)
                texts.append(text)
                rows.append(_args(fast.update(columns), values))
            else:
                values["data"] = record.data
                rows.append(values)
            self._event_rows(record.case_id, expected_version, events, event_rows, sqlite_fast)
            appended.append((record, expected_version + len(events), scalars, updated_at))

        if fast is not None and raw is not None:
            written = self._bulk_sqlite(fast, raw, case_rows, updates, event_rows)
        else:
            written = self._bulk_core(case_rows, updates, event_rows)
        if not written:  # a conflict: the cases one by one raise what their calls raise
            self._write_each(inserts, appends)
            return

        for record, updated_at in inserted:
            record.updated_at = updated_at
            self._remember(record)
        for record, new_version, scalars, updated_at in appended:
            self._seen[record.case_id] = (new_version, scalars)
            record.version = new_version
            record.updated_at = updated_at
        if sqlite_fast and self._cache is not None:
            records = [r for r, _ in inserted] + [r for r, *_ in appended]
            self._touched.update(r.case_id for r in records)
            # only the last ones would stay in the cache (a hit is checked by version, so
            # an older entry of a case written here is never served)
            keep = self._cache.size
            for record, text in zip(records[-keep:], texts[-keep:], strict=True):
                self._new_cached[record.case_id] = CachedCase.of(record, text)

    @staticmethod
    def _distinct(
        inserts: Sequence[tuple[CaseRecord, Sequence[NewEvent]]],
        appends: Sequence[tuple[CaseRecord, int, Sequence[NewEvent]]],
    ) -> bool:
        """Whether no case is named twice (and every case id can be compared)."""
        ids = [r.case_id for r, _ in inserts] + [r.case_id for r, _, _ in appends]
        try:
            return len(set(ids)) == len(ids)
        except TypeError:  # an unhashable case id: let the one-by-one calls refuse it
            return False

    def _write_each(
        self,
        inserts: Sequence[tuple[CaseRecord, Sequence[NewEvent]]],
        appends: Sequence[tuple[CaseRecord, int, Sequence[NewEvent]]],
    ) -> None:
        for record, events in inserts:
            self.insert_case(record, events)
        for record, expected_version, events in appends:
            self.append(record, expected_version, events)

    def _changed(
        self, case_id: str, expected_version: int, scalars: tuple[Any, ...]
    ) -> tuple[str, ...]:
        """The scalar columns an append of the case checks and writes: only those that
        changed since this transaction read (or wrote) the case, so unchanged indexed
        columns cost no index maintenance; all of them if it did not see that version."""
        seen = self._seen.get(case_id)
        if seen is None or seen[0] != expected_version:
            return CASE_SCALARS
        return tuple(
            name
            for name, old, new in zip(CASE_SCALARS, seen[1], scalars, strict=True)
            if old != new or type(old) is not type(new)
        )

    @staticmethod
    def _event_rows(
        case_id: str, base: int, events: Sequence[NewEvent], rows: list[Any], sqlite_fast: bool
    ) -> None:
        """Add the event rows as :meth:`_write_events` writes them: argument tuples in
        ``EVENT_COLUMNS`` order (SQLite fast path) or dicts."""
        if sqlite_fast:
            rows += [
                (
                    case_id, seq, ev.type, ev.actor_id, ev.actor_role, time_to_sqlite(ev.at),
                    ev.reason,
                    _json_text(ev.payload if type(ev.payload) is dict else dict(ev.payload)),
                    ev.policy_version,
                )
                for seq, ev in enumerate(events, start=base + 1)
            ]
        else:
            rows += [
                {
                    "case_id": case_id,
                    "seq": seq,
                    "type": ev.type,
                    "actor_id": ev.actor_id,
                    "actor_role": ev.actor_role,
                    "at": ev.at.astimezone(UTC),
                    "reason": ev.reason,
                    "payload": dict(ev.payload),
                    "policy_version": ev.policy_version,
                }
                for seq, ev in enumerate(events, start=base + 1)
            ]

    def _bulk_sqlite(
        self,
        fast: SqliteFast,
        raw: sqlite3.Connection,
        case_rows: list[Any],
        updates: dict[tuple[str, ...], list[Any]],
        event_rows: list[Any],
    ) -> bool:
        """The bulk statements on the ``sqlite3`` connection, in a savepoint; ``False``
        (and nothing written) on a conflict."""
        fast.execute(raw, _SAVEPOINT, ())
        try:
            written = self._bulk_sqlite_statements(fast, raw, case_rows, updates, event_rows)
        except IntegrityError:  # events of a case someone wrote bypassing its version
            written = False
        if not written:
            fast.execute(raw, _ROLLBACK_TO, ())
        fast.execute(raw, _RELEASE, ())
        return written

    @staticmethod
    def _bulk_sqlite_statements(
        fast: SqliteFast,
        raw: sqlite3.Connection,
        case_rows: list[Any],
        updates: dict[tuple[str, ...], list[Any]],
        event_rows: list[Any],
    ) -> bool:
        # INSERT … ON CONFLICT DO NOTHING: a taken case id or key shows in the rowcount
        if case_rows and (
            fast.execute_many(raw, fast.insert_case.sql, case_rows).rowcount != len(case_rows)
        ):
            return False
        for columns, rows in updates.items():
            if fast.execute_many(raw, fast.update(columns).sql, rows).rowcount != len(rows):
                return False
        fast.execute_many(raw, fast.insert_event.sql, event_rows)
        return True

    def _bulk_core(
        self,
        case_rows: list[dict[str, Any]],
        updates: dict[tuple[str, ...], list[dict[str, Any]]],
        event_rows: list[dict[str, Any]],
    ) -> bool:
        """The bulk statements as Core executemany, in a savepoint; ``False`` (and nothing
        written) on a conflict. A value the database cannot store undoes the savepoint too
        and raises :class:`CaseValidationError`."""
        try:
            with self._conn.begin_nested():
                self._bulk_core_statements(case_rows, updates, event_rows)
        except _Undo:
            return False
        return True

    def _bulk_core_statements(
        self,
        case_rows: list[dict[str, Any]],
        updates: dict[tuple[str, ...], list[dict[str, Any]]],
        event_rows: list[dict[str, Any]],
    ) -> None:
        s = self._s
        try:
            if case_rows:
                self._execute_write(s.insert_case, case_rows)
            for rows in updates.values():
                if self._conn.dialect.supports_sane_multi_rowcount:
                    count = self._execute_write(s.update_case, rows).rowcount
                else:  # pragma: no cover - every supported driver sums executemany rowcounts
                    count = sum(self._execute_write(s.update_case, row).rowcount for row in rows)
                if count != len(rows):
                    raise _Undo
            self._execute_write(s.insert_event, event_rows)
        except IntegrityError as exc:  # a taken case id or key (or a bypassed version)
            raise _Undo from exc

    def history(self, case_id: str) -> list[EventRecord]:
        """Every event of the case, ordered by ``seq``."""
        rows = self._conn.execute(self._s.history, {"b_case_id": case_id})
        return [_event_from_row(r) for r in rows]

    def histories(self, case_ids: Sequence[str]) -> dict[str, list[EventRecord]]:
        """Every event of each case, ordered by ``seq``, in one query (``[]`` for a case
        without events or not stored)."""
        out: dict[str, list[EventRecord]] = {cid: [] for cid in case_ids}
        if not out:
            return out
        ids = list(out)
        fast, raw = self._fast, self._raw
        if fast is not None and raw is not None:
            for at in range(0, len(ids), _IN_CHUNK):  # SQLite caps the parameters
                chunk = ids[at:at + _IN_CHUNK]
                stmt = fast.histories(len(chunk))
                convert = stmt.row
                for r in fast.execute(raw, stmt.sql, chunk):
                    out[r[1]].append(EventRecord(*convert(r)))
            return out
        e = self._t.events
        query = (
            sa.select(*self._s.history.selected_columns)
            .where(e.c.case_id.in_(ids))
            .order_by(e.c.case_id, e.c.seq)
        )
        for row in self._conn.execute(query):
            out[row[1]].append(_event_from_row(row))
        return out

    def insert_rows(self, table: sa.Table, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert plain rows into ``table`` (a table of this store's metadata, e.g. the
        aggregates'), in bulk; on SQLite straight on the driver connection."""
        groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
        for row in rows:  # one statement per column set
            groups.setdefault(tuple(row), []).append(row)
        fast, raw = self._fast, self._raw
        for columns, group in groups.items():
            if fast is not None and raw is not None:
                fast.run_many(raw, fast.insert(table, columns), group)
            else:
                self._conn.execute(sa.insert(table), [dict(r) for r in group])

    def query_cases(
        self,
        *,
        states: Collection[str] | None = None,
        lead_department: str | None = None,
        pool: str | None = None,
        unit: str | None = None,
        handler: str | None = None,
        due_before: datetime | None = None,
        warn_before: datetime | None = None,
        open_only: bool = False,
        limit: int | None = None,
        order_by_due: bool = True,
    ) -> list[CaseRecord]:
        """Cases matching every given filter (worklists, overdue and near-due lists).

        ``due_before``/``warn_before`` are inclusive (``due_at <= t``) and skip cases with
        no such time; ``open_only`` keeps cases with no ``closed_at``. Ordered by
        ``due_at`` (cases without one last) then ``case_id``, or by ``case_id`` alone.
        """
        stmt = self._cases_query(
            states=states, lead_department=lead_department, pool=pool, unit=unit,
            handler=handler, due_before=due_before, warn_before=warn_before,
            open_only=open_only, limit=limit, order_by_due=order_by_due,
        )
        return [_case_from_row(r) for r in self._conn.execute(stmt)]

    def count_reported(
        self, same: Sequence[str], values: Sequence[str], since: datetime, before: datetime
    ) -> int:
        """How many cases were reported in ``[since, before)`` with ``values`` in the
        ``same`` columns (of ``HISTORY_FIELDS``) — what history conditions count (a
        :class:`~gridflow.history.CaseHistory`)."""
        key = tuple(same)
        if len(key) != len(values):
            raise ValueError(f"{len(key)} field(s) to compare but {len(values)} value(s)")
        params: dict[str, Any] = {"b_since": since, "b_before": before}
        for name, value in zip(key, values, strict=True):
            if name not in HISTORY_FIELDS:
                raise ValueError(f"history cannot compare {name!r}")
            params[f"b_{name}"] = value
        fast, raw = self._fast, self._raw
        if fast is not None and raw is not None:
            return int(fast.run(raw, fast.count_reported(key), params).fetchone()[0])
        return int(self._conn.execute(self._s.count_reported(key), params).scalar_one())

    def _cases_query(
        self,
        *,
        states: Collection[str] | None,
        lead_department: str | None,
        pool: str | None,
        unit: str | None,
        handler: str | None,
        due_before: datetime | None,
        warn_before: datetime | None,
        open_only: bool,
        limit: int | None,
        order_by_due: bool,
    ) -> sa.Select[Any]:
        c = self._t.cases
        stmt = sa.select(*self._s.case_columns)
        if states is not None:
            stmt = stmt.where(c.c.state.in_(list(states)))
        for col, value in (
            (c.c.lead_department, lead_department),
            (c.c.pool, pool),
            (c.c.unit, unit),
            (c.c.handler, handler),
        ):
            if value is not None:
                stmt = stmt.where(col == value)
        if due_before is not None:
            stmt = stmt.where(c.c.due_at <= due_before)
        if warn_before is not None:
            stmt = stmt.where(c.c.warn_at <= warn_before)
        if open_only:
            stmt = stmt.where(c.c.closed_at.is_(None))
        if order_by_due:
            stmt = stmt.order_by(sa.case((c.c.due_at.is_(None), 1), else_=0), c.c.due_at)
        stmt = stmt.order_by(c.c.case_id)
        if limit is not None:
            stmt = stmt.limit(limit)
        return stmt

    def iter_cases(self, batch: int = 1000) -> Iterator[CaseRecord]:
        """Every case in ``case_id`` order, fetched ``batch`` rows at a time (keyset paging)."""
        c = self._t.cases
        base = sa.select(*self._s.case_columns).order_by(c.c.case_id).limit(batch)
        last: str | None = None
        while True:
            stmt = base if last is None else base.where(c.c.case_id > last)
            rows = self._conn.execute(stmt).all()
            for row in rows:
                yield _case_from_row(row)
            if len(rows) < batch:
                return
            last = rows[-1].case_id

    # -- timers -----------------------------------------------------------------------

    def set_timers(self, case_id: str, timers: Sequence[tuple[str, datetime]]) -> None:
        """Make ``(kind, due_at)`` pairs the case's unfired timers (others are removed).

        A pair that already fired for this case is not armed again (so re-planning the
        same deadline after a ``tick`` never fires it twice); calling it again with the
        same pairs writes nothing. Call it after ``append``/``insert_case`` of the case in
        the same transaction: the case row must be locked before its timers.
        """
        errors: list[FieldError] = []
        for i, (kind, due_at) in enumerate(timers):
            _check_text(errors, f"timers[{i}].kind", kind, required=True, limit="kind")
            _check_time(errors, f"timers[{i}].due_at", due_at, required=True)
        _raise_invalid(errors)
        fast, raw = self._fast, self._raw
        if fast is not None and raw is not None:
            existing = [(t.id, t.kind, t.due_at, t.fired_at) for t in fast.timers_of(raw, case_id)]
        else:
            existing = list(self._conn.execute(self._s.case_timers, {"b_case_id": case_id}))
        unfired: dict[tuple[str, datetime], int] = {}
        fired: set[tuple[str, datetime]] = set()
        for timer_id, kind, due_at, fired_at in existing:
            if fired_at is None:
                unfired[(kind, due_at)] = timer_id
            else:
                fired.add((kind, due_at))
        wanted = dict.fromkeys((kind, due_at.astimezone(UTC)) for kind, due_at in timers)
        stale = [timer_id for key, timer_id in unfired.items() if key not in wanted]
        rows = [
            {"case_id": case_id, "kind": kind, "due_at": due_at, "fired_at": None}
            for kind, due_at in wanted
            if (kind, due_at) not in unfired and (kind, due_at) not in fired
        ]
        if stale:
            self._conn.execute(self._s.delete_timers, {"b_ids": stale})
        self.write_timer_rows(rows)

    def write_timer_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert timer rows as they are (``case_id``, ``kind``, ``due_at``, ``fired_at``):
        the unit of work writing back the timers it held in memory, cases already
        written. No checks beyond the database's own."""
        if not rows:
            return
        fast, raw = self._fast, self._raw
        if fast is not None and raw is not None:
            fast.run_many(raw, fast.insert_timer, rows)
        else:
            self._conn.execute(self._s.insert_timer, rows)

    def use_timer_rows(self, rows: Sequence[tuple[str, str, datetime, datetime]]) -> None:
        """Mark unfired timers ``(case_id, kind, due_at)`` fired at the given time, without
        firing them (the unit of work's :meth:`~UnitOfWork.use_timer`, written in bulk)."""
        if not rows:
            return
        tm = self._t.timers
        stmt = (
            sa.update(tm)
            .where(tm.c.case_id == sa.bindparam("b_case_id"), tm.c.kind == sa.bindparam("b_kind"),
                   tm.c.due_at == sa.bindparam("b_due_at"), tm.c.fired_at.is_(None))
            .values(fired_at=sa.bindparam("b_at", type_=tm.c.fired_at.type))
        )
        self._conn.execute(stmt, [
            {"b_case_id": c, "b_kind": k, "b_due_at": d, "b_at": a} for c, k, d, a in rows
        ])

    def timers(self, case_id: str) -> list[TimerRecord]:
        """Every timer of the case (fired or not), by due time."""
        tm = self._t.timers
        stmt = (
            sa.select(tm.c.id, tm.c.case_id, tm.c.kind, tm.c.due_at, tm.c.fired_at)
            .where(tm.c.case_id == case_id)
            .order_by(tm.c.due_at, tm.c.id)
        )
        return [TimerRecord(*r) for r in self._conn.execute(stmt)]

    def claim_due_timers(self, now: datetime, limit: int = 100) -> list[TimerRecord]:
        """Mark up to ``limit`` unfired timers due at or before ``now`` as fired and
        return them (by due time). Claim, fire and commit in one transaction.

        PostgreSQL/MariaDB: the *cases* of due timers are locked first, with ``SKIP
        LOCKED``, then their due timers. A case another worker is ticking, or a command is
        changing at this moment, is left for the next tick. Concurrent workers thus never
        claim the same timer, and a tick never waits for a command while holding locks the
        command needs: commands lock the case row before its timers, and so does this (no
        deadlock). The claimed cases stay locked until the transaction ends. SQLite
        serializes writers.
        """
        errors: list[FieldError] = []
        _check_time(errors, "now", now, required=True)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            errors.append(FieldError("limit", "must be a positive integer"))
        _raise_invalid(errors)
        s = self._s
        if not self._caps.row_locks:
            rows = self._conn.execute(s.due_timers, {"b_now": now, "b_limit": limit}).all()
        else:
            # candidates beyond ``limit``: some of them may be locked by other workers
            due = self._conn.scalars(s.due_cases, {"b_now": now, "b_limit": 4 * limit}).all()
            if not due:
                return []
            need = len(set(due[:limit]))  # the cases of the ``limit`` oldest timers
            lock = s.lock_cases_skip if self._caps.skip_locked else s.lock_cases
            locked = self._conn.scalars(
                lock, {"b_case_ids": list(dict.fromkeys(due)), "b_limit": need}
            ).all()
            if not locked:
                return []
            rows = self._conn.execute(
                s.due_timers_of_skip if self._caps.skip_locked else s.due_timers_of,
                {"b_case_ids": locked, "b_now": now},
            ).all()[:limit]
        if not rows:
            return []
        ids = [r.id for r in rows]
        result = self._conn.execute(s.fire_timers, {"b_ids": ids, "b_now": now})
        if result.rowcount != len(ids):  # pragma: no cover - a writer ignoring the locks
            raise ConcurrencyConflict(rows[0].case_id, 0)
        return [TimerRecord(r.id, r.case_id, r.kind, r.due_at, now) for r in rows]

    # -- outbox -----------------------------------------------------------------------

    def outbox_fetch(self, limit: int = 100) -> list[OutboxMessage]:
        """Up to ``limit`` unpublished events, oldest first (each case's in ``seq`` order).

        Publish them, then :meth:`outbox_ack` them in the same transaction. Until acked a
        message stays in the outbox: a publisher that dies before the commit leaves its
        messages to the next one (at-least-once delivery; consumers dedupe on
        ``event_id``). With several publishers (PostgreSQL/MariaDB) the rows are locked
        with ``SKIP LOCKED``, so publishers share the work; a message is handed out only
        when every earlier pending message of its case is in the same batch, so a case's
        events are never published out of order. On SQLite publishers take turns.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise CaseValidationError([FieldError("limit", "must be a positive integer")],
                                      source="store")
        if not self._caps.skip_locked:
            rows = self._conn.execute(self._s.outbox_pending, {"b_limit": limit}).all()
            return [_outbox_message(r) for r in rows]
        ids = self._conn.scalars(self._s.outbox_claim, {"b_limit": limit}).all()
        if not ids:
            return []
        rows = self._conn.execute(self._s.events_by_id, {"b_ids": list(ids)}).all()
        mine: dict[str, set[int]] = {}
        for r in rows:
            mine.setdefault(r.case_id, set()).add(r.seq)
        pending = self._conn.execute(
            self._s.outbox_pending_of,
            {"b_case_ids": list(mine), "b_max_seq": max(r.seq for r in rows)},
        )
        allowed: dict[str, int] = {}  # highest publishable seq per case
        blocked: set[str] = set()
        for case_id, seq in pending:
            if case_id in blocked:
                continue
            if seq in mine[case_id]:
                allowed[case_id] = seq
            else:  # an earlier message of the case is held by another publisher
                blocked.add(case_id)
        return [_outbox_message(r) for r in rows if r.seq <= allowed.get(r.case_id, 0)]

    def outbox_ack(self, ids: Sequence[int], at: datetime | None = None) -> int:
        """Remove published messages from the outbox (by ``OutboxMessage.id``); returns how
        many were still pending (acking twice is harmless). ``at`` is accepted for
        compatibility and checked, but not stored: the event keeps its own time."""
        if at is not None:
            errors: list[FieldError] = []
            _check_time(errors, "at", at, required=True)
            _raise_invalid(errors)
        if not ids:
            return 0
        result = self._conn.execute(self._s.outbox_delete, {"b_ids": [int(i) for i in ids]})
        return int(result.rowcount)

    def outbox_pending(self) -> int:
        """How many messages wait in the outbox (for monitoring the publishers)."""
        return int(self._conn.execute(self._s.outbox_count).scalar_one())

    # -- internals --------------------------------------------------------------------

    def _case_values(self, record: CaseRecord, updated_at: datetime) -> dict[str, Any]:
        return {
            "case_id": record.case_id,
            "version": record.version,
            "state": record.state,
            "idempotency_key": record.idempotency_key,
            "category": record.category,
            "unit": record.unit,
            "lead_department": record.lead_department,
            "pool": record.pool,
            "handler": record.handler,
            "tier": record.tier,
            "due_at": record.due_at,
            "warn_at": record.warn_at,
            "reported_at": record.reported_at,
            "dispatched_at": record.dispatched_at,
            "closed_at": record.closed_at,
            "policy_version": record.policy_version,
            "data": record.data,
            "updated_at": updated_at,
            **intake_values(record.data),
        }

    def _execute_write(self, stmt: Any, params: Any) -> sa.CursorResult[Any]:
        """Execute, turning a value the database cannot store (JSON serialization fails in
        SQLAlchemy or, on psycopg, in the driver) into :class:`CaseValidationError`."""
        try:
            return self._conn.execute(stmt, params)
        except DBAPIError:
            raise
        except StatementError as exc:
            if isinstance(exc.orig, (TypeError, ValueError)):
                raise unstorable(exc.orig) from exc
            raise
        except (TypeError, ValueError) as exc:
            raise unstorable(exc) from exc

    def _raise_duplicate(self, record: CaseRecord) -> None:
        # MariaDB under REPEATABLE READ: a locking read sees the row the other writer just
        # committed, where a plain read would use the transaction's older snapshot.
        lock = self._caps.family == "mysql"
        if record.idempotency_key is not None:
            stmt = self._s.select_key_owner
            if lock:
                stmt = stmt.with_for_update(read=True)
            row = self._conn.execute(stmt, {"b_key": record.idempotency_key}).first()
            if row is not None and row.case_id != record.case_id:
                raise IdempotencyConflict(
                    record.idempotency_key,
                    row.case_id,
                    attempted_case_id=record.case_id,
                    existing_version=row.version,
                )
        vstmt = self._s.select_version
        if lock:
            vstmt = vstmt.with_for_update(read=True)
        actual = self._conn.execute(vstmt, {"b_case_id": record.case_id}).scalar()
        raise ConcurrencyConflict(record.case_id, 0, actual)

    def _write_events(
        self, case_id: str, base: int, events: Sequence[NewEvent]
    ) -> list[EventRecord]:
        payloads = [dict(ev.payload) for ev in events]
        times = [ev.at.astimezone(UTC) for ev in events]
        fast, raw = self._fast, self._raw
        outbox_written = False
        try:
            if fast is not None and raw is not None:
                sql = fast.insert_event.sql  # columns in EVENT_COLUMNS order
                ids = [
                    int(fast.execute(raw, sql, (
                        case_id, base + i, ev.type, ev.actor_id, ev.actor_role,
                        time_to_sqlite(at), ev.reason, _json_text(payload), ev.policy_version,
                    )).lastrowid)
                    for i, (ev, payload, at) in enumerate(
                        zip(events, payloads, times, strict=True), start=1
                    )
                ]
            elif self._caps.family == "postgresql" and self._outbox and len(events) == 1:
                (ev,), (payload,), (at,) = events, payloads, times
                row = dict(zip(EVENT_COLUMNS, (
                    case_id, base + 1, ev.type, ev.actor_id, ev.actor_role, at, ev.reason,
                    payload, ev.policy_version,
                ), strict=True))
                result = self._execute_write(self._s.event_with_outbox_pg(), row)
                ids = [int(result.scalar_one())]
                outbox_written = True
            else:
                rows = [
                    {
                        "case_id": case_id,
                        "seq": base + i,
                        "type": ev.type,
                        "actor_id": ev.actor_id,
                        "actor_role": ev.actor_role,
                        "at": at,
                        "reason": ev.reason,
                        "payload": payload,
                        "policy_version": ev.policy_version,
                    }
                    for i, (ev, payload, at) in enumerate(
                        zip(events, payloads, times, strict=True), start=1
                    )
                ]
                if len(rows) == 1:
                    ids = [_new_id(self._execute_write(self._s.insert_event, rows[0]))]
                elif self._caps.multi_returning:
                    result = self._execute_write(self._s.insert_events_returning, rows)
                    ids = [int(r[0]) for r in result]
                else:
                    ids = [
                        _new_id(self._execute_write(self._s.insert_event, row)) for row in rows
                    ]
        except IntegrityError as exc:
            # Only reachable when a writer bypassed the version check (e.g. a raw insert).
            raise ConcurrencyConflict(case_id, base) from exc
        records = [
            EventRecord(
                event_id, case_id, base + i, ev.type, ev.actor_id, ev.actor_role, at,
                ev.reason, payload, ev.policy_version,
            )
            for i, (event_id, ev, payload, at) in enumerate(
                zip(ids, events, payloads, times, strict=True), start=1
            )
        ]
        if not self._outbox or outbox_written:
            return records
        if fast is not None and raw is not None:
            sql = fast.insert_outbox.sql
            for event_id in ids:
                fast.execute(raw, sql, (event_id,))
        else:
            outbox = [{"event_id": event_id} for event_id in ids]
            self._conn.execute(self._s.insert_outbox, outbox[0] if len(outbox) == 1 else outbox)
        return records


class _ThreadTransaction:
    """A transaction on the thread's own connection (file SQLite, engine owned by the
    store): BEGIN / COMMIT straight on the ``sqlite3`` connection. A plain class rather
    than a generator: this runs once per command."""

    __slots__ = ("_conn", "_fallback", "_raw", "_readonly", "_store", "_threads", "_tx")
    _conn: Connection
    _raw: sqlite3.Connection

    def __init__(self, store: Store, threads: ThreadConnections, readonly: bool):
        self._store = store
        self._threads = threads
        self._readonly = readonly
        self._fallback: AbstractContextManager[StoreTx] | None = None
        self._tx: StoreTx | None = None

    def __enter__(self) -> StoreTx:
        conn = self._threads.acquire()
        if conn is None:  # a transaction inside a transaction on this thread
            self._fallback = self._store._transaction(self._readonly)
            return self._fallback.__enter__()
        raw = conn.connection.dbapi_connection
        assert isinstance(raw, sqlite3.Connection)
        self._conn, self._raw = conn, raw
        try:
            raw.execute("BEGIN" if self._readonly else "BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._threads.release(conn)
            error = DBAPIError.instance(None, None, exc, sqlite3.Error)
            raise (self._store._conflict(error) or error) from exc
        self._tx = tx = self._store._tx(conn)
        return tx

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> bool:
        if self._fallback is not None:
            return bool(self._fallback.__exit__(exc_type, exc, tb))
        conn, raw, store = self._conn, self._raw, self._store
        if exc_type is None:
            try:
                if conn.in_transaction():  # a Core statement began SQLAlchemy's transaction
                    conn.commit()
                else:
                    raw.commit()
            except BaseException as failed:
                exc = failed
            else:
                self._threads.release(conn)
                assert self._tx is not None
                store._committed(self._tx)
                return False
        broken = False
        try:
            if conn.in_transaction():
                conn.rollback()
            else:
                raw.rollback()
        except Exception:  # pragma: no cover - a connection that is gone
            broken = True
        if isinstance(exc, sqlite3.Error):
            exc = DBAPIError.instance(None, None, exc, sqlite3.Error)
        conflict = store._conflict(exc) if isinstance(exc, DBAPIError) else None
        broken = broken or (isinstance(exc, DBAPIError) and conflict is None)
        self._threads.release(conn, broken=broken)
        store._failed(self._tx)
        if conflict is not None:
            raise conflict from exc
        if exc_type is None:  # the commit failed
            assert exc is not None
            raise exc
        return False


# ---------------------------------------------------------------------------- store


class Store:
    """gridflow's event store on one database.

    ``bind`` may be:

    * ``None`` — a private in-memory SQLite database (single-threaded; for tests/demos);
    * a URL (``str`` or :class:`~sqlalchemy.engine.URL`) — the store creates and owns an
      engine (see :func:`make_engine`); :meth:`dispose` closes it;
    * an :class:`~sqlalchemy.engine.Engine` — the host's; each gridflow transaction checks
      out a connection and commits it;
    * a :class:`~sqlalchemy.engine.Connection` — gridflow works inside the host's
      transaction (a SAVEPOINT per gridflow transaction) and never commits it; if the
      connection has no transaction open, gridflow begins and commits its own;
    * a :class:`~sqlalchemy.orm.Session` — like a connection, using
      ``session.begin_nested()``; the host commits the session.

    Tables are ``<table_prefix>cases``, ``…events``, ``…timers``, ``…outbox``, in
    ``schema`` when given (a PostgreSQL schema, a MariaDB database). ``outbox=False`` skips
    the outbox rows (replays, what-if runs). ``case_cache`` is how many case rows a SQLite
    store that commits its own transactions keeps decoded (0: none; see
    :mod:`gridflow.store.cache`).
    """

    def __init__(
        self,
        bind: Bind = None,
        *,
        table_prefix: str = "gf_",
        schema: str | None = None,
        outbox: bool = True,
        case_cache: int = 1024,
    ):
        #: whether appended events are also written to the outbox (turn off for replays
        #: and what-if runs that publish nothing; saves one insert per event)
        self.outbox = outbox
        self.tables = build_tables(table_prefix, schema)  # checks the names first
        self.metadata = self.tables.metadata
        self._owns_engine = False
        self._connection: Connection | None = None
        self._session: Session | None = None
        self.engine: Engine | None = None
        if bind is None or isinstance(bind, (str, URL)):
            self.engine = make_engine(bind)
            self._owns_engine = True
            dialect = self.engine.dialect
        elif isinstance(bind, Engine):
            self.engine = bind
            dialect = bind.dialect
        elif isinstance(bind, Connection):
            self._connection = bind
            dialect = bind.dialect
        elif isinstance(bind, Session):
            self._session = bind
            dialect = bind.get_bind().dialect
        else:
            raise TypeError(
                f"Store bind must be an Engine, Connection, Session, URL or None, "
                f"not {type(bind).__name__}"
            )
        self.dialect_name = family(dialect)
        self._stmts = Statements(self.tables)
        self._caps: Caps | None = None
        self._fast: SqliteFast | None = None
        self._pid = os.getpid()
        # gridflow commits its own transactions only with an engine: only then may it
        # cache what it wrote (a host may still roll back a SAVEPOINT's work)
        self._cache: CaseCache | None = None
        if (
            isinstance(case_cache, int)
            and case_cache > 0
            and self.engine is not None
            and self.dialect_name == "sqlite"
        ):
            self._cache = CaseCache(case_cache)
        self._threads: ThreadConnections | None = None
        self._own_connections()

    def _own_connections(self) -> None:
        """A file SQLite store with its own engine keeps one connection per thread."""
        if (
            self._owns_engine
            and self._threads is None
            and self.engine is not None
            and self.dialect_name == "sqlite"
            and not is_memory_sqlite(self.engine.url)
        ):
            self._threads = ThreadConnections(self.engine)

    @classmethod
    def from_url(
        cls,
        url: str | URL,
        *,
        table_prefix: str = "gf_",
        schema: str | None = None,
        outbox: bool = True,
        case_cache: int = 1024,
        **engine_kw: Any,
    ) -> Store:
        """A store owning a new engine for ``url`` (``engine_kw`` go to ``create_engine``)."""
        store = cls(
            make_engine(url, **engine_kw), table_prefix=table_prefix, schema=schema,
            outbox=outbox, case_cache=case_cache,
        )
        store._owns_engine = True
        store._own_connections()
        return store

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dispose()

    def __repr__(self) -> str:
        t = self.tables
        return f"<Store {self.dialect_name} prefix={t.prefix!r} schema={t.schema!r}>"

    # -- schema -----------------------------------------------------------------------

    def create_all(self) -> None:
        """Create the tables (and the PostgreSQL schema) if missing, for tests, demos and
        embedded SQLite. A database created here is stamped with the current migration,
        so :func:`gridflow.store.upgrade` takes over from it later. Production databases
        are brought to the current schema with :func:`gridflow.store.upgrade`. The
        derived scoring tables (:mod:`gridflow.store.aggregates`) are created too, as
        the current migration has them."""
        if self._cache is not None:
            self._cache.clear()
        self._define_aggregates()
        with self._ddl_connection() as conn:
            schema = self.tables.schema
            if (
                schema is not None
                and conn.dialect.name == "postgresql"
                and not conn.dialect.has_schema(conn, schema)
            ):
                conn.execute(sa.schema.CreateSchema(schema))
            self.metadata.create_all(conn)
            versions, head = version_table(self.tables.prefix, schema)
            if not sa.inspect(conn).has_table(versions.name, schema=schema):
                versions.create(conn)
                conn.execute(versions.insert().values(version_num=head))

    def drop_all(self) -> None:
        """Drop gridflow's tables (the derived scoring tables included) and its migration
        record (the data is gone)."""
        if self._cache is not None:
            self._cache.clear()
        self._define_aggregates()
        with self._ddl_connection() as conn:
            self.metadata.drop_all(conn)
            versions, _ = version_table(self.tables.prefix, self.tables.schema)
            versions.drop(conn, checkfirst=True)

    def _define_aggregates(self) -> None:
        from gridflow.store.aggregates import define_aggregate_tables  # imports this module

        define_aggregate_tables(self.metadata, self.tables.prefix)

    @contextmanager
    def _ddl_connection(self) -> Iterator[Connection]:
        if self.engine is not None:
            with self.engine.begin() as conn:
                yield conn
        elif self._connection is not None:
            conn = self._connection
            if conn.in_transaction():
                with conn.begin_nested():
                    yield conn
            else:
                with conn.begin():
                    yield conn
        else:
            assert self._session is not None
            yield self._session.connection()

    # -- transactions -----------------------------------------------------------------

    def transaction(self, *, readonly: bool = False) -> AbstractContextManager[StoreTx]:
        """One database transaction: committed when the block ends, rolled back (nothing
        written) if it raises. Under a host connection/session it is a SAVEPOINT.

        ``readonly=True`` is a hint for SQLite (a deferred ``BEGIN`` that does not take the
        write lock); do not write in such a transaction. A deadlock or lock timeout the
        database reports is raised as :class:`TransactionConflict` (retry).
        """
        if self._pid != os.getpid():
            self._after_fork()
        if self._threads is not None:
            return _ThreadTransaction(self, self._threads, readonly)
        return self._transaction(readonly)

    @contextmanager
    def _transaction(self, readonly: bool) -> Iterator[StoreTx]:
        holder: list[StoreTx] = []
        try:
            if self.engine is not None:
                with self.engine.connect() as conn, conn.begin():
                    self._sqlite_begin(conn, readonly)
                    holder.append(self._tx(conn))
                    yield holder[0]
            elif self._connection is not None:
                conn = self._connection
                if conn.in_transaction():
                    self._sqlite_begin(conn, readonly)
                    with conn.begin_nested():
                        holder.append(self._tx(conn))
                        yield holder[0]
                else:
                    with conn.begin():
                        self._sqlite_begin(conn, readonly)
                        holder.append(self._tx(conn))
                        yield holder[0]
            else:
                assert self._session is not None
                conn = self._session.connection()
                self._sqlite_begin(conn, readonly)
                with self._session.begin_nested():
                    holder.append(self._tx(conn))
                    yield holder[0]
        except (DBAPIError, sqlite3.Error) as exc:  # (the latter: the compiled SQLite path)
            self._failed(holder[0] if holder else None)
            conflict = self._conflict(exc)
            if conflict is not None:
                raise conflict from exc
            raise
        except BaseException:
            self._failed(holder[0] if holder else None)
            raise
        else:
            if holder:
                self._committed(holder[0])

    def _committed(self, tx: StoreTx) -> None:
        cache = self._cache
        if cache is not None and tx._new_cached:
            cache.put_all(tx._new_cached)

    def _failed(self, tx: StoreTx | None) -> None:
        if self._cache is not None and tx is not None:
            self._cache.drop(tx._touched | set(tx._new_cached))

    def _conflict(
        self, exc: DBAPIError | sqlite3.Error
    ) -> TransactionConflict | StoreSchemaError | None:
        """The gridflow error to raise instead of ``exc``, if it is one: a retryable
        conflict, or a schema that is missing or behind. ``exc`` may come from the driver
        itself (the compiled SQLite statements)."""
        error = DBAPIError.instance(None, None, exc, sqlite3.Error) if isinstance(
            exc, sqlite3.Error) else exc
        if not isinstance(error, DBAPIError):
            return None
        detail = _retryable(self.dialect_name, error)
        if detail is not None:
            return TransactionConflict(detail)
        missing = _schema_missing(self.dialect_name, error)
        return None if missing is None else StoreSchemaError(missing)

    def _after_fork(self) -> None:
        """In a forked child: never use the parent's pooled connections."""
        self._pid = os.getpid()
        if self._owns_engine and self.engine is not None:
            self.engine.dispose(close=False)

    # -- outbox publishing ------------------------------------------------------------

    def publish_outbox(
        self, send: Callable[[list[OutboxMessage]], object], *, limit: int = 100
    ) -> int:
        """Hand up to ``limit`` pending messages to ``send`` and remove them from the
        outbox once it returns; returns how many were sent (0: nothing pending).

        All in one transaction: if ``send`` raises, nothing is acknowledged and the same
        messages come again (at-least-once; consumers dedupe on ``event_id``). Run it in
        a loop in one or more publisher processes.
        """
        with self.transaction() as tx:
            messages = tx.outbox_fetch(limit)
            if messages:
                send(messages)
                tx.outbox_ack([m.id for m in messages])
            return len(messages)

    def dispose(self) -> None:
        """Close the engine if this store created it (a host's engine is left alone)."""
        if self._threads is not None:
            self._threads.close_all()
        if self._owns_engine and self.engine is not None:
            self.engine.dispose()

    def _tx(self, conn: Connection) -> StoreTx:
        caps = self._caps
        if caps is None:
            caps = self._caps = Caps(conn.dialect)
        fast: tuple[SqliteFast, sqlite3.Connection] | None = None
        if caps.family == "sqlite":
            raw = conn.connection.dbapi_connection
            if isinstance(raw, sqlite3.Connection):
                if self._fast is None:
                    self._fast = SqliteFast(self._stmts, self.tables, conn.dialect)
                fast = (self._fast, raw)
        return StoreTx(self, conn, caps, fast)

    def _sqlite_begin(self, conn: Connection, readonly: bool) -> None:
        """Make SQLite really begin a transaction now.

        Python's sqlite3 driver (legacy transaction control, the default before 3.16)
        only emits BEGIN before the first INSERT/UPDATE/DELETE, so reads run outside the
        transaction and a SAVEPOINT would commit on release. gridflow emits
        ``BEGIN IMMEDIATE`` itself, which also takes the write lock up front: concurrent
        writers wait (busy timeout) instead of failing with ``database is locked``.
        """
        if self.dialect_name != "sqlite":
            return
        raw = conn.connection.dbapi_connection
        if isinstance(raw, sqlite3.Connection) and not raw.in_transaction:
            raw.execute("BEGIN" if readonly else "BEGIN IMMEDIATE")
