"""The store's tables, as the code uses them (and ``create_all`` creates them).

:func:`build_tables` makes a fresh :class:`~sqlalchemy.MetaData` for a table prefix and
schema, so a host can put gridflow's tables where it wants them. The constraint naming
convention keeps generated names stable. The Alembic migrations in ``gridflow/migrations``
spell the same tables out (a migration never changes); ``tests/test_migrations.py``
checks that a migrated database and these definitions agree on every backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect

__all__ = [
    "MAX_LENGTHS",
    "NAMING_CONVENTION",
    "StoreTables",
    "UTCDateTime",
    "build_tables",
    "check_names",
]

#: Column lengths (characters). utf8mb4 uses up to 4 bytes per character; every index
#: stays far below InnoDB's 3072-byte key limit.
MAX_LENGTHS: dict[str, int] = {
    "case_id": 64,
    "state": 32,
    "idempotency_key": 128,
    "category": 64,
    "unit": 128,
    "lead_department": 128,
    "pool": 128,
    "handler": 128,
    "tier": 32,
    "policy_version": 64,
    "type": 64,
    "actor_id": 128,
    "actor_role": 64,
    "kind": 32,
    "location": 64,
    "address": 255,
    "reporter": 128,
}

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# MariaDB/MySQL: 4-byte UTF-8 and binary (exact, case-sensitive) comparison of ids and keys.
_MYSQL_TABLE_KW: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A timezone-aware datetime stored as UTC on every backend.

    PostgreSQL keeps ``timestamptz``; SQLite and MariaDB/MySQL (which drop the offset) get
    the UTC wall time, microseconds included (``DATETIME(6)`` on MariaDB). Naive datetimes
    are refused; values come back aware, in UTC.
    """

    impl = sa.DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(sa.DateTime(timezone=True))
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()}: gridflow needs aware datetimes")
        value = value.astimezone(UTC)
        if dialect.name == "postgresql":
            return value
        return value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


@dataclass(frozen=True)
class StoreTables:
    metadata: sa.MetaData
    cases: sa.Table
    events: sa.Table
    timers: sa.Table
    outbox: sa.Table
    prefix: str
    schema: str | None


def _s(name: str) -> sa.String:
    return sa.String(MAX_LENGTHS[name])


def _partial(condition: sa.ColumnElement[bool]) -> dict[str, Any]:
    """A partial index on SQLite and PostgreSQL (MariaDB indexes every row)."""
    return {"sqlite_where": condition, "postgresql_where": condition}


def _id_type() -> sa.types.TypeEngine[int]:
    # BIGINT on the servers; INTEGER on SQLite, where an INTEGER PRIMARY KEY is the rowid
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,23}")
_SCHEMA = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")


def check_names(table_prefix: str, schema: str | None) -> None:
    """Refuse a table prefix or schema name gridflow cannot use safely: a prefix is at most
    24 letters, digits or ``_`` (so every generated index name fits PostgreSQL's 63 and
    MariaDB's 64 characters); a schema is a plain identifier."""
    if not isinstance(table_prefix, str) or not _PREFIX.fullmatch(table_prefix):
        raise ValueError(
            f"table_prefix {table_prefix!r}: use up to 24 letters, digits or '_', "
            "not starting with a digit (e.g. 'gf_')"
        )
    if schema is not None and (not isinstance(schema, str) or not _SCHEMA.fullmatch(schema)):
        raise ValueError(
            f"schema {schema!r}: use a plain identifier (letters, digits, '_', '$')"
        )


