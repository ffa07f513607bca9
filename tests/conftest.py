"""Database fixtures: every store test runs on SQLite (memory and file), PostgreSQL and MariaDB.

Servers come from ``GRIDFLOW_PG_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``)
and ``GRIDFLOW_MYSQL_URL`` (default ``mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4``).
A server that cannot be reached skips its tests with the reason shown in the summary — or fails
them when ``GRIDFLOW_REQUIRE_DBS=1`` (CI).

Isolation: one engine per server per session; the session's tables live in a schema
(PostgreSQL) or database (MariaDB) named ``gf_test_<random>`` that is dropped at the end;
every test starts from empty tables.

Fixtures:

* ``sqlite`` — a :class:`Store` on in-memory SQLite and on a WAL file in ``tmp_path``;
* ``postgres`` / ``mysql`` — a :class:`Store` on the session's schema/database;
* ``store`` — parametrized over all four (``store_backend`` names the current one);
* ``concurrent_store`` — file SQLite, PostgreSQL, MariaDB (several connections at once);
* ``server_store`` — PostgreSQL and MariaDB only;
* ``postgres_db`` / ``mysql_db`` — the session's :class:`TestDatabase` (URL, schema, engine)
  for tests that need their own engines or processes;
* ``empty_db`` — an empty database on file SQLite, PostgreSQL and MariaDB (a new file, or a
  new schema/database dropped afterwards): ``(url, schema)`` for migration tests.

And one policy fixture: ``wujin_without_history``, a copy of the example district without
its history rule (replays of it shard by case id, whatever the target holds).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from gridflow import load_policy
from gridflow.store import Store, make_engine

PG_URL = os.environ.get("GRIDFLOW_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get(
    "GRIDFLOW_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4"
)
REQUIRE_DBS = os.environ.get("GRIDFLOW_REQUIRE_DBS", "") not in ("", "0")

_MEMORY = pytest.param("sqlite-memory", id="sqlite-memory")
_FILE = pytest.param("sqlite-file", id="sqlite-file")
_PG = pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)
_MYSQL = pytest.param("mysql", id="mysql", marks=pytest.mark.mysql)
BACKENDS = [_MEMORY, _FILE, _PG, _MYSQL]
CONCURRENT_BACKENDS = [_FILE, _PG, _MYSQL]  # several connections at once
SERVER_BACKENDS = [_PG, _MYSQL]  # row locks, SKIP LOCKED


@dataclass(frozen=True)
class TestDatabase:
    """A server database reserved for this test session."""

    __test__ = False  # not a test class

    url: str  # connect here (other processes make their own engines from it)
    schema: str  # the session's schema (PostgreSQL) / database (MariaDB)
    engine: sa.Engine  # shared by the session's tests; do not dispose

    def store(self, table_prefix: str = "gf_") -> Store:
        return Store(self.engine, table_prefix=table_prefix, schema=self.schema)


def _unreachable(name: str, url: str, exc: BaseException) -> None:
    safe = sa.make_url(url).render_as_string(hide_password=True)
    reason = f"{name} not reachable at {safe}: {type(exc).__name__}: {exc}".splitlines()[0]
    if REQUIRE_DBS:
        pytest.fail(f"{reason} (GRIDFLOW_REQUIRE_DBS is set)", pytrace=False)
    pytest.skip(reason)


def _connect(name: str, url: str, **kw: object) -> sa.Engine:
    engine = make_engine(url, **kw)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except sa.exc.DBAPIError as exc:
        engine.dispose()
        _unreachable(name, url, exc)
    return engine


def _empty_tables(store: Store) -> None:
    with store.transaction() as tx:
        for table in reversed(store.metadata.sorted_tables):
            tx.connection.execute(table.delete())


@pytest.fixture(scope="session")
def postgres_db() -> Iterator[TestDatabase]:
    engine = _connect("PostgreSQL", PG_URL, connect_args={"connect_timeout": 5})
    schema = f"gf_test_{uuid.uuid4().hex[:12]}"
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        db = TestDatabase(PG_URL, schema, engine)
        store = db.store()
        store.create_all()
        yield db
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        engine.dispose()


@pytest.fixture(scope="session")
def mysql_db() -> Iterator[TestDatabase]:
    engine = _connect("MariaDB/MySQL", MYSQL_URL, connect_args={"connect_timeout": 5})
    schema = f"gf_test_{uuid.uuid4().hex[:12]}"
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                f"CREATE DATABASE `{schema}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
            )
        db = TestDatabase(MYSQL_URL, schema, engine)
        db.store().create_all()
        yield db
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{schema}`")
        engine.dispose()


def _server_store(db: TestDatabase) -> Iterator[Store]:
    store = db.store()
    _empty_tables(store)
    try:
        yield store
    finally:
        store.dispose()  # the engine belongs to the session fixture: this is a no-op


def _sqlite_store(kind: str, tmp_path: Path) -> Iterator[Store]:
    store = Store() if kind == "memory" else Store(f"sqlite:///{tmp_path / 'gridflow.db'}")
    try:
        store.create_all()
        yield store
    finally:
        store.dispose()


@pytest.fixture(params=["memory", "file"])
def sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from _sqlite_store(request.param, tmp_path)


@pytest.fixture
def postgres(postgres_db: TestDatabase) -> Iterator[Store]:
    yield from _server_store(postgres_db)


@pytest.fixture
def mysql(mysql_db: TestDatabase) -> Iterator[Store]:
    yield from _server_store(mysql_db)


def _store_for(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if backend.startswith("sqlite-"):
        yield from _sqlite_store(backend.removeprefix("sqlite-"), tmp_path)
    else:
        db: TestDatabase = request.getfixturevalue(f"{backend}_db")
        yield from _server_store(db)


@pytest.fixture(params=BACKENDS)
def store_backend(request: pytest.FixtureRequest) -> str:
    """The backend the parametrized ``store`` fixture runs on."""
    return str(request.param)


@pytest.fixture
def store(
    store_backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Store]:
    """A :class:`Store` on each backend in turn (empty tables)."""
    yield from _store_for(store_backend, request, tmp_path)


@pytest.fixture(params=CONCURRENT_BACKENDS)
def concurrent_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A :class:`Store` that several threads can use at once (file SQLite and servers)."""
    yield from _store_for(str(request.param), request, tmp_path)


