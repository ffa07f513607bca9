"""Import historic case logs (CSV or JSONL), streamed, through a column-mapping file.

A *mapping file* (YAML, see docs/replay.md) says which source column feeds which case
field, how source values translate (value maps), how times are written (formats and
time zone) and which optional columns hold the later steps of each case (dispatched at,
closed at, actual department, satisfaction, ...). Without a mapping file the columns
(CSV) or keys (JSONL) are taken to be named like the fields.

Reading is streamed: one row at a time, never the whole file. Every row that cannot be
imported is reported with its line number and reason and counted in
:class:`ImportReport`; with ``on_error="fail"`` the first one stops the import
(:class:`LogImportError`), with ``"skip"`` (the default) it is left out — never silently.

    reader = LogReader("cases.csv", load_mapping("map.yaml", policy), policy=policy)
    for record in reader:          # LogRecord: .case (a validated CaseIn) + later steps
        ...
    print(reader.report.bad, reader.report.errors[:5])
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gridflow.calendar import parse_duration
from gridflow.errors import (
    CaseValidationError,
    DefinitionError,
    GridflowRuntimeError,
    Problem,
    suggest,
)
from gridflow.policy import Policy
from gridflow.routing import validate_case
from gridflow.schema import CaseIn
from gridflow.yamlsrc import Located, read_yaml

__all__ = [
    "CASE_FIELDS",
    "STEP_FIELDS",
    "ImportReport",
    "LogImportError",
    "LogReader",
    "LogRecord",
    "MappingSpec",
    "RowError",
    "default_mapping",
    "load_mapping",
    "parse_mapping",
]

#: Case fields a column can feed (plus ``attributes.<name>``).
CASE_FIELDS: tuple[str, ...] = (
    "id", "category", "location", "description", "channel", "urgency", "reported_at",
    "reporter", "address",
)
#: Times of the later steps of a case, in life-cycle order.
STEP_FIELDS: tuple[str, ...] = (
    "filed_at", "dispatched_at", "accepted_at", "handled_at", "verified_at", "closed_at",
    "evaluated_at",
)
#: Other optional columns about what happened to the case.
OUTCOME_FIELDS: tuple[str, ...] = (
    "department", "satisfaction", "status", "on_spot", "returns", "rework", "extension",
)
TARGETS: tuple[str, ...] = CASE_FIELDS + STEP_FIELDS + OUTCOME_FIELDS
TIME_TARGETS = frozenset(("reported_at", *STEP_FIELDS))
SATISFACTION = ("satisfied", "basically_satisfied", "dissatisfied")
STATUSES = ("closed", "cancelled", "deferred", "open")
_MAX_ERRORS_KEPT = 200

Scalar = str | int | float | bool | None


# --------------------------------------------------------------------------- the mapping


class FieldSpec(BaseModel):
    """How one case field is read (the long form of ``field: column``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: str | list[str] | None = Field(
        None, description="source column (CSV) or key (JSONL, dotted for nesting); a list "
        "of columns is joined with `join`"
    )
    value: Scalar = Field(None, description="a constant instead of a column")
    map: dict[str, Scalar] | str | None = Field(
        None, description="source value → field value, or the name of an entry of `maps`"
    )
    unmapped: Literal["error", "keep", "null"] = Field(
        "error", description="a value the map does not list: a row error, kept as is, or empty"
    )
    default: Scalar = Field(None, description="used when the column is empty or missing")
    format: str | list[str] | None = Field(
        None, description="time formats (strptime, 'iso', 'epoch', 'epoch_ms'); "
        "default: the file's date_formats"
    )
    type: Literal["string", "integer", "number", "boolean"] | None = Field(
        None, description="convert the text (attributes; default: the attribute's declared type)"
    )
    join: str = " "


class MappingSpec(BaseModel):
    """A validated mapping file (see docs/replay.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["csv", "jsonl"] | None = Field(
        None, description="default: from the file name (.csv, .jsonl/.ndjson)"
    )
    encoding: str = "utf-8-sig"
    delimiter: str = Field(",", min_length=1, max_length=1)
    timezone: str = Field("Asia/Shanghai", description="for times written without an offset")
    date_formats: list[str] = Field(default_factory=lambda: ["iso"], min_length=1)
    true_values: list[str] = Field(default_factory=lambda: ["1", "true", "yes", "y", "是", "t"])
    false_values: list[str] = Field(default_factory=lambda: ["0", "false", "no", "n", "否", "f"])
    on_error: Literal["skip", "fail"] = "skip"
    maps: dict[str, dict[str, Scalar]] = Field(
        default_factory=dict, description="named value maps shared by several fields"
    )
    fields: dict[str, str | FieldSpec] = Field(
        default_factory=dict, description="case field → column name or FieldSpec"
    )

    def spec(self, target: str) -> FieldSpec | None:
        raw = self.fields.get(target)
        if raw is None:
            return None
        return FieldSpec(column=raw) if isinstance(raw, str) else raw

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def has_steps(self) -> bool:
        """Whether any later-step column is mapped (life-cycle data)."""
        return any(t in self.fields for t in (*STEP_FIELDS, "status", "on_spot"))


def _target_ok(name: str) -> bool:
    return name in TARGETS or (name.startswith("attributes.") and len(name) > len("attributes."))


def _check_mapping(spec: MappingSpec, policy: Policy | None) -> list[tuple[tuple[str | int, ...],
                                                                           str, str | None, bool]]:
    """Semantic problems: (path, message, suggestion, at_key)."""
    out: list[tuple[tuple[str | int, ...], str, str | None, bool]] = []
    try:
        ZoneInfo(spec.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        out.append((("timezone",), f"unknown time zone '{spec.timezone}'", None, False))
    for i, fmt in enumerate(spec.date_formats):
        if fmt not in ("iso", "epoch", "epoch_ms") and "%" not in fmt:
            out.append((("date_formats", i), f"'{fmt}' is not a time format (strptime "
                        "directives such as %Y-%m-%d %H:%M, or iso, epoch, epoch_ms)", None, False))
    reg = policy.registry if policy is not None else None
    for target, raw in spec.fields.items():
        if not _target_ok(target):
            hint = suggest(target, TARGETS)
            listing = "" if hint else (f" (fields: {', '.join(TARGETS)}, attributes.<name>)")
            out.append((("fields", target), f"unknown case field '{target}'{listing}", hint,
                        True))
            continue
        fs = FieldSpec(column=raw) if isinstance(raw, str) else raw
        where: tuple[str | int, ...] = ("fields", target)
        if fs.column is None and fs.value is None and fs.default is None:
            out.append((where, "give a column, a value or a default", None, False))
        if fs.column is not None and fs.value is not None:
            out.append(((*where, "value"), "give either a column or a value, not both", None,
                        True))
        meant = fs.map
        if isinstance(fs.map, str) and fs.map not in spec.maps:
            meant = suggest(fs.map, spec.maps)  # its values are checked as that map's
            out.append(((*where, "map"), f"no map named '{fs.map}' under maps", meant, False))
        if fs.format is not None and target not in TIME_TARGETS:
            out.append(((*where, "format"), "format only applies to time fields", None, True))
        if target.startswith("attributes.") and reg is not None:
            name = target.removeprefix("attributes.")
            if name not in reg.attributes:
                out.append((("fields", target), f"the policy declares no attribute '{name}'",
                            suggest(name, reg.attributes), True))
        if reg is None:
            continue
        known: Mapping[str, Any] | None = {
            "category": reg.categories, "location": reg.units, "department": reg.departments,
            "channel": dict.fromkeys(reg.channels),
        }.get(target)
        table = spec.maps.get(meant) if isinstance(meant, str) else meant
        if known is not None and table:
            map_path: tuple[str | int, ...] = (
                ("maps", meant) if isinstance(meant, str) else (*where, "map")
            )
            for source, value in table.items():
                if value is not None and str(value) not in known:
                    out.append(((*map_path, source), f"unknown {target} '{value}'",
                                suggest(str(value), known), False))
    if "category" not in spec.fields or "location" not in spec.fields:
        missing = [t for t in ("category", "location") if t not in spec.fields]
        out.append((("fields",), f"map the required case field(s): {', '.join(missing)}", None,
                    True))
    return out


def parse_mapping(
    text: str | bytes, *, path: str = "<mapping>", policy: Policy | None = None
) -> MappingSpec:
    """Validate mapping-file text; every problem is raised at once as a located
    :class:`DefinitionError` (``path:line:col: message``)."""
    located, problems = read_yaml(path, text)
    if problems:
        raise DefinitionError(problems)
    data = located.data
    if not isinstance(data, dict):
        raise DefinitionError([Problem(path, 1, 1, "a mapping file is a YAML mapping")])
    try:
        spec = MappingSpec.model_validate(data)
    except ValidationError as exc:
        # every problem at once: the parts that are valid are checked as well
        problems, rest, dropped = _located_errors(located, exc), *_salvage_mapping(data, exc)
        try:
            partial = MappingSpec.model_validate(rest)
        except ValidationError:
            raise DefinitionError(problems) from None
        raise DefinitionError(
            sorted({*problems, *_semantic_problems(located, partial, policy, dropped)})
        ) from None
    found = _semantic_problems(located, spec, policy)
    if found:
        raise DefinitionError(found)
    return spec


def _semantic_problems(
    located: Located, spec: MappingSpec, policy: Policy | None,
    dropped: AbstractSet[str | int] = frozenset(),
) -> list[Problem]:
    """:func:`_check_mapping`'s problems, located; none about entries ``dropped`` (refused
    by the schema, already reported)."""
    unsure = dropped & {"fields", "category", "location"}  # (then "map the required…" is)
    return [
        located.problem(loc, message, key=at_key, suggestion=hint)
        for loc, message, hint, at_key in _check_mapping(spec, policy)
        if not dropped & set(loc[:2])
        and not (unsure and "required case field" in message)
    ]


def _salvage_mapping(
    data: dict[str, Any], exc: ValidationError
) -> tuple[dict[str, Any], set[str | int]]:
    """The mapping file without the entries pydantic refused (a field, a map or a
    top-level key), and what was dropped (their semantic checks would be noise)."""
    rest = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    dropped: set[str | int] = set()
    for err in exc.errors():
        loc = err["loc"]
        if len(loc) >= 2 and loc[0] in ("fields", "maps") and isinstance(rest.get(loc[0]), dict):
            rest[loc[0]].pop(loc[1], None)
            dropped.add(loc[1])
        elif loc:
            rest.pop(str(loc[0]), None)
            dropped.add(loc[0])
    return rest, dropped


_UNION_TAGS = ("str", "FieldSpec", "list[str]")


def _located_errors(located: Located, exc: ValidationError) -> list[Problem]:
    """pydantic errors as located problems; of a ``column | {spec}`` union only the
    alternative that fits the input's shape is reported."""
    errors = exc.errors()
    spec_paths = {
        tuple(e["loc"][: e["loc"].index("FieldSpec")]) for e in errors if "FieldSpec" in e["loc"]
    }
    out = []
    for err in errors:
        raw_loc = err["loc"]
        tag = next((p for p in raw_loc if p in _UNION_TAGS), None)
        if tag is not None:
            prefix = tuple(raw_loc[: raw_loc.index(tag)])
            value = err.get("input")
            if tag == "str" and prefix in spec_paths:
                continue  # the FieldSpec alternative explains it
            if tag == "FieldSpec" and len(raw_loc) == len(prefix) + 1 and not isinstance(
                value, dict
            ):
                loc = prefix
                out.append(located.problem(loc, "expected a column name or a mapping "
                                           "(column, map, default, format, ...)"))
                continue
        loc = tuple(p for p in raw_loc if p not in _UNION_TAGS and not (
            isinstance(p, str) and p.startswith(("function-", "union[", "dict[", "list["))))
        if err["type"] == "extra_forbidden":
            name = str(loc[-1]) if loc else "?"
            in_field = len(loc) >= 3 and loc[0] == "fields"
            hint = suggest(name, (FieldSpec if in_field else MappingSpec).model_fields)
            out.append(located.problem(loc, f"unknown key '{name}'", key=True, suggestion=hint))
            continue
        msg = "required" if err["type"] == "missing" else err["msg"]
        out.append(located.problem(loc, msg))
    return sorted(set(out))


