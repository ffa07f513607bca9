"""Case-log import: mapping files (validated, located errors), CSV/JSONL streaming, bad rows."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gridflow import DefinitionError, load_policy
from gridflow.importer import LogImportError, LogReader, load_mapping, parse_mapping
from gridflow.policy import Policy

ROOT = Path(__file__).resolve().parent.parent
SH = ZoneInfo("Asia/Shanghai")


@pytest.fixture(scope="module")
def wujin() -> Policy:
    return load_policy(ROOT / "examples" / "wujin")


MAPPING = """\
timezone: Asia/Shanghai
date_formats: ["%Y/%m/%d %H:%M", iso]
fields:
  id: 编号
  category: {column: 小类, map: categories}
  location: 网格
  description: {column: [标题, 内容], join: "："}
  channel: {column: 来源, map: {巡查: patrol, "12345": hotline}, default: patrol}
  reported_at: 上报时间
  attributes.needy: {column: 困难户}
  attributes.repeat_count: 次数
  closed_at: {column: 结案时间, format: "%Y-%m-%d %H:%M:%S"}
  department: {column: 处置部门, map: departments, unmapped: keep}
  satisfaction: {column: 回访, map: {满意: satisfied, 基本满意: basically_satisfied,
                                    不满意: dissatisfied}}
maps:
  categories: {暴露垃圾: E01-10, 占道经营: E04-06, 老年证: S01-01}
  departments: {环卫所: sanitation, 城管中队: cg-squad}
