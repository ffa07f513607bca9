"""Reports: the JSON document against hand-computed figures (the district of
tests/test_indicators.py), the HTML showing exactly the JSON figures, self-contained and
deterministic output, the terminal tables and the ``gridflow report`` command."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

from gridflow import Engine
from gridflow.cli import main
from gridflow.clock import ManualClock
from gridflow.indicators import FactsSource, Period, StoreSource, refresh
from gridflow.policy import Policy
from gridflow.report import COLUMNS, build_report, fmt, render, to_html, to_json
from gridflow.scoring import CaseFacts
from gridflow.store import Store
from tests.test_indicators import AS_OF, build_district, district_facts, wujin  # noqa: F401
from tests.test_scoring import Desk, at, policy_with_scoring

MARCH = Period.parse("2026-03")
KIND = {key: kind for key, _zh, _en, kind in COLUMNS}


@pytest.fixture
def python(district_facts: list[CaseFacts], wujin: Policy) -> FactsSource:  # noqa: F811
    return FactsSource.from_policy(district_facts, wujin)


@pytest.fixture
def doc(python: FactsSource, wujin: Policy) -> dict[str, Any]:  # noqa: F811
    return build_report(python, policy=wujin, period=MARCH, by="department", as_of=AS_OF)


# --------------------------------------------------------------------------- JSON


def test_json_figures_by_hand(doc: dict[str, Any], wujin: Policy) -> None:  # noqa: F811
    assert doc["headline"] == {"zh": "上报事项 14 件，办结率 90.00%",
                               "en": "14 matters reported, completion rate 90.00%"}
    assert doc["period"] == {"kind": "month", "label": "2026-03", "first_day": "2026-03-01",
                             "last_day": "2026-03-31"}
    assert doc["as_of"] == "2026-03-13T12:00:00+08:00"
    assert doc["policy"] == {"name": wujin.name, "version": wujin.version}
    t = doc["totals"]
    assert (t["reported"], t["should_close"], t["closed"], t["on_time"], t["overdue"]) == (
        14, 10, 9, 8, 2)
    assert (t["completion_rate"], t["on_time_rate"], t["composite"]) == (0.9, 0.8, 95.44)
    keys = [r["key"] for r in doc["rows"]]
    assert keys == [k for k in wujin.registry.departments
                    if k in {"sanitation", "street-command", "grid-worker"}] + [None]
    rows = {r["key"]: r for r in doc["rows"]}
    assert rows["sanitation"]["name"] == "街道环卫所"
    assert (rows["sanitation"]["should_close"], rows["sanitation"]["completion_rate"]) == (
        8, 0.875)
    assert rows[None]["name"] == "（未派遣）"
    assert [(w["week"], w["first_day"], w["reported"], w["closed"]) for w in doc["trend"]] == [
        ("2026-W10", "2026-03-02", 1, 1), ("2026-W11", "2026-03-09", 13, 8)]
    rankings = {r["name"]: r for r in doc["rankings"]}
    assert list(rankings) == ["cases", "departments", "grid_workers"]
    workers = rankings["grid_workers"]
    assert (workers["of"], workers["period"]["label"], workers["top"]) == ("worker", "2026-W11", 5)
    assert [(e["rank"], e["key"], e["composite"]) for e in workers["entries"]] == [
        (1, "gw-chen", 95.17), (2, "gw-wang", 94.0)]
    assert [e["case_id"] for e in rankings["cases"]["entries"]] == [
        f"QSY-{c}" for c in "NMACKJDFB"]
    assert rankings["cases"]["entries"][0]["lead_name"] == "街道环卫所"
    assert [e["key"] for e in rankings["departments"]["entries"]] == [
        "grid-worker", "street-command", "sanitation"]


def test_report_by_grid_and_week(python: FactsSource, wujin: Policy) -> None:  # noqa: F811
    doc = build_report(python, policy=wujin, period=Period.parse("2026-W11"), by="grid",
                       as_of=AS_OF)
    assert doc["headline"]["zh"] == "上报事项 13 件，办结率 88.89%"
    assert [(r["key"], r["name"], r["reported"]) for r in doc["rows"]] == [
        ("qdj-g3", "戚大街社区第三网格", 11), ("qdj-g4", "戚大街社区第四网格", 2)]
    # the weekly ranking window is the report week; the monthly ones are clipped to it
    assert {r["period"]["label"] for r in doc["rankings"]} == {"2026-W11", "2026-03"}
    assert all(r["period"]["first_day"] == "2026-03-09" for r in doc["rankings"])


def test_policy_rankings_and_who_is_scored(
    district_facts: list[CaseFacts], tmp_path: Path  # noqa: F811
) -> None:
    policy = policy_with_scoring(tmp_path, """\
