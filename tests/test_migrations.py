"""Alembic migrations: an empty database goes to head on every backend, and the migrated
schema is exactly what the models describe (no drift)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from click.testing import CliRunner

from gridflow import cli
from gridflow.store import (
    HEAD,
    CaseRecord,
    NewEvent,
    Store,
    build_tables,
    current_revision,
    make_engine,
    upgrade,
    upgrade_sql,
)
from gridflow.store.migrate import alembic_config, version_table
from tests.conftest import CONCURRENT_BACKENDS, EmptyDatabase

CST = timezone(timedelta(hours=8))
T0 = datetime(2026, 3, 9, 9, 0, tzinfo=CST)


def drift(engine: sa.Engine, metadata: sa.MetaData, prefix: str, schema: str | None) -> list[Any]:
    """What Alembic's autogenerate would change to make the database match ``metadata``
    (gridflow's tables of ``prefix`` only)."""

    def include(name: str | None, type_: str, parent: Any) -> bool:
        if type_ == "schema":
            return name == schema
        if type_ == "table":
            return name is not None and name.startswith(prefix)
        return True

    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "include_schemas": schema is not None,
                "include_name": include,
                "version_table": f"{prefix}alembic_version",
                "version_table_schema": schema,
                "compare_type": True,
                "compare_server_default": True,
            },
        )
        return list(compare_metadata(context, metadata))


def indexes(engine: sa.Engine, prefix: str, schema: str | None) -> dict[str, Any]:
    """Every index of gridflow's tables as the database reports it, prefix removed."""
    out: dict[str, Any] = {}
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        for table in ("cases", "events", "timers", "outbox"):
            for ix in inspector.get_indexes(f"{prefix}{table}", schema=schema):
                options = {
                    k: re.sub(r"[\s()]", "", str(v)).lower()
                    for k, v in ix.get("dialect_options", {}).items()
                    if v is not None and not (isinstance(v, list) and not v)
                }
                name = str(ix["name"]).replace(prefix, "<p>")
                out[name] = (table, ix["column_names"], bool(ix["unique"]), options)
    assert out
    return out


def use_store(store: Store) -> None:
    """Every kind of write and read works on the migrated tables, Unicode included."""
    record = CaseRecord("武进-0001", 1, "reported", {"描述": "井盖缺失 🕳️", "地点": "𠀀路"},
                        idempotency_key="12345:张三", lead_department="区城管局", due_at=T0)
    with store.transaction() as tx:
        tx.insert_case(record, [NewEvent("reported", "w-李四", "网格员", T0, reason="巡查发现")])
    with store.transaction() as tx:
        case = tx.require_case("武进-0001")
        case.state = "filed"
        tx.append(case, 1, [NewEvent("file", "c-王五", "受理员", T0 + timedelta(minutes=5))])
        tx.set_timers("武进-0001", [("overdue", T0 + timedelta(hours=4))])
    with store.transaction() as tx:
        assert [t.kind for t in tx.claim_due_timers(T0 + timedelta(hours=5))] == ["overdue"]
        messages = tx.outbox_fetch()
        assert [m.seq for m in messages] == [1, 2]
        assert messages[0].payload["reason"] == "巡查发现"
        tx.outbox_ack([m.id for m in messages])
        stored = tx.require_case("武进-0001")
        assert stored.data == {"描述": "井盖缺失 🕳️", "地点": "𠀀路"}
        assert stored.due_at == T0 and stored.version == 2
        assert tx.case_by_idempotency_key("12345:张三") is not None


# --------------------------------------------------------------------------- upgrade


def test_upgrade_empty_database_to_head_without_drift(empty_db: EmptyDatabase) -> None:
    prefix = "mg_"
    assert upgrade(empty_db.url, prefix=prefix, schema=empty_db.schema) == HEAD
    engine = make_engine(empty_db.url)
    try:
        models = build_tables(prefix, empty_db.schema).metadata
        assert drift(engine, models, prefix, empty_db.schema) == []
        # the comparison does see differences: a model with one more index is drift
        changed = build_tables(prefix, empty_db.schema)
        sa.Index("ix_extra", changed.events.c.type)
        assert [d[0] for d in drift(engine, changed.metadata, prefix, empty_db.schema)] == [
            "add_index"
        ]
        with engine.connect() as conn:
            assert current_revision(conn, prefix, empty_db.schema) == HEAD
        # a second upgrade (another node deploying) finds it current and changes nothing
        assert upgrade(engine, prefix=prefix, schema=empty_db.schema) == HEAD
        store = Store(engine, table_prefix=prefix, schema=empty_db.schema)
        use_store(store)
        with engine.connect() as conn:
            names = set(sa.inspect(conn).get_table_names(schema=empty_db.schema))
        assert names == {f"{prefix}{t}" for t in ("cases", "events", "timers", "outbox",
                                                   "alembic_version")}
    finally:
        engine.dispose()


