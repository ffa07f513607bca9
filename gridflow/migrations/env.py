"""Alembic environment for gridflow's tables.

Run through :func:`gridflow.store.upgrade` (which passes a locked connection and the
prefix/schema in ``Config.attributes``), or with the ``alembic`` command line and
``-x db=URL -x prefix=gf_ -x schema=S`` (see alembic.ini next to this file).
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

from gridflow.store.aggregates import define_aggregate_tables
from gridflow.store.connect import make_engine
from gridflow.store.migrate import migration_lock, migration_options
from gridflow.store.tables import build_tables

config = context.config
prefix, schema, url = migration_options(config)
metadata = build_tables(prefix, schema).metadata
define_aggregate_tables(metadata, prefix)  # the scoring tables (migration 0002)
version_table = f"{prefix}alembic_version"


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Autogenerate (the drift check) looks at gridflow's tables of this prefix only."""
    return type_ != "table" or (name is not None and name.startswith(prefix))


def run_offline() -> None:
    context.configure(
        url=url, literal_binds=True, version_table=version_table,
        version_table_schema=schema, target_metadata=metadata, include_name=include_name,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection, version_table=version_table, version_table_schema=schema,
        target_metadata=metadata, include_name=include_name,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_on(connection)
        return
    if not url:
        raise SystemExit("no database: pass -x db=URL (or use `gridflow db upgrade --db URL`)")
    engine = make_engine(url)
    try:
        with engine.connect() as conn, migration_lock(conn, prefix, schema):
            run_on(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
