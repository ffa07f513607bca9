"""The ``gridflow`` command line: check, test, route, schema; exit codes 0 / 1 / 2."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from gridflow import cli
from gridflow.loader import load_policy

MINI = Path(__file__).parent / "policies" / "mini"
TODAY = dt.date(2026, 3, 1)
GARBAGE = {"category": "E01-10", "location": "g1", "description": "路边有暴露垃圾",
           "reported_at": "2026-03-09T10:00:00+08:00"}
LOCATED = re.compile(r"^(?P<path>\S+\.yaml):(?P<line>\d+):(?P<col>\d+): (?P<message>.+)$")


@pytest.fixture(autouse=True)
def fixed_today(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads today's date for the calendar warning; pin it."""
    monkeypatch.setattr(cli, "_today", lambda: TODAY)


def run(*args: str, input: str | bytes | None = None) -> Result:
    result = CliRunner().invoke(cli.main, list(args), input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is never an acceptable CLI answer
    return result


def copy_mini(dest: Path) -> Path:
    shutil.copytree(MINI, dest)
    return dest


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"fixture drifted: {old!r}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def broken_policy(tmp_path: Path) -> Path:
    root = copy_mini(tmp_path / "broken")
    edit(root / "policy.yaml", "  description:", "  descripton:")
    edit(root / "routing.yaml", "then: {lead: sanitation, pool: east}",
         "then: {lead: sanitaton, pool: east}")
    return root


# --- check ---------------------------------------------------------------------------------


def test_check_valid_policy_exits_0() -> None:
    result = run("check", str(MINI))
    assert result.exit_code == 0, result.output
    version = load_policy(MINI, today=TODAY).version
    assert result.stdout.startswith(f"ok: mini (version {version}): ")
    assert "7 units, 5 departments, 6 categories, 3 rules" in result.stdout
    assert "4 rule tests" in result.stdout
    assert result.stderr == ""


def test_check_invalid_policy_exits_1_with_located_lines(tmp_path: Path) -> None:
    root = broken_policy(tmp_path)
    result = run("check", str(root))
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    located = [m for m in map(LOCATED.match, lines) if m]
    assert len(located) == 2, result.stdout
    by_file = {Path(m["path"]).name: m for m in located}
    assert by_file["policy.yaml"]["line"] == "4" and by_file["policy.yaml"]["col"] == "3"
    assert by_file["policy.yaml"]["message"] == \
        "unknown key 'descripton' (did you mean 'description'?)"
    assert by_file["routing.yaml"]["message"] == \
        "unknown department 'sanitaton' (did you mean 'sanitation'?)"
    assert (by_file["routing.yaml"]["line"], by_file["routing.yaml"]["col"]) == ("9", "24")
    assert Path(by_file["routing.yaml"]["path"]).resolve() == (root / "routing.yaml").resolve()
    assert lines[-1] == f"2 error(s), 0 warning(s) in {root}"
    assert "ok:" not in result.output


def test_check_prints_calendar_warning_on_stderr_and_still_exits_0(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli, "_today", lambda: dt.date(2026, 12, 1))
    result = run("check", str(MINI))
    assert result.exit_code == 0
    assert result.stdout.startswith("ok: ")
    assert "holiday data ends on 2026-12-31" in result.stderr
    assert result.stderr.rstrip().endswith("[warning]")


def test_check_relative_path_prints_relative_locations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken_policy(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = run("check", "broken")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert "broken/routing.yaml:9:24: unknown department 'sanitaton'" in lines[1]


# --- test ----------------------------------------------------------------------------------


def test_test_command_prints_counts_and_exits_0() -> None:
    result = run("test", str(MINI))
    assert result.exit_code == 0, result.output
    assert re.search(r"^4 passed, 0 failed in \d+\.\d\ds$", result.stdout, re.M), result.stdout
    assert "FAILED" not in result.stdout


def test_test_command_verbose_lists_every_test() -> None:
    result = run("test", "-v", str(MINI))
    assert result.exit_code == 0
    assert result.stdout.count("PASSED") == 4
    assert "routing.yaml" not in result.stdout
    assert "tests.yaml:2 暴露垃圾去环卫所" in result.stdout


def test_test_command_exits_1_on_a_failing_test(tmp_path: Path) -> None:
    root = copy_mini(tmp_path / "p")
    edit(root / "tests.yaml", "expect: {lead: sanitation, tier: street, rule: garbage",
         "expect: {lead: grid-team, tier: street, rule: garbage")
    result = run("test", str(root))
    assert result.exit_code == 1
    assert re.search(r"^3 passed, 1 failed in ", result.stdout, re.M), result.stdout
    assert f"FAILED {root / 'tests.yaml'}:2 暴露垃圾去环卫所" in result.stdout
    assert "lead: expected 'grid-team', got 'sanitation'" in result.stdout


def test_test_command_on_an_invalid_policy_exits_1(tmp_path: Path) -> None:
    result = run("test", str(broken_policy(tmp_path)))
    assert result.exit_code == 1
    assert "2 error(s)" in result.stdout
    assert "passed" not in result.stdout


# --- route ---------------------------------------------------------------------------------


def write_json(tmp_path: Path, data: Any, name: str = "case.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def test_route_json_gives_the_decision(tmp_path: Path) -> None:
    result = run("route", str(MINI), str(write_json(tmp_path, GARBAGE)), "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["lead"] == "sanitation"
    assert d["tier"] == "street"
    assert d["rule"] == "garbage"
    assert d["pool"] == "east" and d["handler"] is None
    assert d["time_limit"] == "4wh"
    assert d["due_at"] is not None and d["due_at"].startswith("2026-03-09T")
    assert d["policy_version"] == load_policy(MINI, today=TODAY).version
    assert d["default"] is False
    (hit,) = d["hits"]
    assert hit["rule"] == "garbage" and hit["table"] == "main"
    assert hit["source"].endswith("routing.yaml:7")
    seen = {c["field"]: c["seen"] for c in hit["conditions"]}
    assert seen == {"category": "E01-10", "description": "路边有暴露垃圾"}
    assert any("matched main/garbage" in line for line in d["explain"])


def test_route_reads_stdin_with_dash() -> None:
    result = run("route", str(MINI), "-", "--json", input=json.dumps(GARBAGE))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["lead"] == "sanitation"


def test_route_a_list_of_cases_gives_a_list(tmp_path: Path) -> None:
    cases = [GARBAGE, {"category": "E04-06", "location": "g3", "id": "C-2"},
             {"category": "E01-11", "location": "g2"}]
    result = run("route", str(MINI), str(write_json(tmp_path, cases)), "--json")
    assert result.exit_code == 0, result.output
    decisions = json.loads(result.stdout)
    assert isinstance(decisions, list)
    assert [(d["lead"], d["rule"]) for d in decisions] == [
        ("sanitation", "garbage"), ("urban-mgmt", "street-order"), ("centre", "default"),
    ]
    assert decisions[1]["case_id"] == "C-2"
    assert decisions[2]["default"] is True and decisions[2]["hits"] == []


def test_route_explain_shows_rule_conditions_and_version(tmp_path: Path) -> None:
    result = run("route", str(MINI), str(write_json(tmp_path, GARBAGE)), "--explain")
    assert result.exit_code == 0, result.output
    out = result.stdout
    version = load_policy(MINI, today=TODAY).version
    assert re.search(r"matched main/garbage at \S*routing\.yaml:7", out), out
    assert "description contains '垃圾'  (seen: '路边有暴露垃圾')" in out
    assert f"policy version {version}" in out


def test_route_explain_says_when_the_default_route_applied(tmp_path: Path) -> None:
    case = {"category": "E01-11", "location": "g2"}
    result = run("route", str(MINI), str(write_json(tmp_path, case)), "--explain")
    assert result.exit_code == 0
    assert re.search(r"no rule matched; default route \(\S*routing\.yaml:2\)", result.stdout)


def test_route_json_stays_parseable_when_the_policy_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "_today", lambda: dt.date(2026, 12, 1))
    result = run("route", str(MINI), str(write_json(tmp_path, GARBAGE)), "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["lead"] == "sanitation"
    assert "[warning]" in result.stderr


@pytest.mark.parametrize(
    ("case", "field_message"),
    [
        ({"category": "E01-10", "location": "g9"}, "location: unknown unit 'g9'"),
        ({"location": "g1"}, "category: required field missing"),
        ({"category": "E01-10", "location": "g1", "urgency": "asap"}, "urgency: "),
        ({"category": "E01-10", "location": "g1", "attributes": {"households": "many"}},
         "attributes.households: expected integer"),
        ({"category": "E01-10", "location": "g1", "colour": "red"}, "colour: unknown field"),
        ({"category": "E01-10", "location": "g1", "reported_at": "2026-03-09T10:00:00"},
         "reported_at: "),
        ("just a string", "case: expected a JSON object"),
    ],
    ids=["unknown-unit", "missing-category", "bad-urgency", "attribute-type", "unknown-field",
         "naive-time", "not-an-object"],
)
def test_route_invalid_case_exits_1_naming_the_field(
    case: Any, field_message: str, tmp_path: Path
) -> None:
    path = write_json(tmp_path, case)
    result = run("route", str(MINI), str(path), "--json")
    assert result.exit_code == 1
    assert f"{path}: invalid case: {field_message}" in result.stderr
    assert result.stdout == ""  # nothing half-written where JSON is expected


def test_route_invalid_case_in_a_list_names_its_index() -> None:
    cases = [GARBAGE, {"category": "E01-10", "location": "g9"}, GARBAGE,
             {"category": "E01-1", "location": "g1"}]
    result = run("route", str(MINI), "-", "--json", input=json.dumps(cases))
    assert result.exit_code == 1
    # every invalid case is reported, and none of the list is routed
    assert result.stderr.splitlines() == [
        "-[1]: invalid case: location: unknown unit 'g9'",
        "-[3]: invalid case: category: unknown category 'E01-1' (did you mean 'E01-11'?)",
    ]
    assert result.stdout == ""


def test_route_bad_json_exits_1_with_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"category": "E01-10",\n "location": g1}\n', encoding="utf-8")
    result = run("route", str(MINI), str(path))
    assert result.exit_code == 1
    assert f"{path}:2:14: invalid JSON" in result.stderr
    stdin = run("route", str(MINI), "-", input='[{"category": "E01-10"},\n\n  ]')
    assert stdin.exit_code == 1
    assert "-:3:3: invalid JSON" in stdin.stderr


def test_route_non_utf8_case_file_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "gbk.json"
    path.write_bytes(json.dumps({"category": "E01-10", "location": "g1",
                                 "description": "垃圾"}, ensure_ascii=False).encode("gbk"))
    result = run("route", str(MINI), str(path))
    assert result.exit_code == 1
    assert "not UTF-8" in result.stderr


def test_route_case_file_with_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GARBAGE, ensure_ascii=False).encode())
    result = run("route", str(MINI), str(path), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["lead"] == "sanitation"


def test_route_with_an_invalid_policy_exits_1_before_reading_cases(tmp_path: Path) -> None:
    result = run("route", str(broken_policy(tmp_path)), "-", "--json", input="not json")
    assert result.exit_code == 1
    assert "unknown department 'sanitaton'" in result.stderr
    assert "invalid JSON" not in result.output
    assert result.stdout == ""


# --- usage errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("route", str(MINI), "-", "--bogus"),
        ("check", "--nope", str(MINI)),
        ("frobnicate",),
        ("route", str(MINI)),
        ("check", "/no/such/policy/dir"),
        ("route", str(MINI), "/no/such/case.json"),
        ("test",),
    ],
    ids=["unknown-route-option", "unknown-check-option", "unknown-command", "missing-argument",
         "missing-directory", "missing-case-file", "test-without-directory"],
)
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert "Usage:" in result.stderr or "Error:" in result.stderr


