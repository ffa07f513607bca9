"""Reports of the §8 indicators and rankings: a JSON document, rich tables, one HTML file.

:func:`build_report` assembles the report document (plain JSON data, deterministic: sorted
keys, stable row order, no wall-clock time) from a :class:`~gridflow.indicators.Source` —
the store (SQL aggregation) or case facts in memory (the in-Python definition). The three
renderings show the same figures:

* :func:`to_json` — the document itself (``gridflow report --json``);
* :func:`render` — rich tables for the terminal;
* :func:`to_html` — one self-contained HTML file (tables and inline SVG charts: workload
  by unit, on-time and completion rates by unit, the weekly trend); no scripts, fonts,
  styles or images from elsewhere, so it opens offline. Every figure carries its JSON
  value in a ``data-value`` attribute, and the document is embedded as
  ``<script type="application/json" id="gridflow-report">``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any

from rich.console import Console
from rich.markup import escape as escape_markup
from rich.table import Table

from gridflow.indicators import (
    DIMENSIONS,
    Indicators,
    Period,
    Source,
    Tally,
    rank_cases,
    rank_units,
    ranking_specs,
    ranking_window,
    scoring_spec,
    unit_names,
)
from gridflow.policy import Policy
from gridflow.registry import Registry
from gridflow.schema import ScoringSpec

__all__ = [
    "COLUMNS",
    "build_report",
    "fmt",
    "grouping",
    "headline",
    "render",
    "to_html",
    "to_json",
]

REPORT_FORMAT = 1

#: (indicator key, Chinese label, English label, kind) of the indicator tables.
COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("reported", "上报", "reported", "count"),
    ("filed", "立案", "filed", "count"),
    ("cancelled", "作废", "cancelled", "count"),
    ("deferred", "挂账", "deferred", "count"),
    ("should_close", "应结", "should close", "count"),
    ("closed", "办结", "closed", "count"),
    ("completion_rate", "办结率", "completion", "rate"),
    ("on_time_rate", "按期处置率", "on time", "rate"),
    ("overdue_rate", "超期率", "overdue", "rate"),
    ("rework_rate", "返工率", "rework", "rate"),
    ("extension_rate", "延期率", "extension", "rate"),
    ("satisfaction_rate", "满意率", "satisfaction", "rate"),
    ("avg_handling_hours", "平均处置工时", "avg hours", "hours"),
    ("composite", "综合得分", "score", "score"),
)
_TREND_COLUMNS = ("reported", "should_close", "closed", "completion_rate", "on_time_rate",
                  "overdue_rate", "satisfaction_rate", "composite")
_BY_LABELS = {"department": "部门", "worker": "网格员", "grid": "网格", "community": "社区",
              "street": "街道", "district": "区"}
_NONE_LABEL = {"department": "（未派遣）", "worker": "（非网格员上报）"}


# --------------------------------------------------------------------------- formatting


def fmt(value: Any, kind: str) -> str:
    """A figure as reports print it: counts ``22,107``, rates ``99.85%``, hours and scores
    with two decimals; ``—`` for no value."""
    if value is None:
        return "—"
    if kind == "count":
        return f"{int(value):,}"
    if kind == "rate":
        return f"{float(value) * 100:.2f}%"
    return f"{float(value):.2f}"


def headline(totals: Mapping[str, Any]) -> dict[str, str]:
    """The seeds' style of figure: "上报事项 22,107 件，办结率 99.85%"."""
    n = fmt(totals["reported"], "count")
    rate = fmt(totals["completion_rate"], "rate")
    return {
        "zh": f"上报事项 {n} 件，办结率 {rate}",
        "en": f"{n} matters reported, completion rate {rate}",
    }


def grouping(by: str, registry: Registry | None) -> str:
    """The source grouping of ``--by``: ``department``, ``worker`` or ``level:<level>``."""
    if by in DIMENSIONS:
        return by
    if registry is not None and by not in registry.levels:
        choices = ", ".join([*DIMENSIONS, *registry.levels])
        raise ValueError(f"unknown grouping {by!r} (one of: {choices})")
    return f"level:{by}"


