"""The store's tables: one definition, used by ``create_all`` and by Alembic migrations.

:func:`build_tables` makes a fresh :class:`~sqlalchemy.MetaData` for a table prefix and
schema, so a host can put gridflow's tables where it wants them. The constraint naming
convention keeps generated names stable for migrations.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect

__all__ = ["MAX_LENGTHS", "NAMING_CONVENTION", "StoreTables", "UTCDateTime", "build_tables"]

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


def build_tables(table_prefix: str = "gf_", schema: str | None = None) -> StoreTables:
    """Define gridflow's four tables in a new MetaData (``<prefix>cases`` etc.)."""
    md = sa.MetaData(schema=schema, naming_convention=NAMING_CONVENTION)
    p = table_prefix
    cases = sa.Table(
        f"{p}cases",
        md,
        sa.Column("case_id", _s("case_id"), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", _s("state"), nullable=False),
        sa.Column("idempotency_key", _s("idempotency_key"), nullable=True, unique=True),
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
        # Worklists: open cases (closed_at IS NULL) of a department, pool or handler; state
        # is left out of those indexes because it changes on every step (each changed
        # indexed column costs an index rewrite per command).
        sa.Index(None, "lead_department", "closed_at"),
        sa.Index(None, "pool", "closed_at"),
        sa.Index(None, "handler", "closed_at"),
        sa.Index(None, "unit", "closed_at"),
        sa.Index(None, "state", "due_at"),
        sa.Index(None, "due_at"),
        sa.Index(None, "warn_at"),
        **_MYSQL_TABLE_KW,
    )
    events = sa.Table(
        f"{p}events",
        md,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
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
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("case_id", _s("case_id"), sa.ForeignKey(cases.c.case_id), nullable=False),
        sa.Column("kind", _s("kind"), nullable=False),
        sa.Column("due_at", UTCDateTime(), nullable=False),
        sa.Column("fired_at", UTCDateTime()),
        sa.UniqueConstraint("case_id", "kind", "due_at"),
        sa.Index(None, "fired_at", "due_at"),
        **_MYSQL_TABLE_KW,
    )
    outbox = sa.Table(
        f"{p}outbox",
        md,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"),
                  sa.ForeignKey(events.c.id), nullable=False, unique=True),
        sa.Column("case_id", _s("case_id"), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("type", _s("type"), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("published_at", UTCDateTime()),
        sa.Index(None, "published_at", "id"),
        **_MYSQL_TABLE_KW,
    )
    return StoreTables(md, cases, events, timers, outbox, table_prefix, schema)