# --- schema --------------------------------------------------------------------------------


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def test_schema_is_a_json_schema_of_rule_files() -> None:
    result = run("schema")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["$schema"].startswith("https://json-schema.org/")
    assert doc["type"] == "object"
    assert doc["additionalProperties"] is False
    assert {"policy", "organisation", "departments", "categories", "attributes", "calendar",
            "routing", "tests"} <= set(doc["properties"])
    defs = doc["$defs"]
    for ref in refs(doc):  # every reference resolves inside the document
        assert ref.startswith("#/$defs/"), ref
        assert ref.removeprefix("#/$defs/") in defs, ref
    assert {"lead", "assist", "tier", "time_limit", "pool", "summon"} <= \
        set(defs["Outcome"]["properties"])
    assert set(defs["Table"]["properties"]["hit"]["enum"]) == {"first", "unique", "collect"}
    assert "in" in defs["Match"]["properties"]  # the alias, as written in YAML
    assert "from" in defs["HolidaySpan"]["properties"]


def test_schema_case() -> None:
    result = run("schema", "--case")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["title"] == "gridflow case"
    assert {"category", "location", "description", "channel", "urgency", "reported_at",
            "attributes"} <= set(doc["properties"])
    assert set(doc["required"]) == {"category", "location"}
    assert doc["additionalProperties"] is False