def load_mapping(path: str | os.PathLike[str], policy: Policy | None = None) -> MappingSpec:
    """Read and validate a mapping file (see :func:`parse_mapping`)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DefinitionError([Problem(str(p), 1, 1, f"cannot read: {exc.strerror}")]) from None
    return parse_mapping(raw, path=str(p), policy=policy)


def default_mapping(columns: list[str] | None = None, **options: Any) -> MappingSpec:
    """The mapping used without a mapping file: each field from the column (or JSON key)
    of the same name, ``attributes.<name>`` (or ``attr.<name>``) columns to attributes."""
    fields: dict[str, str | FieldSpec] = {}
    for col in columns if columns is not None else list(TARGETS):
        if _target_ok(col):
            fields[col] = col
        elif col.startswith("attr.") and len(col) > len("attr."):
            fields["attributes." + col.removeprefix("attr.")] = col
    return MappingSpec(fields=fields, **options)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One imported row: the case as it was reported and what the log says happened next."""

    row: int  # line number in the source file (CSV: the line the record starts on)
    case: CaseIn
    filed_at: datetime | None = None
    dispatched_at: datetime | None = None
    accepted_at: datetime | None = None
    handled_at: datetime | None = None
    verified_at: datetime | None = None
    closed_at: datetime | None = None
    evaluated_at: datetime | None = None
    department: str | None = None  # the department that actually handled it
    satisfaction: str | None = None
    status: str | None = None  # closed | cancelled | deferred | open (None: from the times)
    on_spot: bool = False
    returns: int = 0
    rework: int = 0
    extension: str | None = None  # an approved extension, e.g. "2wd"

    @property
    def case_id(self) -> str:
        return self.case.id or f"row-{self.row}"

    def has_steps(self) -> bool:
        return any(getattr(self, f) is not None for f in STEP_FIELDS) or self.status is not None


