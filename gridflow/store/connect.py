"""Engines and connections: how gridflow talks to each database.

:func:`make_engine` configures an engine the way the store wants it (SQLite pragmas,
MariaDB charset and isolation). :class:`Caps` records what the connected server can do.
:class:`ThreadConnections` keeps one open connection per thread for a file SQLite store
that owns its engine: checking a connection out of the pool and back in costs more than
a whole SQLite transaction of a command.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
import threading
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import StaticPool

__all__ = ["Caps", "ThreadConnections", "dumps", "family", "is_memory_sqlite", "make_engine"]


def dumps(value: Any) -> str:
    """JSON as gridflow stores it: UTF-8 text (Chinese stays readable), compact, no NaN."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def family(dialect: sa.engine.Dialect) -> str:
    """``sqlite``, ``postgresql`` or ``mysql`` (MariaDB included)."""
    return "mysql" if dialect.name in ("mysql", "mariadb") else dialect.name


def is_memory_sqlite(url: URL) -> bool:
    db = url.database or ""
    return db in ("", ":memory:") or url.query.get("mode") == "memory"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any, page_size: int = 2048) -> None:
    cur = dbapi_connection.cursor()
    try:
        # Only a new, empty database takes it. 2 KiB pages: a command writes about four
        # pages (its case row, its event, the event index, the outbox), and the bytes of
        # every page go through the WAL and its fsync at the next checkpoint, so smaller
        # pages make commits cheaper; a case row still fits in one page.
        cur.execute(f"PRAGMA page_size={int(page_size)}")
        # switching a new database to WAL needs a moment alone with it: another connection
        # doing the same at once gets "database is locked" (the busy timeout does not
        # apply), so try again for a while
        for attempt in range(100):
            try:
                cur.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError:
                if attempt == 99:
                    raise
                time.sleep(0.05)
        # WAL + NORMAL: a commit is atomic and consistent after a crash; the WAL is
        # fsynced at each checkpoint, so a power loss may drop the last commits (not
        # corrupt anything). Use synchronous=FULL (engine kwarg / your own engine) to
        # fsync every commit.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        # checkpoint every ~40 MB of WAL instead of ~4 MB: each checkpoint fsyncs, and hot
        # pages (indexes, the case table) are copied once per checkpoint, not per commit
        cur.execute("PRAGMA wal_autocheckpoint=10000")
        # a 32 MB page cache (the default is 2 MB): a batch's transaction then keeps its
        # pages in memory instead of spilling them to the WAL and reading them back
        cur.execute("PRAGMA cache_size=-32768")
    finally:
        cur.close()


def _sqlite_memory_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    try:
        cur.execute("PRAGMA foreign_keys=ON")
    finally:
        cur.close()


def make_engine(
    url: str | URL | None = None, *, sqlite_page_size: int = 2048, **kw: Any
) -> Engine:
    """An engine configured the way gridflow wants it (what ``Store(url)`` uses).

    * ``None`` / ``sqlite://``: in-memory SQLite on one shared connection (``StaticPool``;
      single-threaded use only);
    * SQLite file: WAL journal (checkpoint every 10,000 pages), ``synchronous=NORMAL``,
      foreign keys on, 30 s busy timeout, ``sqlite_page_size`` (2 KiB) for a new file;
    * MariaDB/MySQL: ``charset=utf8mb4`` and ``READ COMMITTED`` isolation;
    * PostgreSQL: the default ``READ COMMITTED``;
    * every backend: JSON written as UTF-8 text (Chinese stays readable in the database).

    Keyword arguments go to :func:`sqlalchemy.create_engine` and win over these defaults.
    """
    u = sa.make_url(url if url is not None else "sqlite://")
    backend = u.get_backend_name()
    fam = "mysql" if backend in ("mysql", "mariadb") else backend
    opts: dict[str, Any] = {"json_serializer": dumps}
    listener: Any = None
    if fam == "sqlite":
        if is_memory_sqlite(u):
            opts["poolclass"] = StaticPool
            opts["connect_args"] = {"check_same_thread": False}
            listener = _sqlite_memory_pragmas
        else:
            opts["connect_args"] = {"timeout": 30.0}
            # a store keeps one connection per thread: no limit on their number
            opts["max_overflow"] = -1
            if sqlite_page_size not in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536):
                raise ValueError(f"sqlite_page_size {sqlite_page_size}: a power of two, 512-65536")
            listener = functools.partial(_sqlite_pragmas, page_size=sqlite_page_size)
    elif fam == "mysql":
        if "charset" not in u.query:
            u = u.update_query_dict({"charset": "utf8mb4"})
        opts["isolation_level"] = "READ COMMITTED"
        opts["pool_recycle"] = 3600
        opts["pool_pre_ping"] = True
    elif fam == "postgresql":
        opts["pool_pre_ping"] = True
    opts.update(kw)
    engine = sa.create_engine(u, **opts)
    if listener is not None:
        sa_event.listen(engine, "connect", listener)
    return engine


