"""Alembic migrations: an empty database goes to head on every backend, and the migrated
schema is exactly what the models describe (no drift)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from click.testing import CliRunner

from gridflow import Engine, cli, load_policy
from gridflow.clock import ManualClock
from gridflow.indicators import current_scores, refresh
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
from gridflow.store.aggregates import define_aggregate_tables, ensure_aggregate_tables
from gridflow.store.migrate import alembic_config, version_table
from tests.conftest import CONCURRENT_BACKENDS, EmptyDatabase
from tests.test_scoring import WUJIN, Desk, at

TABLES = ("cases", "events", "timers", "outbox", "case_facts", "case_units", "scores")

CST = timezone(timedelta(hours=8))
T0 = datetime(2026, 3, 9, 9, 0, tzinfo=CST)


def models(prefix: str, schema: str | None = None) -> sa.MetaData:
    """Every table the migrations create: the store's and the derived scoring tables."""
    metadata = build_tables(prefix, schema).metadata
    define_aggregate_tables(metadata, prefix)
    return metadata


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
        for table in TABLES:
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
        assert drift(engine, models(prefix, empty_db.schema), prefix, empty_db.schema) == []
        # the comparison does see differences: a model with one more index is drift, on
        # the store's tables and on the scoring tables
        changed = build_tables(prefix, empty_db.schema)
        sa.Index("ix_extra", changed.events.c.type)
        facts, _, _ = define_aggregate_tables(changed.metadata, prefix)
        sa.Index("ix_extra_facts", facts.c.category)
        added = drift(engine, changed.metadata, prefix, empty_db.schema)
        assert sorted((d[0], d[1].name) for d in added) == [
            ("add_index", "ix_extra"), ("add_index", "ix_extra_facts")
        ]
        # ... and the scoring tables are compared: without them, they are surplus tables
        store_only = build_tables(prefix, empty_db.schema).metadata
        surplus = drift(engine, store_only, prefix, empty_db.schema)
        assert {d[0] for d in surplus} <= {"remove_table", "remove_index"}
        assert sorted(d[1].name for d in surplus if d[0] == "remove_table") == [
            f"{prefix}{t}" for t in ("case_facts", "case_units", "scores")
        ]
        with engine.connect() as conn:
            assert current_revision(conn, prefix, empty_db.schema) == HEAD
        # a second upgrade (another node deploying) finds it current and changes nothing
        assert upgrade(engine, prefix=prefix, schema=empty_db.schema) == HEAD
        store = Store(engine, table_prefix=prefix, schema=empty_db.schema)
        use_store(store)
        with engine.connect() as conn:
            names = set(sa.inspect(conn).get_table_names(schema=empty_db.schema))
        assert names == {f"{prefix}{t}" for t in (*TABLES, "alembic_version")}
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
        assert drift(engine, models("ca_", empty_db.schema), "ca_", empty_db.schema) == []
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


def _score_one_case(store: Store, case_id: str) -> None:
    """``refresh`` fills the scoring tables of ``store`` (and a second one changes nothing)."""
    policy = load_policy(WUJIN)
    clock = ManualClock(at(9, 9))
    desk = Desk(Engine(policy, store, clock), clock)
    cid = desk.simple(case_id, at(9, 11))
    first = refresh(store, policy)
    assert (first.cases, first.scored, first.revisions) == (1, 1, 1)
    assert {r.subject.role for r in current_scores(store, cid, policy.version)} >= {"lead"}
    again = refresh(store, policy)
    assert (again.cases, again.revisions) == (0, 0)


def test_refresh_on_migrated_and_on_created_databases(empty_db: EmptyDatabase) -> None:
    """``refresh`` uses the scoring tables that ``upgrade`` or ``create_all`` made (it does
    not create them again)."""
    engine = make_engine(empty_db.url)
    try:
        assert upgrade(engine, prefix="mg_", schema=empty_db.schema) == HEAD
        migrated = Store(engine, table_prefix="mg_", schema=empty_db.schema)
        _score_one_case(migrated, "MG-1")
        created = Store(engine, table_prefix="ca_", schema=empty_db.schema)
        created.create_all()
        with engine.connect() as conn:
            names = set(sa.inspect(conn).get_table_names(schema=empty_db.schema))
            assert current_revision(conn, "ca_", empty_db.schema) == HEAD
        assert {f"ca_{t}" for t in TABLES} <= names
        _score_one_case(created, "CA-1")
        assert drift(engine, models("mg_", empty_db.schema), "mg_", empty_db.schema) == []
        assert drift(engine, models("ca_", empty_db.schema), "ca_", empty_db.schema) == []
        created.drop_all()
    finally:
        engine.dispose()


