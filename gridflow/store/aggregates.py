"""SQL aggregation for scoring and indicators (BRIEF §8): derived tables and the queries.

Three derived tables live beside the store's own, on the store's :class:`~sqlalchemy.MetaData`
(same table prefix and schema), and are rebuilt from the event history at any time:

* ``<prefix>case_facts`` — one row per case: the facts of :func:`gridflow.scoring.case_facts`
  that the indicators count (flags as 0/1, times, the case composite), under one policy
  version;
* ``<prefix>case_units`` — the location's ancestry: one row per (case, level, unit);
* ``<prefix>scores`` — the score history: one row per scored subject (lead / assisting
  department, reporting grid worker) per revision, under the policy version it was computed
  with. Revisions are never deleted; ``current`` marks the rows in force.

The queries return integer counts and integer sums only (handling time in seconds, the
composite in hundredths), so that the SQL aggregation equals the in-Python definition
exactly on every backend. No foreign keys: the tables are caches of derived data. Migration
0002 (``gridflow/migrations/versions/r0002_scoring_tables.py``) spells the same tables out
and :meth:`Store.create_all` creates them; ``tests/test_migrations.py`` checks they agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from gridflow.store.core import Store, StoreTx
from gridflow.store.records import EventRecord
from gridflow.store.tables import MAX_LENGTHS, UTCDateTime

__all__ = [
    "TALLY_FIELDS",
    "AggregateTables",
    "aggregate_tables",
    "define_aggregate_tables",
    "ensure_aggregate_tables",
    "has_aggregate_rows",
    "has_aggregate_tables",
    "has_store_tables",
]

_MYSQL_KW: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}

#: Integer sums every tally query returns (answer counts come as ``answer:<key>``).
TALLY_FIELDS: tuple[str, ...] = (
    "reported", "filed", "cancelled", "deferred", "should_close", "closed", "on_time",
    "reworked", "extended", "evaluated", "handled", "handling_seconds", "scored",
    "composite_centi",
)  # fmt: skip


@dataclass(frozen=True)
class AggregateTables:
    facts: sa.Table
    units: sa.Table
    scores: sa.Table
    cases: sa.Table
    events: sa.Table


def _s(n: int) -> sa.String:
    return sa.String(n)


def define_aggregate_tables(metadata: sa.MetaData, table_prefix: str = "gf_") -> tuple[
    sa.Table, sa.Table, sa.Table
]:
    """Define (or return, when already defined) the derived tables on ``metadata``; for
    Alembic migrations and :func:`aggregate_tables`."""
    p = table_prefix
    schema = metadata.schema
    names = (f"{p}case_facts", f"{p}case_units", f"{p}scores")
    keys = [f"{schema}.{n}" if schema else n for n in names]
    if all(k in metadata.tables for k in keys):
        return metadata.tables[keys[0]], metadata.tables[keys[1]], metadata.tables[keys[2]]
    cid, unit, pv = MAX_LENGTHS["case_id"], MAX_LENGTHS["unit"], MAX_LENGTHS["policy_version"]
    flag = sa.SmallInteger
    facts = sa.Table(
        names[0],
        metadata,
        sa.Column("case_id", _s(cid), primary_key=True),
        sa.Column("case_version", sa.Integer, nullable=False),
        sa.Column("policy_version", _s(pv)),
        sa.Column("state", _s(MAX_LENGTHS["state"]), nullable=False),
        sa.Column("reported_at", UTCDateTime(), nullable=False),
        sa.Column("report_week", _s(8), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("category", _s(MAX_LENGTHS["category"])),
        sa.Column("location", _s(unit)),
        sa.Column("lead", _s(MAX_LENGTHS["lead_department"])),
        sa.Column("reporter", _s(MAX_LENGTHS["actor_id"])),
        sa.Column("filed", flag, nullable=False),
        sa.Column("cancelled", flag, nullable=False),
        sa.Column("deferred", flag, nullable=False),
        sa.Column("closed", flag, nullable=False),
        sa.Column("on_time", flag, nullable=False),
        sa.Column("extended", flag, nullable=False),
        sa.Column("evaluated", flag, nullable=False),
        sa.Column("rework_count", sa.Integer, nullable=False),
        sa.Column("satisfaction", _s(32)),
        sa.Column("due_at", UTCDateTime()),
        sa.Column("closed_at", UTCDateTime()),
        sa.Column("handling_seconds", sa.BigInteger),
        sa.Column("composite_centi", sa.Integer),
        sa.Index(None, "reported_at"),
        sa.Index(None, "lead", "reported_at"),
        sa.Index(None, "reporter", "reported_at"),
        sa.Index(None, "policy_version"),
        **_MYSQL_KW,
    )
    units = sa.Table(
        names[1],
        metadata,
        sa.Column("case_id", _s(cid), primary_key=True),
        sa.Column("level", _s(64), primary_key=True),
        sa.Column("unit", _s(unit), nullable=False),
        sa.Index(None, "level", "unit"),
        **_MYSQL_KW,
    )
    scores = sa.Table(
        names[2],
        metadata,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("case_id", _s(cid), nullable=False),
        sa.Column("policy_version", _s(pv), nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("current", flag, nullable=False),
        sa.Column("subject_kind", _s(16), nullable=False),
        sa.Column("subject_id", _s(MAX_LENGTHS["actor_id"]), nullable=False),
        sa.Column("role", _s(16), nullable=False),
        sa.Column("timeliness", sa.Double, nullable=False),
        sa.Column("resolution", sa.Double, nullable=False),
        sa.Column("quality", sa.Double, nullable=False),
        sa.Column("satisfaction", sa.Double, nullable=False),
        sa.Column("composite_centi", sa.Integer, nullable=False),
        sa.Column("exempt", _s(64), nullable=False),
        sa.Column("reason", sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")),
        sa.Column("details", sa.JSON, nullable=False),
        sa.Column("case_version", sa.Integer, nullable=False),
        sa.Column("reported_at", UTCDateTime(), nullable=False),
        sa.Column("scored_at", UTCDateTime(), nullable=False),
        # explicit short names: the generated ones would pass the 63/64-character limits
        sa.UniqueConstraint("case_id", "policy_version", "revision", "subject_kind",
                            "subject_id", "role", name=f"uq_{p}scores_revision"),
        sa.Index(f"ix_{p}scores_subject", "policy_version", "current", "subject_kind",
                 "reported_at"),
        **_MYSQL_KW,
    )
    return facts, units, scores


def aggregate_tables(store: Store) -> AggregateTables:
    """The derived tables of ``store`` (defined on its metadata on first use)."""
    facts, units, scores = define_aggregate_tables(store.metadata, store.tables.prefix)
    return AggregateTables(facts, units, scores, store.tables.cases, store.tables.events)


def ensure_aggregate_tables(store: Store) -> AggregateTables:
    """:func:`aggregate_tables`, creating the tables in the database when they are missing
    (migration 0002 and :meth:`Store.create_all` create them; this covers databases
    created before). Tables that exist are left alone."""
    t = aggregate_tables(store)
    tables = [t.facts, t.units, t.scores]
    with store.transaction(readonly=True) as tx:
        inspector = sa.inspect(tx.connection)
        missing = [x for x in tables if not inspector.has_table(x.name, schema=x.schema)]
    if missing:
        with store.transaction() as tx:
            store.metadata.create_all(tx.connection, tables=missing, checkfirst=True)
    return t


def _has_table(store: Store, table: sa.Table) -> bool:
    with store.transaction(readonly=True) as tx:
        return bool(sa.inspect(tx.connection).has_table(table.name, schema=table.schema))


def has_aggregate_tables(store: Store) -> bool:
    """Whether the derived tables exist in the database."""
    return _has_table(store, aggregate_tables(store).facts)


def has_aggregate_rows(store: Store) -> bool:
    """Whether a refresh has filled the derived tables (the tables exist — the migrations
    and ``create_all`` make them — and hold the facts of at least one case)."""
    if not has_aggregate_tables(store):
        return False
    facts = aggregate_tables(store).facts
    with store.transaction(readonly=True) as tx:
        return tx.connection.execute(sa.select(facts.c.case_id).limit(1)).first() is not None


def has_store_tables(store: Store) -> bool:
    """Whether the store's case table exists in the database."""
    return _has_table(store, store.tables.cases)