class Caps:
    """What the connected database supports (worked out once per store)."""

    def __init__(self, dialect: sa.engine.Dialect):
        self.family = family(dialect)
        version = tuple(dialect.server_version_info or ())
        if self.family == "postgresql":
            self.skip_locked = version >= (9, 5)
        elif self.family == "mysql":
            is_mariadb = bool(getattr(dialect, "is_mariadb", False))
            self.skip_locked = version >= ((10, 6) if is_mariadb else (8, 0, 1))
        else:
            self.skip_locked = False
        #: row locks (``SELECT … FOR UPDATE``): the servers; SQLite locks the database
        self.row_locks = self.family in ("postgresql", "mysql")
        self.multi_returning = bool(
            getattr(dialect, "insert_executemany_returning_sort_by_parameter_order", False)
        )


class ThreadConnections:
    """One open connection per thread (per process) for a file SQLite store.

    Connections of threads that have ended are closed when a new thread asks for one, and
    all of them by :meth:`close_all` (``Store.dispose``). A connection whose transaction
    is still open (a nested ``transaction()`` in the same thread) is not handed out
    twice: the caller then uses an ordinary pooled connection.
    """

    def __init__(self, engine: Engine):
        self._engine = engine
        self._local = threading.local()
        self._lock = threading.Lock()
        # id(connection) -> (pid, thread, connection); after a fork the child leaves the
        # parent's connections alone (closing them would disturb the parent)
        self._all: dict[int, tuple[int, threading.Thread, Connection]] = {}

    def acquire(self) -> Connection | None:
        """This thread's connection, or ``None`` when it is already in use."""
        local = self._local
        conn: Connection | None = getattr(local, "conn", None)
        if conn is not None and local.pid == os.getpid() and not conn.closed:
            if local.busy:
                return None
            local.busy = True
            return conn
        pid = os.getpid()
        conn = self._engine.connect()
        local.conn, local.pid, local.busy = conn, pid, True
        me = threading.current_thread()
        stale: list[Connection] = []
        with self._lock:
            for key, (owner, thread, old) in list(self._all.items()):
                if owner != pid:
                    del self._all[key]
                elif not thread.is_alive():
                    del self._all[key]
                    stale.append(old)
            self._all[id(conn)] = (pid, me, conn)
        for old in stale:
            _close_quietly(old)
        return conn

    def release(self, conn: Connection, *, broken: bool = False) -> None:
        self._local.busy = False
        if broken:
            self._local.conn = None
            with self._lock:
                self._all.pop(id(conn), None)
            _close_quietly(conn)

    def close_all(self) -> None:
        pid = os.getpid()
        with self._lock:
            conns = [c for owner, _, c in self._all.values() if owner == pid]
            self._all.clear()
        self._local = threading.local()
        for conn in conns:
            _close_quietly(conn)


def _close_quietly(conn: Connection) -> None:
    with contextlib.suppress(Exception):  # a broken connection
        conn.close()