def build_tables(table_prefix: str = "gf_", schema: str | None = None) -> StoreTables:
    """Define gridflow's four tables in a new MetaData (``<prefix>cases`` etc.)."""
    check_names(table_prefix, schema)
    md = sa.MetaData(schema=schema, naming_convention=NAMING_CONVENTION)
    p = table_prefix
    cases = sa.Table(
        f"{p}cases",
        md,
        sa.Column("case_id", _s("case_id"), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", _s("state"), nullable=False),
        sa.Column("idempotency_key", _s("idempotency_key"), nullable=True),
        sa.Column("category", _s("category")),
        sa.Column("unit", _s("unit")),
        sa.Column("lead_department", _s("lead_department")),
        sa.Column("pool", _s("pool")),
        sa.Column("handler", _s("handler")),
        sa.Column("tier", _s("tier")),
        sa.Column("due_at", UTCDateTime()),
        sa.Column("warn_at", UTCDateTime()),
        sa.Column("reported_at", UTCDateTime()),
        sa.Column("dispatched_at", UTCDateTime()),
        sa.Column("closed_at", UTCDateTime()),
        sa.Column("policy_version", _s("policy_version")),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        # the intake fields history conditions compare (written once, with the report)
        sa.Column("location", _s("location")),
        sa.Column("address", _s("address")),
        sa.Column("reporter", _s("reporter")),
        **_MYSQL_TABLE_KW,
    )
    # Every index is paid for by every write that changes one of its columns (on SQLite
    # one more page written per index and commit), so the set is small and, on SQLite and
    # PostgreSQL, partial: rows whose key is NULL (a case not yet dispatched, keyless
    # intake) are not in it at all.
    #
    # * idempotency keys are unique (NULL: no key);
    # * worklists of a lead department, pool, handler or unit (state is not in these
    #   indexes: it changes on every step);
    # * the supervision lists (overdue, near due) read open cases by deadline:
    #   ``closed_at IS NULL AND due_at <= t``.
    sa.Index(
        f"uq_{p}cases_idempotency_key", cases.c.idempotency_key, unique=True,
        **_partial(cases.c.idempotency_key.is_not(None)),
    )
    for name in ("lead_department", "pool", "handler", "unit"):
        col = cases.c[name]
        sa.Index(None, col, **_partial(col.is_not(None)))
    sa.Index(
        None, cases.c.closed_at, cases.c.due_at,
        **_partial(sa.and_(cases.c.closed_at.is_(None), cases.c.due_at.is_not(None))),
    )
    # * history conditions count the cases reported in a window, by time, or by address
    #   and time (the usual "same address within 30 days").
    sa.Index(None, cases.c.reported_at)
    sa.Index(
        None, cases.c.address, cases.c.reported_at, **_partial(cases.c.address.is_not(None))
    )
    events = sa.Table(
        f"{p}events",
        md,
        sa.Column("id", _id_type(), primary_key=True, autoincrement=True),
        sa.Column("case_id", _s("case_id"), sa.ForeignKey(cases.c.case_id), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("type", _s("type"), nullable=False),
        sa.Column("actor_id", _s("actor_id"), nullable=False),
        sa.Column("actor_role", _s("actor_role"), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("reason", sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("policy_version", _s("policy_version")),
        sa.UniqueConstraint("case_id", "seq"),
        **_MYSQL_TABLE_KW,
    )
    timers = sa.Table(
        f"{p}timers",
        md,
        sa.Column("id", _id_type(), primary_key=True, autoincrement=True),
        sa.Column("case_id", _s("case_id"), sa.ForeignKey(cases.c.case_id), nullable=False),
        sa.Column("kind", _s("kind"), nullable=False),
        sa.Column("due_at", UTCDateTime(), nullable=False),
        sa.Column("fired_at", UTCDateTime()),
        sa.UniqueConstraint("case_id", "kind", "due_at"),
        **_MYSQL_TABLE_KW,
    )
    # due timers: unfired ones by due time (a fired timer leaves the partial index)
    sa.Index(None, timers.c.fired_at, timers.c.due_at, **_partial(timers.c.fired_at.is_(None)))
    # The outbox holds the ids of events not yet published (a row is deleted when the
    # host acknowledges it): one narrow insert per event, and the pending set stays small.
    outbox = sa.Table(
        f"{p}outbox",
        md,
        sa.Column("event_id", _id_type(), sa.ForeignKey(events.c.id), primary_key=True,
                  autoincrement=False),
        **_MYSQL_TABLE_KW,
    )
    return StoreTables(md, cases, events, timers, outbox, table_prefix, schema)