# --------------------------------------------------------------------------- refresh


def stale_cases(
    tx: StoreTx, t: AggregateTables, policy_version: str, after: str | None, limit: int
) -> list[str]:
    """Ids of cases whose facts are missing, older than the case, or of another policy
    version (``case_id`` order, after ``after``)."""
    c, f = t.cases, t.facts
    stmt = (
        sa.select(c.c.case_id)
        .select_from(c.outerjoin(f, f.c.case_id == c.c.case_id))
        .where(sa.or_(
            f.c.case_id.is_(None),
            f.c.case_version != c.c.version,
            f.c.policy_version.is_(None),
            f.c.policy_version != policy_version,
        ))
        .order_by(c.c.case_id)
        .limit(limit)
    )
    if after is not None:
        stmt = stmt.where(c.c.case_id > after)
    return [r[0] for r in tx.connection.execute(stmt)]


def histories(tx: StoreTx, t: AggregateTables, case_ids: Sequence[str]) -> dict[str, list[
    EventRecord
]]:
    """The events of each case, by ``seq``."""
    return tx.histories(case_ids)


def write_facts(
    tx: StoreTx,
    t: AggregateTables,
    rows: Sequence[Mapping[str, Any]],
    units: Sequence[Mapping[str, Any]],
) -> None:
    """Replace the facts (and unit rows) of the cases in ``rows``."""
    if not rows:
        return
    ids = [r["case_id"] for r in rows]
    conn = tx.connection
    conn.execute(sa.delete(t.units).where(t.units.c.case_id.in_(ids)))
    conn.execute(sa.delete(t.facts).where(t.facts.c.case_id.in_(ids)))
    tx.insert_rows(t.facts, rows)
    tx.insert_rows(t.units, units)