def test_upgrade_keeps_scoring_tables_refresh_created_before(empty_db: EmptyDatabase) -> None:
    """A database at 0001 whose scoring tables an earlier ``refresh`` created goes to head
    (0002 leaves those tables as they are) without drift."""
    engine = make_engine(empty_db.url)
    try:
        assert upgrade(engine, prefix="old_", schema=empty_db.schema, revision="0001") == "0001"
        store = Store(engine, table_prefix="old_", schema=empty_db.schema)
        ensure_aggregate_tables(store)
        assert upgrade(engine, prefix="old_", schema=empty_db.schema) == HEAD
        assert drift(engine, models("old_", empty_db.schema), "old_", empty_db.schema) == []
        _score_one_case(store, "OLD-1")
    finally:
        engine.dispose()


def test_upgrade_fills_the_history_columns_of_stored_cases(empty_db: EmptyDatabase) -> None:
    """0003 adds the intake columns history conditions count by and fills them from each
    stored case's projection (an over-long value stays NULL, as the store writes it)."""
    engine = make_engine(empty_db.url)
    try:
        assert upgrade(engine, prefix="hist_", schema=empty_db.schema, revision="0002") == "0002"
        cases = sa.Table("hist_cases", sa.MetaData(schema=empty_db.schema), autoload_with=engine)
        as_json = isinstance(cases.c.data.type, sa.JSON)
        rows = [
            ("H-1", {"address": "湖塘镇1号", "reporter": "张三", "location": "g1"}),
            ("H-2", {"location": "g2"}),
            ("H-3", {"address": "很长" * 200, "location": "g1"}),
        ]
        with engine.begin() as conn:
            for case_id, case in rows:
                data = {"case": {"category": "E01-10", **case}}
                conn.execute(sa.insert(cases).values(
                    case_id=case_id, version=1, state="reported", category="E01-10",
                    # in UTC: a reflected DATETIME column drops the offset
                    reported_at=T0.astimezone(UTC), updated_at=T0.astimezone(UTC),
                    data=data if as_json else json.dumps(data, ensure_ascii=False),
                ))
        assert upgrade(engine, prefix="hist_", schema=empty_db.schema) == HEAD
        assert drift(engine, models("hist_", empty_db.schema), "hist_", empty_db.schema) == []
        after = sa.Table("hist_cases", sa.MetaData(schema=empty_db.schema), autoload_with=engine)
        with engine.connect() as conn:
            got = conn.execute(sa.select(after.c.case_id, after.c.location, after.c.address,
                                         after.c.reporter).order_by(after.c.case_id)).all()
        assert [tuple(r) for r in got] == [
            ("H-1", "g1", "湖塘镇1号", "张三"),
            ("H-2", "g2", None, None),
            ("H-3", "g1", None, None),
        ]
        store = Store(engine, table_prefix="hist_", schema=empty_db.schema)
        with store.transaction(readonly=True) as tx:
            assert tx.count_reported(("location",), ("g1",), T0 - timedelta(days=1),
                                     T0 + timedelta(seconds=1)) == 2
    finally:
        engine.dispose()


def test_a_database_behind_the_schema_is_a_clear_error_and_nothing_is_written(
    empty_db: EmptyDatabase,
) -> None:
    """No tables (never set up), or tables at 0002 (no intake columns): every command is
    refused with StoreSchemaError naming the fix, not a driver error with the SQL; once
    upgraded, the same command works and nothing earlier was half-written."""
    from gridflow import Actor, StoreSchemaError

    engine = make_engine(empty_db.url)
    try:
        store = Store(engine, table_prefix="behind_", schema=empty_db.schema)
        desk = Engine(load_policy(WUJIN), store, ManualClock(T0))
        case = {"category": "E01-10", "location": "qdj-g3", "description": "路边有暴露垃圾"}
        who = Actor("gw-1", "grid_worker")
        with pytest.raises(StoreSchemaError, match=r"gridflow db upgrade URL") as info:
            desk.report(case, who)
        assert "behind_cases" in info.value.detail
        assert upgrade(engine, prefix="behind_", schema=empty_db.schema, revision="0002")
        with pytest.raises(StoreSchemaError) as info:
            desk.report(case, who)
        assert "location" in info.value.detail or "address" in info.value.detail
        upgrade(engine, prefix="behind_", schema=empty_db.schema)
        view = desk.report(case, who)
        with store.transaction(readonly=True) as tx:
            assert [c.case_id for c in tx.iter_cases()] == [view.id]
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
        assert drift(engine, models("co_", empty_db.schema), "co_", empty_db.schema) == []
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
    assert "CREATE TABLE city.gf_scores" in sql and "uq_gf_scores_revision" in sql
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
        assert drift(engine, models("city_"), "city_", None) == []
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
        assert drift(engine, models("ops_"), "ops_", None) == []
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
