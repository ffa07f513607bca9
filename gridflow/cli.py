"""The ``gridflow`` command line: check, test, route, schema, diagram, demo.

Exit codes: 0 success, 1 invalid input or failed tests, 2 usage error.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from gridflow.clock import SystemClock
from gridflow.errors import DefinitionError, GridflowError, Problem
from gridflow.loader import load_policy
from gridflow.policy import Policy
from gridflow.routing import Decision

__all__ = ["main"]

# Piped output (CI logs, files) gets a wide fixed width so decision tables stay readable.
_out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
_err = Console(stderr=True, highlight=False, soft_wrap=True)


def _today() -> Any:
    return SystemClock().now().date()


def _load(directory: str, report: Console = _out) -> Policy:
    """Load a policy or print every problem (to ``report``) and exit 1."""
    warnings: list[Problem] = []
    try:
        policy: Policy = load_policy(directory, today=_today(), on_warning=warnings.append)
    except DefinitionError as exc:
        for p in exc.problems:
            report.print(str(p), markup=False)
        n_err = len(exc.errors)
        report.print(
            f"{n_err} error(s), {len(exc.problems) - n_err} warning(s) in {directory}", markup=False
        )
        sys.exit(1)
    for w in warnings:
        _err.print(str(w), markup=False)
    return policy


def _read_json(path: str) -> Any:
    try:
        if path == "-":
            stdin = getattr(sys.stdin, "buffer", None)  # bytes, so encoding errors are ours
            raw = stdin.read() if stdin is not None else sys.stdin.read().encode("utf-8")
        else:
            raw = Path(path).read_bytes()
    except OSError as exc:
        raise click.UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        _err.print(f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}", markup=False)
        sys.exit(1)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        _err.print(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}", markup=False)
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gridflow")
def main() -> None:
    """Route, track and score grid-governance cases with YAML rule files."""


@main.command()
@click.argument("directory", type=click.Path(exists=True))
def check(directory: str) -> None:
    """Validate a policy directory; print every problem as path:line:col: message."""
    policy = _load(directory)
    reg = policy.registry
    n_rules = sum(len(t) for t in policy.router.rules)
    _out.print(
        f"ok: {policy.name} (version {policy.version}): {len(reg.units)} units, "
        f"{len(reg.departments)} departments, {len(reg.categories)} categories, "
        f"{n_rules} rules in {policy.router.compiled.ruleset_count} ruleset(s), "
        f"{len(policy.tests)} rule tests",
        markup=False,
    )


@main.command("test")
@click.argument("directory", type=click.Path(exists=True))
@click.option("-v", "--verbose", is_flag=True, help="List every test, not only failures.")
def test_cmd(directory: str, verbose: bool) -> None:
    """Run the rule tests written beside the rules (exit 1 on any failure)."""
    started = time.perf_counter()
    policy = _load(directory)
    results = policy.run_tests()
    failed = [r for r in results if not r.passed]
    for r in results:
        if verbose or not r.passed:
            status = "[green]PASSED[/]" if r.passed else "[red]FAILED[/]"
            _out.print(f"{status} {r.source} {r.name}")
        for f in r.failures:
            _out.print(f"    {f}", markup=False)
    elapsed = time.perf_counter() - started
    passed = len(results) - len(failed)
    colour = "red" if failed else "green"
    _out.print(f"[{colour}]{passed} passed, {len(failed)} failed in {elapsed:.2f}s[/]")
    if failed:
        sys.exit(1)


def _decision_json(d: Decision) -> dict[str, Any]:
    out: dict[str, Any] = d.to_dict()
    out["explain"] = d.explain()
    return out


@main.command()
@click.argument("directory", type=click.Path(exists=True))
@click.argument("case_file", metavar="CASE.json")
@click.option("--explain", is_flag=True, help="Show the matched rules and the values seen.")
@click.option("--json", "as_json", is_flag=True, help="Print the decision(s) as JSON.")
def route(directory: str, case_file: str, explain: bool, as_json: bool) -> None:
    """Route a case (or a JSON list of cases); CASE.json may be '-' for stdin."""
    # stdout carries only the decisions (JSON with --json); problems go to stderr
    policy = _load(directory, report=_err)
    data = _read_json(case_file)
    cases = data if isinstance(data, list) else [data]
    decisions: list[Decision] = []
    for i, case in enumerate(cases):
        where = case_file if not isinstance(data, list) else f"{case_file}[{i}]"
        try:
            decisions.append(policy.router.route(case, source=where))
        except GridflowError as exc:
            _err.print(str(exc), markup=False)
            sys.exit(1)
    if as_json:
        payload = [_decision_json(d) for d in decisions]
        click.echo(
            json.dumps(
                payload if isinstance(data, list) else payload[0], ensure_ascii=False, indent=2
            )
        )
        return
    _decision_table(decisions, policy)
    if explain:
        for d in decisions:
            _out.print(f"\n[bold]{d.case_id or d.category}[/]")
            for line in d.explain():
                _out.print(f"  {line}", markup=False)


def _decision_table(decisions: list[Decision], policy: Policy) -> None:
    reg = policy.registry
    table = Table(title=f"{policy.name} — policy {policy.version}")
    for col in ("case", "category", "lead", "assist", "tier", "unit", "limit", "due", "rule"):
        table.add_column(col)
    for d in decisions:
        cat = reg.categories[d.category]
        table.add_row(
            d.case_id or "-",
            f"{d.category} {cat.name}",
            f"{d.lead} {d.lead_name}",
            ", ".join(d.assist + [f"summon:{s}" for s in d.summon]) or "-",
            d.tier,
            d.unit or "-",
            d.time_limit or "-",
            d.due_at.astimezone(policy.calendar.timezone).strftime("%m-%d %H:%M")
            if d.due_at
            else "-",
            f"{d.rule} ({d.source})",
        )
    _out.print(table)


@main.command()
@click.option("--case", "case_schema", is_flag=True, help="Schema of the case JSON instead.")
def schema(case_schema: bool) -> None:
    """Print the JSON Schema of rule files (for editor completion)."""
    from gridflow.schema import CaseIn, PolicyFile

    model = CaseIn if case_schema else PolicyFile
    doc = model.model_json_schema(by_alias=True)
    doc["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    doc["title"] = "gridflow case" if case_schema else "gridflow rule file"
    click.echo(json.dumps(doc, ensure_ascii=False, indent=2))


@main.command()
@click.argument("directory", required=False, type=click.Path(exists=True))
@click.option("--format", "fmt", type=click.Choice(["mermaid", "dot"]), default="mermaid")
def diagram(directory: str | None, fmt: str) -> None:
    """Print the case workflow as Mermaid (default) or DOT."""
    from gridflow import workflow

    graph = _load(directory).lifecycle.graph if directory else workflow.default_graph()
    click.echo(workflow.to_mermaid(graph) if fmt == "mermaid" else workflow.to_dot(graph))


@main.command()
@click.option(
    "--dir", "directory", default="examples/wujin", show_default=True, type=click.Path(exists=True)
)
def demo(directory: str) -> None:
    """Check the example district, run its rule tests and route its sample cases."""
    _out.rule(f"gridflow demo: {directory}")
    policy = _load(directory)
    _out.print(f"policy {policy.name} version {policy.version}: valid", markup=False)
    results = policy.run_tests()
    failed = [r for r in results if not r.passed]
    _out.print(f"rule tests: {len(results) - len(failed)} passed, {len(failed)} failed")
    for r in failed:
        _out.print(f"  FAILED {r.source} {r.name}: {'; '.join(r.failures)}", markup=False)
    cases_dir = Path(directory) / "cases"
    decisions = []
    for path in sorted(cases_dir.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for case in data if isinstance(data, list) else [data]:
            decisions.append(policy.router.route(case, source=str(path)))
    if decisions:
        _decision_table(decisions, policy)
    if failed:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