def score_rows(
    tx: StoreTx, t: AggregateTables, case_ids: Sequence[str], policy_version: str | None = None
) -> list[dict[str, Any]]:
    """Score rows of the cases (every revision), in insertion order."""
    if not case_ids:
        return []
    s = t.scores
    stmt = sa.select(s).where(s.c.case_id.in_(list(case_ids))).order_by(s.c.id)
    if policy_version is not None:
        stmt = stmt.where(s.c.policy_version == policy_version)
    return [dict(r._mapping) for r in tx.connection.execute(stmt)]


def retire_scores(tx: StoreTx, t: AggregateTables, ids: Sequence[int]) -> None:
    if ids:
        s = t.scores
        tx.connection.execute(sa.update(s).where(s.c.id.in_(list(ids))).values(current=0))


def insert_scores(tx: StoreTx, t: AggregateTables, rows: Sequence[Mapping[str, Any]]) -> None:
    tx.insert_rows(t.scores, rows)


def facts_versions(tx: StoreTx, t: AggregateTables) -> list[str | None]:
    """The policy versions the stored facts were computed under."""
    f = t.facts
    return [r[0] for r in tx.connection.execute(sa.select(f.c.policy_version).distinct())]


def latest_update(tx: StoreTx, t: AggregateTables) -> datetime | None:
    """The time of the latest event folded into the facts."""
    value = tx.connection.execute(sa.select(sa.func.max(t.facts.c.updated_at))).scalar()
    if value is None:
        return None
    if isinstance(value, datetime):
        return UTCDateTime().process_result_value(value, tx.connection.dialect)
    # SQLite returns aggregate results untyped (text)
    return UTCDateTime().process_result_value(datetime.fromisoformat(str(value)),
                                              tx.connection.dialect)


# --------------------------------------------------------------------------- tallies


def _sum_if(cond: Any, value: Any = 1) -> Any:
    return sa.func.sum(sa.case((cond, value), else_=0))


def _period(col: Any, start: datetime | None, end: datetime | None) -> list[Any]:
    out = []
    if start is not None:
        out.append(col >= start)
    if end is not None:
        out.append(col < end)
    return out


