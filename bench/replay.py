"""Replay benchmark: routing replay vs a raw durable_rules ruleset, life-cycle replay into
SQLite, and the peak memory of a 1,000,000-case CSV replay.

    .venv/bin/python bench/replay.py                 # routing + life cycle (one run)
    .venv/bin/python bench/replay.py --million       # also the 1M-case CSV (RSS)
    .venv/bin/python bench/replay.py --routing-cases 50000 --lifecycle-cases 20000

Routing: the same rules (bench/policygen.py) as one hand-written durable.engine Host
ruleset, posted case by case, against ``gridflow.replay.replay_routing`` over the same
validated cases; every decision of the replay is checked against the raw ruleset (and a
sample against ``Policy.route``) before the ratio is printed. Life cycle: the example
district's policy (with its history rule, so every dispatch counts earlier cases in the
store) and a generated log; the same records through one process (``LifecycleReplay``
under ``tuned_gc``, as ``gridflow replay`` runs it) and through ``--jobs`` shards
(``ShardedLifecycleReplay``: this process and worker processes; default: one per core),
each into a new file SQLite database; the two reports must be identical. Targets:
routing ≥ 5× the raw ruleset; life cycle ≥ 3,000 cases/s; 1M-case CSV replay ≤ 500 MB
peak RSS.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from policygen import write_policy
from route import raw_durable

import gridflow
from gridflow.generate import Settings, write_log
from gridflow.importer import LogReader, LogRecord
from gridflow.replay import LifecycleReplay, RouteMemo, replay_routing, to_json
from gridflow.shards import ShardedLifecycleReplay, tuned_gc
from gridflow.store import Store

ROOT = Path(__file__).resolve().parent.parent
WUJIN = ROOT / "examples" / "wujin"
MILLION = Path(tempfile.gettempdir()) / "gridflow-bench-1m.csv"


def _cases(shape: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Cases over all rules (9 in 10 hit one), each with its own description text."""
    rules = shape["rules"]
    out = []
    for k in range(n):
        rule = rules[(k * 7919) % len(rules)]
        word = rule["when"]["description"] if k % 10 else "无关"
        out.append({"id": f"c{k}", "category": rule["when"]["category"], "location": "g1",
                    "description": f"群众反映{word}问题，编号{k}", "channel": "hotline"})
    return out


