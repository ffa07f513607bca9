"""initial schema: cases, events, timers, outbox

Revision ID: 0001
Revises:
Create Date: 2025-03-03 09:00:00

gridflow migrations are frozen: they spell out every table, column and index (never
build them from gridflow.store.tables, which changes with later migrations). Names come
from the prefix/schema of the run: ``names()``.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from gridflow.migrations.naming import MYSQL_TABLE, names
from gridflow.store.tables import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _where(condition: str) -> dict[str, Any]:
    return {"sqlite_where": sa.text(condition), "postgresql_where": sa.text(condition)}


def upgrade() -> None:
    p, schema = names()
    op.create_table(
        f"{p}cases",
        sa.Column("case_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=True),
        sa.Column("category", sa.String(64), nullable=True),
        sa.Column("unit", sa.String(128), nullable=True),
        sa.Column("lead_department", sa.String(128), nullable=True),
        sa.Column("pool", sa.String(128), nullable=True),
        sa.Column("handler", sa.String(128), nullable=True),
        sa.Column("tier", sa.String(32), nullable=True),
        sa.Column("due_at", UTCDateTime(), nullable=True),
        sa.Column("warn_at", UTCDateTime(), nullable=True),
        sa.Column("reported_at", UTCDateTime(), nullable=True),
        sa.Column("dispatched_at", UTCDateTime(), nullable=True),
        sa.Column("closed_at", UTCDateTime(), nullable=True),
        sa.Column("policy_version", sa.String(64), nullable=True),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("case_id", name=f"pk_{p}cases"),
        schema=schema,
        **MYSQL_TABLE,
    )
    # partial on SQLite and PostgreSQL: rows with a NULL key are not indexed
    op.create_index(
        f"uq_{p}cases_idempotency_key", f"{p}cases", ["idempotency_key"], unique=True,
        schema=schema, **_where("idempotency_key IS NOT NULL"),
    )
    for column in ("lead_department", "pool", "handler", "unit"):
        op.create_index(
            f"ix_{p}cases_{column}", f"{p}cases", [column], schema=schema,
            **_where(f"{column} IS NOT NULL"),
        )
    op.create_index(
        f"ix_{p}cases_closed_at_due_at", f"{p}cases", ["closed_at", "due_at"], schema=schema,
        **_where("closed_at IS NULL AND due_at IS NOT NULL"),
    )
    op.create_table(
        f"{p}events",
        sa.Column("id", _id(), autoincrement=True, nullable=False),
        sa.Column("case_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("actor_id", sa.String(128), nullable=False),
        sa.Column("actor_role", sa.String(64), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column(
            "reason", sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb"),
            nullable=True,
        ),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("policy_version", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=f"pk_{p}events"),
        sa.ForeignKeyConstraint(
            ["case_id"], [f"{schema}.{p}cases.case_id" if schema else f"{p}cases.case_id"],
            name=f"fk_{p}events_case_id_{p}cases",
        ),
        sa.UniqueConstraint("case_id", "seq", name=f"uq_{p}events_case_id_seq"),
        schema=schema,
        **MYSQL_TABLE,
    )
    op.create_table(
        f"{p}timers",
        sa.Column("id", _id(), autoincrement=True, nullable=False),
        sa.Column("case_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("due_at", UTCDateTime(), nullable=False),
        sa.Column("fired_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=f"pk_{p}timers"),
        sa.ForeignKeyConstraint(
            ["case_id"], [f"{schema}.{p}cases.case_id" if schema else f"{p}cases.case_id"],
            name=f"fk_{p}timers_case_id_{p}cases",
        ),
        sa.UniqueConstraint("case_id", "kind", "due_at", name=f"uq_{p}timers_case_id_kind_due_at"),
        schema=schema,
        **MYSQL_TABLE,
    )
    op.create_index(
        f"ix_{p}timers_fired_at_due_at", f"{p}timers", ["fired_at", "due_at"], schema=schema,
        **_where("fired_at IS NULL"),
    )
    op.create_table(
        f"{p}outbox",
        sa.Column("event_id", _id(), autoincrement=False, nullable=False),
        sa.PrimaryKeyConstraint("event_id", name=f"pk_{p}outbox"),
        sa.ForeignKeyConstraint(
            ["event_id"], [f"{schema}.{p}events.id" if schema else f"{p}events.id"],
            name=f"fk_{p}outbox_event_id_{p}events",
        ),
        schema=schema,
        **MYSQL_TABLE,
    )


def downgrade() -> None:
    p, schema = names()
    for table in ("outbox", "timers", "events", "cases"):
        op.drop_table(f"{p}{table}", schema=schema)
