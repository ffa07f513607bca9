"""What a migration script needs besides Alembic: the table prefix and schema of the run,
and the MariaDB table options every gridflow table has."""

from __future__ import annotations

from typing import Any

from alembic import context

from gridflow.store.migrate import migration_options

__all__ = ["MYSQL_TABLE", "names"]

#: 4-byte UTF-8 and exact (binary) comparison of ids and keys on MariaDB/MySQL.
MYSQL_TABLE: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}


def names() -> tuple[str, str | None]:
    """(table prefix, schema) of the running migration."""
    prefix, schema, _ = migration_options(context.config)
    return prefix, schema