# --- the installed console script ------------------------------------------------------------


def test_console_script_smoke() -> None:
    script = Path(sys.executable).with_name("gridflow")
    exe = str(script) if script.exists() else shutil.which("gridflow")
    assert exe, "the gridflow console script is not installed"
    ok = subprocess.run([exe, "check", str(MINI)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: mini ")


def test_route_a_list_counts_its_earlier_cases_for_history_conditions(tmp_path: Path) -> None:
    from tests.test_history import HISTORY_RULE, _policy_dir

    root = _policy_dir(tmp_path, HISTORY_RULE)
    at = ["2026-03-10T10:00:00+08:00", "2026-03-01T10:00:00+08:00", "2026-03-16T10:00:00+08:00"]
    cases = [{**GARBAGE, "address": "湖塘镇1号", "reported_at": t} for t in at]
    result = run("route", str(root), str(write_json(tmp_path, cases)), "--json")
    assert result.exit_code == 0, result.output
    rules = [d["rule"] for d in json.loads(result.stdout)]
    # the list is the history, by report time (not list order): only the 16th is the third
    assert rules == ["garbage", "garbage", "same-address-thrice"]
    alone = run("route", str(root), str(write_json(tmp_path, cases[2])), "--json")
    assert json.loads(alone.stdout)["rule"] == "garbage"
