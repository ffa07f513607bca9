"""Moving whole cases from one store into another (sharded replays gather their shards).

:func:`absorb` copies every case of a source store — its row, its events in order, its
timers — into a target store in ONE transaction of the target, and nothing if anything
fails. Event ids are the target's (new ones); a case id the target already holds makes
the copy fail with :class:`ConcurrencyConflict` and leaves the target unchanged.

Between two SQLite databases the copy runs inside SQLite (``ATTACH`` and ``INSERT …
SELECT``): the stored text is the same in both, so rows are moved byte for byte without
passing through Python. Other targets read the source through SQLAlchemy and insert
through it, in chunks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from gridflow.errors import ConcurrencyConflict
from gridflow.store.connect import is_memory_sqlite
from gridflow.store.core import Store

__all__ = ["absorb"]

_CHUNK = 2000
_ALIAS = "gf_absorbed"


def _source_path(source: Store) -> Path | None:
    engine = source.engine
    if engine is None or source.dialect_name != "sqlite" or is_memory_sqlite(engine.url):
        return None
    return Path(engine.url.database or "")


def absorb(target: Store, source: Store) -> int:
    """Copy every case of ``source`` into ``target``; the number of cases copied."""
    path = _source_path(source)
    if (
        path is not None
        and target.dialect_name == "sqlite"
        and target.engine is not None
        and target.tables.schema is None
        and source.tables.schema is None
    ):
        return _absorb_sqlite(target, source, path)
    return _absorb_generic(target, source)


def _columns(table: sa.Table, *, without_id: bool) -> list[str]:
    return [c.name for c in table.columns if not (without_id and c.name == "id")]


def _absorb_sqlite(target: Store, source: Store, path: Path) -> int:
    t, s = target.tables, source.tables
    assert target.engine is not None
    raw: Any = target.engine.raw_connection()
    try:
        raw.execute(f"ATTACH DATABASE ? AS {_ALIAS}", (str(path),))
        try:
            raw.execute("BEGIN IMMEDIATE")
            try:
                n = _copy_sqlite(raw, target, t, s)
            except BaseException:
                raw.execute("ROLLBACK")
                raise
            raw.execute("COMMIT")
        finally:
            raw.execute(f"DETACH DATABASE {_ALIAS}")
    finally:
        raw.close()
    return n


def _copy_sqlite(raw: Any, target: Store, t: Any, s: Any) -> int:
    import sqlite3

    cases = _columns(t.cases, without_id=False)
    clash = raw.execute(
        f"SELECT c.case_id FROM {_ALIAS}.{s.cases.name} c JOIN main.{t.cases.name} m "
        "ON m.case_id = c.case_id LIMIT 1"
    ).fetchone()
    if clash is not None:
        raise ConcurrencyConflict(clash[0], 0)
    before = raw.execute(f"SELECT COALESCE(MAX(id), 0) FROM main.{t.events.name}").fetchone()[0]
    cols = ", ".join(cases)
    try:
        n = raw.execute(
            f"INSERT INTO main.{t.cases.name} ({cols}) SELECT {cols} FROM "
            f"{_ALIAS}.{s.cases.name} ORDER BY case_id"
        ).rowcount
        events = ", ".join(_columns(t.events, without_id=True))
        # the events in their source order: each case's events keep their order
        raw.execute(
            f"INSERT INTO main.{t.events.name} ({events}) SELECT {events} FROM "
            f"{_ALIAS}.{s.events.name} ORDER BY id"
        )
        timers = ", ".join(_columns(t.timers, without_id=True))
        raw.execute(
            f"INSERT INTO main.{t.timers.name} ({timers}) SELECT {timers} FROM "
            f"{_ALIAS}.{s.timers.name} ORDER BY id"
        )
        if target.outbox:
            raw.execute(
                f"INSERT INTO main.{t.outbox.name} (event_id) SELECT id FROM "
                f"main.{t.events.name} WHERE id > ? ORDER BY id", (before,)
            )
    except sqlite3.IntegrityError as exc:  # a writer inserted one of the cases meanwhile
        raise ConcurrencyConflict("?", 0) from exc
    return int(n)


def _absorb_generic(target: Store, source: Store) -> int:
    t, s = target.tables, source.tables
    n = 0
    with source.transaction(readonly=True) as src, target.transaction() as tx:
        conn, read = tx.connection, src.connection
        try:
            for table, from_table, order in (
                (t.cases, s.cases, s.cases.c.case_id),
                (t.events, s.events, s.events.c.id),
                (t.timers, s.timers, s.timers.c.id),
            ):
                names = _columns(table, without_id=table is not t.cases)
                query = sa.select(*(from_table.c[c] for c in names)).order_by(order)
                result = read.execution_options(yield_per=_CHUNK).execute(query)
                for part in result.partitions(_CHUNK):
                    rows = [dict(zip(names, r, strict=True)) for r in part]
                    if table is t.cases:
                        n += len(rows)
                        clash = conn.execute(sa.select(t.cases.c.case_id).where(
                            t.cases.c.case_id.in_([r["case_id"] for r in rows])
                        ).limit(1)).first()
                        if clash is not None:
                            raise ConcurrencyConflict(clash[0], 0)
                    conn.execute(sa.insert(table), rows)
                    if table is t.events and target.outbox:
                        ids = [r["case_id"] for r in rows]
                        conn.execute(sa.insert(t.outbox).from_select(
                            ["event_id"],
                            sa.select(t.events.c.id).where(
                                t.events.c.case_id.in_(set(ids)),
                                ~sa.exists().where(t.outbox.c.event_id == t.events.c.id),
                            ).order_by(t.events.c.id),
                        ))
        except IntegrityError as exc:
            raise ConcurrencyConflict("?", 0) from exc
    return n