@pytest.fixture(params=SERVER_BACKENDS)
def server_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A :class:`Store` on PostgreSQL and on MariaDB (row locks, ``SKIP LOCKED``)."""
    yield from _store_for(str(request.param), request, tmp_path)


@pytest.fixture
def server_db(store_backend: str, request: pytest.FixtureRequest) -> TestDatabase | None:
    """The session database behind ``store`` (``None`` on SQLite)."""
    if store_backend.startswith("sqlite-"):
        return None
    db: TestDatabase = request.getfixturevalue(f"{store_backend}_db")
    return db


@dataclass(frozen=True)
class EmptyDatabase:
    """A database with nothing in it (for migrations): connect to ``url``, use ``schema``."""

    __test__ = False

    backend: str
    url: str
    schema: str | None


@pytest.fixture(params=CONCURRENT_BACKENDS)
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EmptyDatabase]:
    backend = str(request.param)
    if backend == "sqlite-file":
        yield EmptyDatabase(backend, f"sqlite:///{tmp_path / 'empty.db'}", None)
        return
    db: TestDatabase = request.getfixturevalue(f"{backend}_db")
    schema = f"gf_empty_{uuid.uuid4().hex[:10]}"
    try:
        yield EmptyDatabase(backend, db.url, schema)  # the schema is created by the test
    finally:
        with db.engine.begin() as conn:
            if backend == "postgres":
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            else:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{schema}`")


@pytest.fixture(scope="session")
def wujin_without_history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/wujin without its history rule (``repeat-at-address``)."""
    copy = tmp_path_factory.mktemp("policy") / "wujin-no-history"
    shutil.copytree(Path(__file__).resolve().parent.parent / "examples" / "wujin", copy)
    table = copy / "routing" / "30-co-handling.yaml"
    text = table.read_text("utf-8")
    start = text.index("        - id: repeat-at-address")
    end = text.index("        - id: wide-impact")
    table.write_text(text[:start] + text[end:], "utf-8")
    assert not load_policy(copy).router.history_specs
    return copy
