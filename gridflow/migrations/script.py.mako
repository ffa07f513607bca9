"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

gridflow migrations are frozen: they spell out every table, column and index (never
build them from gridflow.store.tables, which changes with later migrations). Names come
from the prefix/schema of the run: ``names()``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gridflow.migrations.naming import names
${imports if imports else ""}

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    p, schema = names()
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    p, schema = names()
    ${downgrades if downgrades else "pass"}