# --------------------------------------------------------------------------- the document


def _order(keys: Sequence[str | None], names: Mapping[str, str]) -> list[str | None]:
    index = {k: i for i, k in enumerate(names)}
    return sorted(keys, key=lambda k: (k is None, index.get(k, len(index)) if k else 0, k or ""))


def _iso(when: datetime | None, policy_tz: Any) -> str | None:
    return None if when is None else when.astimezone(policy_tz).isoformat()


def build_report(
    source: Source,
    *,
    policy: Policy | None = None,
    period: Period | None = None,
    by: str = "department",
    as_of: datetime | None = None,
    spec: ScoringSpec | None = None,
) -> dict[str, Any]:
    """The report document: totals, one row per unit of ``by``, the weekly trend and the
    policy's rankings, for the cases reported in ``period`` (default: all), judged at
    ``as_of`` (default: the latest event in the data)."""
    period = period if period is not None else Period.all()
    spec = spec if spec is not None else scoring_spec(policy)
    registry = policy.registry if policy is not None else None
    group = grouping(by, registry)
    tz = source.timezone
    if as_of is None:
        as_of = source.latest()
    if as_of is None:
        end = period.bounds(tz)[1]
        as_of = end if end is not None else datetime(1970, 1, 1, tzinfo=UTC)
    if as_of.tzinfo is None or as_of.utcoffset() is None:
        raise ValueError("as_of must be timezone-aware")

    def ind(t: Tally | None) -> dict[str, Any]:
        return Indicators.of(t if t is not None else Tally(), spec).to_dict()

    totals = ind(source.tally(None, period, as_of).get(None))
    names = unit_names(registry, group)
    none_label = _NONE_LABEL.get(group, "（无）")
    tallies = source.tally(group, period, as_of)
    rows = [
        {"key": k, "name": names.get(k, k) if k is not None else none_label, **ind(tallies[k])}
        for k in _order(list(tallies), names)
    ]
    weeks = source.tally("week", period, as_of)
    trend = []
    for week in sorted(k for k in weeks if k is not None):
        year, _, num = week.partition("-W")
        first = Period.containing("week", datetime.fromisocalendar(int(year), int(num), 1)
                                  .date())
        trend.append({"week": week, "first_day": first.to_dict()["first_day"],
                      **ind(weeks[week])})
    rankings = []
    for name, dim, kind, top in ranking_specs(spec):
        window = ranking_window(kind, period, as_of, tz)
        entry: dict[str, Any] = {"name": name, "of": dim, "period": window.to_dict(),
                                 "top": top}
        if dim == "case":
            dept_names = unit_names(registry, "department")
            loc_names = unit_names(registry, "unit")
            entry["entries"] = [
                {"rank": i, "case_id": c.case_id, "composite": c.composite,
                 "lead": c.lead, "lead_name": dept_names.get(c.lead or "", c.lead),
                 "location": c.location,
                 "location_name": loc_names.get(c.location or "", c.location),
                 "category": c.category, "closed_at": _iso(c.closed_at, tz)}
                for i, c in enumerate(rank_cases(source.top_cases(window, top), top), start=1)
            ]
        else:
            dim_group = dim if dim in DIMENSIONS else f"level:{dim}"
            dim_names = unit_names(registry, dim_group)
            entry["entries"] = [
                {"rank": r.rank, "key": r.key, "name": dim_names.get(r.key, r.key),
                 "composite": r.composite, "scored": r.scored, "closed": r.closed}
                for r in rank_units(source.tally(dim_group, window, as_of), top)
            ]
        rankings.append(entry)
    title = (policy.name if policy is not None else "gridflow") + " 网格化管理考核报告"
    return {
        "format": REPORT_FORMAT,
        "title": title,
        "policy": {"name": policy.name if policy is not None else None,
                   "version": source.policy_version},
        "period": period.to_dict(),
        "as_of": _iso(as_of, tz),
        "by": by,
        "headline": headline(totals),
        "totals": totals,
        "rows": rows,
        "trend": trend,
        "rankings": rankings,
    }