@dataclass(frozen=True)
class RowError:
    row: int
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f" {self.field}:" if self.field else ""
        return f"row {self.row}:{where} {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "field": self.field, "message": self.message}


class LogImportError(GridflowRuntimeError):
    """The log cannot be imported (unreadable, or a bad row with ``on_error='fail'``)."""

    def __init__(self, source: str, error: RowError | str):
        self.source = source
        self.error = error
        if isinstance(error, RowError):
            where = f"{error.field}: " if error.field else ""
            text = f"{source}:{error.row}: {where}{error.message}"
        else:
            text = f"{source}: {error}"
        super().__init__(text)


@dataclass
class ImportReport:
    """Counts of an import; ``errors`` keeps the first 200 bad rows, ``by_field`` counts all."""

    source: str = ""
    rows: int = 0
    imported: int = 0
    bad: int = 0
    errors: list[RowError] = field(default_factory=list)
    by_field: Counter[str] = field(default_factory=Counter)

    def add(self, error: RowError) -> None:
        self.bad += 1
        self.by_field[error.field or "row"] += 1
        if len(self.errors) < _MAX_ERRORS_KEPT:
            self.errors.append(error)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "imported": self.imported,
            "bad_rows": self.bad,
            "bad_by_field": dict(sorted(self.by_field.items())),
            "errors": [e.to_dict() for e in self.errors],
        }


