"""The store's SQL: Core statements built once per store, and the SQLite fast path.

:class:`Statements` holds every statement the store runs, built from the tables of one
prefix/schema (SQLAlchemy caches their compiled form). :class:`SqliteFast` runs the hot
statements of a command straight on the ``sqlite3`` connection: SQLAlchemy still writes
the SQL (compiled once from the same Core statements) and its type processors convert the
values (times and JSON use equivalent, faster converters); only the per-execution
machinery is skipped, which on SQLite costs more than the database work itself.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from json.encoder import c_make_encoder as _c_make_encoder  # type: ignore[attr-defined]
from json.encoder import encode_basestring as _encode_str
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import DBAPIError

from gridflow.errors import CaseValidationError, FieldError
from gridflow.store.records import CaseRecord, TimerRecord
from gridflow.store.tables import MAX_LENGTHS, StoreTables, UTCDateTime

__all__ = [
    "CASE_FIELDS",
    "CASE_INSERT_FIELDS",
    "CASE_SCALARS",
    "EVENT_COLUMNS",
    "INTAKE_FIELDS",
    "SqliteFast",
    "Statements",
    "decode_json",
    "encode_json",
    "intake_values",
    "time_to_sqlite",
    "unstorable",
]

CASE_FIELDS = (  # the order of CaseRecord's fields
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
# The case's intake fields that history conditions compare: written with the report (from
# the projection's ``case``), never changed; not part of CaseRecord.
INTAKE_FIELDS = ("location", "address", "reporter")
CASE_INSERT_FIELDS = CASE_FIELDS + INTAKE_FIELDS


def intake_values(data: Mapping[str, Any]) -> dict[str, str | None]:
    """The intake columns of a projection (``None`` where a value is missing, or longer
    than its column: such a case is not counted by history conditions on that field)."""
    case = data.get("case")
    case = case if isinstance(case, Mapping) else {}
    out: dict[str, str | None] = {}
    for name in INTAKE_FIELDS:
        value = case.get(name)
        ok = isinstance(value, str) and value and len(value) <= MAX_LENGTHS[name]
        out[name] = value if ok else None
    return out


# Columns an append may leave alone when they did not change (SQLite then rewrites no index
# entry for them); version, data and updated_at are always written.
CASE_SCALARS = tuple(
    f for f in CASE_FIELDS if f not in ("case_id", "version", "data", "updated_at")
)
EVENT_COLUMNS = (
    "case_id", "seq", "type", "actor_id", "actor_role", "at", "reason", "payload",
    "policy_version",
)


def unstorable(exc: BaseException) -> CaseValidationError:
    return CaseValidationError(
        [FieldError("data/payload", f"cannot be stored as JSON: {exc}")], source="store"
    )


class Statements:
    """Core statements built once per store (SQLAlchemy caches their compiled form)."""

    def __init__(self, t: StoreTables):
        c, e, tm, o = t.cases, t.events, t.timers, t.outbox
        bp = sa.bindparam
        self.case_columns = [c.c[name] for name in CASE_FIELDS]
        self.select_case = sa.select(*self.case_columns).where(c.c.case_id == bp("b_case_id"))
        self.select_case_locked = self.select_case.with_for_update()
        self.select_version = sa.select(c.c.version).where(c.c.case_id == bp("b_case_id"))
        self.select_version_locked = self.select_version.with_for_update()
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
        self._event_outbox_pg: Any = None
        self._tables = t
        self._counts: dict[tuple[str, ...], sa.Select[Any]] = {}
        self.event_columns = (
            e.c.id, e.c.case_id, e.c.seq, e.c.type, e.c.actor_id, e.c.actor_role,
            e.c.at, e.c.reason, e.c.payload, e.c.policy_version,
        )
        self.history = (
            sa.select(*self.event_columns)
            .where(e.c.case_id == bp("b_case_id"))
            .order_by(e.c.seq)
        )
        # -- timers
        self.case_timers = sa.select(tm.c.id, tm.c.kind, tm.c.due_at, tm.c.fired_at).where(
            tm.c.case_id == bp("b_case_id")
        )
        self.delete_timers = sa.delete(tm).where(
            tm.c.id.in_(bp("b_ids", expanding=True)), tm.c.fired_at.is_(None)
        )
        self.insert_timer = sa.insert(tm)
        now = bp("b_now", type_=tm.c.due_at.type)
        self.due_timers = (
            sa.select(tm.c.id, tm.c.case_id, tm.c.kind, tm.c.due_at)
            .where(tm.c.fired_at.is_(None), tm.c.due_at <= now)
            .order_by(tm.c.due_at, tm.c.id)
            .limit(bp("b_limit", type_=sa.Integer))
        )
        self.fire_timers = (
            sa.update(tm)
            .where(tm.c.id.in_(bp("b_ids", expanding=True)), tm.c.fired_at.is_(None))
            .values(fired_at=bp("b_now", type_=tm.c.fired_at.type))
        )
        # tick on the servers: the cases of due timers are locked first (the order
        # commands lock in: case row, then its timers), then their due timers
        self.due_cases = (
            sa.select(tm.c.case_id)
            .where(tm.c.fired_at.is_(None), tm.c.due_at <= now)
            .order_by(tm.c.due_at, tm.c.id)
            .limit(bp("b_limit", type_=sa.Integer))
        )
        lock_cases = (
            sa.select(c.c.case_id)
            .where(c.c.case_id.in_(bp("b_case_ids", expanding=True)))
            .order_by(c.c.case_id)
            .limit(bp("b_limit", type_=sa.Integer))
        )
        self.lock_cases_skip = lock_cases.with_for_update(skip_locked=True)
        self.lock_cases = lock_cases.with_for_update()
        due_of = (
            sa.select(tm.c.id, tm.c.case_id, tm.c.kind, tm.c.due_at)
            .where(
                tm.c.case_id.in_(bp("b_case_ids", expanding=True)),
                tm.c.fired_at.is_(None),
                tm.c.due_at <= now,
            )
            .order_by(tm.c.due_at, tm.c.id)
        )
        self.due_timers_of = due_of.with_for_update()
        # MariaDB may scan (and would wait on) other cases' timer rows to find these
        self.due_timers_of_skip = due_of.with_for_update(skip_locked=True)
        # -- outbox
        pending = (
            sa.select(*self.event_columns)
            .select_from(o.join(e, e.c.id == o.c.event_id))
            .order_by(o.c.event_id)
            .limit(bp("b_limit", type_=sa.Integer))
        )
        self.outbox_pending = pending
        # several publishers: lock outbox rows alone (a locking join could lock more rows
        # than it returns on MariaDB), then read their events
        self.outbox_claim = (
            sa.select(o.c.event_id)
            .order_by(o.c.event_id)
            .limit(bp("b_limit", type_=sa.Integer))
            .with_for_update(skip_locked=True)
        )
        self.events_by_id = (
            sa.select(*self.event_columns)
            .where(e.c.id.in_(bp("b_ids", expanding=True)))
            .order_by(e.c.id)
        )
        # the pending events of some cases up to a sequence number (publication order)
        self.outbox_pending_of = (
            sa.select(e.c.case_id, e.c.seq)
            .select_from(o.join(e, e.c.id == o.c.event_id))
            .where(
                e.c.case_id.in_(bp("b_case_ids", expanding=True)),
                e.c.seq <= bp("b_max_seq", type_=sa.Integer),
            )
            .order_by(e.c.case_id, e.c.seq)
        )
        self.outbox_delete = sa.delete(o).where(o.c.event_id.in_(bp("b_ids", expanding=True)))
        self.outbox_count = sa.select(sa.func.count()).select_from(o)



    def count_reported(self, same: tuple[str, ...]) -> sa.Select[Any]:
        """How many cases were reported in ``[b_since, b_before)`` with the values
        ``b_<name>`` in the ``same`` columns (one statement per combination: history
        conditions ask on every dispatch)."""
        stmt = self._counts.get(same)
        if stmt is None:
            c = self._tables.cases
            when = c.c.reported_at.type
            stmt = sa.select(sa.func.count()).select_from(c).where(
                c.c.reported_at >= sa.bindparam("b_since", type_=when),
                c.c.reported_at < sa.bindparam("b_before", type_=when),
                *(c.c[name] == sa.bindparam(f"b_{name}", type_=c.c[name].type)
                  for name in same),
            )
            self._counts[same] = stmt
        return stmt
    def event_with_outbox_pg(self) -> Any:
        """PostgreSQL: insert one event and its outbox row in one statement (one round
        trip): ``WITH e AS (INSERT … RETURNING id), o AS (INSERT INTO outbox SELECT id FROM
        e) SELECT id FROM e``. (Several rows would need a multi-VALUES insert, which
        SQLAlchemy compiles anew every time: those take the two-statement way.)"""
        stmt = self._event_outbox_pg
        if stmt is None:
            e, o = self._tables.events, self._tables.outbox
            values = {c: sa.bindparam(c, type_=e.c[c].type) for c in EVENT_COLUMNS}
            new = sa.insert(e).values(values).returning(e.c.id).cte("new_event")
            outbox = sa.insert(o).from_select(["event_id"], sa.select(new.c.id))
            stmt = self._event_outbox_pg = (
                sa.select(new.c.id).add_cte(outbox.cte("new_outbox"))
            )
        return stmt


# ---------------------------------------------------------------------------- SQLite


_SQLITE_TIMES: dict[datetime, str] = {}  # recent UTC answers: a case row's times are events'


def time_to_sqlite(value: datetime | None) -> str | None:
    """UTCDateTime's SQLite storage format (what SQLAlchemy writes), without its overhead."""
    if value is None:
        return None
    if value.tzinfo is UTC:  # "YYYY-MM-DD HH:MM:SS.ffffff+00:00" without its offset
        text = _SQLITE_TIMES.get(value)
        if text is None:
            text = value.isoformat(" ", "microseconds")[:26]
            if len(_SQLITE_TIMES) >= 4096:
                _SQLITE_TIMES.clear()
            _SQLITE_TIMES[value] = text
        return text
    if value.tzinfo is not UTC:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"naive datetime {value.isoformat()}: gridflow needs aware datetimes"
            )
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