def tally(
    tx: StoreTx,
    t: AggregateTables,
    *,
    by: str | None,
    start: datetime | None,
    end: datetime | None,
    as_of: datetime,
    answers: Sequence[str],
) -> dict[str | None, dict[str, int]]:
    """The indicator sums of the cases reported in ``[start, end)``, grouped by ``by``:
    ``None`` (one total), ``department`` (lead), ``worker`` (reporting grid worker),
    ``week`` (ISO week of report) or ``level:<level>`` (the location's unit at that level).
    The composite sums are the cases' (per-subject sums: :func:`subject_tally`)."""
    f, u = t.facts, t.units
    should = sa.and_(
        f.c.filed == 1,
        f.c.deferred == 0,
        sa.or_(f.c.closed == 1, sa.and_(f.c.due_at.is_not(None), f.c.due_at <= as_of)),
    )
    has_time = sa.and_(f.c.closed == 1, f.c.handling_seconds.is_not(None))
    cols: list[Any] = [
        sa.func.count().label("reported"),
        _sum_if(f.c.filed == 1).label("filed"),
        _sum_if(f.c.cancelled == 1).label("cancelled"),
        _sum_if(sa.and_(f.c.filed == 1, f.c.deferred == 1)).label("deferred"),
        _sum_if(should).label("should_close"),
        _sum_if(f.c.closed == 1).label("closed"),
        _sum_if(sa.and_(f.c.closed == 1, f.c.on_time == 1)).label("on_time"),
        _sum_if(sa.and_(f.c.closed == 1, f.c.rework_count > 0)).label("reworked"),
        _sum_if(sa.and_(should, f.c.extended == 1)).label("extended"),
        _sum_if(f.c.evaluated == 1).label("evaluated"),
        _sum_if(has_time).label("handled"),
        _sum_if(has_time, f.c.handling_seconds).label("handling_seconds"),
        _sum_if(f.c.composite_centi.is_not(None)).label("scored"),
        _sum_if(f.c.composite_centi.is_not(None), f.c.composite_centi).label("composite_centi"),
    ]
    for i, answer in enumerate(answers):
        cols.append(_sum_if(sa.and_(f.c.evaluated == 1, f.c.satisfaction == answer))
                    .label(f"a{i}"))
    source: Any = f
    key: Any = None
    if by is None:
        pass
    elif by == "department":
        key = f.c.lead
    elif by == "worker":
        key = f.c.reporter
    elif by == "week":
        key = f.c.report_week
    elif by.startswith("level:"):
        level = by.removeprefix("level:")
        source = f.outerjoin(u, sa.and_(u.c.case_id == f.c.case_id, u.c.level == level))
        key = u.c.unit
    else:
        raise ValueError(f"unknown grouping {by!r}")
    stmt = sa.select(*([key.label("k")] if key is not None else []), *cols).select_from(source)
    stmt = stmt.where(*_period(f.c.reported_at, start, end))
    if key is not None:
        stmt = stmt.group_by(key)
    out: dict[str | None, dict[str, int]] = {}
    for row in tx.connection.execute(stmt):
        m = row._mapping
        if key is None and not m["reported"]:
            continue
        sums = {name: int(m[name] or 0) for name in TALLY_FIELDS}
        for i, answer in enumerate(answers):
            sums[f"answer:{answer}"] = int(m[f"a{i}"] or 0)
        out[m["k"] if key is not None else None] = sums
    return out


def subject_tally(
    tx: StoreTx,
    t: AggregateTables,
    *,
    kind: str,
    policy_version: str,
    start: datetime | None,
    end: datetime | None,
) -> dict[str, tuple[int, int]]:
    """Per subject of ``kind`` (department / worker): (scored cases, sum of composite
    hundredths) over the current scores of cases reported in ``[start, end)``."""
    s = t.scores
    stmt = (
        sa.select(s.c.subject_id, sa.func.count(), sa.func.sum(s.c.composite_centi))
        .where(s.c.policy_version == policy_version, s.c.current == 1, s.c.subject_kind == kind,
               *_period(s.c.reported_at, start, end))
        .group_by(s.c.subject_id)
    )
    return {r[0]: (int(r[1] or 0), int(r[2] or 0)) for r in tx.connection.execute(stmt)}


def top_cases(
    tx: StoreTx,
    t: AggregateTables,
    *,
    start: datetime | None,
    end: datetime | None,
    top: int,
) -> list[dict[str, Any]]:
    """Scored cases reported in ``[start, end)`` whose composite reaches the ``top``-th best
    (all of them when ``top`` is 0); the caller orders ties."""
    f = t.facts
    where = [f.c.composite_centi.is_not(None), *_period(f.c.reported_at, start, end)]
    stmt = sa.select(f.c.case_id, f.c.composite_centi, f.c.closed_at, f.c.reported_at,
                     f.c.lead, f.c.location, f.c.category).where(*where)
    if top > 0:
        threshold = tx.connection.execute(
            sa.select(f.c.composite_centi).where(*where)
            .order_by(f.c.composite_centi.desc()).limit(1).offset(top - 1)
        ).scalar()
        if threshold is not None:
            stmt = stmt.where(f.c.composite_centi >= threshold)
    return [dict(r._mapping) for r in tx.connection.execute(stmt)]