"""


def _write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text, encoding="utf-8")
    return p


def test_csv_with_mapping_maps_values_times_and_attributes(tmp_path: Path, wujin: Policy) -> None:
    mapping = parse_mapping(MAPPING, policy=wujin)
    csv_text = (
        "编号,小类,网格,标题,内容,来源,上报时间,困难户,次数,结案时间,处置部门,回访\n"
        "A1,暴露垃圾,qdj-g3,垃圾,\"路口,堆放\",12345,2026/03/09 10:20,是,2,"
        "2026-03-09 15:00:00,环卫所,满意\n"
        "A2,占道经营,qdj-g1,,,,2026-03-10T08:00:00+00:00,,,,城管中队,\n"
    )
    reader = LogReader(_write(tmp_path, "log.csv", csv_text), mapping, policy=wujin)
    records = list(reader)
    assert reader.report.rows == 2 and reader.report.bad == 0
    a, b = records
    assert a.row == 2 and a.case.id == "A1" and a.case.category == "E01-10"
    assert a.case.description == "垃圾：路口,堆放"
    assert a.case.channel == "hotline"
    assert a.case.reported_at == datetime(2026, 3, 9, 10, 20, tzinfo=SH)
    assert a.case.attributes == {"needy": True, "repeat_count": 2}  # converted by declared type
    assert a.closed_at == datetime(2026, 3, 9, 15, 0, tzinfo=SH)
    assert (a.department, a.satisfaction) == ("sanitation", "satisfied")
    assert b.case.channel == "patrol"  # the default for an empty cell
    assert b.case.reported_at == datetime(2026, 3, 10, 8, 0, tzinfo=UTC)  # an offset is kept
    assert b.case.description == "" and b.satisfaction is None


def test_bad_rows_are_reported_with_row_and_reason_and_skipped(
    tmp_path: Path, wujin: Policy
) -> None:
    mapping = parse_mapping(MAPPING, policy=wujin)
    csv_text = (
        "编号,小类,网格,标题,内容,来源,上报时间,困难户,次数,结案时间,处置部门,回访\n"
        "B1,暴露垃圾,qdj-g3,a,b,巡查,2026/03/09 10:20,,,,,\n"
        "B2,乱扔,qdj-g3,a,b,巡查,2026/03/09 10:20,,,,,\n"  # not in the category map
        "B3,暴露垃圾,nowhere,a,b,巡查,2026/03/09 10:20,,,,,\n"  # unknown unit
        "B4,暴露垃圾,qdj-g3,a,b,巡查,yesterday,,,,,\n"  # no format matches
        "B5,暴露垃圾,qdj-g3,a,b,巡查,2026/03/09 10:20,也许,,,,\n"  # not a yes/no
        "B6,暴露垃圾,qdj-g3,a,b,巡查,2026/03/09 10:20,,,2026-03-08 10:00:00,,\n"  # closed first
        "B7,暴露垃圾,qdj-g3,\"multi\nline\",b,巡查,2026/03/09 10:20,,,,,很好\n"  # satisfaction
        "B8,老年证,qdj-g3,a,b,巡查,2026/03/09 10:20,,,,,\n"
    )
    reader = LogReader(_write(tmp_path, "log.csv", csv_text), mapping, policy=wujin)
    ids = [r.case.id for r in reader]
    assert ids == ["B1", "B8"]
    rep = reader.report
    assert (rep.rows, rep.imported, rep.bad) == (8, 2, 6)
    by_row = {e.row: e for e in rep.errors}
    assert by_row[3].field == "category" and "乱扔" in by_row[3].message
    assert by_row[4].field == "location" and "nowhere" in by_row[4].message
    assert by_row[5].field == "reported_at" and "yesterday" in by_row[5].message
    assert by_row[6].field == "attributes.needy"
    assert by_row[7].field == "closed_at" and "precedes" in by_row[7].message
    assert by_row[8].field == "satisfaction"  # the row number is the line the record starts on
    assert rep.by_field["category"] == 1
    assert rep.to_dict()["bad_rows"] == 6


def test_a_case_id_twice_is_a_bad_row_the_second_time(tmp_path: Path, wujin: Policy) -> None:
    text = ("id,category,location\nW1,E01-10,qdj-g3\nW2,E01-10,qdj-g3\nW1,E04-09,qdj-g3\n"
            "W3,E01-10,qdj-g3\n")
    path = _write(tmp_path, "log.csv", text)
    reader = LogReader(path, policy=wujin)
    assert [(r.row, r.case.id) for r in reader] == [(2, "W1"), (3, "W2"), (5, "W3")]
    assert (reader.report.imported, reader.report.bad) == (3, 1)
    (error,) = reader.report.errors
    assert (error.row, error.field) == (4, "id")
    assert error.message == "case id 'W1' is on an earlier row"
    # each iteration reads the file afresh (the ids of the last one are not remembered)
    assert len(list(reader)) == 3
    with pytest.raises(LogImportError) as err:
        list(LogReader(path, policy=wujin, on_error="fail"))
    assert "log.csv:4: id: case id 'W1' is on an earlier row" in str(err.value)


def test_on_error_fail_stops_at_the_first_bad_row(tmp_path: Path, wujin: Policy) -> None:
    path = _write(tmp_path, "log.csv", "id,category,location\nok,E01-10,qdj-g3\nbad,ZZ,qdj-g3\n")
    reader = LogReader(path, policy=wujin, on_error="fail")
    with pytest.raises(LogImportError) as err:
        list(reader)
    assert "log.csv:3: category: unknown category 'ZZ'" in str(err.value)


def test_a_mapped_column_missing_from_the_header_is_fatal(tmp_path: Path, wujin: Policy) -> None:
    mapping = parse_mapping("fields: {category: 小类, location: 网格}", policy=wujin)
    path = _write(tmp_path, "log.csv", "小类,网络\nE01-10,qdj-g3\n")
    with pytest.raises(LogImportError, match="no column '网格'"):
        list(LogReader(path, mapping, policy=wujin))


def test_jsonl_without_mapping(tmp_path: Path, wujin: Policy) -> None:
    lines = [
        {"id": "J1", "category": "S02-02", "location": "qdj-g3", "channel": "wechat",
         "reported_at": "2026-03-09T10:20:00+08:00", "attributes": {"needy": True},
         "dispatched_at": "2026-03-09T11:00:00+08:00", "department": "community-station",
         "status": "closed", "closed_at": "2026-03-10T09:00:00+08:00", "rework": 1},
        "not json",
        ["a list"],
        {"id": "J4", "category": "S02-02", "location": "qdj-g3", "colour": "red"},
    ]
    text = "\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)
                     for x in lines) + "\n\n"
    reader = LogReader(_write(tmp_path, "log.jsonl", text), policy=wujin)
    assert reader.format == "jsonl" and reader.has_steps()
    records = list(reader)
    assert [r.case.id for r in records] == ["J1", "J4"]  # unknown keys are ignored
    j1 = records[0]
    assert j1.case.attributes == {"needy": True} and j1.rework == 1
    assert j1.dispatched_at == datetime(2026, 3, 9, 11, 0, tzinfo=SH)
    assert {e.row for e in reader.report.errors} == {2, 3}
    assert "invalid JSON" in reader.report.errors[0].message


def test_mapping_errors_are_located_with_suggestions(wujin: Policy) -> None:
    text = """\
