"""Schema migrations: Alembic scripts shipped in ``gridflow/migrations``.

:func:`upgrade` brings a database to the current schema (``gridflow db upgrade --db URL``
does the same from the command line). Each table prefix/schema has its own version table,
``<prefix>alembic_version``, so gridflow's migrations never mix with the host's own
Alembic history. Several nodes may run the upgrade at once when they deploy: it takes a
lock first (PostgreSQL advisory lock, MariaDB ``GET_LOCK``, SQLite's write lock), and the
later ones find the schema current. PostgreSQL and SQLite migrate in one transaction;
MariaDB commits each DDL statement (a failed migration may need cleaning up by hand).

Alembic is imported only when a migration runs.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine

from gridflow.store.connect import family, make_engine
from gridflow.store.tables import check_names

if TYPE_CHECKING:  # pragma: no cover
    from alembic.config import Config

__all__ = [
    "HEAD",
    "MIGRATIONS",
    "alembic_config",
    "current_revision",
    "migration_lock",
    "migration_options",
    "upgrade",
    "upgrade_sql",
    "version_table",
]

#: The newest migration (``create_all`` stamps databases it creates with it).
HEAD = "0003"
#: Where the Alembic environment and the version scripts live.
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"

_PREFIX_KEY = "gridflow.prefix"
_SCHEMA_KEY = "gridflow.schema"
_URL_KEY = "gridflow.url"


def version_table(table_prefix: str = "gf_", schema: str | None = None) -> tuple[sa.Table, str]:
    """The Alembic version table of a prefix/schema (as Alembic creates it) and ``HEAD``."""
    name = f"{table_prefix}alembic_version"
    table = sa.Table(
        name,
        sa.MetaData(),
        sa.Column("version_num", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("version_num", name=f"{name}_pkc"),
        schema=schema,
    )
    return table, HEAD


def alembic_config(
    table_prefix: str = "gf_",
    schema: str | None = None,
    *,
    connection: Connection | None = None,
    url: str | URL | None = None,
    output: io.StringIO | None = None,
) -> Config:
    """An Alembic ``Config`` for gridflow's migrations (no ini file needed)."""
    from alembic.config import Config

    cfg = Config(output_buffer=output) if output is not None else Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes[_PREFIX_KEY] = table_prefix
    cfg.attributes[_SCHEMA_KEY] = schema
    if connection is not None:
        cfg.attributes["connection"] = connection
    if url is not None:
        cfg.attributes[_URL_KEY] = url
    return cfg


def migration_options(config: Any) -> tuple[str, str | None, str | URL | None]:
    """(prefix, schema, url) for a migration run: from the helper's ``Config.attributes``,
    else from ``alembic -x prefix=… -x schema=… -x db=URL`` (alembic.ini in the package)."""
    attrs = config.attributes
    if _PREFIX_KEY in attrs:
        return attrs[_PREFIX_KEY], attrs.get(_SCHEMA_KEY), attrs.get(_URL_KEY)
    x: dict[str, str] = {}
    for item in config.cmd_opts.x if config.cmd_opts is not None and config.cmd_opts.x else []:
        key, _, value = item.partition("=")
        x[key.strip()] = value.strip()
    prefix = x.get("prefix", "gf_")
    schema = x.get("schema") or None
    check_names(prefix, schema)
    return prefix, schema, x.get("db") or config.get_main_option("sqlalchemy.url")


def _lock_key(table_prefix: str, schema: str | None) -> str:
    return f"gridflow-migrate:{schema or ''}:{table_prefix}"


@contextmanager
def migration_lock(
    conn: Connection, table_prefix: str, schema: str | None
) -> Iterator[Connection]:
    """Serialize migrations of one prefix/schema across nodes; yields ``conn`` inside a
    transaction (committed at the end) with the schema created if it was missing."""
    fam = family(conn.dialect)
    key = _lock_key(table_prefix, schema)
    if fam == "mysql":
        name = "gf:" + hashlib.sha256(key.encode()).hexdigest()[:40]
        got = conn.exec_driver_sql("SELECT GET_LOCK(%s, 600)", (name,)).scalar()
        conn.commit()
        if got != 1:  # pragma: no cover - another node holds it for ten minutes
            raise TimeoutError(f"could not take the migration lock {name!r}")
        try:
            if schema is not None and not sa.inspect(conn).has_schema(schema):
                conn.exec_driver_sql(
                    f"CREATE DATABASE IF NOT EXISTS `{schema}` "
                    "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                )
            conn.commit()
            with conn.begin():
                yield conn
        finally:
            if conn.in_transaction():
                conn.rollback()
            conn.exec_driver_sql("SELECT RELEASE_LOCK(%s)", (name,))
            conn.commit()
        return
    with conn.begin():
        if fam == "postgresql":
            number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": number})
            if schema is not None:
                conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        elif fam == "sqlite":
            raw = conn.connection.dbapi_connection
            if isinstance(raw, sqlite3.Connection) and not raw.in_transaction:
                raw.execute("BEGIN IMMEDIATE")  # DDL and version row in one transaction
        yield conn


def current_revision(
    conn: Connection, table_prefix: str = "gf_", schema: str | None = None
) -> str | None:
    """The migration a database is at (``None``: gridflow's tables are not there)."""
    table, _ = version_table(table_prefix, schema)
    if not sa.inspect(conn).has_table(table.name, schema=schema):
        return None
    return conn.execute(sa.select(table.c.version_num)).scalar()


def upgrade(
    bind: str | URL | Engine | Connection,
    *,
    prefix: str = "gf_",
    schema: str | None = None,
    revision: str = "head",
) -> str | None:
    """Bring gridflow's tables (``prefix``, in ``schema``) to ``revision`` (default: the
    newest) and return the revision the database is at.

    ``bind``: a URL (an engine is made and disposed), the host's ``Engine``, or a
    ``Connection`` — then the migration runs in the host's transaction and the host
    commits (no lock is taken). A database already at the revision is left as it is.
    """
    from alembic import command

    check_names(prefix, schema)
    if isinstance(bind, Connection):
        fam = family(bind.dialect)
        if schema is not None and fam == "postgresql":
            bind.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        raw = bind.connection.dbapi_connection if fam == "sqlite" else None
        if isinstance(raw, sqlite3.Connection) and not raw.in_transaction:
            raw.execute("BEGIN")  # so the DDL is part of the host's transaction
        command.upgrade(alembic_config(prefix, schema, connection=bind), revision)
        return current_revision(bind, prefix, schema)
    engine = make_engine(bind) if isinstance(bind, (str, URL)) else bind
    try:
        with engine.connect() as conn:
            with migration_lock(conn, prefix, schema):
                command.upgrade(alembic_config(prefix, schema, connection=conn), revision)
            return current_revision(conn, prefix, schema)
    finally:
        if engine is not bind:
            engine.dispose()


def upgrade_sql(
    url: str | URL, *, prefix: str = "gf_", schema: str | None = None, revision: str = "head"
) -> str:
    """The SQL :func:`upgrade` would run on an empty database of ``url``'s kind (Alembic
    offline mode; nothing is connected to), for review by a DBA."""
    from alembic import command

    check_names(prefix, schema)
    out = io.StringIO()
    command.upgrade(alembic_config(prefix, schema, url=url, output=out), revision, sql=True)
    return out.getvalue()