scoring:
  score_reporter: false
  rankings:
    grids: {period: week, top: 1}
    league: {of: department, period: month}
""")
    source = FactsSource.from_policy(district_facts, policy)
    doc = build_report(source, policy=policy, by="worker", as_of=AS_OF)
    assert [r["name"] for r in doc["rankings"]] == ["grids", "league"]
    grids = doc["rankings"][0]
    assert [(e["key"], e["name"], e["composite"]) for e in grids["entries"]] == [
        ("qdj-g3", "戚大街社区第三网格", 95.17)]  # g3 571/6 beats g4 188/2 in week 11
    assert all(r["composite"] is None for r in doc["rows"])  # workers are not scored


def test_unknown_grouping(python: FactsSource, wujin: Policy) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="unknown grouping 'team'"):
        build_report(python, policy=wujin, by="team")


def test_empty_data_gives_an_empty_report(wujin: Policy) -> None:  # noqa: F811
    doc = build_report(FactsSource([]), policy=wujin, period=MARCH)
    assert doc["headline"]["zh"] == "上报事项 0 件，办结率 —"
    assert doc["as_of"] == "2026-04-01T00:00:00+08:00"  # the end of the period
    assert doc["rows"] == doc["trend"] == []
    assert to_html(doc).startswith("<!DOCTYPE html>")


# --------------------------------------------------------------------------- HTML


class _Figures(HTMLParser):
    """Collects every element carrying ``data-value`` with where it is and its text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.where: list[str] = []
        self.figures: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self.headline = ""
        self._in_headline = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self.where.append(a.get("id") or f"ranking:{a.get('data-ranking')}")
        elif tag == "svg":
            self.where.append(f"svg:{a['aria-label']}")
        if a.get("data-figure") == "headline":
            self._in_headline = True
        if "data-value" in a:
            self._open = {"where": self.where[-1], "tag": tag, "unit": a.get("data-unit"),
                          "key": a["data-key"], "value": json.loads(a["data-value"]),
                          "text": ""}
            self.figures.append(self._open)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("table", "svg"):
            self.where.pop()
        if tag in ("td", "rect", "circle"):
            self._open = None
        if tag == "p":
            self._in_headline = False

    def handle_data(self, data: str) -> None:
        if self._open is not None and self._open["tag"] == "td":
            self._open["text"] += data
        if self._in_headline:
            self.headline += data


def _expected(doc: dict[str, Any]) -> dict[tuple[str, str, str], Any]:
    """(where, unit, key) → JSON value, for every figure the HTML must show."""
    out: dict[tuple[str, str, str], Any] = {}
    for row in doc["rows"]:
        unit = row["key"] or ""
        for key in KIND:
            out[("by-unit", unit, key)] = row[key]
        for key in ("reported", "closed"):
            out[("svg:workload by unit", unit, key)] = row[key]
        for key in ("completion_rate", "on_time_rate"):
            out[("svg:on-time and completion rates by unit", unit, key)] = row[key]
    for key in KIND:
        out[("by-unit", "__total__", key)] = doc["totals"][key]
    for w in doc["trend"]:
        for key in ("reported", "should_close", "closed", "completion_rate", "on_time_rate",
                    "overdue_rate", "satisfaction_rate", "composite"):
            out[("trend", w["week"], key)] = w[key]
        out[("svg:weekly trend", w["week"], "reported")] = w["reported"]
        for key in ("completion_rate", "on_time_rate"):
            if w[key] is not None:
                out[("svg:weekly trend", w["week"], key)] = w[key]
    for r in doc["rankings"]:
        for e in r["entries"]:
            unit = e.get("case_id") or e["key"]
            keys = ("composite",) if r["of"] == "case" else ("composite", "scored", "closed")
            for key in keys:
                out[(f"ranking:{r['name']}", unit, key)] = e[key]
    return out


def _kind(key: str) -> str:
    return "score" if key == "composite" else KIND.get(key, "count")


