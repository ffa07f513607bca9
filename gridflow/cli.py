"""The ``gridflow`` command line: check, test, route, schema, diagram, demo.

Exit codes: 0 success, 1 invalid input or failed tests, 2 usage error.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from gridflow.clock import SystemClock
from gridflow.errors import DefinitionError, GridflowError, Problem
from gridflow.history import History
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
    """Route a case (or a JSON list of cases); CASE.json may be '-' for stdin.

    A list is routed when every case in it is valid (each invalid one is reported).
    History conditions count the list's cases reported before each case."""
    # stdout carries only the decisions (JSON with --json); problems go to stderr
    policy = _load(directory, report=_err)
    data = _read_json(case_file)
    cases = data if isinstance(data, list) else [data]
    decisions: list[Decision] = []
    valid, invalid = [], []
    for i, case in enumerate(cases):  # every invalid case is reported, then none is routed
        try:
            valid.append(policy.router.validate(
                case, source=f"{case_file}[{i}]" if isinstance(data, list) else case_file))
        except GridflowError as exc:
            invalid.append(str(exc))
    if invalid:
        _err.print("\n".join(invalid), markup=False)
        sys.exit(1)
    try:
        history = History(valid) if policy.router.history_specs else None
        decisions += [policy.router.route(case, history=history) for case in valid]
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
            f"{d.lead} {d.lead_name}"
            + (f" → pool {d.pool}" if d.pool else "")
            + (f" → handler {d.handler}" if d.handler else ""),
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
@click.option("--cases", "n_cases", default=22107, show_default=True,
              type=click.IntRange(min=0),
              help="Synthetic year to replay (0: stop after routing the sample cases).")
@click.option("--out", "out_dir", default="out/demo", show_default=True,
              type=click.Path(file_okay=False), help="Where the log, database and report go.")
@click.pass_context
def demo(ctx: click.Context, directory: str, n_cases: int, out_dir: str) -> None:
    """The example district end to end: check, rule tests, sample routes, then a
    synthetic year generated, replayed through the life cycle into SQLite, and reported."""
    _route_samples(directory)
    if n_cases == 0:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log, db = out / "year.csv", out / "demo.db"
    for stale in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        stale.unlink(missing_ok=True)
    _out.rule(f"a synthetic year: {n_cases} cases (seed 2019) → {log}")
    ctx.invoke(generate_cmd, directory=directory, n_cases=n_cases, seed=2019,
               out_file=str(log), start=None, days=365)
    _out.rule(f"life-cycle replay into {db}")
    ctx.invoke(replay_cmd, directory=directory, cases=str(log), map_file=None,
               compare_dir=None, json_out=None, html_out=None, db_url=f"sqlite:///{db}",
               mode="lifecycle", on_error=None, until=None,
               jobs=max(1, min(os.cpu_count() or 1, 4)))
    _out.rule("report")
    ctx.invoke(report, db_url=f"sqlite:///{db}", policy_dir=directory, period=None,
               by="department", as_of=None, json_out=None, html_out=str(out / "report.html"))
    _out.print(f"HTML report: {out / 'report.html'}", markup=False)


def _route_samples(directory: str) -> None:
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


# --------------------------------------------------------------------------- report


F = TypeVar("F", bound=Callable[..., Any])


def _table_options(f: F) -> F:
    """``--prefix`` and ``--schema``: where gridflow's tables are (as in ``db upgrade``)."""
    f = click.option("--schema", default=None,
                     help="PostgreSQL schema / MariaDB database of the tables.")(f)
    return click.option("--prefix", default="gf_", show_default=True,
                        help="Prefix of gridflow's table names.")(f)


def _store(db_url: str, *, prefix: str, schema: str | None, outbox: bool = True) -> Any:
    from gridflow.store import Store

    try:
        return Store(db_url, table_prefix=prefix, schema=schema, outbox=outbox)
    except ValueError as exc:  # a bad prefix/schema name
        raise click.BadParameter(str(exc), param_hint="--prefix/--schema") from None
    except Exception as exc:  # a malformed URL or a missing database driver
        raise click.BadParameter(str(exc), param_hint="--db") from None


@main.command()
@click.option("--db", "db_url", required=True, metavar="URL",
              help="Database URL, e.g. sqlite:///gridflow.db or postgresql+psycopg://…")
@click.option("--policy", "policy_dir", type=click.Path(exists=True, file_okay=False),
              help="Policy directory: new events are folded into the score tables first "
              "(under this policy version), and units and departments get their names.")
