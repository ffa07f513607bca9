"""Benchmark: the full 7-step flow per case through the engine on file SQLite (WAL).

Each case is reported, filed, dispatched (routed by the policy), accepted, fed back,
verified, closed and evaluated: 8 commands, each its own store transaction. Beside it, in
the same run, a naive baseline: a new ``transitions.Machine`` per case and no store.

    .venv/bin/python bench/lifecycle.py [--cases N] [--policy DIR] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from transitions import Machine

import gridflow
from gridflow import Actor, Engine
from gridflow.clock import ManualClock
from gridflow.store import Store
from gridflow.workflow import default_graph

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8  # report + 7 transitions

GRID_WORKER = Actor("gw-1", "grid_worker", department="grid-worker")
CLERK = Actor("clerk-1", "clerk")
DISPATCHER = Actor("disp-1", "dispatcher")
SUPERVISOR = Actor("sup-1", "supervisor")
RESIDENT = Actor("res-1", "resident")


def sample_cases(policy_dir: Path) -> list[dict[str, object]]:
    cases = []
    for f in sorted((policy_dir / "cases").glob("*.json")):
        case = json.loads(f.read_text(encoding="utf-8"))
        case.pop("id", None)
        cases.append(case)
    return cases


def run_engine(policy: gridflow.Policy, db: Path, n: int) -> tuple[float, int]:
    store = Store(f"sqlite:///{db}")
    store.create_all()
    clock = ManualClock(datetime(2026, 3, 9, 9, 0, tzinfo=ZoneInfo("Asia/Shanghai")))
    counter = iter(range(10**9))
    engine = Engine(policy, store, clock, ids=lambda: f"B-{next(counter):08d}")
    cases = sample_cases(policy.root)
    # warm up (statement compilation, routing caches)
    for case in cases:
        _one(engine, case)
    start = time.perf_counter()
    for i in range(n):
        _one(engine, cases[i % len(cases)])
        if i % 50 == 0:
            clock.advance(minutes=1)
    elapsed = time.perf_counter() - start
    store.dispose()
    return elapsed, n


def _one(engine: Engine, case: dict[str, object]) -> None:
    view = engine.report(case, GRID_WORKER)
    cid = view.id
    engine.file(cid, CLERK)
    view = engine.dispatch(cid, DISPATCHER)
    handler = Actor("h-1", "handler", department=view.lead)
    if view.pool is not None:
        engine.claim(cid, handler)
    else:
        engine.accept(cid, handler)
    engine.feedback(cid, handler, evidence=["https://img.example/1.jpg"])
    engine.verify(cid, SUPERVISOR)
    engine.close(cid, SUPERVISOR)
    engine.evaluate(cid, RESIDENT, "satisfied")


def run_baseline(n: int) -> tuple[float, int]:
    graph = default_graph()
    states = list(graph.state_names)
    transitions = [
        {"trigger": t.name, "source": list(t.sources), "dest": t.dest or t.sources[0]}
        for t in graph.triggers if t.dest is not None
    ]
    flow = ["file", "dispatch", "accept", "feedback", "verify", "close", "evaluate"]
    start = time.perf_counter()
    for _ in range(n):
        model = Machine(states=states, transitions=transitions, initial="reported",
                        auto_transitions=False)
        for trigger in flow:
            model.trigger(trigger)
        assert model.state == "evaluated"
    return time.perf_counter() - start, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--policy", default=str(ROOT / "examples" / "wujin"))
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    policy = gridflow.load_policy(args.policy)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.sqlite"
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
        elapsed, n = run_engine(policy, db, args.cases)
        if args.profile:
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
    base_elapsed, base_n = run_baseline(args.cases)
    print(f"policy: {policy.name} ({policy.version}); {n} cases, {STEPS} commands each")
    print(
        f"engine   (file SQLite WAL, 1 tx/command): {n / elapsed:8.1f} cases/s  "
        f"{elapsed / (n * STEPS) * 1e6:8.1f} µs/command  ({elapsed:.2f} s)"
    )
    print(
        f"baseline (new transitions Machine/case, no store): {base_n / base_elapsed:8.1f} "
        f"cases/s  {base_elapsed / (base_n * (STEPS - 1)) * 1e6:8.1f} µs/transition"
    )
    print(f"target ≥ 300 cases/s: {'met' if n / elapsed >= 300 else 'NOT met'}")


if __name__ == "__main__":
    main()
