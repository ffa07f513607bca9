"""Benchmark: full 7-step cases/s through the engine on SQLite, PostgreSQL and MariaDB,
with 1 and 2 worker processes, in one run; then where the time of a command goes.

Each case is reported, filed, dispatched (routed by the policy), accepted or claimed, fed
back, verified, closed and evaluated: 8 commands, each its own store transaction. Every
worker process has its own engine and store on one shared database (a new schema or
database, migrated with ``gridflow.store.upgrade``, dropped afterwards); the workers start
together and cases/s counts all their cases over the wall time until the last finishes.

    .venv/bin/python bench/store.py [--cases N] [--workers 1,2] [--backends sqlite,postgres,mysql]
                                    [--pg-url URL] [--mysql-url URL] [--no-profile] [--pg-async]

Servers default to the test servers (``GRIDFLOW_PG_URL`` / ``GRIDFLOW_MYSQL_URL``); an
unreachable one is reported and skipped.
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing
import os
import pstats
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import lifecycle  # noqa: E402  (the same 7-step flow as bench/lifecycle.py)

import gridflow  # noqa: E402
from gridflow import Engine  # noqa: E402
from gridflow.clock import ManualClock  # noqa: E402
from gridflow.store import Store, make_engine, upgrade  # noqa: E402

PG_URL = os.environ.get("GRIDFLOW_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get(
    "GRIDFLOW_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4"
)
START = datetime(2026, 3, 9, 9, 0, tzinfo=ZoneInfo("Asia/Shanghai"))
STEPS = 8


# ------------------------------------------------------------------ databases


class Database:
    """A fresh place for gridflow's tables on one backend (migrated to head)."""

    def __init__(self, backend: str, pg_url: str, mysql_url: str, tmp: Path):
        self.backend = backend
        self.schema: str | None = None
        name = f"gf_bench_{uuid.uuid4().hex[:8]}"
        if backend == "sqlite":
            self.url = f"sqlite:///{tmp / (name + '.db')}"
        else:
            self.url = pg_url if backend == "postgres" else mysql_url
            self.schema = name
        upgrade(self.url, schema=self.schema)  # creates the schema / database too

    def drop(self) -> None:
        if self.schema is None:
            return
        engine = make_engine(self.url)
        try:
            with engine.begin() as conn:
                if self.backend == "postgres":
                    conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
                else:
                    conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{self.schema}`")
        finally:
            engine.dispose()


def reachable(url: str) -> str | None:
    """``None`` if the server answers, else why not."""
    engine = make_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return None
    except sa.exc.DBAPIError as exc:
        return str(exc).splitlines()[0]
    finally:
        engine.dispose()


# ------------------------------------------------------------------ workers


def _engine(url: str, schema: str | None, worker: int,
            engine_kw: dict[str, Any] | None = None) -> tuple[Engine, Store]:
    store = Store.from_url(url, schema=schema, **(engine_kw or {}))
    counter = iter(range(10**9))
    engine = Engine(
        gridflow.load_policy(ROOT / "examples" / "wujin"), store, ManualClock(START),
        ids=lambda: f"W{worker}-{next(counter):08d}-{uuid.uuid4().hex[:6]}",
    )
    return engine, store


def worker_main(url: str, schema: str | None, worker: int, n: int, barrier: Any,
                results: Any, engine_kw: dict[str, Any]) -> None:
    engine, store = _engine(url, schema, worker, engine_kw)
    cases = lifecycle.sample_cases(ROOT / "examples" / "wujin")
    for case in cases[:3]:  # warm up: statement compilation, routing caches
        lifecycle._one(engine, case)
    barrier.wait(timeout=120)
    start = time.perf_counter()
    cpu = time.process_time()
    for i in range(n):
        lifecycle._one(engine, cases[i % len(cases)])
    results.put((worker, time.perf_counter() - start, time.process_time() - cpu, n))
    store.dispose()


def run(db: Database, workers: int, n: int,
        engine_kw: dict[str, Any] | None = None) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=worker_main,
                    args=(db.url, db.schema, w, n, barrier, results, engine_kw or {}))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=300)  # every worker warmed up
    start = time.perf_counter()
    got = [results.get(timeout=3600) for _ in procs]
    wall = time.perf_counter() - start
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            raise RuntimeError(f"worker exited with {p.exitcode}")
    total = sum(g[3] for g in got)
    cpu = sum(g[2] for g in got)
    return {
        "cases_s": total / wall,
        "us_per_command": wall / (total * STEPS) * 1e6 * workers,  # per worker
        "cpu_share": cpu / (wall * workers),
        "cases": total,
    }


# ------------------------------------------------------------------ where the time goes

def _is_database(file: str, fn: str) -> bool:
    """Time inside the database driver: SQLite's C library, or waiting for the server."""
    return (
        any(d in file for d in ("psycopg", "pymysql"))
        or any(d in fn for d in ("sqlite3.", "psycopg", "socket", "select", "poll"))
    )


CATEGORIES: list[tuple[str, Callable[[str, str], bool]]] = [
    ("database driver: SQLite work incl. commit / server round trips", _is_database),
    ("JSON encode/decode", lambda f, fn: "/json/" in f),
    ("SQLAlchemy (Core execution, pool, types)", lambda f, fn: "sqlalchemy" in f),
    ("gridflow store (Python)", lambda f, fn: "gridflow/store" in f),
    ("transitions (workflow state machine)",
     lambda f, fn: "transitions" in f or "gridflow/workflow" in f),
    ("routing (durable_rules, policy)",
     lambda f, fn: "durable" in fn or "durable" in f or "gridflow/routing" in f
     or "gridflow/compiler" in f or "gridflow/conditions" in f),
    ("engine, projection, views (Python)", lambda f, fn: "gridflow/" in f),
]


def profile(db: Database, n: int) -> list[tuple[str, float]]:
    """Single process, cProfile: the share of each kind of work (tottime)."""
    engine, store = _engine(db.url, db.schema, 9)
    cases = lifecycle.sample_cases(ROOT / "examples" / "wujin")
    for case in cases[:3]:
        lifecycle._one(engine, case)
    prof = cProfile.Profile()
    prof.enable()
    for i in range(n):
        lifecycle._one(engine, cases[i % len(cases)])
    prof.disable()
    store.dispose()
    stats = pstats.Stats(prof)
    totals: dict[str, float] = {}
    grand = 0.0
    commit = 0.0
    for (file, _line, fn), row in stats.stats.items():  # type: ignore[attr-defined]
        tottime, cumtime = row[2], row[3]
        grand += tottime
        if fn == "<method 'commit' of 'sqlite3.Connection' objects>" or (
            fn == "commit" and any(d in file for d in ("psycopg", "pymysql"))
            and "cursor" not in file
        ):
            commit += cumtime
        for name, match in CATEGORIES:
            if match(file, fn):
                totals[name] = totals.get(name, 0.0) + tottime
                break
        else:
            totals["other (interpreter, stdlib)"] = (
                totals.get("other (interpreter, stdlib)", 0.0) + tottime
            )
    parts = sorted(((k, v / grand) for k, v in totals.items()), key=lambda kv: -kv[1])
    return [*parts, ("  of all: waiting for COMMIT (durable write: WAL append / fsync)",
                     commit / grand)]


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=300, help="cases per worker")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--backends", default="sqlite,postgres,mysql")
    ap.add_argument("--pg-url", default=PG_URL)
    ap.add_argument("--mysql-url", default=MYSQL_URL)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--profile-cases", type=int, default=100)
    ap.add_argument("--pg-async", action="store_true",
                    help="also run PostgreSQL with synchronous_commit=off (commits do not "
                    "wait for the fsync): shows what round trips and CPU cost")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    load = os.getloadavg()
    print(f"gridflow store benchmark: {args.cases} cases per worker, {STEPS} commands each, "
          f"1 transaction per command; {os.cpu_count()} CPUs, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    rows: list[tuple[str, int, dict[str, float]]] = []
    breakdowns: dict[str, list[tuple[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            url = {"postgres": args.pg_url, "mysql": args.mysql_url}.get(backend)
            if url is not None and (why := reachable(url)) is not None:
                print(f"{backend}: skipped ({why})")
                continue
            variants: list[tuple[str, dict[str, Any]]] = [(backend, {})]
            if backend == "postgres" and args.pg_async:
                variants.append(("postgres, synchronous_commit=off",
                                 {"connect_args": {"options": "-c synchronous_commit=off"}}))
            for label, engine_kw in variants:
                for w in workers:
                    db = Database(backend, args.pg_url, args.mysql_url, Path(tmp))
                    try:
                        rows.append((label, w, run(db, w, args.cases, engine_kw)))
                    finally:
                        db.drop()
                    r = rows[-1][2]
                    print(f"  {label} {w} worker(s): {r['cases_s']:8.1f} cases/s", flush=True)
            if not args.no_profile:
                db = Database(backend, args.pg_url, args.mysql_url, Path(tmp))
                try:
                    breakdowns[backend] = profile(db, args.profile_cases)
                finally:
                    db.drop()
    print()
    width = max([10, *(len(label) for label, _, _ in rows)])
    print(f"{'backend':{width}s} {'workers':>7s} {'cases/s':>9s} {'µs/command':>11s} "
          f"{'CPU busy':>9s}")
    for label, w, r in rows:
        print(f"{label:{width}s} {w:7d} {r['cases_s']:9.1f} {r['us_per_command']:11.1f} "
              f"{r['cpu_share']:9.0%}")
    print("(µs/command: wall time per command in one worker; CPU busy: the workers' own "
          "CPU time / their wall time, the rest is waiting for the database or the CPU)")
    for backend, parts in breakdowns.items():
        print(f"\nwhere a command's time goes, {backend} (1 process, cProfile, "
              f"{args.profile_cases} cases):")
        for name, share in parts:
            print(f"  {share:6.1%}  {name}")


if __name__ == "__main__":
    main()