@click.option("--period", default=None, metavar="PERIOD",
              help="Cases reported in 2026, 2026-Q1, 2026-03, 2026-W10, 2026-03-09 or "
              "2026-03-01..2026-03-31 (default: all).")
@click.option("--by", "by", default="department", show_default=True,
              help="department, worker, or a level of the organisation (grid, community, "
              "street, …).")
@click.option("--as-of", "as_of", default=None, metavar="TIME",
              help="ISO 8601 time with offset at which open cases are judged "
              "(default: the latest event).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), metavar="OUT",
              help="Write the report as JSON ('-': to stdout, instead of the tables).")
@click.option("--html", "html_out", type=click.Path(dir_okay=False), metavar="OUT",
              help="Write the report as one self-contained HTML file.")
@click.option("--timezone", "zone", default=None, metavar="ZONE",
              help="The organisation's time zone for periods and rankings when no --policy "
                   "gives it (default: Asia/Shanghai).")
@_table_options
def report(db_url: str, policy_dir: str | None, period: str | None, by: str,
           as_of: str | None, json_out: str | None, html_out: str | None,
           zone: str | None = None, prefix: str = "gf_", schema: str | None = None) -> None:
    """Indicators, rankings and scores of the cases in a database (see docs/scoring.md)."""
    from datetime import datetime

    from gridflow.indicators import Period, StoreSource, refresh
    from gridflow.report import build_report, grouping, render, to_html, to_json
    from gridflow.store.aggregates import has_aggregate_rows, has_store_tables

    try:
        chosen = Period.parse(period)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--period") from None
    when = None
    if as_of is not None:
        try:
            when = datetime.fromisoformat(as_of)
        except ValueError:
            raise click.BadParameter(f"{as_of!r} is not an ISO 8601 time",
                                     param_hint="--as-of") from None
        if when.tzinfo is None or when.utcoffset() is None:
            raise click.BadParameter("give a UTC offset, e.g. 2026-03-31T18:00:00+08:00",
                                     param_hint="--as-of")
    policy = _load(policy_dir, report=_err) if policy_dir else None
    if zone is not None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise click.BadParameter(f"unknown time zone {zone!r}",
                                     param_hint="--timezone") from None
        if policy is not None and zone != policy.registry.timezone:
            raise click.BadParameter(
                f"the policy's time zone is {policy.registry.timezone}: leave --timezone out",
                param_hint="--timezone")
    try:
        grouping(by, policy.registry if policy is not None else None)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--by") from None
    if db_url.startswith("sqlite:///"):  # do not create an empty database file
        path = db_url.removeprefix("sqlite:///").split("?")[0]
        if path and path != ":memory:" and not Path(path).exists():
            raise click.BadParameter(f"no database file {path}", param_hint="--db")
    store = _store(db_url, prefix=prefix, schema=schema)
    try:
        if not has_store_tables(store):
            _err.print(f"{db_url}: no gridflow tables (run `gridflow db upgrade --db URL` "
                       "or let an engine create them)", markup=False)
            sys.exit(1)
        if policy is not None:
            refresh(store, policy)
            source = StoreSource.from_policy(store, policy)
        elif has_aggregate_rows(store):
            source = StoreSource(store, timezone=zone) if zone else StoreSource(store)
        else:
            _err.print("no scores in the database yet: pass --policy DIR to compute them",
                       markup=False)
            sys.exit(1)
        doc = build_report(source, policy=policy, period=chosen, by=by, as_of=when)
    except (GridflowError, ValueError) as exc:
        _err.print(str(exc), markup=False)
        sys.exit(1)
    finally:
        store.dispose()
    if json_out == "-":
        click.echo(to_json(doc), nl=False)
    else:
        render(doc, _out)
    for out, text in ((json_out, to_json(doc)), (html_out, to_html(doc))):
        if out is None or out == "-":
            continue
        try:
            Path(out).write_text(text, encoding="utf-8")
        except OSError as exc:
            _err.print(f"cannot write {out}: {exc.strerror}", markup=False)
            sys.exit(1)
        _err.print(f"wrote {out}", markup=False)


# --- replay and generate (BRIEF §10) ------------------------------------------------------


