"""Routing benchmark: gridflow.route vs a raw durable_rules ruleset vs a plain-Python baseline.

Run: ``python bench/route.py`` (or ``make bench``). One process, one run, same rules
and cases for all three; decisions are cross-checked before timing.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from policygen import sample_cases, write_policy

from gridflow import load_policy

N_CASES = 2000
RAW_LIMIT = 512  # durable_rules hangs creating a ruleset above this


def _pcts(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    return statistics.median(s), s[min(len(s) - 1, int(len(s) * 0.99))]


def _time(fn: Any, items: list[Any]) -> tuple[list[float], list[Any]]:
    out, results = [], []
    for item in items:
        t0 = time.perf_counter_ns()
        results.append(fn(item))
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out, results


def raw_durable(rules: list[dict[str, Any]]) -> Any:
    """The same rules as one hand-written durable_rules ruleset (hit policy by event)."""
    from durable import engine

    class Host(engine.Host):  # type: ignore[misc]
        def _run(self) -> None:
            return None

    host = Host()
    fired: list[str] = []
    definition = {}

    def action(lead: str) -> Any:
        def act(_c: Any) -> None:  # durable_rules treats two-argument actions as async
            fired.append(lead)

        return act

    for i, r in enumerate(rules):
        act = action(r["then"]["lead"])
        definition[r["id"]] = {
            "all": [
                {
                    "m": {
                        "$and": [
                            {"k": 1},
                            {"category": r["when"]["category"]},
                            {"$mt": {"description": f".*{r['when']['description']}.*"}},
                        ]
                    }
                }
            ],
            "pri": i,
            "run": act,
        }
    name = f"raw{len(rules)}"
    host.set_rulesets({name: definition})
    counter = iter(range(10**9))

    def route(case: dict[str, Any]) -> str:
        fired.clear()
        try:
            host.post(
                name,
                {
                    "id": next(counter),
                    "sid": "0",
                    "k": 1,
                    "category": case["category"],
                    "description": case["description"],
                },
            )
        except engine.MessageNotHandledException:
            return "centre"
        return fired[0]

    return route


def python_baseline(rules: list[dict[str, Any]]) -> Any:
    index: dict[str, list[tuple[str, str]]] = {}
    for r in rules:
        index.setdefault(r["when"]["category"], []).append(
            (r["when"]["description"], r["then"]["lead"])
        )

    def route(case: dict[str, Any]) -> str:
        for word, lead in index.get(case["category"], ()):
            if word in case["description"]:
                return lead
        return "centre"

    return route


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [50, 500, 5000]
    print(f"routing benchmark, {N_CASES} cases per size (µs per case)")
    header = (
        f"{'rules':>6} {'load s':>7} {'rulesets':>8} | {'gridflow p50/p99':>17} | "
        f"{'raw durable p50/p99':>20} | {'python p50/p99':>15} | {'gf/raw':>6}"
    )
    print(header)
    print("-" * len(header))
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            shape = write_policy(Path(tmp), n)
            t0 = time.perf_counter()
            policy = load_policy(tmp)
            load_s = time.perf_counter() - t0
            cases = sample_cases(shape, N_CASES)
            for c in cases[:200]:
                policy.route(c)  # warm-up
            gf_t, gf_r = _time(lambda c, p=policy: p.route(c).lead, cases)
            py = python_baseline(shape["rules"])
            py_t, py_r = _time(py, cases)
            assert gf_r == py_r, "gridflow and the Python baseline disagree"
            raw_txt = "not loadable (>512 rules)"
            ratio = "-"
            if n <= RAW_LIMIT:
                raw = raw_durable(shape["rules"])
                for c in cases[:200]:
                    raw(c)
                raw_t, raw_r = _time(raw, cases)
                assert raw_r == gf_r, "gridflow and raw durable_rules disagree"
                r50, r99 = _pcts(raw_t)
                raw_txt = f"{r50:8.1f} /{r99:8.1f}"
                ratio = f"{_pcts(gf_t)[0] / r50:.2f}"
            g50, g99 = _pcts(gf_t)
            p50, p99 = _pcts(py_t)
            print(
                f"{n:>6} {load_s:>7.2f} {policy.router.compiled.ruleset_count:>8} | "
                f"{g50:7.1f} /{g99:8.1f} | {raw_txt:>20} | {p50:6.1f} /{p99:6.1f} | {ratio:>6}"
            )
    print(
        "targets: gridflow p50 <= 1.5x raw durable at 500 rules; at 5000 rules p50 <= 100 µs "
        "and load <= 10 s"
    )


if __name__ == "__main__":
    main()