_ENCODER = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=False
)
# the C encoder JSONEncoder.encode builds on every call, built once (same arguments)
_c_encode: Callable[[Any, int], Sequence[str]] | None = (
    None if _c_make_encoder is None else
    _c_make_encoder(None, _ENCODER.default, _encode_str, None, ":", ",", False, False, False)
)


def encode_json(value: Any) -> str:
    """JSON for the SQLite fast path: the same text as :func:`dumps` (a circular structure
    raises RecursionError instead of ValueError)."""
    if _c_encode is None or type(value) is str:
        return _ENCODER.encode(value)
    return "".join(_c_encode(value, 0))

decode_json = json.JSONDecoder().decode


def _time_from_sqlite(value: str | None) -> datetime | None:
    if value is None:
        return None
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def _json_from_sqlite(value: str | None) -> Any:
    return None if value is None else decode_json(value)


def _bind_processor(col_type: Any, dialect: sa.engine.Dialect) -> Any:
    if isinstance(col_type, UTCDateTime):
        return time_to_sqlite
    if isinstance(col_type, sa.JSON):
        return encode_json
    return col_type.dialect_impl(dialect).bind_processor(dialect)


def _result_processor(col_type: Any, dialect: sa.engine.Dialect) -> Any:
    if isinstance(col_type, UTCDateTime):
        return _time_from_sqlite
    if isinstance(col_type, sa.JSON):
        return _json_from_sqlite
    return col_type.dialect_impl(dialect).result_processor(dialect, None)


