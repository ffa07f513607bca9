"""A loaded, compiled policy, and a handle that swaps policies atomically on reload."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from gridflow.calendar import BusinessCalendar, Duration, parse_duration
from gridflow.errors import Problem
from gridflow.history import CaseHistory, History
from gridflow.registry import Registry
from gridflow.routing import Decision, Router
from gridflow.schema import CaseIn, ScoringSpec
from gridflow.workflow import WorkflowGraph, default_graph

__all__ = ["Lifecycle", "Policy", "RuleTestResult"]


@dataclass(frozen=True)
class RuleTestResult:
    name: str
    source: str
    passed: bool
    failures: tuple[str, ...]
    decision: Decision | None


@dataclass(frozen=True)
class Lifecycle:
    """Validated life-cycle settings: workflow graph, supervision, escalation, appeals."""

    graph: WorkflowGraph
    warn_at: float = 0.8
    escalation_path: Mapping[str, str] = field(default_factory=dict)  # tier → tier above
    escalate_on_overdue: frozenset[str] = frozenset()
    escalate_after_returns: int = 2
    escalate_after_rework: int = 2
    summon_at: frozenset[str] = frozenset({"street"})
    appeal_windows: Mapping[str, Duration] = field(
        default_factory=lambda: {
            "routing": parse_duration("2wd"),
            "score": parse_duration("5wd"),
            "resident": parse_duration("7d"),
        }
    )
    reopen_window: Duration = field(default_factory=lambda: parse_duration("7d"))

    def tier_above(self, tier: str) -> str | None:
        return self.escalation_path.get(tier)


@dataclass(frozen=True)
class Policy:
    """Validated rule files compiled for routing. Immutable; reload by loading anew."""

    root: Path
    version: str
    registry: Registry
    calendar: BusinessCalendar
    router: Router
    tests: tuple[Any, ...] = ()
    warnings: tuple[Problem, ...] = ()
    sections: Mapping[str, Any] = field(default_factory=dict)
    lifecycle: Lifecycle = field(default_factory=lambda: Lifecycle(default_graph()))

    @property
    def name(self) -> str:
        return self.registry.name

    @cached_property
    def scoring(self) -> ScoringSpec:
        """The scoring section, or the defaults (built once: closing a case reads it)."""
        spec = self.sections.get("scoring")
        return spec if isinstance(spec, ScoringSpec) else ScoringSpec()

    def validate_case(self, data: CaseIn | Mapping[str, Any]) -> CaseIn:
        return self.router.validate(data)

    def route(
        self,
        case: CaseIn | Mapping[str, Any],
        *,
        exclude: Sequence[str] = (),
        history: CaseHistory | None = None,
    ) -> Decision:
        """Route one case (a dict as in docs/cases.md, or a validated :class:`CaseIn`).
        ``history``: the earlier cases that ``history`` conditions count."""
        return self.router.route(case, exclude=exclude, history=history)

    def run_tests(self) -> list[RuleTestResult]:
        """Run the rule tests written beside the rules."""
        results = []
        for t in self.tests:
            failures: list[str] = []
            decision: Decision | None = None
            try:
                decision = self.route(t.case, history=History(t.earlier))
            except Exception as exc:  # a test reports, it does not crash the run
                failures.append(f"routing raised {type(exc).__name__}: {exc}")
            if decision is not None:
                failures += _compare(t.expect, decision)
            results.append(
                RuleTestResult(t.name, t.source, not failures, tuple(failures), decision)
            )
        return results


def _compare(expect: Any, d: Decision) -> list[str]:
    out = []
    checks: list[tuple[str, Any, Any]] = [
        ("lead", expect.lead, d.lead),
        ("tier", expect.tier, d.tier),
        ("rule", expect.rule, d.rule),
        ("pool", expect.pool, d.pool),
        ("handler", expect.handler, d.handler),
        ("priority", expect.priority, d.priority),
        ("time_limit", _canonical(expect.time_limit), d.time_limit),
        ("due_at", expect.due_at, d.due_at),
        ("unit", expect.unit, d.unit),
        ("urgency", expect.urgency, d.urgency),
    ]
    for name, want, got in checks:
        if want is not None and want != got:
            out.append(f"{name}: expected {want!r}, got {got!r}")
    for name, want_list, got_list in (
        ("assist", expect.assist, d.assist),
        ("tags", expect.tags, d.tags),
        ("summon", expect.summon, d.summon),
        ("notify", expect.notify, [u for n in d.notify for u in n.units]),
    ):
        if want_list is not None and sorted(want_list) != sorted(got_list):
            out.append(f"{name}: expected {sorted(want_list)!r}, got {sorted(got_list)!r}")
    return out


def _canonical(limit: str | None) -> str | None:
    return str(parse_duration(limit)) if limit else None