timezone: Mars/Olympus
date_formats: [iso, ymd]
fields:
  category: {column: 小类, map: categoris}
  location: {colum: 网格}
  descripton: 描述
"""
    with pytest.raises(DefinitionError) as err:
        parse_mapping(text, path="map.yaml", policy=wujin)
    # all at once: the schema's refusal and what the rest of the file gets wrong
    msgs = [str(p) for p in err.value.problems]
    assert msgs[0] == "map.yaml:1:11: unknown time zone 'Mars/Olympus'"
    assert msgs[1].startswith("map.yaml:2:21: 'ymd' is not a time format")
    assert msgs[2:] == [
        "map.yaml:4:31: no map named 'categoris' under maps",
        "map.yaml:5:14: unknown key 'colum' (did you mean 'column'?)",
        "map.yaml:6:3: unknown case field 'descripton' (did you mean 'description'?)",
    ]  # (nothing about 'location', whose entry the schema refused)
    fixed = text.replace("colum:", "column:")
    with pytest.raises(DefinitionError) as err:
        parse_mapping(fixed, path="map.yaml", policy=wujin)
    assert [str(p) for p in err.value.problems] == msgs[:2] + msgs[2:3] + msgs[4:]


def test_a_misspelt_map_name_checks_the_map_it_means(wujin: Policy) -> None:
    text = """maps:
  categories: {垃圾: E01-1O}
fields:
  category: {column: 小类, map: categoris}
  location: 网格
"""
    with pytest.raises(DefinitionError) as err:
        parse_mapping(text, path="map.yaml", policy=wujin)
    msgs = [str(p) for p in err.value.problems]
    assert msgs[0].startswith("map.yaml:2:20: unknown category 'E01-1O' (did you mean")
    assert msgs[1:] == [
        "map.yaml:4:31: no map named 'categoris' under maps (did you mean 'categories'?)"]


def test_mapping_values_are_checked_against_the_policy(wujin: Policy) -> None:
    text = """\
fields:
  category: {column: c, map: {垃圾: E01-1O}}
  location: l
  department: {column: d, map: {环卫: sanitaton}}
  attributes.neddy: n
"""
    with pytest.raises(DefinitionError) as err:
        parse_mapping(text, path="m.yaml", policy=wujin)
    msgs = [str(p) for p in err.value.problems]
    assert any(m.startswith("m.yaml:2:35: unknown category 'E01-1O' (did you mean 'E01-1")
               for m in msgs)
    assert "m.yaml:4:37: unknown department 'sanitaton' (did you mean 'sanitation'?)" in msgs
    assert "m.yaml:5:3: the policy declares no attribute 'neddy' (did you mean 'needy'?)" in msgs


def test_mapping_file_limits_and_syntax(tmp_path: Path) -> None:
    with pytest.raises(DefinitionError, match=r"m\.yaml:2:1: YAML syntax error"):
        parse_mapping("fields: [", path="m.yaml")
    with pytest.raises(DefinitionError, match="cannot read"):
        load_mapping(tmp_path / "missing.yaml")
    with pytest.raises(DefinitionError, match="category, location"):
        parse_mapping("fields: {id: x}", path="m.yaml")


def test_reading_streams(tmp_path: Path, wujin: Policy) -> None:
    rows = "".join(f"c{i},E01-10,qdj-g3,{'长描述' * 20}\n" for i in range(20_000))
    path = _write(tmp_path, "big.csv", "id,category,location,description\n" + rows)
    reader = LogReader(path, policy=wujin)
    it = iter(reader)
    first = next(it)
    assert first.case.id == "c0"
    assert 0 < reader.bytes_read < reader.size / 4  # read ahead a buffer, not the file
    assert sum(1 for _ in it) == 19_999


def test_non_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "gbk.csv"
    path.write_bytes("id,category,location\nx,垃圾,g\n".encode("gbk"))
    with pytest.raises(LogImportError, match="not utf-8-sig text"):
        list(LogReader(path))
    mapping = parse_mapping("encoding: gbk\nfields: {id: id, category: category, location: "
                            "location}")
    records = list(LogReader(path, mapping))  # no policy: any category text is accepted
    assert records[0].case.category == "垃圾"