def _replay_summary(doc: dict[str, Any]) -> None:
    inp, r = doc["input"], doc["routing"]
    _out.print(f"{doc['policy']['name']} (version {doc['policy']['version']}), "
               f"{doc['mode']} replay of {inp['source']}", markup=False)
    _out.print(f"rows {inp['rows']:,}: imported {inp['imported']:,}, bad {inp['bad_rows']:,}",
               markup=False)
    for e in inp["errors"][:10]:
        where = f" {e['field']}:" if e["field"] else ""
        _err.print(f"  row {e['row']}:{where} {e['message']}", markup=False)
    agreement = r["agreement"]
    _out.print(
        f"routing: {r['cases']:,} cases, {r['default_routed']:,} to the default route, "
        f"{r['errors']:,} errors"
        + (f"; agreement with the log {agreement * 100:.2f}% of {r['with_actual']:,}"
           if agreement is not None else ""),
        markup=False,
    )
    if r["confusion"]:
        table = Table(title="biggest disagreements (actual → routed)")
        for col in ("actual", "routed", "cases", "share of actual"):
            table.add_column(col)
        for c in r["confusion"][:10]:
            share = c["share_of_actual"]
            table.add_row(c["actual"], c["routed"], f"{c['count']:,}",
                          "-" if share is None else f"{share * 100:.1f}%")
        _out.print(table)
    life = doc.get("lifecycle")
    if life is not None:
        ind = life["indicators"]

        def pct(v: Any) -> str:
            return "-" if v is None else f"{v * 100:.2f}%"

        _out.print(
            f"life cycle: {ind['reported']:,} reported, {ind['closed']:,} closed, completion "
            f"rate {pct(ind['completion_rate'])}, on time {pct(ind['on_time_rate'])}, overdue "
            f"{pct(ind['overdue_rate'])}, rework {pct(ind['rework_rate'])}, satisfaction "
            f"{pct(ind['satisfaction_rate'])}, composite {ind['composite']}",
            markup=False,
        )
        if life["errors"]:
            _out.print(f"  {life['errors']:,} step(s) refused by the engine: "
                       f"{life['errors_by_step']}", markup=False)
            for e in life["error_list"][:10]:  # the rest are in --json / --html
                _err.print(f"  row {e['row']} ({e['case_id']}) {e['step']}: {e['message']}",
                           markup=False)
    cmp_doc = doc.get("compare")
    if cmp_doc is not None:
        _compare_summary(cmp_doc)


def _move(v: Mapping[str, Any] | None, name: str) -> str:
    if v is None:
        return "="
    if name.endswith("_rate"):
        return " → ".join("-" if x is None else f"{x * 100:.2f}%"
                          for x in (v["before"], v["after"]))
    return " → ".join("-" if x is None else _num(x) for x in (v["before"], v["after"]))


_CHANGE_NAMES = {"lead": "lead department", "tier": "tier", "time_limit": "time limit",
                 "due_at": "due time", "overdue": "overdue status", "state": "final state"}


def _changes(kind: str, section: Mapping[str, Any]) -> str:
    """'routing: 684 of 20,000 cases change (lead department 446, …)'."""
    changed = dict(section["changed"])
    n = changed.pop("any", 0)
    if not n:
        return f"{kind}: no case changes (of {section['compared']:,})"
    parts = ", ".join(f"{_CHANGE_NAMES.get(k, k)} {v:,}" for k, v in changed.items())
    return f"{kind}: {n:,} of {section['compared']:,} cases change ({parts})"


def _num(v: Any, sign: str = "") -> str:
    return f"{v:{sign},}" if isinstance(v, int) else f"{v:{sign}g}"