def test_create_all_matches_the_migrations_and_is_stamped(empty_db: EmptyDatabase) -> None:
    """``create_all`` (tests, demos) builds the same schema and records the head revision,
    so the migrations take over from there."""
    engine = make_engine(empty_db.url)
    try:
        if empty_db.schema is not None:
            with engine.begin() as conn:
                if empty_db.backend == "postgres":
                    conn.execute(sa.schema.CreateSchema(empty_db.schema))
                else:
                    conn.exec_driver_sql(f"CREATE DATABASE `{empty_db.schema}`")
        store = Store(engine, table_prefix="ca_", schema=empty_db.schema)
        store.create_all()
        assert drift(engine, store.metadata, "ca_", empty_db.schema) == []
        # Alembic does not compare partial indexes' conditions: compare the database's
        # own account of both schemas
        upgrade(engine, prefix="mg_", schema=empty_db.schema)
        assert indexes(engine, "ca_", empty_db.schema) == indexes(engine, "mg_", empty_db.schema)
        assert upgrade(engine, prefix="ca_", schema=empty_db.schema) == HEAD
        use_store(store)
        store.drop_all()
        with engine.connect() as conn:
            assert current_revision(conn, "ca_", empty_db.schema) is None
            assert not [n for n in sa.inspect(conn).get_table_names(schema=empty_db.schema)
                        if n.startswith("ca_")]
    finally:
        engine.dispose()


def test_upgrades_from_several_nodes_at_once(empty_db: EmptyDatabase) -> None:
    """Deploying several nodes runs the upgrade concurrently: one migrates, the others
    wait for its lock and find the schema current."""
    results: list[str | BaseException | None] = []
    barrier = threading.Barrier(3)

    def node() -> None:
        barrier.wait(timeout=30)
        try:
            results.append(upgrade(empty_db.url, prefix="co_", schema=empty_db.schema))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=node) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [HEAD, HEAD, HEAD]
    engine = make_engine(empty_db.url)
    try:
        assert drift(engine, build_tables("co_", empty_db.schema).metadata, "co_",
                     empty_db.schema) == []
        versions, _ = version_table("co_", empty_db.schema)
        with engine.connect() as conn:
            assert conn.execute(sa.select(versions.c.version_num)).scalars().all() == [HEAD]
    finally:
        engine.dispose()


def test_downgrade_to_base_and_up_again(tmp_path: Path) -> None:
    from alembic import command

    url = f"sqlite:///{tmp_path / 'down.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            command.downgrade(alembic_config(connection=conn), "base")
        with engine.connect() as conn:
            assert current_revision(conn) is None or current_revision(conn) == ""
            assert not [n for n in sa.inspect(conn).get_table_names() if n != "gf_alembic_version"]
        assert upgrade(engine) == HEAD
    finally:
        engine.dispose()