def bench_routing(n_rules: int, n_cases: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        shape = write_policy(Path(tmp), n_rules)
        policy = gridflow.load_policy(tmp)
        docs = _cases(shape, n_cases)
        records = [LogRecord(i + 2, policy.validate_case(d)) for i, d in enumerate(docs)]
        raw = raw_durable(shape["rules"])
        for d in docs[:200]:
            raw(d)  # warm-up
        t0 = time.perf_counter()
        raw_leads = [raw(d) for d in docs]
        raw_s = time.perf_counter() - t0

        leads: list[str] = []
        memo = RouteMemo(policy)
        t0 = time.perf_counter()
        stats = replay_routing(policy, records, memo=memo,
                               on_case=lambda _rec, routed: leads.append(routed.lead))
        replay_s = time.perf_counter() - t0
        assert stats.cases == n_cases and stats.errors == 0
        mismatches = sum(a != b for a, b in zip(leads, raw_leads, strict=True))
        assert mismatches == 0, f"{mismatches} decisions differ from raw durable_rules"
        for rec, lead in list(zip(records, leads, strict=True))[:: max(1, n_cases // 2000)]:
            assert policy.route(rec.case).lead == lead, rec.case
        ratio = (n_cases / replay_s) / (n_cases / raw_s)
        print(f"  {n_rules:>4} rules, {n_cases:,} cases: raw durable_rules "
              f"{n_cases / raw_s:>9,.0f} cases/s ({raw_s / n_cases * 1e6:5.1f} µs) | routing "
              f"replay {n_cases / replay_s:>9,.0f} cases/s ({replay_s / n_cases * 1e6:5.1f} µs) "
              f"| ×{ratio:.1f} | memo {memo.hits:,} hits / {memo.misses:,} misses | "
              f"decisions identical ({n_cases:,} checked against raw)")
        return ratio


def _lifecycle_run(policy: Any, records: list[LogRecord], db: Path, jobs: int) -> tuple[Any, float]:
    store = Store(f"sqlite:///{db}", outbox=False)
    store.create_all()
    t0 = time.perf_counter()
    run: Any = (LifecycleReplay(policy, store) if jobs == 1 else
                ShardedLifecycleReplay(policy, store, jobs=jobs))
    # as `gridflow replay` runs it (the workers tune their own)
    with tuned_gc():
        for rec in records:
            run.feed(rec)
        run.finish()
    total_s = time.perf_counter() - t0
    with store.transaction(readonly=True) as tx:
        stored = sum(1 for _ in tx.iter_cases())
    store.dispose()
    assert stored == run.cases == len(records) and run.error_count == 0
    return run, total_s


def bench_lifecycle(n_cases: int, jobs: int = 2) -> float:
    """One process (LifecycleReplay) beside ``jobs`` shards (ShardedLifecycleReplay, what
    ``gridflow replay --jobs`` runs: this process and worker processes), same records, both
    into a new file SQLite database, counting every case stored; same report checked."""
    policy = gridflow.load_policy(WUJIN)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log.csv"
        write_log(log, policy, n_cases, seed=11, settings=Settings(days=max(30, n_cases // 60)),
                  route=RouteMemo(policy).route)
        t0 = time.perf_counter()
        records = list(LogReader(log, policy=policy))
        import_s = time.perf_counter() - t0
        one, one_s = _lifecycle_run(policy, records, Path(tmp) / "one.db", 1)
        many, many_s = _lifecycle_run(policy, records, Path(tmp) / "many.db", jobs)
        assert to_json(one.to_dict()) == to_json(many.to_dict()), "reports differ"
        events = sum(one.events.values())
        ind = one.indicators()
        print(f"  {n_cases:,} cases ({events:,} events), import {n_cases / import_s:,.0f} rows/s; "
              f"completion {ind['completion_rate']:.4%}, on time {ind['on_time_rate']:.2%}")
        print(f"  one process:      {n_cases / one_s:>7,.0f} cases/s ({one_s:.2f} s)")
        print(f"  {jobs} shards:           {n_cases / many_s:>7,.0f} cases/s ({many_s:.2f} s, "
              f"incl. start-up and gathering the shards; ×{one_s / many_s:.2f}); same report")
        return n_cases / many_s


def bench_million() -> None:
    policy = gridflow.load_policy(WUJIN)
    if not MILLION.exists():
        t0 = time.perf_counter()
        part = MILLION.with_suffix(".part")
        write_log(part, policy, 1_000_000, seed=1, route=RouteMemo(policy).route, format="csv")
        part.replace(MILLION)  # never a half-written file under the final name
        print(f"  generated {MILLION} ({MILLION.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t0:.0f} s")
    out = Path(tempfile.gettempdir()) / "gridflow-bench-1m.json"
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out_log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _PEAK_WRAPPER, "replay", str(WUJIN), str(MILLION),
             "--mode", "routing", "--json", str(out)],
            stdout=out_log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "120"},
        )
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - t0
        out_log.seek(0)
        text = out_log.read().decode("utf-8", "replace")
        if proc.returncode != 0:
            print(text)
            raise SystemExit("the 1M replay failed")
    peaks = [int(line.split()[1]) for line in text.splitlines() if line.startswith("VmHWM_KB ")]
    # the child's own high-water mark (/proc/self/status at exit). ru_maxrss is not: Linux
    # carries the forking parent's resident size over fork and exec into it.
    rss_mb = (peaks[-1] if peaks else usage.ru_maxrss) / 1024
    source = "VmHWM at exit" if peaks else "ru_maxrss, includes the parent's pages"
    print(f"  1,000,000-case CSV routing replay (gridflow replay --mode routing): {elapsed:.0f} s "
          f"({1_000_000 / elapsed:,.0f} cases/s incl. CSV import), peak RSS {rss_mb:,.0f} MB "
          f"({source}) — target ≤ 500 MB: {'met' if rss_mb <= 500 else 'NOT met'}")


#: runs ``python -m gridflow ARGS`` and prints its peak resident size when it exits
_PEAK_WRAPPER = """
import atexit, runpy, sys

def _peak():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    print("VmHWM_KB", line.split()[1], file=sys.stderr, flush=True)
    except OSError:
        pass

atexit.register(_peak)
sys.argv = ["gridflow", *sys.argv[1:]]
runpy.run_module("gridflow", run_name="__main__", alter_sys=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routing-cases", type=int, default=50_000)
    ap.add_argument("--lifecycle-cases", type=int, default=20_000)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2,
                    help="shards (processes) of the sharded life-cycle replay")
    ap.add_argument("--million", action="store_true", help="also the 1M-case CSV (RSS)")
    args = ap.parse_args()
    print("routing replay vs raw durable_rules (same rules, same cases, one run)")
    ratios = [bench_routing(n, args.routing_cases) for n in (50, 500)]
    print(f"  target ≥ 5×: {'met' if min(ratios) >= 5 else 'NOT met'} "
          f"(×{min(ratios):.1f} at worst)")
    print("life-cycle replay (batched transactions)")
    rate = bench_lifecycle(args.lifecycle_cases, args.jobs)
    print(f"  target ≥ 3,000 cases/s: {'met' if rate >= 3000 else 'NOT met'}")
    if args.million:
        print("memory")
        bench_million()


if __name__ == "__main__":
    main()