class _RowProblem(Exception):
    def __init__(self, field: str | None, message: str):
        self.field = field
        self.message = message


# --------------------------------------------------------------------------- conversion


Getter = Callable[[Any], Any]


def _column_getter(column: str | list[str], index: Mapping[str, int] | None, join: str) -> Getter:
    """Read a column from a CSV row (list, by ``index``) or a JSON object (dotted keys)."""
    columns = [column] if isinstance(column, str) else list(column)
    if index is not None:
        positions = [index[c] for c in columns]
        if len(positions) == 1:
            pos = positions[0]
            return lambda row: row[pos] if pos < len(row) else None
        return lambda row: join.join(
            row[p] for p in positions if p < len(row) and row[p] != ""
        ) or None
    paths = [c.split(".") for c in columns]

    def one(obj: Any, path: list[str]) -> Any:
        for part in path:
            if not isinstance(obj, dict):
                return None
            obj = obj.get(part)
        return obj

    if len(paths) == 1:
        p0 = paths[0]
        if len(p0) == 1:
            key = p0[0]
            return lambda obj: obj.get(key)
        return lambda obj: one(obj, p0)
    return lambda obj: join.join(
        str(v) for v in (one(obj, p) for p in paths) if v not in (None, "")
    ) or None


class _Converter:
    """A mapping compiled against one file's header into per-field readers."""

    def __init__(self, spec: MappingSpec, policy: Policy | None, index: Mapping[str, int] | None):
        self.spec = spec
        self.policy = policy
        self.zone = spec.zone
        self.true = {v.lower() for v in spec.true_values}
        self.false = {v.lower() for v in spec.false_values}
        self.readers: list[tuple[str, Callable[[Any], Any]]] = []
        attr_types = dict(policy.registry.attributes) if policy is not None else {}
        missing = []
        for target in spec.fields:
            fs = spec.spec(target)
            assert fs is not None
            if fs.column is not None and index is not None:
                cols = [fs.column] if isinstance(fs.column, str) else fs.column
                absent = [c for c in cols if c not in index]
                if absent:
                    missing += absent
                    continue
            kind = fs.type
            if kind is None and target.startswith("attributes."):
                kind = attr_types.get(target.removeprefix("attributes."))  # type: ignore[assignment]
            self.readers.append((target, self._reader(target, fs, index, kind)))
        if missing:
            raise _RowProblem(None, "the header has no column " + ", ".join(
                f"'{c}'" + (f" (did you mean '{h}'?)" if (h := suggest(c, index or {})) else "")
                for c in missing
            ))

    def _reader(
        self, target: str, fs: FieldSpec, index: Mapping[str, int] | None, kind: str | None
    ) -> Callable[[Any], Any]:
        if fs.column is not None:
            get = _column_getter(fs.column, index, fs.join)
        else:
            constant = fs.value

            def get(_row: Any) -> Any:
                return constant

        table = self.spec.maps.get(fs.map) if isinstance(fs.map, str) else fs.map
        default = fs.default
        unmapped = fs.unmapped
        formats = (
            ([fs.format] if isinstance(fs.format, str) else fs.format)
            if fs.format is not None else self.spec.date_formats
        )
        convert = self._converter(target, kind, formats)

        def read(row: Any) -> Any:
            value = get(row)
            if isinstance(value, str):
                value = value.strip()
            if value is None or value == "":
                value = default
                if value is None:
                    return None
            elif table is not None:
                key = value if isinstance(value, str) else json.dumps(value)
                if key in table:
                    value = table[key]
                    if value is None:
                        return None
                elif unmapped == "error":
                    raise _RowProblem(target, f"value '{key}' is not in the value map")
                elif unmapped == "null":
                    return None
            return convert(value) if convert is not None else value

        return read

    def _converter(
        self, target: str, kind: str | None, formats: list[str]
    ) -> Callable[[Any], Any] | None:
        if target in TIME_TARGETS:
            return lambda v: self._time(target, v, formats)
        if target in ("returns", "rework"):
            return lambda v: self._integer(target, v, minimum=0)
        if target == "on_spot" or kind == "boolean":
            return lambda v: self._boolean(target, v)
        if kind == "integer":
            return lambda v: self._integer(target, v)
        if kind == "number":
            return lambda v: self._number(target, v)
        if kind == "string" or target in CASE_FIELDS or target in OUTCOME_FIELDS:
            return lambda v: v if isinstance(v, str) else (
                json.dumps(v) if isinstance(v, bool) else str(v)
            )
        return None

    def _time(self, target: str, value: Any, formats: list[str]) -> datetime:
        if isinstance(value, datetime):
            parsed: datetime | None = value
        else:
            parsed = None
            text = str(value)
            for fmt in formats:
                try:
                    if fmt == "iso":
                        parsed = datetime.fromisoformat(text)
                    elif fmt in ("epoch", "epoch_ms"):
                        number = float(text) / (1000 if fmt == "epoch_ms" else 1)
                        parsed = datetime.fromtimestamp(number, UTC)
                    else:
                        parsed = datetime.strptime(text, fmt)
                except (ValueError, OverflowError, OSError):
                    continue
                break
        if parsed is None:
            raise _RowProblem(
                target, f"'{value}' matches none of the time formats ({', '.join(formats)})"
            )
        if parsed.tzinfo is None or parsed.utcoffset() is None:
            parsed = parsed.replace(tzinfo=self.zone)
        return parsed

    def _boolean(self, target: str, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in self.true:
            return True
        if text in self.false:
            return False
        raise _RowProblem(target, f"'{value}' is not a yes/no value (true_values/false_values)")

    @staticmethod
    def _integer(target: str, value: Any, minimum: int | None = None) -> int:
        if isinstance(value, bool):
            raise _RowProblem(target, f"expected a whole number, got {value!r}")
        try:
            number = int(value) if not isinstance(value, float) or value.is_integer() else None
        except ValueError:
            number = None
        if number is None:
            raise _RowProblem(target, f"expected a whole number, got {value!r}")
        if minimum is not None and number < minimum:
            raise _RowProblem(target, f"must be ≥ {minimum}, got {number}")
        return number

    @staticmethod
    def _number(target: str, value: Any) -> int | float:
        if isinstance(value, bool):
            raise _RowProblem(target, f"expected a number, got {value!r}")
        if isinstance(value, int | float):
            return value
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            raise _RowProblem(target, f"expected a number, got {value!r}") from None

    def record(self, row_number: int, row: Any) -> LogRecord:
        case: dict[str, Any] = {}
        attributes: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for target, read in self.readers:
            value = read(row)
            if value is None:
                continue
            if target in _CASE_SET:
                case[target] = value
            elif target.startswith("attributes."):
                attributes[target[11:]] = value
            else:
                extra[target] = value
        if attributes:
            case["attributes"] = attributes
        try:
            case_in = CaseIn.model_validate(case)
            if self.policy is not None:
                validate_case(self.policy.registry, case_in)
        except ValidationError as exc:
            err = exc.errors()[0]
            name = ".".join(str(p) for p in err["loc"]) or None
            msg = "required field missing" if err["type"] == "missing" else err["msg"]
            raise _RowProblem(name, msg) from None
        except CaseValidationError as exc:
            first = exc.errors[0]
            raise _RowProblem(first.field, first.message) from None
        if extra:
            self._check_outcome(extra, case_in)
        return LogRecord(row_number, case_in, **extra)

    def _check_outcome(self, extra: dict[str, Any], case: CaseIn) -> None:
        sat = extra.get("satisfaction")
        if sat is not None and sat not in SATISFACTION:
            raise _RowProblem("satisfaction", f"'{sat}' is not one of {', '.join(SATISFACTION)} "
                              "(map the log's values in the mapping file)")
        status = extra.get("status")
        if status is not None and status not in STATUSES:
            raise _RowProblem("status", f"'{status}' is not one of {', '.join(STATUSES)}")
        dept = extra.get("department")
        if dept is not None and self.policy is not None and \
                dept not in self.policy.registry.departments:
            hint = suggest(dept, self.policy.registry.departments)
            raise _RowProblem("department", f"unknown department '{dept}'"
                              + (f" (did you mean '{hint}'?)" if hint else ""))
        ext = extra.get("extension")
        if ext is not None:
            try:
                extra["extension"] = str(parse_duration(ext))
            except ValueError as exc:
                raise _RowProblem("extension", str(exc)) from None
        previous, previous_name = case.reported_at, "reported_at"
        for name in STEP_FIELDS:
            when = extra.get(name)
            if when is None:
                continue
            if previous is not None and when < previous:
                raise _RowProblem(name, f"{when.isoformat()} precedes {previous_name} "
                                  f"({previous.isoformat()})")
            previous, previous_name = when, name


_CASE_SET = frozenset(CASE_FIELDS)


# --------------------------------------------------------------------------- reading


class _CountingReader(io.RawIOBase):
    """A binary file that counts the bytes handed out (for progress bars)."""

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.count += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


class LogReader:
    """Iterate over the valid records of a log; bad rows go to :attr:`report`.

    Each iteration re-reads the file from the start with a fresh :attr:`report`.
    ``on_error`` overrides the mapping's (``"skip"`` or ``"fail"``). ``policy`` makes rows
    with unknown categories/units/channels/attributes/departments bad rows at import.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        mapping: MappingSpec | None = None,
        *,
        policy: Policy | None = None,
        on_error: Literal["skip", "fail"] | None = None,
        format: Literal["csv", "jsonl"] | None = None,
    ):
        self.path = Path(path)
        self.mapping = mapping
        self.policy = policy
        self.on_error = on_error or (mapping.on_error if mapping is not None else "skip")
        self.format = format or (mapping.format if mapping is not None else None) or _guess(
            self.path
        )
        self.report = ImportReport(source=self.path.name)
        self._counter: _CountingReader | None = None

    @property
    def size(self) -> int:
        """The file's size in bytes."""
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    @property
    def bytes_read(self) -> int:
        """Bytes consumed so far by the running iteration (for a progress bar)."""
        return self._counter.count if self._counter is not None else 0

    def has_steps(self) -> bool:
        """Whether the log carries later steps (by the mapping, or the file's header)."""
        if self.mapping is not None:
            return self.mapping.has_steps()
        return any(t in (*STEP_FIELDS, "status", "on_spot") for t in self._header())

    def _header(self) -> list[str]:
        try:
            with self.path.open(encoding="utf-8-sig", newline="") as f:
                if self.format == "csv":
                    return next(csv.reader(f), [])
                line = f.readline()
                obj = json.loads(line) if line.strip() else {}
                return list(obj) if isinstance(obj, dict) else []
        except (OSError, ValueError, UnicodeDecodeError):
            return []

    def __iter__(self) -> Iterator[LogRecord]:
        self.report = ImportReport(source=self.path.name)
        try:
            raw = self.path.open("rb")
        except OSError as exc:
            raise LogImportError(str(self.path), f"cannot read: {exc.strerror}") from None
        counter = self._counter = _CountingReader(raw)
        encoding = self.mapping.encoding if self.mapping is not None else "utf-8-sig"
        text = io.TextIOWrapper(io.BufferedReader(counter, 1 << 16), encoding=encoding,
                                newline="")
        try:
            rows = self._csv(text) if self.format == "csv" else self._jsonl(text)
            yield from self._convert(rows)
        except UnicodeDecodeError as exc:
            raise LogImportError(
                str(self.path),
                f"not {encoding} text ({exc.reason}) after row {self.report.rows}",
            ) from None
        finally:
            text.close()

    def _mapping_for(self, columns: list[str] | None) -> MappingSpec:
        if self.mapping is not None:
            return self.mapping
        return default_mapping(columns)

    def _csv(self, text: IO[str]) -> Iterator[tuple[int, Any, _Converter | None]]:
        delimiter = self.mapping.delimiter if self.mapping is not None else ","
        reader = csv.reader(text, delimiter=delimiter, strict=False)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise LogImportError(str(self.path), f"line 1: {exc}") from None
        index = {name.strip(): i for i, name in enumerate(header)}
        try:
            converter = _Converter(self._mapping_for(list(index)), self.policy, index)
        except _RowProblem as exc:
            raise LogImportError(str(self.path), f"line 1: {exc.message}") from None
        line = reader.line_num
        width = len(header)
        while True:
            start = line + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield start, _RowProblem(None, f"unreadable CSV: {exc}"), None
                line = reader.line_num
                continue
            line = reader.line_num
            if not row:
                continue  # blank line
            if len(row) > width:
                yield start, _RowProblem(None, f"{len(row)} values for {width} columns"), None
                continue
            yield start, row, converter

    def _jsonl(self, text: IO[str]) -> Iterator[tuple[int, Any, _Converter | None]]:
        fixed = (
            _Converter(self.mapping, self.policy, None) if self.mapping is not None else None
        )
        by_keys: dict[tuple[str, ...], _Converter] = {}  # no mapping: one per key set
        for number, line in enumerate(text, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, _RowProblem(None, f"invalid JSON: {exc.msg} (col {exc.colno})"), None
                continue
            if not isinstance(obj, dict):
                yield number, _RowProblem(None, "expected a JSON object"), None
                continue
            converter = fixed
            if converter is None:
                attrs = obj.get("attributes")
                if attrs is not None and not isinstance(attrs, dict):
                    yield number, _RowProblem("attributes", "expected a JSON object"), None
                    continue
                keys = tuple(k for k in obj if k != "attributes") + tuple(
                    f"attributes.{k}" for k in attrs or ()  # read as a dotted path
                )
                converter = by_keys.get(keys)
                if converter is None:
                    if len(by_keys) > 256:
                        by_keys.clear()
                    converter = by_keys[keys] = _Converter(
                        default_mapping(list(keys)), self.policy, None
                    )
            yield number, obj, converter

    def _convert(
        self, rows: Iterator[tuple[int, Any, _Converter | None]]
    ) -> Iterator[LogRecord]:
        report = self.report
        fail = self.on_error == "fail"
        ids: set[str] = set()  # a case id twice would be counted, routed and replayed twice
        for number, row, converter in rows:
            report.rows += 1
            try:
                if converter is None:
                    raise row
                record = converter.record(number, row)
                case_id = record.case.id
                if case_id is not None:
                    if case_id in ids:
                        raise _RowProblem("id", f"case id '{case_id}' is on an earlier row")
                    ids.add(case_id)
            except _RowProblem as exc:
                error = RowError(number, exc.field, exc.message)
                report.add(error)
                if fail:
                    raise LogImportError(str(self.path), error) from None
                continue
            report.imported += 1
            yield record


def _guess(path: Path) -> Literal["csv", "jsonl"]:
    suffixes = [s.lower() for s in path.suffixes]
    if ".jsonl" in suffixes or ".ndjson" in suffixes or ".json" in suffixes:
        return "jsonl"
    return "csv"