def test_prefixes_keep_separate_histories(tmp_path: Path) -> None:
    """Two gridflow installations (prefixes) and the host's own Alembic table live side by
    side in one database."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32))")
            conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('host-rev-1')")
        assert upgrade(engine, prefix="a_") == HEAD
        assert upgrade(engine, prefix="b_") == HEAD
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == (
                "host-rev-1"
            )
            assert current_revision(conn, "a_") == current_revision(conn, "b_") == HEAD
    finally:
        engine.dispose()


def test_bad_prefix_or_schema_is_refused() -> None:
    for bad in ("", "1x_", "gf-", "x" * 25, "a b", "gf_;drop"):
        with pytest.raises(ValueError, match="table_prefix"):
            upgrade("sqlite://", prefix=bad)
        with pytest.raises(ValueError, match="table_prefix"):
            Store(table_prefix=bad)
    with pytest.raises(ValueError, match="schema"):
        upgrade("sqlite://", schema='x"; drop schema public; --')


# --------------------------------------------------------------------------- packaging


def test_head_constant_is_the_scripts_head() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_heads() == [HEAD]
    revisions = list(script.walk_revisions())
    assert all(r.module.__doc__ for r in revisions)  # every migration says what it does


def test_migrations_ship_inside_the_package() -> None:
    root = resources.files("gridflow.migrations")
    for name in ("env.py", "script.py.mako", "alembic.ini", "naming.py"):
        assert root.joinpath(name).is_file(), name
    assert any(p.name.endswith(".py") and p.name.startswith("r")
               for p in root.joinpath("versions").iterdir())


def test_offline_sql_for_review() -> None:
    sql = upgrade_sql("postgresql+psycopg://", prefix="gf_", schema="city")
    assert "CREATE TABLE city.gf_cases" in sql
    assert "CREATE TABLE city.gf_alembic_version" in sql
    mysql = upgrade_sql("mysql+pymysql://")
    assert "utf8mb4_bin" in mysql and "CREATE TABLE gf_outbox" in mysql


# --------------------------------------------------------------------------- command line


def cli_run(*args: str) -> Any:
    return CliRunner().invoke(cli.main, list(args))


def test_cli_db_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    result = cli_run("db", "upgrade", "--db", url, "--prefix", "city_")
    assert result.exit_code == 0, result.output
    assert f"city_* tables at revision {HEAD}" in result.output
    again = cli_run("db", "upgrade", "--db", url, "--prefix", "city_")
    assert again.exit_code == 0 and HEAD in again.output
    engine = make_engine(url)
    try:
        assert drift(engine, build_tables("city_").metadata, "city_", None) == []
    finally:
        engine.dispose()
    sql = cli_run("db", "upgrade", "--db", "postgresql+psycopg://", "--sql")
    assert sql.exit_code == 0 and "CREATE TABLE gf_events" in sql.output


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--prefix", "bad-prefix"], 2, "table_prefix"),
        (["--schema", "x;y"], 2, "schema"),
    ],
)
def test_cli_db_upgrade_refuses_bad_names(
    tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    result = cli_run("db", "upgrade", "--db", f"sqlite:///{tmp_path / 'x.db'}", *args)
    assert result.exit_code == code
    assert message in result.output


def test_cli_db_upgrade_reports_an_unreachable_database() -> None:
    result = cli_run("db", "upgrade", "--db",
                     "postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")
    assert result.exit_code == 1
    assert "upgrade failed" in result.output
    assert "Traceback" not in result.output


def test_plain_alembic_command_line(tmp_path: Path) -> None:
    """Operators who prefer Alembic's own command line use the shipped alembic.ini."""
    ini = resources.files("gridflow.migrations").joinpath("alembic.ini")
    url = f"sqlite:///{tmp_path / 'alembic.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ini), "-x", f"db={url}", "-x",
         "prefix=ops_", "upgrade", "head"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert current_revision(conn, "ops_") == HEAD
        assert drift(engine, build_tables("ops_").metadata, "ops_", None) == []
    finally:
        engine.dispose()



@pytest.mark.parametrize(
    "empty_db", [p for p in CONCURRENT_BACKENDS if p.id != "mysql"], indirect=True
)  # MariaDB commits DDL statements implicitly
def test_upgrade_inside_the_hosts_transaction(empty_db: EmptyDatabase) -> None:
    """``upgrade(connection)`` runs in the host's transaction: the host commits it (or,
    on PostgreSQL and SQLite, rolls it back with its own work)."""
    engine = make_engine(empty_db.url)
    try:
        with engine.connect() as conn:
            with conn.begin():
                assert upgrade(conn, prefix="h_", schema=empty_db.schema) == HEAD
                raise_after = conn.in_transaction()
            assert raise_after
        with engine.connect() as conn:
            assert current_revision(conn, "h_", empty_db.schema) == HEAD
        with engine.connect() as conn:
            trans = conn.begin()
            upgrade(conn, prefix="r_", schema=empty_db.schema)
            trans.rollback()
        with engine.connect() as conn:
            assert current_revision(conn, "r_", empty_db.schema) is None
            names = sa.inspect(conn).get_table_names(schema=empty_db.schema)
            assert not [n for n in names if n.startswith("r_")]
    finally:
        engine.dispose()
