"""The event store: cases, their append-only events, timers and the outbox.

One :class:`Store` is bound to a database (an engine it creates, or the host's engine,
connection or session). All work happens in :meth:`Store.transaction`, which yields a
:class:`StoreTx`: one database transaction that commits when the block ends and rolls
back on any exception. Statements are SQLAlchemy Core, built once per store; on SQLite
the four statements of a command (read the case, update it, insert its events and outbox
rows) are compiled once by SQLAlchemy and run directly on the ``sqlite3`` connection, which
halves their cost (they then bypass SQLAlchemy's cursor events and ``echo`` logging).

Concurrency: ``append`` updates the case row only when its ``version`` is the one the
caller read (``ConcurrencyConflict`` otherwise), then inserts the events with the next
sequence numbers and their outbox rows. Timers and outbox rows are claimed with
``SELECT … FOR UPDATE SKIP LOCKED`` on PostgreSQL and MariaDB ≥ 10.6 / MySQL ≥ 8; on
SQLite a gridflow transaction takes the write lock up front (``BEGIN IMMEDIATE``), so
writers are serialized.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, StatementError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from gridflow.errors import (
    CaseNotFound,
    CaseValidationError,
    ConcurrencyConflict,
    FieldError,
    GridflowRuntimeError,
)
from gridflow.store.records import (
    CaseRecord,
    EventRecord,
    NewEvent,
    OutboxMessage,
    TimerRecord,
)
from gridflow.store.tables import MAX_LENGTHS, StoreTables, build_tables

__all__ = ["IdempotencyConflict", "Store", "StoreTx", "make_engine"]

Bind = Engine | Connection | Session | str | URL | None

_CASE_FIELDS = (  # the order of CaseRecord's fields
    "case_id",
    "version",
    "state",
    "data",
    "idempotency_key",
    "category",
    "unit",
    "lead_department",
    "pool",
    "handler",
    "tier",
    "due_at",
    "warn_at",
    "reported_at",
    "dispatched_at",
    "closed_at",
    "policy_version",
    "updated_at",
)
# Columns an append may leave alone when they did not change (SQLite then rewrites no index
# entry for them); version, data and updated_at are always written.
_CASE_SCALARS = (
    "state",
    "idempotency_key",
    "category",
    "unit",
    "lead_department",
    "pool",
    "handler",
    "tier",
    "due_at",
    "warn_at",
    "reported_at",
    "dispatched_at",
    "closed_at",
    "policy_version",
)
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


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _family(dialect: sa.engine.Dialect) -> str:
    return "mysql" if dialect.name in ("mysql", "mariadb") else dialect.name


def _is_memory_sqlite(url: URL) -> bool:
    db = url.database or ""
    return db in ("", ":memory:") or url.query.get("mode") == "memory"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        # checkpoint every ~40 MB of WAL instead of ~4 MB: each checkpoint fsyncs, and hot
        # pages (indexes, the case table) are copied once per checkpoint, not per commit
        cur.execute("PRAGMA wal_autocheckpoint=10000")
    finally:
        cur.close()


def _sqlite_memory_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    try:
        cur.execute("PRAGMA foreign_keys=ON")
    finally:
        cur.close()


def make_engine(url: str | URL | None = None, **kw: Any) -> Engine:
    """An engine configured the way gridflow wants it (what ``Store(url)`` uses).

    * ``None`` / ``sqlite://``: in-memory SQLite on one shared connection (``StaticPool``;
      single-threaded use only);
    * SQLite file: WAL journal (checkpoint every 10,000 pages), ``synchronous=NORMAL``,
      foreign keys on, 30 s busy timeout;
    * MariaDB/MySQL: ``charset=utf8mb4`` and ``READ COMMITTED`` isolation;
    * every backend: JSON written as UTF-8 text (Chinese stays readable in the database).

    Keyword arguments go to :func:`sqlalchemy.create_engine` and win over these defaults.
    """
    u = sa.make_url(url if url is not None else "sqlite://")
    family = "mysql" if u.get_backend_name() in ("mysql", "mariadb") else u.get_backend_name()
    opts: dict[str, Any] = {"json_serializer": _dumps}
    listener: Any = None
    if family == "sqlite":
        if _is_memory_sqlite(u):
            opts["poolclass"] = StaticPool
            opts["connect_args"] = {"check_same_thread": False}
            listener = _sqlite_memory_pragmas
        else:
            opts["connect_args"] = {"timeout": 30.0}
            listener = _sqlite_pragmas
    elif family == "mysql":
        if "charset" not in u.query:
            u = u.update_query_dict({"charset": "utf8mb4"})
        opts["isolation_level"] = "READ COMMITTED"
        opts["pool_recycle"] = 3600
    opts.update(kw)
    engine = sa.create_engine(u, **opts)
    if listener is not None:
        sa_event.listen(engine, "connect", listener)
    return engine


class _Caps:
    """What the connected database supports (worked out once per store)."""

    def __init__(self, dialect: sa.engine.Dialect):
        self.family = _family(dialect)
        version = tuple(dialect.server_version_info or ())
        if self.family == "postgresql":
            self.skip_locked = version >= (9, 5)
        elif self.family == "mysql":
            is_mariadb = bool(getattr(dialect, "is_mariadb", False))
            self.skip_locked = version >= ((10, 6) if is_mariadb else (8, 0, 1))
        else:
            self.skip_locked = False
        self.row_locks = self.family in ("postgresql", "mysql")
        self.multi_returning = bool(
            getattr(dialect, "insert_executemany_returning_sort_by_parameter_order", False)
        )


class _Statements:
    """Core statements built once per store (SQLAlchemy caches their compiled form)."""

    def __init__(self, t: StoreTables):
        c, e, tm, o = t.cases, t.events, t.timers, t.outbox
        bp = sa.bindparam
        self.case_columns = [c.c[name] for name in _CASE_FIELDS]
        self.select_case = sa.select(*self.case_columns).where(c.c.case_id == bp("b_case_id"))
        self.select_case_locked = self.select_case.with_for_update()
        self.select_version = sa.select(c.c.version).where(c.c.case_id == bp("b_case_id"))
        self.select_by_key = sa.select(*self.case_columns).where(
            c.c.idempotency_key == bp("b_key")
        )
        self.select_key_owner = sa.select(c.c.case_id, c.c.version).where(
            c.c.idempotency_key == bp("b_key")
        )
        self.insert_case = sa.insert(c)
        # rowcount tells whether ON CONFLICT DO NOTHING inserted the row
        self.insert_case_pg = (
            pg_dialect.insert(c).on_conflict_do_nothing().execution_options(preserve_rowcount=True)
        )
        self.insert_case_sqlite = (
            sqlite_dialect.insert(c)
            .on_conflict_do_nothing()
            .execution_options(preserve_rowcount=True)
        )
        self.update_case = sa.update(c).where(
            c.c.case_id == bp("b_case_id"), c.c.version == bp("b_expected")
        )
        self.insert_event = sa.insert(e)
        self.insert_events_returning = sa.insert(e).returning(
            e.c.id, sort_by_parameter_order=True
        )
        self.insert_outbox = sa.insert(o)
        self.history = (
            sa.select(
                e.c.id, e.c.case_id, e.c.seq, e.c.type, e.c.actor_id, e.c.actor_role,
                e.c.at, e.c.reason, e.c.payload, e.c.policy_version,
            )
            .where(e.c.case_id == bp("b_case_id"))
            .order_by(e.c.seq)
        )
        self.case_timers = sa.select(tm.c.id, tm.c.kind, tm.c.due_at, tm.c.fired_at).where(
            tm.c.case_id == bp("b_case_id")
        )
        self.delete_timers = sa.delete(tm).where(
            tm.c.id.in_(bp("b_ids", expanding=True)), tm.c.fired_at.is_(None)
        )
        self.insert_timer = sa.insert(tm)
        due = (
            sa.select(tm.c.id, tm.c.case_id, tm.c.kind, tm.c.due_at)
            .where(tm.c.fired_at.is_(None), tm.c.due_at <= bp("b_now", type_=tm.c.due_at.type))
            .order_by(tm.c.due_at, tm.c.id)
            .limit(bp("b_limit", type_=sa.Integer))
        )
        self.due_timers = due
        self.due_timers_locked = due.with_for_update()
        self.due_timers_skip = due.with_for_update(skip_locked=True)
        self.fire_timers = (
            sa.update(tm)
            .where(tm.c.id.in_(bp("b_ids", expanding=True)), tm.c.fired_at.is_(None))
            .values(fired_at=bp("b_now", type_=tm.c.fired_at.type))
        )
        pending = (
            sa.select(
                o.c.id, o.c.event_id, o.c.case_id, o.c.seq, o.c.type, o.c.payload, o.c.created_at
            )
            .where(o.c.published_at.is_(None))
            .order_by(o.c.id)
            .limit(bp("b_limit", type_=sa.Integer))
        )
        self.outbox_pending = pending
        self.outbox_pending_skip = pending.with_for_update(skip_locked=True)
        self.outbox_unpublished_of = (
            sa.select(o.c.case_id, o.c.seq)
            .where(
                o.c.published_at.is_(None),
                o.c.case_id.in_(bp("b_case_ids", expanding=True)),
                o.c.seq <= bp("b_max_seq", type_=sa.Integer),
            )
            .order_by(o.c.case_id, o.c.seq)
        )
        self.outbox_ack = (
            sa.update(o)
            .where(o.c.id.in_(bp("b_ids", expanding=True)), o.c.published_at.is_(None))
            .values(published_at=bp("b_at", type_=o.c.published_at.type))
        )
        self.outbox_purge = sa.delete(o).where(
            o.c.published_at.is_not(None),
            o.c.published_at < bp("b_before", type_=o.c.published_at.type),
        )


class _Compiled:
    """A statement compiled for one dialect, run straight on the DBAPI cursor."""

    __slots__ = ("names", "procs", "sql")

    def __init__(self, stmt: Any, dialect: sa.engine.Dialect, column_keys: Sequence[str] | None):
        compiled = stmt.compile(dialect=dialect, column_keys=column_keys)
        self.sql = str(compiled)
        self.names: tuple[str, ...] = tuple(compiled.positiontup or ())
        procs: list[Any] = []
        for name in self.names:
            bind = compiled.binds[name]
            procs.append(bind.type.dialect_impl(dialect).bind_processor(dialect))
        self.procs: tuple[Any, ...] = tuple(procs)

    def args(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(
            params[n] if p is None else p(params[n])
            for n, p in zip(self.names, self.procs, strict=True)
        )


class _SqliteFast:
    """The hot statements of a command (read case, update it, insert events and outbox
    rows) executed directly on the ``sqlite3`` connection.

    SQLAlchemy still writes the SQL (compiled once from the same Core statements) and
    converts every value (the same type processors Core uses); this only skips the
    per-execution machinery, which on SQLite costs more than the database work itself.
    """

    def __init__(self, stmts: _Statements, t: StoreTables, dialect: sa.engine.Dialect):
        self.dialect = dialect
        self.select_case = _Compiled(stmts.select_case, dialect, None)
        self.case_results = tuple(
            col.type.dialect_impl(dialect).result_processor(dialect, None)
            for col in stmts.select_case.selected_columns
        )
        self.insert_case = _Compiled(stmts.insert_case_sqlite, dialect, _CASE_FIELDS)
        self.insert_event = _Compiled(sa.insert(t.events), dialect, _EVENT_COLUMNS)
        self.insert_outbox = _Compiled(sa.insert(t.outbox), dialect, _OUTBOX_COLUMNS)
        self._updates: dict[tuple[str, ...], _Compiled] = {}
        self._update_stmt = stmts.update_case

    def update(self, columns: tuple[str, ...]) -> _Compiled:
        entry = self._updates.get(columns)
        if entry is None:
            entry = self._updates[columns] = _Compiled(self._update_stmt, self.dialect, columns)
        return entry

    def run(self, raw: sqlite3.Connection, stmt: _Compiled, params: Mapping[str, Any]) -> Any:
        try:
            args = stmt.args(params)
        except (TypeError, ValueError) as exc:
            raise _unstorable(exc) from exc
        try:
            return raw.execute(stmt.sql, args)
        except sqlite3.Error as exc:
            raise DBAPIError.instance(
                stmt.sql, args, exc, sqlite3.Error, dialect=self.dialect
            ) from exc

    def case_from_row(self, row: Sequence[Any]) -> CaseRecord:
        values: list[Any] = [
            v if p is None else p(v) for v, p in zip(row, self.case_results, strict=True)
        ]
        return CaseRecord(*values)


_EVENT_COLUMNS = (
    "case_id", "seq", "type", "actor_id", "actor_role", "at", "reason", "payload",
    "policy_version",
)
_OUTBOX_COLUMNS = ("event_id", "case_id", "seq", "type", "payload", "created_at", "published_at")


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
    record: CaseRecord, fields: Collection[str] = _CASE_SCALARS
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


def _validate_events(events: Sequence[NewEvent], errors: list[FieldError]) -> None:
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
    if errors:
        raise CaseValidationError(errors, source="store")


def _case_from_row(row: Sequence[Any]) -> CaseRecord:
    return CaseRecord(*row)


def _event_from_row(row: Sequence[Any]) -> EventRecord:
    return EventRecord(*row)


def _unstorable(exc: BaseException) -> CaseValidationError:
    return CaseValidationError(
        [FieldError("data/payload", f"cannot be stored as JSON: {exc}")], source="store"
    )


def _new_id(result: sa.CursorResult[Any]) -> int:
    pk = result.inserted_primary_key
    if pk is None or pk[0] is None:  # pragma: no cover - every supported driver reports it
        raise GridflowRuntimeError("the database did not report the new event id")
    return int(pk[0])


# ---------------------------------------------------------------------------- transaction


class StoreTx:
    """Operations inside one database transaction (obtained from :meth:`Store.transaction`)."""

    __slots__ = ("_caps", "_conn", "_fast", "_outbox", "_raw", "_s", "_seen", "_t")

    def __init__(
        self,
        store: Store,
        conn: Connection,
        caps: _Caps,
        fast: tuple[_SqliteFast, sqlite3.Connection] | None = None,
    ):
        self._conn = conn
        self._s = store._stmts
        self._t = store.tables
        self._caps = caps
        self._outbox = store.outbox
        self._fast: _SqliteFast | None = None
        self._raw: sqlite3.Connection | None = None
        if fast is not None:
            self._fast, self._raw = fast
        # case_id -> (version, _CASE_SCALARS values) as last read or written here
        self._seen: dict[str, tuple[int, tuple[Any, ...]]] = {}

    @property
    def connection(self) -> Connection:
        """The SQLAlchemy connection this transaction runs on (for host-side joins)."""
        return self._conn

    # -- cases ------------------------------------------------------------------------

    def get_case(self, case_id: str, *, for_update: bool = False) -> CaseRecord | None:
        """The case, or ``None``. ``for_update`` also locks its row (PostgreSQL/MariaDB)."""
        fast, raw = self._fast, self._raw
        if fast is not None and raw is not None:
            row = fast.run(raw, fast.select_case, {"b_case_id": case_id}).fetchone()
            record = None if row is None else fast.case_from_row(row)
        else:
            stmt = self._s.select_case_locked if for_update and self._caps.row_locks else (
                self._s.select_case
            )
            found = self._conn.execute(stmt, {"b_case_id": case_id}).first()
            record = None if found is None else _case_from_row(found)
        if record is not None:
            self._remember(record)
        return record

    def _remember(self, record: CaseRecord) -> None:
        self._seen[record.case_id] = (
            record.version,
            tuple(getattr(record, name) for name in _CASE_SCALARS),
        )

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
        family = self._caps.family
        fast, raw = self._fast, self._raw
        if fast is not None and raw is not None:
            inserted = fast.run(raw, fast.insert_case, values).rowcount == 1
        elif family in ("postgresql", "sqlite"):
            stmt = self._s.insert_case_pg if family == "postgresql" else self._s.insert_case_sqlite
            inserted = self._execute_write(stmt, values).rowcount == 1
        else:
            # MariaDB/MySQL roll back just the failed statement; others need a savepoint.
            guard = nullcontext() if family == "mysql" else self._conn.begin_nested()
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
        return written

    def append(
        self, record: CaseRecord, expected_version: int, events: Sequence[NewEvent]
    ) -> list[EventRecord]:
        """Store the new projection and append events, if the case is still at
        ``expected_version``; otherwise raise :class:`ConcurrencyConflict` (or
        :class:`CaseNotFound`). Sets ``record.version`` to ``expected_version + len(events)``.
        """
        new_version = expected_version + len(events)
        scalars = tuple(getattr(record, name) for name in _CASE_SCALARS)
        seen = self._seen.get(record.case_id)
        if seen is not None and seen[0] == expected_version:
            # Only what changed since this transaction read (or wrote) the case is checked
            # and written: unchanged indexed columns then cost no index maintenance.
            changed = tuple(
                name
                for name, old, new in zip(_CASE_SCALARS, seen[1], scalars, strict=True)
                if old != new or type(old) is not type(new)
            )
        else:
            changed = _CASE_SCALARS
        errors = _validate_case(record, changed)
        _validate_events(events, errors)
        _raise_invalid(errors)
        columns = ("version", "data", "updated_at", *changed)
        values: dict[str, Any] = {name: getattr(record, name) for name in changed}
        values["version"] = new_version
        values["data"] = record.data
        values["updated_at"] = events[-1].at.astimezone(UTC)
        values["b_case_id"] = record.case_id
        values["b_expected"] = expected_version
        fast, raw = self._fast, self._raw
        if fast is not None and raw is not None:
            rowcount = fast.run(raw, fast.update(columns), values).rowcount
        else:
            rowcount = self._execute_write(self._s.update_case, values).rowcount
        if rowcount != 1:
            actual = self._conn.execute(
                self._s.select_version, {"b_case_id": record.case_id}
            ).scalar()
            if actual is None:
                raise CaseNotFound(record.case_id)
            raise ConcurrencyConflict(record.case_id, expected_version, actual)
        self._seen[record.case_id] = (new_version, scalars)
        written = self._write_events(record.case_id, expected_version, events)
        record.version = expected_version + len(events)
        record.updated_at = values["updated_at"]
        return written

    def history(self, case_id: str) -> list[EventRecord]:
        """Every event of the case, ordered by ``seq``."""
        rows = self._conn.execute(self._s.history, {"b_case_id": case_id})
        return [_event_from_row(r) for r in rows]

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
        return [_case_from_row(r) for r in self._conn.execute(stmt)]

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
        same pairs writes nothing.
        """
        errors: list[FieldError] = []
        for i, (kind, due_at) in enumerate(timers):
            _check_text(errors, f"timers[{i}].kind", kind, required=True, limit="kind")
            _check_time(errors, f"timers[{i}].due_at", due_at, required=True)
        _raise_invalid(errors)
        unfired: dict[tuple[str, datetime], int] = {}
        fired: set[tuple[str, datetime]] = set()
        for timer_id, kind, due_at, fired_at in self._conn.execute(
            self._s.case_timers, {"b_case_id": case_id}
        ):
            if fired_at is None:
                unfired[(kind, due_at)] = timer_id
            else:
                fired.add((kind, due_at))
        wanted = dict.fromkeys((kind, due_at) for kind, due_at in timers)  # no duplicates
        stale = [timer_id for key, timer_id in unfired.items() if key not in wanted]
        rows = [
            {"case_id": case_id, "kind": kind, "due_at": due_at, "fired_at": None}
            for kind, due_at in wanted
            if (kind, due_at) not in unfired and (kind, due_at) not in fired
        ]
        if stale:
            self._conn.execute(self._s.delete_timers, {"b_ids": stale})
        if rows:
            self._conn.execute(self._s.insert_timer, rows)

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
        return them (oldest first). Concurrent workers never get the same timer: rows
        are locked with ``SKIP LOCKED`` where available; SQLite serializes writers.
        """
        errors: list[FieldError] = []
        _check_time(errors, "now", now, required=True)
        _raise_invalid(errors)
        if self._caps.skip_locked:
            stmt = self._s.due_timers_skip
        elif self._caps.row_locks:
            stmt = self._s.due_timers_locked
        else:
            stmt = self._s.due_timers
        rows = self._conn.execute(stmt, {"b_now": now, "b_limit": limit}).all()
        if not rows:
            return []
        ids = [r.id for r in rows]
        result = self._conn.execute(self._s.fire_timers, {"b_ids": ids, "b_now": now})
        if result.rowcount != len(ids):
            raise GridflowRuntimeError(
                "timers were claimed by another worker at the same time; retry the tick"
            )
        return [TimerRecord(r.id, r.case_id, r.kind, r.due_at, now) for r in rows]

    # -- outbox -----------------------------------------------------------------------

    def outbox_fetch(self, limit: int = 100) -> list[OutboxMessage]:
        """Up to ``limit`` unpublished messages, oldest first.

        With several publishers (PostgreSQL/MariaDB) rows are locked with ``SKIP LOCKED``
        and a message is handed out only when every earlier unpublished message of its
        case is in the same batch, so each case's events are published in order. Call
        :meth:`outbox_ack` in the same transaction, after publishing, to keep the locks.
        """
        if not self._caps.skip_locked:
            rows = self._conn.execute(self._s.outbox_pending, {"b_limit": limit}).all()
            return [OutboxMessage(*r) for r in rows]
        rows = self._conn.execute(self._s.outbox_pending_skip, {"b_limit": limit}).all()
        if not rows:
            return []
        mine: dict[str, set[int]] = {}
        for r in rows:
            mine.setdefault(r.case_id, set()).add(r.seq)
        unpublished = self._conn.execute(
            self._s.outbox_unpublished_of,
            {"b_case_ids": list(mine), "b_max_seq": max(r.seq for r in rows)},
        )
        allowed: dict[str, int] = {}  # highest publishable seq per case
        blocked: set[str] = set()
        for case_id, seq in unpublished:
            if case_id in blocked:
                continue
            if seq in mine[case_id]:
                allowed[case_id] = seq
            else:
                blocked.add(case_id)
        return [
            OutboxMessage(*r) for r in rows if r.seq <= allowed.get(r.case_id, 0)
        ]

    def outbox_ack(self, ids: Sequence[int], at: datetime) -> None:
        """Mark messages as published at ``at`` (already published ones are left as they are)."""
        if not ids:
            return
        errors: list[FieldError] = []
        _check_time(errors, "at", at, required=True)
        _raise_invalid(errors)
        self._conn.execute(self._s.outbox_ack, {"b_ids": list(ids), "b_at": at})

    def outbox_purge(self, published_before: datetime) -> int:
        """Delete messages published before ``published_before``; returns how many."""
        errors: list[FieldError] = []
        _check_time(errors, "published_before", published_before, required=True)
        _raise_invalid(errors)
        result = self._conn.execute(self._s.outbox_purge, {"b_before": published_before})
        return int(result.rowcount)

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
                raise _unstorable(exc.orig) from exc
            raise
        except (TypeError, ValueError) as exc:
            raise _unstorable(exc) from exc

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
        fast, raw = self._fast, self._raw
        try:
            if fast is not None and raw is not None:
                ids = [int(fast.run(raw, fast.insert_event, row).lastrowid) for row in rows]
            elif len(rows) == 1:
                ids = [_new_id(self._execute_write(self._s.insert_event, rows[0]))]
            elif self._caps.multi_returning:
                result = self._execute_write(self._s.insert_events_returning, rows)
                ids = [int(r[0]) for r in result]
            else:
                ids = [_new_id(self._execute_write(self._s.insert_event, row)) for row in rows]
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
        if not self._outbox:
            return records
        outbox = [
            {
                "event_id": rec.id,
                "case_id": case_id,
                "seq": rec.seq,
                "type": rec.type,
                "payload": rec.to_dict(),
                "created_at": rec.at,
                "published_at": None,
            }
            for rec in records
        ]
        if fast is not None and raw is not None:
            for row in outbox:
                fast.run(raw, fast.insert_outbox, row)
        else:
            self._execute_write(
                self._s.insert_outbox, outbox[0] if len(outbox) == 1 else outbox
            )
        return records


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
    the outbox rows (replays, what-if runs).
    """

    def __init__(
        self,
        bind: Bind = None,
        *,
        table_prefix: str = "gf_",
        schema: str | None = None,
        outbox: bool = True,
    ):
        #: whether appended events are also written to the outbox (turn off for replays
        #: and what-if runs that publish nothing; saves one insert per event)
        self.outbox = outbox
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
            session_bind = bind.get_bind()
            dialect = session_bind.dialect
        else:
            raise TypeError(
                f"Store bind must be an Engine, Connection, Session, URL or None, "
                f"not {type(bind).__name__}"
            )
        self.dialect_name = _family(dialect)
        self.tables = build_tables(table_prefix, schema)
        self.metadata = self.tables.metadata
        self._stmts = _Statements(self.tables)
        self._caps: _Caps | None = None
        self._fast: _SqliteFast | None = None

    @classmethod
    def from_url(
        cls,
        url: str | URL,
        *,
        table_prefix: str = "gf_",
        schema: str | None = None,
        outbox: bool = True,
        **engine_kw: Any,
    ) -> Store:
        """A store owning a new engine for ``url`` (``engine_kw`` go to ``create_engine``)."""
        store = cls(
            make_engine(url, **engine_kw), table_prefix=table_prefix, schema=schema, outbox=outbox
        )
        store._owns_engine = True
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
        """Create the tables (and the PostgreSQL schema) if missing. Production databases
        should be brought to the current schema with the Alembic migrations instead."""
        with self._ddl_connection() as conn:
            schema = self.tables.schema
            if (
                schema is not None
                and conn.dialect.name == "postgresql"
                and not conn.dialect.has_schema(conn, schema)
            ):
                conn.execute(sa.schema.CreateSchema(schema))
            self.metadata.create_all(conn)

    def drop_all(self) -> None:
        """Drop gridflow's tables (the data is gone)."""
        with self._ddl_connection() as conn:
            self.metadata.drop_all(conn)

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

    @contextmanager
    def transaction(self, *, readonly: bool = False) -> Iterator[StoreTx]:
        """One database transaction: committed when the block ends, rolled back (nothing
        written) if it raises. Under a host connection/session it is a SAVEPOINT.

        ``readonly=True`` is a hint for SQLite (a deferred ``BEGIN`` that does not take the
        write lock); do not write in such a transaction.
        """
        if self.engine is not None:
            with self.engine.connect() as conn, conn.begin():
                self._sqlite_begin(conn, readonly)
                yield self._tx(conn)
        elif self._connection is not None:
            conn = self._connection
            if conn.in_transaction():
                self._sqlite_begin(conn, readonly)
                with conn.begin_nested():
                    yield self._tx(conn)
            else:
                with conn.begin():
                    self._sqlite_begin(conn, readonly)
                    yield self._tx(conn)
        else:
            assert self._session is not None
            conn = self._session.connection()
            self._sqlite_begin(conn, readonly)
            with self._session.begin_nested():
                yield self._tx(conn)

    def dispose(self) -> None:
        """Close the engine if this store created it (a host's engine is left alone)."""
        if self._owns_engine and self.engine is not None:
            self.engine.dispose()

    def _tx(self, conn: Connection) -> StoreTx:
        caps = self._capabilities(conn)
        fast: tuple[_SqliteFast, sqlite3.Connection] | None = None
        if caps.family == "sqlite":
            raw = conn.connection.dbapi_connection
            if isinstance(raw, sqlite3.Connection):
                if self._fast is None:
                    self._fast = _SqliteFast(self._stmts, self.tables, conn.dialect)
                fast = (self._fast, raw)
        return StoreTx(self, conn, caps, fast)

    def _capabilities(self, conn: Connection) -> _Caps:
        caps = self._caps
        if caps is None:
            caps = self._caps = _Caps(conn.dialect)
        return caps

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