def _compare_summary(cmp_doc: Mapping[str, Any]) -> None:
    q, cr = cmp_doc["policy"], cmp_doc["routing"]
    _out.print(f"what-if {q['name']} (version {q['version']})", markup=False)
    _out.print("  " + _changes("routing", cr), markup=False)
    agreement = cr.get("agreement") or {}
    if agreement.get("before") is not None and agreement.get("after") is not None:
        _out.print(f"  agreement with the log: {agreement['before'] * 100:.2f}% → "
                   f"{agreement['after'] * 100:.2f}%", markup=False)
    moved = {d: v for d, v in cr["per_department"].items() if v["change"]}
    if moved:
        table = Table(title="cases per lead department")
        for col in ("department", "before", "after", "change"):
            table.add_column(col)
        for d, v in moved.items():
            table.add_row(d, f"{v['before']:,}", f"{v['after']:,}", f"{v['change']:+,}")
        _out.print(table)
    else:
        _out.print("  no lead department gains or loses cases", markup=False)
    lc = cmp_doc.get("lifecycle")
    if lc is not None:
        _out.print("  " + _changes("life cycle", lc), markup=False)
        table = Table(title="indicators")
        for col in ("indicator", "before", "after", "change"):
            table.add_column(col)
        for k, v in lc["indicators"].items():
            if not v["change"]:
                continue
            if k.endswith("_rate"):
                table.add_row(k, f"{v['before'] * 100:.2f}%", f"{v['after'] * 100:.2f}%",
                              f"{v['change'] * 100:+.2f} pp")
            else:
                table.add_row(k, _num(v["before"]), _num(v["after"]), _num(v["change"], "+"))
        if table.row_count:
            _out.print(table)
        else:
            _out.print("  no indicator moves", markup=False)
        depts = Table(title="by lead department (cases, on time, composite)")
        for col in ("department", "reported", "on time", "composite"):
            depts.add_column(col)
        for d, moves in lc["by_department"].items():
            depts.add_row(d, *(_move(moves.get(k), k) for k in
                               ("reported", "on_time_rate", "composite")))
        if depts.row_count:
            _out.print(depts)
    section = lc or cr
    cases = section["cases"]
    if cases:
        table = Table(title=f"changed cases (first {min(len(cases), 10)} of "
                            f"{section['changed'].get('any', 0):,}; all in --json/--html)")
        for col in ("row", "case", "changed", "before", "after"):
            table.add_column(col)
        for c in cases[:10]:
            fields = c["changed"]
            table.add_row(str(c["row"]), c["case_id"], ", ".join(fields),
                          ", ".join(str(c["before"].get(f)) for f in fields),
                          ", ".join(str(c["after"].get(f)) for f in fields))
        _out.print(table)


@main.command("replay")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("cases", type=click.Path(exists=True, dir_okay=False))
@click.option("--map", "map_file", type=click.Path(exists=True, dir_okay=False),
              help="Column-mapping file (YAML); default: columns named like the case fields.")
@click.option("--compare", "compare_dir", type=click.Path(exists=True, file_okay=False),
              help="A second policy directory: report what would change under it.")
@click.option("--json", "json_out", metavar="OUT", help="Write the report as JSON ('-': stdout).")
@click.option("--html", "html_out", metavar="OUT", help="Write the report as an HTML page.")
@click.option("--db", "db_url", metavar="URL",
              help="Store the life-cycle replay here (e.g. sqlite:///replay.db); default: memory.")
@click.option("--mode", type=click.Choice(["auto", "routing", "lifecycle"]), default="auto",
              show_default=True, help="auto: the life cycle when the log has later steps.")
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default=None,
              help="Bad rows: report and skip (default), or stop at the first.")
@click.option("--until", metavar="TIME",
              help="Fire timers up to this time (ISO 8601), not before the log's latest "
                   "step; default: the log's latest time.")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1),
              help="Worker processes for the life-cycle replay (same report; --db must not "
                   "hold the log's cases).")
@_table_options
def replay_cmd(directory: str, cases: str, map_file: str | None, compare_dir: str | None,
               json_out: str | None, html_out: str | None, db_url: str | None, mode: str,
               on_error: str | None, until: str | None, jobs: int = 1, prefix: str = "gf_",
               schema: str | None = None) -> None:
    """Replay a case log (CSV/JSONL) through a policy: routing agreement, life cycle and
    indicators, and with --compare what a rule change would do."""
    from datetime import datetime

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from gridflow.importer import LogImportError, LogReader, load_mapping
    from gridflow.replay import replay, to_html, to_json
    from gridflow.shards import shardable, tuned_gc

    policy = _load(directory, report=_err)
    other = _load(compare_dir, report=_err) if compare_dir else None
    mapping = None
    if map_file:
        try:
            mapping = load_mapping(map_file, policy)
        except DefinitionError as exc:
            for p in exc.problems:
                _err.print(str(p), markup=False)
            sys.exit(1)
    horizon = None
    if until:
        try:
            horizon = datetime.fromisoformat(until)
        except ValueError:
            raise click.BadParameter(f"not an ISO 8601 time: {until}",
                                     param_hint="--until") from None
        if horizon.tzinfo is None:
            horizon = horizon.replace(tzinfo=policy.calendar.timezone)
    reader = LogReader(cases, mapping, policy=policy,
                       on_error=on_error)  # type: ignore[arg-type]
    store = None
    if db_url:
        store = _store(db_url, prefix=prefix, schema=schema, outbox=False)
        try:
            store.create_all()
        except Exception as exc:  # the database refused (no such database, no rights)
            store.dispose()
            raise click.BadParameter(str(exc), param_hint="--db") from None
    bar = Progress(TextColumn("replay"), BarColumn(), TextColumn("{task.fields[rows]} rows"),
                   TimeRemainingColumn(), console=_err, transient=True,
                   disable=not _err.is_terminal)
    task = bar.add_task("replay", total=max(reader.size, 1), rows=0)
    try:
        lifecycle = mode == "lifecycle" or (mode == "auto" and reader.has_steps())
        if lifecycle and jobs > 1 and not shardable(policy, store):
            _err.print(f"--jobs {jobs}: replaying in one process (in shards, the policy's "
                       "history conditions would not count the cases already in the "
                       "database, or they compare no field in common)", markup=False)
        # the GC tuning pays in the life cycle's batches; routing alone keeps nothing alive
        with bar, (tuned_gc() if lifecycle else contextlib.nullcontext()):
            doc = replay(policy, reader, mode=mode, compare=other,  # type: ignore[arg-type]
                         store=store, until=horizon, jobs=jobs,
                         progress=lambda n: bar.update(task, completed=reader.bytes_read,
                                                       rows=f"{n:,}"))
    except LogImportError as exc:
        _err.print(str(exc), markup=False)
        sys.exit(1)
    except GridflowError as exc:
        _err.print(str(exc), markup=False)
        sys.exit(1)
    finally:
        if store is not None:
            store.dispose()
    if json_out == "-":
        click.echo(to_json(doc), nl=False)
    else:
        _replay_summary(doc)
    for out, render_doc in ((json_out, to_json), (html_out, to_html)):
        if out is None or out == "-":
            continue
        try:
            Path(out).write_text(render_doc(doc), encoding="utf-8")
        except OSError as exc:
            _err.print(f"cannot write {out}: {exc.strerror}", markup=False)
            sys.exit(1)
        _err.print(f"wrote {out}", markup=False)