def to_json(doc: Mapping[str, Any]) -> str:
    """The report as JSON text (UTF-8, sorted keys, two-space indent, final newline)."""
    return json.dumps(doc, ensure_ascii=False, indent=2, sort_keys=True) + "\n"


# --------------------------------------------------------------------------- terminal


def _kind(key: str) -> str:
    for k, _zh, _en, kind in COLUMNS:
        if k == key:
            return kind
    return "count"


def render(doc: Mapping[str, Any], console: Console) -> None:
    """Print the report as rich tables."""
    period = doc["period"]
    console.rule(doc["title"])
    console.print(
        f"policy {doc['policy']['version'] or '-'} · period {period['label']}"
        f" · as of {doc['as_of']}", markup=False,
    )
    console.print(f"[bold]{escape_markup(doc['headline']['zh'])}[/]  "
                  f"({escape_markup(doc['headline']['en'])})")
    by_label = _BY_LABELS.get(doc["by"], doc["by"])
    table = Table(title=f"按{by_label}统计 (by {doc['by']})", show_footer=True)
    table.add_column(by_label, footer="合计")
    for key, zh, _en, kind in COLUMNS:
        table.add_column(zh, justify="right", footer=fmt(doc["totals"][key], kind))
    for row in doc["rows"]:
        table.add_row(str(row["name"]), *(fmt(row[k], kind) for k, _z, _e, kind in COLUMNS))
    console.print(table)
    if doc["trend"]:
        trend = Table(title="每周趋势 (weekly trend, by week of report)")
        trend.add_column("周")
        for key in _TREND_COLUMNS:
            trend.add_column(next(zh for k, zh, _e, _k in COLUMNS if k == key), justify="right")
        for w in doc["trend"]:
            trend.add_row(f"{w['week']} ({w['first_day']})",
                          *(fmt(w[k], _kind(k)) for k in _TREND_COLUMNS))
        console.print(trend)
    for r in doc["rankings"]:
        console.print(_ranking_table(r))


