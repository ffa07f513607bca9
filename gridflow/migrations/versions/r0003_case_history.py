"""case history: the intake columns history conditions compare, and their indexes

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 09:00:00

Routing rules may count earlier cases (BRIEF §5: "≥3 cases of the same category at the
same address within 30 days"). The cases table gets the intake fields they compare —
``location``, ``address``, ``reporter`` (written once, when the case is reported) — filled
for the cases already stored from their projection, and two indexes: reported time, and
address with reported time (partial: cases with an address).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gridflow.migrations.naming import names

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_COLUMNS = (("location", 64), ("address", 255), ("reporter", 128))


def _json_text(dialect: str, name: str) -> str:
    """SQL reading ``data -> case -> name`` as text, per dialect."""
    if dialect == "postgresql":
        return f"(data -> 'case' ->> '{name}')"
    if dialect in ("mysql", "mariadb"):
        return f"JSON_UNQUOTE(JSON_EXTRACT(data, '$.case.{name}'))"
    return f"json_extract(data, '$.case.{name}')"


def upgrade() -> None:
    p, schema = names()
    table = f"{p}cases"
    with op.batch_alter_table(table, schema=schema) as batch:
        for name, length in _COLUMNS:
            batch.add_column(sa.Column(name, sa.String(length), nullable=True))
    dialect = op.get_context().dialect.name
    qualified = f"{schema}.{table}" if schema else table
    length_of = "CHAR_LENGTH" if dialect in ("mysql", "mariadb") else "LENGTH"
    for name, length in _COLUMNS:
        value = _json_text(dialect, name)
        # values longer than the column stay NULL (what the store writes for them)
        op.execute(
            f"UPDATE {qualified} SET {name} = {value} "
            f"WHERE {value} IS NOT NULL AND {length_of}({value}) <= {length}"
        )
    op.create_index(f"ix_{p}cases_reported_at", table, ["reported_at"], schema=schema)
    op.create_index(
        f"ix_{p}cases_address_reported_at", table, ["address", "reported_at"], schema=schema,
        sqlite_where=sa.text("address IS NOT NULL"),
        postgresql_where=sa.text("address IS NOT NULL"),
    )


def downgrade() -> None:
    p, schema = names()
    table = f"{p}cases"
    op.drop_index(f"ix_{p}cases_address_reported_at", table_name=table, schema=schema)
    op.drop_index(f"ix_{p}cases_reported_at", table_name=table, schema=schema)
    with op.batch_alter_table(table, schema=schema) as batch:
        for name, _length in reversed(_COLUMNS):
            batch.drop_column(name)