@main.command("generate")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--cases", "n_cases", type=click.IntRange(min=0), required=True,
              help="Number of cases.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False),
              help="Output file (.csv, or .jsonl).")
@click.option("--start", type=click.DateTime(formats=["%Y-%m-%d"]), default=None,
              help="First day (YYYY-MM-DD; default 2026-01-01).")
@click.option("--days", type=click.IntRange(min=1), default=365, show_default=True,
              help="Length of the period in days.")
def generate_cmd(directory: str, n_cases: int, seed: int, out_file: str, start: Any,
                 days: int) -> None:
    """Write a synthetic case log for a policy (same seed, same file)."""
    from gridflow.generate import Settings, write_log
    from gridflow.replay import RouteMemo

    policy = _load(directory, report=_err)
    try:
        n = write_log(out_file, policy, n_cases, seed=seed,
                      start=start.date() if start is not None else None,
                      settings=Settings(days=days), route=RouteMemo(policy).route)
    except OSError as exc:
        _err.print(f"cannot write {out_file}: {exc.strerror}", markup=False)
        sys.exit(1)
    _err.print(f"wrote {n:,} cases to {out_file}", markup=False)


# --------------------------------------------------------------------------- db


@main.group("db")
def db_group() -> None:
    """Manage gridflow's database schema (Alembic migrations shipped with gridflow)."""


@db_group.command("upgrade")
@click.option("--db", "db_url", required=True, metavar="URL",
              help="Database URL, e.g. sqlite:///gridflow.db, "
              "postgresql+psycopg://user@host/db, mysql+pymysql://user@host/db.")
@click.option("--prefix", default="gf_", show_default=True,
              help="Prefix of gridflow's table names.")
@click.option("--schema", default=None,
              help="PostgreSQL schema / MariaDB database for the tables (created if missing).")
@click.option("--revision", default="head", show_default=True,
              help="Migration to go to.")
@click.option("--sql", "as_sql", is_flag=True,
              help="Print the SQL for an empty database instead of running it.")
def db_upgrade(db_url: str, prefix: str, schema: str | None, revision: str,
               as_sql: bool) -> None:
    """Bring the database to the current schema (safe to run from several nodes at once)."""
    from gridflow.store import upgrade, upgrade_sql

    try:
        if as_sql:
            click.echo(upgrade_sql(db_url, prefix=prefix, schema=schema, revision=revision),
                       nl=False)
            return
        at = upgrade(db_url, prefix=prefix, schema=schema, revision=revision)
    except ValueError as exc:  # a bad prefix/schema name
        _err.print(str(exc), markup=False)
        sys.exit(2)
    except Exception as exc:  # the database said no: one line, no traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _err.print(f"upgrade failed: {type(exc).__name__}: {first}", markup=False)
        sys.exit(1)
    where = f"{schema}." if schema else ""
    _out.print(f"{where}{prefix}* tables at revision {at}", markup=False)


if __name__ == "__main__":  # pragma: no cover
    main()