@pytest.mark.parametrize("by", ["department", "grid", "worker"])
def test_html_figures_equal_json_figures(python: FactsSource, wujin: Policy,  # noqa: F811
                                         by: str) -> None:
    doc = build_report(python, policy=wujin, period=MARCH, by=by, as_of=AS_OF)
    html = to_html(doc)
    parser = _Figures()
    parser.feed(html)
    seen = {(f["where"], f["unit"] or "", f["key"]): f for f in parser.figures}
    assert len(seen) == len(parser.figures)  # every figure appears once per place
    expected = _expected(doc)
    assert set(seen) == set(expected)
    for where_key, value in expected.items():
        fig = seen[where_key]
        assert fig["value"] == value, where_key
        if fig["tag"] == "td":
            assert fig["text"] == fmt(value, _kind(where_key[2])), where_key
    assert parser.headline == doc["headline"]["zh"]
    embedded = re.search(r'<script type="application/json" id="gridflow-report">(.*?)</script>',
                         html, re.S)
    assert embedded is not None
    assert json.loads(embedded.group(1)) == doc


def test_html_is_self_contained(doc: dict[str, Any]) -> None:
    html = to_html(doc)
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert '<meta charset="utf-8">' in html
    for needle in ("<link", " src=", "@import", "url(", "<img", "<iframe"):
        assert needle not in html
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) == {"http://www.w3.org/2000/svg"}
    assert html.count("<svg") == 3
    assert "<script" not in html.replace(
        '<script type="application/json" id="gridflow-report">', "")


def test_text_is_escaped(python: FactsSource, wujin: Policy) -> None:  # noqa: F811
    doc = build_report(python, policy=wujin, period=MARCH, as_of=AS_OF)
    doc["rows"][0]["name"] = "<b>&</b>"
    doc["title"] = "</script><script>alert(1)</script>"
    html = to_html(doc)
    assert "<b>&</b>" not in html and "&lt;b&gt;&amp;&lt;/b&gt;" in html
    assert "<script>alert" not in html


# --------------------------------------------------------------------------- determinism


def test_output_is_deterministic(python: FactsSource, wujin: Policy,  # noqa: F811
                                 doc: dict[str, Any]) -> None:
    again = build_report(python, policy=wujin, period=MARCH, by="department", as_of=AS_OF)
    assert to_json(again) == to_json(doc) and to_html(again) == to_html(doc)
    text = to_json(doc)
    assert text.endswith("}\n") and json.loads(text) == doc
    assert list(json.loads(text)) == sorted(doc)


@pytest.fixture
def district_db(tmp_path: Path, wujin: Policy) -> Iterator[str]:  # noqa: F811
    url = f"sqlite:///{tmp_path / 'district.db'}"
    store = Store(url)
    store.create_all()
    clock = ManualClock(at(9, 9))
    engine = Engine(wujin, store=store, clock=clock)
    build_district(Desk(engine, clock))
    store.dispose()
    yield url


def test_store_and_definition_render_identically(district_db: str, python: FactsSource,
                                                 wujin: Policy) -> None:  # noqa: F811
    with Store(district_db) as store:
        refresh(store, wujin)
        sql = build_report(StoreSource.from_policy(store, wujin), policy=wujin, period=MARCH,
                           by="grid", as_of=AS_OF)
    mem = build_report(python, policy=wujin, period=MARCH, by="grid", as_of=AS_OF)
    assert to_json(sql) == to_json(mem)
    assert to_html(sql) == to_html(mem)


def test_terminal_tables(doc: dict[str, Any]) -> None:
    console = Console(record=True, width=220)
    render(doc, console)
    text = console.export_text()
    assert "上报事项 14 件，办结率 90.00%" in text
    for label in ("办结率", "按期处置率", "超期率", "返工率", "延期率", "满意率", "综合得分",
                  "街道环卫所", "合计", "2026-W11", "gw-chen", "QSY-N"):
        assert label in text
    assert "87.50%" in text  # sanitation: 7 of 8 should-close closed


# --------------------------------------------------------------------------- CLI


