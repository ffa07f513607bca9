"""scoring tables: case_facts, case_units, scores (derived from the event history)

Revision ID: 0002
Revises: 0001
Create Date: 2025-06-02 09:00:00

The tables of gridflow.store.aggregates (BRIEF §8), spelled out as they were when this
migration was written (frozen, like 0001). They hold derived data only: no foreign keys,
and ``gridflow.indicators.refresh`` rebuilds them from the events at any time.

Before this migration ``refresh`` created the tables itself on first use (with these very
definitions), so a database at 0001 may have them already: a table that exists is left
as it is (not in offline mode, which cannot look).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import mysql

from gridflow.migrations.naming import MYSQL_TABLE, names
from gridflow.store.tables import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _flag(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.SmallInteger(), nullable=False)


def _existing(schema: str | None) -> set[str]:
    """The tables already in the database (none in offline mode)."""
    if context.is_offline_mode():
        return set()
    return set(sa.inspect(op.get_bind()).get_table_names(schema=schema))


def upgrade() -> None:
    p, schema = names()
    existing = _existing(schema)
    facts = f"{p}case_facts"
    if facts not in existing:
        _create_facts(facts, p, schema)
    units = f"{p}case_units"
    if units not in existing:
        _create_units(units, p, schema)
    scores = f"{p}scores"
    if scores not in existing:
        _create_scores(scores, p, schema)


def _create_facts(facts: str, p: str, schema: str | None) -> None:
    op.create_table(
        facts,
        sa.Column("case_id", sa.String(64), nullable=False),
        sa.Column("case_version", sa.Integer(), nullable=False),
        sa.Column("policy_version", sa.String(64), nullable=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("reported_at", UTCDateTime(), nullable=False),
        sa.Column("report_week", sa.String(8), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("category", sa.String(64), nullable=True),
        sa.Column("location", sa.String(128), nullable=True),
        sa.Column("lead", sa.String(128), nullable=True),
        sa.Column("reporter", sa.String(128), nullable=True),
        _flag("filed"),
        _flag("cancelled"),
        _flag("deferred"),
        _flag("closed"),
        _flag("on_time"),
        _flag("extended"),
        _flag("evaluated"),
        sa.Column("rework_count", sa.Integer(), nullable=False),
        sa.Column("satisfaction", sa.String(32), nullable=True),
        sa.Column("due_at", UTCDateTime(), nullable=True),
        sa.Column("closed_at", UTCDateTime(), nullable=True),
        sa.Column("handling_seconds", sa.BigInteger(), nullable=True),
        sa.Column("composite_centi", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("case_id", name=f"pk_{p}case_facts"),
        schema=schema,
        **MYSQL_TABLE,
    )
    for columns in (["reported_at"], ["lead", "reported_at"], ["reporter", "reported_at"],
                    ["policy_version"]):
        op.create_index(f"ix_{facts}_{'_'.join(columns)}", facts, columns, schema=schema)


def _create_units(units: str, p: str, schema: str | None) -> None:
    op.create_table(
        units,
        sa.Column("case_id", sa.String(64), nullable=False),
        sa.Column("level", sa.String(64), nullable=False),
        sa.Column("unit", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("case_id", "level", name=f"pk_{p}case_units"),
        schema=schema,
        **MYSQL_TABLE,
    )
    op.create_index(f"ix_{units}_level_unit", units, ["level", "unit"], schema=schema)


def _create_scores(scores: str, p: str, schema: str | None) -> None:
    op.create_table(
        scores,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  autoincrement=True, nullable=False),
        sa.Column("case_id", sa.String(64), nullable=False),
        sa.Column("policy_version", sa.String(64), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        _flag("current"),
        sa.Column("subject_kind", sa.String(16), nullable=False),
        sa.Column("subject_id", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("timeliness", sa.Double(), nullable=False),
        sa.Column("resolution", sa.Double(), nullable=False),
        sa.Column("quality", sa.Double(), nullable=False),
        sa.Column("satisfaction", sa.Double(), nullable=False),
        sa.Column("composite_centi", sa.Integer(), nullable=False),
        sa.Column("exempt", sa.String(64), nullable=False),
        sa.Column(
            "reason", sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb"),
            nullable=True,
        ),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("case_version", sa.Integer(), nullable=False),
        sa.Column("reported_at", UTCDateTime(), nullable=False),
        sa.Column("scored_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=f"pk_{p}scores"),
        sa.UniqueConstraint(
            "case_id", "policy_version", "revision", "subject_kind", "subject_id", "role",
            name=f"uq_{p}scores_revision",
        ),
        schema=schema,
        **MYSQL_TABLE,
    )
    op.create_index(
        f"ix_{p}scores_subject", scores,
        ["policy_version", "current", "subject_kind", "reported_at"], schema=schema,
    )


def downgrade() -> None:
    p, schema = names()
    for table in ("scores", "case_units", "case_facts"):
        op.drop_table(f"{p}{table}", schema=schema)
