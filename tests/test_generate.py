"""Synthetic logs: seeded and byte-stable, importable, ordered, calibrated to the seeds."""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import replace
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest

from gridflow import load_policy
from gridflow.generate import Settings, columns, generate, write_log
from gridflow.importer import LogReader
from gridflow.policy import Policy
from gridflow.replay import RouteMemo, replay
from tests import strategies as gs

ROOT = Path(__file__).resolve().parent.parent
WUJIN = load_policy(ROOT / "examples" / "wujin")


@pytest.fixture(scope="module")
def log3000(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "log.csv"
    write_log(path, WUJIN, 3000, seed=42, settings=Settings(days=120),
              route=RouteMemo(WUJIN).route)
    return path


def test_same_seed_same_bytes_other_seed_other_log(tmp_path: Path, log3000: Path) -> None:
    again = tmp_path / "again.csv"
    write_log(again, WUJIN, 3000, seed=42, settings=Settings(days=120))  # Policy.route
    assert again.read_bytes() == log3000.read_bytes()  # the memo gives the same answers
    other = tmp_path / "other.csv"
    write_log(other, WUJIN, 3000, seed=43, settings=Settings(days=120),
              route=RouteMemo(WUJIN).route)
    assert other.read_bytes() != log3000.read_bytes()


def test_the_log_imports_cleanly_in_time_order(log3000: Path) -> None:
    with log3000.open(encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert header == columns(WUJIN)
    reader = LogReader(log3000, policy=WUJIN)
    records = list(reader)
    assert reader.report.bad == 0 and len(records) == 3000
    times = [r.case.reported_at for r in records]
    assert times == sorted(times)
    assert len({r.case.id for r in records}) == 3000
    assert all(r.case.reported_at is not None and r.case.reported_at.date() >= date(2026, 1, 1)
               for r in records)


def test_jsonl_and_csv_hold_the_same_records(tmp_path: Path, log3000: Path) -> None:
    jsonl = tmp_path / "log.jsonl"
    write_log(jsonl, WUJIN, 3000, seed=42, settings=Settings(days=120),
              route=RouteMemo(WUJIN).route)
    first = json.loads(jsonl.read_text("utf-8").splitlines()[0])
    assert isinstance(first.get("attributes", {}), dict)
    a = [replace(r, row=0) for r in LogReader(log3000, policy=WUJIN)]
    b = [replace(r, row=0) for r in LogReader(jsonl, policy=WUJIN)]  # no header line
    assert a == b


def test_arrivals_and_mix_follow_the_settings(log3000: Path) -> None:
    rows = list(LogReader(log3000, policy=WUJIN))
    local = [r.case.reported_at.astimezone(WUJIN.calendar.timezone) for r in rows
             if r.case.reported_at is not None]
    by_weekday = Counter(t.weekday() for t in local)
    assert by_weekday[0] > 1.6 * by_weekday[6]  # Mondays busier than Sundays
    by_hour = Counter(t.hour for t in local)
    assert by_hour[10] > 10 * by_hour[3]  # patrol hours
    groups = Counter(WUJIN.registry.categories[r.case.category].group for r in rows)
    assert groups.most_common(1)[0][0] == "E"  # events lead the mix
    patrol = [r for r in rows if r.case.channel == "patrol"]
    assert 0.55 < len(patrol) / len(rows) < 0.7
    on_spot = sum(r.on_spot for r in patrol) / len(patrol)
    assert 0.28 < on_spot < 0.42
    statuses = Counter(r.status for r in rows)
    assert statuses["cancelled"] < 0.02 * len(rows)
    assert sum(r.returns > 0 for r in rows) > 0 and sum(r.rework > 0 for r in rows) > 0
    assert sum(r.extension is not None for r in rows) > 0
    satisfied = Counter(r.satisfaction for r in rows if r.satisfaction)
    assert satisfied["satisfied"] > 0.85 * sum(satisfied.values())
    agree = [r for r in rows if r.department is not None]
    routed = RouteMemo(WUJIN)
    share = sum(routed.route(r.case).lead == r.department for r in agree) / len(agree)
    assert 0.9 < share < 0.96


def test_replayed_indicators_match_the_seed_articles(log3000: Path) -> None:
    doc = replay(WUJIN, LogReader(log3000, policy=WUJIN))
    ind = doc["lifecycle"]["indicators"]
    # Qishuyan: 22,107 reported, completion 99.85% (seed 000); Dongli: 98.4% (seed 002)
    assert 0.995 <= ind["completion_rate"] <= 0.9995
    assert 0.9 <= ind["on_time_rate"] <= 0.99
    assert 0.9 <= ind["satisfaction_rate"] <= 0.99
    assert ind["rework_rate"] < 0.05
    assert doc["lifecycle"]["errors"] == 0


def test_any_policy_can_be_generated_for(tmp_path: Path) -> None:
    content: dict[str, Any] = {
        "policy": {"name": "tiny"},
        "organisation": gs.ORGANISATION,
        "departments": gs.DEPARTMENTS,
        "categories": gs.CATEGORIES,
        "attributes": gs.ATTRIBUTES,
        "routing": {"default": {"lead": "centre", "time_limit": "1wd"}, "tables": [
            {"id": "t", "hit": "first", "rules": [
                {"id": "garbage", "when": {"category": "E01-10", "description": "垃圾"},
                 "then": {"lead": "sanitation"}}]}]},
    }
    (tmp_path / "policy.yaml").write_text(json.dumps(content, ensure_ascii=False), "utf-8")
    policy: Policy = load_policy(tmp_path)
    rows = list(generate(policy, 200, seed=1, start=date(2026, 5, 1),
                         settings=Settings(days=10)))
    assert len(rows) == 200
    assert all(datetime(2026, 5, 1, tzinfo=policy.calendar.timezone) <= r["reported_at"]
               for r in rows)
    assert {r["location"] for r in rows} <= {"g1", "g2", "g3", "g4"}  # the lowest level
    assert any("垃圾" in r["description"] for r in rows if r["category"] == "E01-10")
    log = tmp_path / "log.csv"
    assert write_log(log, policy, 200, seed=1, settings=Settings(days=10)) == 200
    reader = LogReader(log, policy=policy)
    assert len(list(reader)) == 200 and reader.report.bad == 0
    assert list(generate(policy, 0)) == []
    with pytest.raises(ValueError):
        list(generate(policy, -1))