def test_cli_report(district_db: str, tmp_path: Path, python: FactsSource,
                    wujin: Policy) -> None:  # noqa: F811
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    result = CliRunner().invoke(main, [
        "report", "--db", district_db, "--policy", "examples/wujin", "--period", "2026-03",
        "--by", "grid", "--json", str(out_json), "--html", str(out_html)])
    assert result.exit_code == 0, result.output
    assert "上报事项 14 件，办结率 90.00%" in result.output
    doc = json.loads(out_json.read_text("utf-8"))
    # judged at the latest event (Friday 09:00, when case I was dispatched)
    assert doc == build_report(python, policy=wujin, period=MARCH, by="grid", as_of=at(13, 9))
    assert out_html.read_text("utf-8") == to_html(doc)
    # the scores are stored now: a report without the policy reads them (ids, no names)
    result = CliRunner().invoke(main, ["report", "--db", district_db, "--json", "-",
                                       "--as-of", "2026-03-13T12:00:00+08:00"])
    assert result.exit_code == 0, result.output
    bare = json.loads(result.output)
    assert bare["totals"] == build_report(python, policy=wujin, as_of=AS_OF)["totals"]
    assert bare["rows"][0]["name"] == bare["rows"][0]["key"]


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--period", "2026-13"], 2, "invalid period '2026-13'"),
    (["--by", "team"], 2, "unknown grouping 'team'"),
    (["--as-of", "2026-03-13T12:00"], 2, "give a UTC offset"),
    (["--as-of", "friday"], 2, "not an ISO 8601 time"),
])
def test_cli_report_usage_errors(district_db: str, args: list[str], code: int,
                                 message: str) -> None:
    result = CliRunner().invoke(main, ["report", "--db", district_db, "--policy",
                                       "examples/wujin", *args])
    assert result.exit_code == code
    assert message in result.output


def test_cli_report_needs_scores_or_a_policy(district_db: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["report", "--db", district_db])
    assert result.exit_code == 1
    assert "pass --policy DIR" in result.output
    result = CliRunner().invoke(main, ["report", "--db", f"sqlite:///{tmp_path / 'none.db'}"])
    assert result.exit_code == 2 and "no database file" in result.output
    assert not (tmp_path / "none.db").exists()
    empty = tmp_path / "empty.db"
    Store(f"sqlite:///{empty}").dispose()
    empty.touch()
    result = CliRunner().invoke(main, ["report", "--db", f"sqlite:///{empty}"])
    assert result.exit_code == 1 and "no gridflow tables" in result.output


def test_cli_report_without_the_policy_takes_its_time_zone_from_timezone(
    tmp_path: Path,
) -> None:
    """A case reported at 00:30 on 1 April in Tokyo is April's there and March's in
    Shanghai: without --policy the report reads periods in --timezone (default
    Asia/Shanghai), as it does in the policy's zone with --policy."""
    import shutil
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from gridflow import Actor, load_policy

    root = Path(shutil.copytree("examples/wujin", tmp_path / "tokyo"))
    org = root / "organisation.yaml"
    org.write_text(org.read_text("utf-8").replace("timezone: Asia/Shanghai",
                                                  "timezone: Asia/Tokyo"), "utf-8")
    policy = load_policy(root)
    db = f"sqlite:///{tmp_path / 'tokyo.db'}"
    store = Store(db)
    store.create_all()
    reported = datetime(2026, 4, 1, 0, 30, tzinfo=ZoneInfo("Asia/Tokyo"))
    Engine(policy, store, ManualClock(reported)).report(
        {"category": "E01-10", "location": "qdj-g3"}, Actor("gw-1", "grid_worker"))
    store.dispose()

    def reported_in(*args: str) -> int:
        result = CliRunner().invoke(main, ["report", "--db", db, "--json", "-",
                                           "--period", "2026-04", *args])
        assert result.exit_code == 0, result.output
        return int(json.loads(result.output)["totals"]["reported"])

    assert reported_in("--policy", str(root)) == 1  # (this also stores the scores)
    assert reported_in("--timezone", "Asia/Tokyo") == 1
    assert reported_in() == 0  # read in Asia/Shanghai it is March's
    bad = CliRunner().invoke(main, ["report", "--db", db, "--timezone", "Mars/Olympus"])
    assert bad.exit_code == 2 and "unknown time zone" in bad.output
    other = CliRunner().invoke(main, ["report", "--db", db, "--policy", str(root),
                                      "--timezone", "Asia/Shanghai"])
    assert other.exit_code == 2 and "leave --timezone out" in other.output