class Compiled:
    """A statement compiled for SQLite, run straight on the ``sqlite3`` connection.

    ``raw`` names parameters the caller passes already converted (JSON text).
    """

    __slots__ = ("names", "procs", "results", "sql")

    def __init__(
        self,
        stmt: Any,
        dialect: sa.engine.Dialect,
        column_keys: Sequence[str] | None,
        raw: Sequence[str] = (),
    ):
        compiled = stmt.compile(dialect=dialect, column_keys=column_keys)
        self.sql = str(compiled)
        self.names: tuple[str, ...] = tuple(compiled.positiontup or ())
        self.procs: tuple[Any, ...] = tuple(
            None if name in raw else _bind_processor(compiled.binds[name].type, dialect)
            for name in self.names
        )
        selected = getattr(stmt, "selected_columns", None)
        self.results: tuple[Any, ...] = tuple(
            _result_processor(col.type, dialect) for col in (selected or ())
        )

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        return [
            params[n] if p is None else p(params[n])
            for n, p in zip(self.names, self.procs, strict=True)
        ]

    def row(self, row: Sequence[Any]) -> list[Any]:
        return [v if p is None else p(v) for v, p in zip(row, self.results, strict=True)]


class SqliteFast:
    """The hot statements of a command, compiled for SQLite (see the module docstring)."""

    def __init__(self, stmts: Statements, t: StoreTables, dialect: sa.engine.Dialect):
        self.dialect = dialect
        self.select_case = Compiled(stmts.select_case, dialect, None)
        self.select_version = Compiled(stmts.select_version, dialect, None)
        self.insert_case = Compiled(stmts.insert_case_sqlite, dialect, CASE_INSERT_FIELDS,
                                    ("data",))
        self.insert_event = Compiled(sa.insert(t.events), dialect, EVENT_COLUMNS)
        # append builds the event rows' arguments itself, in this order
        assert self.insert_event.names == EVENT_COLUMNS, self.insert_event.names
        self.insert_outbox = Compiled(sa.insert(t.outbox), dialect, ("event_id",))
        self.case_timers = Compiled(stmts.case_timers, dialect, None)
        self.insert_timer = Compiled(
            sa.insert(t.timers), dialect, ("case_id", "kind", "due_at", "fired_at")
        )
        self._updates: dict[tuple[str, ...], Compiled] = {}
        self._update_stmt = stmts.update_case
        self._counts: dict[tuple[str, ...], Compiled] = {}
        self._stmts = stmts
        self._histories: dict[int, Compiled] = {}
        self._inserts: dict[tuple[str, tuple[str, ...]], Compiled] = {}

    def update(self, columns: tuple[str, ...]) -> Compiled:
        """The case update writing ``columns`` (one compiled form per column set)."""
        entry = self._updates.get(columns)
        if entry is None:
            entry = self._updates[columns] = Compiled(
                self._update_stmt, self.dialect, columns, ("data",)
            )
        return entry

    def count_reported(self, same: tuple[str, ...]) -> Compiled:
        """:meth:`Statements.count_reported`, compiled (one per ``same`` combination)."""
        entry = self._counts.get(same)
        if entry is None:
            entry = self._counts[same] = Compiled(
                self._stmts.count_reported(same), self.dialect, None
            )
        return entry

    def run(self, raw: sqlite3.Connection, stmt: Compiled, params: Mapping[str, Any]) -> Any:
        try:
            args = stmt.args(params)
        except (TypeError, ValueError, RecursionError) as exc:
            raise unstorable(exc) from exc
        return self.execute(raw, stmt.sql, args)

    def run_many(
        self, raw: sqlite3.Connection, stmt: Compiled, rows: Sequence[Mapping[str, Any]]
    ) -> None:
        try:
            args = [stmt.args(row) for row in rows]
        except (TypeError, ValueError, RecursionError) as exc:
            raise unstorable(exc) from exc
        try:
            raw.executemany(stmt.sql, args)
        except sqlite3.Error as exc:
            raise DBAPIError.instance(
                stmt.sql, args, exc, sqlite3.Error, dialect=self.dialect
            ) from exc

    def execute(self, raw: sqlite3.Connection, sql: str, args: Sequence[Any]) -> Any:
        try:
            return raw.execute(sql, args)
        except sqlite3.Error as exc:
            raise DBAPIError.instance(sql, args, exc, sqlite3.Error, dialect=self.dialect) from exc

    def execute_many(
        self, raw: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]
    ) -> Any:
        """``executemany`` of arguments already converted (``rowcount`` is their sum)."""
        try:
            return raw.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise DBAPIError.instance(sql, rows, exc, sqlite3.Error, dialect=self.dialect) from exc

    def histories(self, n: int) -> Compiled:
        """The events of ``n`` cases (parameters ``i0`` … ``i<n-1>``), by case and seq."""
        entry = self._histories.get(n)
        if entry is None:
            e = self._stmts.history.selected_columns
            t = self._stmts._tables.events
            stmt = (
                sa.select(*e)
                .where(t.c.case_id.in_([sa.bindparam(f"i{k}") for k in range(n)]))
                .order_by(t.c.case_id, t.c.seq)
            )
            if len(self._histories) >= 16:
                self._histories.clear()
            entry = self._histories[n] = Compiled(stmt, self.dialect, None)
        return entry

    def insert(self, table: sa.Table, columns: tuple[str, ...]) -> Compiled:
        """A plain insert of ``columns`` into ``table`` (one compiled form per column set)."""
        key = (table.name, columns)
        entry = self._inserts.get(key)
        if entry is None:
            entry = self._inserts[key] = Compiled(sa.insert(table), self.dialect, columns)
        return entry

    def case_from_row(self, row: Sequence[Any]) -> CaseRecord:
        return CaseRecord(*self.select_case.row(row))

    def timers_of(self, raw: sqlite3.Connection, case_id: str) -> list[TimerRecord]:
        stmt = self.case_timers
        rows = self.execute(raw, stmt.sql, (case_id,)).fetchall()
        return [TimerRecord(r[0], case_id, *stmt.row(r)[1:]) for r in rows]