def _ranking_table(r: Mapping[str, Any]) -> Table:
    top = f"前 {r['top']} 名" if r["top"] else "全部"
    table = Table(title=f"排名 {r['name']} ({r['of']}, {r['period']['label']}, {top})")
    table.add_column("名次", justify="right")
    if r["of"] == "case":
        for col in ("案件", "得分", "主办部门", "位置", "类别", "结案时间"):
            table.add_column(col, justify="right" if col == "得分" else "left")
        for e in r["entries"]:
            table.add_row(str(e["rank"]), e["case_id"], fmt(e["composite"], "score"),
                          str(e["lead_name"] or "—"), str(e["location_name"] or "—"),
                          str(e["category"] or "—"), str(e["closed_at"] or "—"))
    else:
        for col in ("名称", "得分", "评分案件", "办结"):
            table.add_column(col, justify="left" if col == "名称" else "right")
        for e in r["entries"]:
            table.add_row(str(e["rank"]), str(e["name"]), fmt(e["composite"], "score"),
                          fmt(e["scored"], "count"), fmt(e["closed"], "count"))
    return table


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:"PingFang SC","Microsoft YaHei","Noto Sans CJK SC",sans-serif;margin:24px;
color:#1f2933;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.meta{color:#616e7c;font-size:13px}.headline{font-size:20px;font-weight:600;margin:16px 0}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #d9e2ec;padding:4px 8px}th{background:#f0f4f8}
td.n{text-align:right;font-variant-numeric:tabular-nums}tfoot td{font-weight:600}
svg{display:block;margin:8px 0}svg text{font-size:12px;fill:#323f4b}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;
vertical-align:middle}
"""
_C_REPORTED, _C_CLOSED, _C_ON_TIME = "#4c78a8", "#72b7b2", "#f58518"


def _attr(value: Any) -> str:
    return escape(json.dumps(value, ensure_ascii=False), quote=True)


def _cell(value: Any, kind: str, key: str, unit: str | None = None) -> str:
    extra = f' data-unit="{escape(unit, quote=True)}"' if unit is not None else ""
    return (f'<td class="n" data-key="{key}" data-value="{_attr(value)}"{extra}>'
            f"{escape(fmt(value, kind))}</td>")


def _indicator_table(doc: Mapping[str, Any]) -> str:
    by_label = _BY_LABELS.get(doc["by"], doc["by"])
    head = "".join(f'<th title="{escape(en)}">{escape(zh)}</th>' for _k, zh, en, _ in COLUMNS)
    body = []
    for row in doc["rows"]:
        unit = row["key"] if row["key"] is not None else ""
        cells = "".join(_cell(row[k], kind, k, unit) for k, _z, _e, kind in COLUMNS)
        body.append(f'<tr data-row="{escape(unit, quote=True)}"><td>{escape(str(row["name"]))}'
                    f"</td>{cells}</tr>")
    foot = "".join(_cell(doc["totals"][k], kind, k, "__total__") for k, _z, _e, kind in COLUMNS)
    return (f'<table id="by-unit"><thead><tr><th>{escape(by_label)}</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody><tfoot><tr><td>合计</td>{foot}</tr></tfoot></table>")


def _trend_table(doc: Mapping[str, Any]) -> str:
    head = "".join(f"<th>{escape(next(zh for k, zh, _e, _ in COLUMNS if k == key))}</th>"
                   for key in _TREND_COLUMNS)
    body = []
    for w in doc["trend"]:
        cells = "".join(_cell(w[k], _kind(k), k, w["week"]) for k in _TREND_COLUMNS)
        body.append(f"<tr><td>{escape(w['week'])} ({escape(w['first_day'])})</td>{cells}</tr>")
    return (f'<table id="trend"><thead><tr><th>周</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def _ranking_html(r: Mapping[str, Any]) -> str:
    top = f"前 {r['top']} 名" if r["top"] else "全部"
    title = f"排名 {r['name']}（{r['of']}，{r['period']['label']}，{top}）"
    rid = escape(r["name"], quote=True)
    if r["of"] == "case":
        head = "<th>名次</th><th>案件</th><th>得分</th><th>主办部门</th><th>位置</th><th>类别</th>"
        rows = "".join(
            f'<tr><td class="n">{e["rank"]}</td><td>{escape(e["case_id"])}</td>'
            f'{_cell(e["composite"], "score", "composite", e["case_id"])}'
            f'<td>{escape(str(e["lead_name"] or "—"))}</td>'
            f'<td>{escape(str(e["location_name"] or "—"))}</td>'
            f'<td>{escape(str(e["category"] or "—"))}</td></tr>'
            for e in r["entries"]
        )
    else:
        head = "<th>名次</th><th>名称</th><th>得分</th><th>评分案件</th><th>办结</th>"
        rows = "".join(
            f'<tr><td class="n">{e["rank"]}</td><td>{escape(str(e["name"]))}</td>'
            f'{_cell(e["composite"], "score", "composite", e["key"])}'
            f'{_cell(e["scored"], "count", "scored", e["key"])}'
            f'{_cell(e["closed"], "count", "closed", e["key"])}</tr>'
            for e in r["entries"]
        )
    return (f"<h3>{escape(title)}</h3>"
            f'<table class="ranking" data-ranking="{rid}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{rows}</tbody></table>")


def _svg(width: int, height: int, label: str, parts: Sequence[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label, quote=True)}">'
            + "".join(parts) + "</svg>")


def _bar(x: float, y: float, w: float, h: float, colour: str, unit: str, key: str,
         value: Any, text: str) -> str:
    return (f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{h:.1f}" '
            f'fill="{colour}" data-unit="{escape(unit, quote=True)}" data-key="{key}" '
            f'data-value="{_attr(value)}"><title>{escape(text)}</title></rect>')


_MAX_BARS = 60


def _workload_chart(rows: Sequence[Mapping[str, Any]]) -> str:
    rows = rows[:_MAX_BARS]
    left, width, step = 190, 760, 26
    top = max([int(r["reported"]) for r in rows] + [1])
    scale = (width - left - 70) / top
    parts = []
    for i, r in enumerate(rows):
        y = 10 + i * step
        unit = r["key"] if r["key"] is not None else ""
        name = str(r["name"])
        parts.append(f'<text x="{left - 8}" y="{y + 14}" text-anchor="end">{escape(name)}</text>')
        parts.append(_bar(left, y, r["reported"] * scale, 10, _C_REPORTED, unit, "reported",
                          r["reported"], f"{name} 上报 {fmt(r['reported'], 'count')}"))
        parts.append(_bar(left, y + 11, r["closed"] * scale, 10, _C_CLOSED, unit, "closed",
                          r["closed"], f"{name} 办结 {fmt(r['closed'], 'count')}"))
        parts.append(f'<text x="{left + r["reported"] * scale + 6:.1f}" y="{y + 14}">'
                     f"{escape(fmt(r['reported'], 'count'))} / "
                     f"{escape(fmt(r['closed'], 'count'))}</text>")
    return _svg(width, 20 + len(rows) * step, "workload by unit", parts)


def _rates_chart(rows: Sequence[Mapping[str, Any]]) -> str:
    rows = rows[:_MAX_BARS]
    left, width, step = 190, 760, 26
    span = width - left - 80
    parts = [f'<line x1="{left}" y1="4" x2="{left}" y2="{14 + len(rows) * step}" '
             'stroke="#9aa5b1"/>']
    for pct in (50, 100):
        x = left + span * pct / 100
        parts.append(f'<line x1="{x:.1f}" y1="4" x2="{x:.1f}" y2="{14 + len(rows) * step}" '
                     f'stroke="#d9e2ec" stroke-dasharray="3 3"/><text x="{x:.1f}" '
                     f'y="{24 + len(rows) * step}" text-anchor="middle">{pct}%</text>')
    for i, r in enumerate(rows):
        y = 10 + i * step
        unit = r["key"] if r["key"] is not None else ""
        name = str(r["name"])
        parts.append(f'<text x="{left - 8}" y="{y + 14}" text-anchor="end">{escape(name)}</text>')
        for j, (key, colour, label) in enumerate((("completion_rate", _C_CLOSED, "办结率"),
                                                  ("on_time_rate", _C_ON_TIME, "按期处置率"))):
            value = r[key]
            w = span * (value or 0)
            parts.append(_bar(left, y + 11 * j, w, 10, colour, unit, key, value,
                              f"{name} {label} {fmt(value, 'rate')}"))
            parts.append(f'<text x="{left + w + 6:.1f}" y="{y + 9 + 11 * j}" '
                         f'font-size="10">{escape(fmt(value, "rate"))}</text>')
    return _svg(width, 34 + len(rows) * step, "on-time and completion rates by unit", parts)


def _trend_chart(trend: Sequence[Mapping[str, Any]]) -> str:
    height, left, right, top, bottom = 260, 60, 60, 16, 40
    n = max(len(trend), 1)
    slot = min(640 / n, 90.0)
    width = round(max(360, left + right + n * slot))
    plot = height - top - bottom
    peak = max([int(w["reported"]) for w in trend] + [1])
    parts = [f'<line x1="{left}" y1="{top + plot}" x2="{width - right}" y2="{top + plot}" '
             'stroke="#9aa5b1"/>',
             f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{peak:,}</text>',
             f'<text x="{width - right + 6}" y="{top + 4}">100%</text>',
             f'<text x="{width - right + 6}" y="{top + plot}">0%</text>']
    lines: dict[str, list[str]] = {"completion_rate": [], "on_time_rate": []}
    for i, w in enumerate(trend):
        x = left + i * slot
        h = plot * int(w["reported"]) / peak
        parts.append(_bar(x + slot * 0.15, top + plot - h, slot * 0.7, h, _C_REPORTED,
                          w["week"], "reported", w["reported"],
                          f"{w['week']} 上报 {fmt(w['reported'], 'count')}"))
        parts.append(f'<text x="{x + slot / 2:.1f}" y="{height - 22}" text-anchor="middle" '
                     f'font-size="10">{escape(w["week"])}</text>')
        parts.append(f'<text x="{x + slot / 2:.1f}" y="{top + plot - h - 4:.1f}" '
                     f'text-anchor="middle" font-size="10">'
                     f"{escape(fmt(w['reported'], 'count'))}</text>")
        for key in lines:
            value = w[key]
            if value is None:
                continue
            cx, cy = x + slot / 2, top + plot * (1 - value)
            lines[key].append(f"{cx:.1f},{cy:.1f}")
            colour = _C_CLOSED if key == "completion_rate" else _C_ON_TIME
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3.5" fill="{colour}" '
                         f'data-unit="{escape(w["week"], quote=True)}" data-key="{key}" '
                         f'data-value="{_attr(value)}"><title>{escape(w["week"])} '
                         f"{escape(fmt(value, 'rate'))}</title></circle>")
    for key, points in lines.items():
        colour = _C_CLOSED if key == "completion_rate" else _C_ON_TIME
        if len(points) > 1:
            parts.append(f'<polyline points="{" ".join(points)}" fill="none" '
                         f'stroke="{colour}" stroke-width="2"/>')
    return _svg(width, height, "weekly trend", parts)


def _legend(items: Sequence[tuple[str, str]]) -> str:
    return '<p class="legend">' + "".join(
        f'<span style="background:{c}"></span>{escape(t)}' for c, t in items) + "</p>"


def to_html(doc: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page (UTF-8 text)."""
    period = doc["period"]
    by_label = _BY_LABELS.get(doc["by"], doc["by"])
    data = (json.dumps(doc, ensure_ascii=False, sort_keys=True)
            .replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e"))
    sections = [
        f"<h1>{escape(doc['title'])}</h1>",
        f'<p class="meta">统计周期 {escape(period["label"])}'
        f"（按上报时间，{escape(str(period['first_day'] or '—'))} 至 "
        f"{escape(str(period['last_day'] or '—'))}）· 数据截至 {escape(str(doc['as_of']))} · "
        f"policy {escape(str(doc['policy']['version'] or '—'))}</p>",
        f'<p class="headline" data-figure="headline">{escape(doc["headline"]["zh"])}</p>',
        f'<p class="meta">{escape(doc["headline"]["en"])}</p>',
        f"<h2>按{escape(by_label)}统计</h2>",
        _indicator_table(doc),
        f"<h2>工作量（上报 / 办结）按{escape(by_label)}</h2>",
        _legend(((_C_REPORTED, "上报 reported"), (_C_CLOSED, "办结 closed"))),
        _workload_chart(doc["rows"]),
        f"<h2>办结率与按期处置率 按{escape(by_label)}</h2>",
        _legend(((_C_CLOSED, "办结率 completion"), (_C_ON_TIME, "按期处置率 on time"))),
        _rates_chart(doc["rows"]),
        "<h2>每周趋势（按上报周）</h2>",
        _legend(((_C_REPORTED, "上报 reported"), (_C_CLOSED, "办结率 completion"),
                 (_C_ON_TIME, "按期处置率 on time"))),
        _trend_chart(doc["trend"]),
        _trend_table(doc),
        "<h2>排名</h2>",
        *(_ranking_html(r) for r in doc["rankings"]),
        f'<script type="application/json" id="gridflow-report">{data}</script>',
    ]
    return ("<!DOCTYPE html>\n<html lang=\"zh-CN\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(doc['title'])} {escape(period['label'])}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(sections)
            + "\n</body></html>\n")

