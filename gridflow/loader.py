"""Load a policy directory: located YAML → validated models → checked references → Policy.

Every problem of the directory is collected in one pass and raised together as a
:class:`~gridflow.errors.DefinitionError` whose lines read ``path:line:col: message``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, time, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from gridflow import analysis, workflow
from gridflow.calendar import BusinessCalendar, CalendarYear, parse_duration
from gridflow.compiler import (
    CompiledRules,
    RuleSpec,
    RuleTooComplex,
    TableSpec,
    category_scope,
    check_regex,
)
from gridflow.conditions import CATEGORY, LowerContext, Predicate, lower_when
from gridflow.errors import (
    CaseValidationError,
    DefinitionError,
    Problem,
    plain_message,
    suggest,
    suggest_choice,
)
from gridflow.policy import Lifecycle
from gridflow.registry import DEFAULT_CHANNELS, CategoryInfo, DepartmentInfo, Registry, UnitInfo
from gridflow.routing import Router, RouteRule, validate_case
from gridflow.schema import (
    AppealsSpec,
    AttributeDef,
    CalendarSpec,
    Category,
    Department,
    DurationText,
    EscalationSpec,
    EvaluationSpec,
    Organisation,
    Outcome,
    PolicyFile,
    PolicyMeta,
    Routing,
    Rule,
    RuleTest,
    SupervisionSpec,
    Table,
    Unit,
)
from gridflow.yamlsrc import BAD_SCALAR, Limits, Located, read_yaml

__all__ = ["LoadedTest", "PolicySource", "load_policy", "read_sources"]

YPath = tuple[str | int, ...]
_NOT_AN_ID = re.compile(r"'([^']+)' is not an id")
DEFAULT_LEVELS = ("district", "street", "community", "grid")


@dataclass
class PolicySource:
    """The raw, validated files of a policy directory (before cross-checks)."""

    root: Path
    files: list[tuple[Located, PolicyFile]]
    version: str
    problems: list[Problem] = field(default_factory=list)
    #: files that could not be read at all (whatever they define is missing)
    unreadable: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LoadedTest:
    name: str
    source: str
    case: Any  # CaseIn
    expect: Any  # Expectation
    earlier: tuple[Any, ...] = ()  # CaseIn: the history the case is routed with


# --- reading and schema validation --------------------------------------------------------


def _yaml_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith((".yaml", ".yml")) and not name.startswith("."):
                found.append(Path(dirpath) / name)
    return sorted(found)


def _model_at(model: type[BaseModel], path: YPath) -> type[BaseModel] | None:
    """The pydantic model that describes the mapping at ``path`` (for key suggestions)."""
    current: Any = model
    for part in path:
        current = _unwrap_model(current)
        if current is None:
            return None
        if isinstance(current, type) and issubclass(current, BaseModel):
            if isinstance(part, int):
                return None
            fld = next(
                (f for n, f in current.model_fields.items() if (f.alias or n) == part or n == part),
                None,
            )
            if fld is None:
                return None
            current = fld.annotation
        else:
            current = _element(current)
    unwrapped = _unwrap_model(current)
    return unwrapped if isinstance(unwrapped, type) and issubclass(unwrapped, BaseModel) else None


def _element(tp: Any) -> Any:
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (list, tuple) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def _unwrap_model(tp: Any) -> Any:
    """Strip Optional/Annotated/Union to the single model or container inside."""
    if tp is None:
        return None
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap_model(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        models = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        containers = [a for a in inner if typing.get_origin(a) in (list, dict)]
        if models:
            return models[0]
        if containers:
            return containers[0]
        return inner[0] if inner else None
    return tp


def _readable(data: Any, path: YPath) -> str:
    """A path for people: list items by their id, name or code (``routing.tables[main]
    .rules[home-repair].then.time_limit``), else by their 1-based position."""
    out = ""
    current = data
    for part in path:
        if isinstance(part, int):
            item = current[part] if isinstance(current, list) and part < len(current) else None
            label = next((item[k] for k in ("id", "code", "name")
                          if isinstance(item, dict) and isinstance(item.get(k), str)), None)
            out += f"[{label if label is not None else f'#{part + 1}'}]"
            current = item
        else:
            out += f".{part}" if out else str(part)
            current = current.get(part) if isinstance(current, dict) else None
    return out or "file"


def _misplaced(key: str, at: YPath) -> str | None:
    """Where a key that is unknown at ``at`` belongs, when it is one level off (the usual
    indentation slip): under the mapping above, or under one of this mapping's keys."""
    above = _model_at(PolicyFile, at[:-1]) if at else None
    if above is not None and key in _model_keys(above) and not isinstance(at[-1], int):
        return f"it belongs one level up, beside '{at[-1]}' (check its indentation)"
    # under one of this mapping's keys, or of the mapping above (a sibling of this one)
    for base in (at, at[:-1]) if at and not isinstance(at[-1], int) else (at,):
        model = _model_at(PolicyFile, base)
        for name in _model_keys(model) if model is not None else []:
            below = _model_at(PolicyFile, (*base, name))
            if below is not None and key in _model_keys(below) and (*base, name) != at:
                return f"it belongs under '{name}' (check its indentation)"
    return None


def _expects_duration(path: YPath) -> bool:
    """Whether the value at ``path`` is a duration (a time limit, a window...)."""
    parent = _model_at(PolicyFile, path[:-1]) if path else None
    fld = parent.model_fields.get(str(path[-1])) if parent is not None else None
    return fld is not None and _mentions(fld.annotation, DurationText)


def _mentions(tp: Any, target: Any) -> bool:
    return tp == target or any(_mentions(a, target) for a in typing.get_args(tp))


def _duration_forms() -> str:
    try:
        parse_duration("")
    except ValueError as exc:
        return str(exc).split("; ", 1)[-1]
    raise AssertionError("an empty duration parsed")


def _model_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def _navigable(data: Any, loc: Iterable[Any]) -> YPath:
    """The prefix of a pydantic error location that walks through the actual data."""
    out: list[str | int] = []
    current = data
    for part in loc:
        if isinstance(current, dict) and isinstance(part, str) and part in current:
            out.append(part)
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            out.append(part)
            current = current[part]
        elif isinstance(current, dict) and isinstance(part, str | int) and str(part) in current:
            out.append(str(part))
            current = current[str(part)]
    return tuple(out)


def _schema_problems(located: Located, exc: ValidationError, prefix: YPath = ()) -> list[Problem]:
    grouped: dict[YPath, list[dict[str, Any]]] = {}
    for err in exc.errors():
        real = _navigable(located.data, (*prefix, *err["loc"]))
        grouped.setdefault(real, []).append(dict(err))
    # keep only the deepest paths: an error at a.b hides union noise at a
    paths = list(grouped)
    keep = [p for p in paths if not any(q != p and q[: len(p)] == p for q in paths)]
    problems = []
    for p in keep:
        if p in located.bad:
            continue  # already reported by the YAML reader
        errs = grouped[p]
        extra = [e for e in errs if e["type"] == "extra_forbidden"]
        if extra:
            key = p[-1] if p else "?"
            parent = _model_at(PolicyFile, p[:-1])
            hint = suggest(str(key), _model_keys(parent)) if parent else None
            moved = _misplaced(str(key), p[:-1]) if not hint else None
            allowed = f" (allowed: {', '.join(_model_keys(parent))})" if parent and not hint else ""
            problems.append(located.problem(
                p, f"unknown key '{key}'" + (f": {moved}" if moved else allowed),
                key=True, suggestion=hint))
            continue
        missing = [e for e in errs if e["type"] == "missing"]
        if missing:
            names = sorted({str(e["loc"][-1]) for e in missing})
            problems.append(located.problem(p, f"missing required key(s): {', '.join(names)}"))
            continue
        messages: list[str] = []
        value_errors = [e for e in errs if e["type"] == "value_error"]
        for e in value_errors or errs:
            msg = plain_message(e)
            if msg not in messages:
                messages.append(msg)
        number = errs[0].get("input")
        if (isinstance(number, int | float) and not isinstance(number, bool)
                and _expects_duration(p)):
            messages = [f"{number} has no unit: " + _duration_forms()]
        where = _readable(located.data, p)
        hint = next(filter(None, map(suggest_choice, errs)), None)
        problems.append(located.problem(p, f"{where}: " + " or ".join(messages[:3]),
                                        suggestion=hint))
    return problems


_ITEM_MODELS: dict[str, type[BaseModel]] = {
    "departments": Department,
    "categories": Category,
    "attributes": AttributeDef,
    "tests": RuleTest,
}


def _validate(
    model: type[BaseModel], value: Any, located: Located, path: YPath, problems: list[Problem]
) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        problems += _schema_problems(located, exc, path)
        return None


def _salvage(located: Located) -> tuple[PolicyFile, list[Problem]]:
    """Validate a failing file piece by piece, keeping every valid item in place.

    Invalid list items become ``None`` (indices keep matching the YAML), so the
    cross-file checks still run on the rest and report their problems in the same pass.
    """
    problems: list[Problem] = []
    fields: dict[str, Any] = {}
    data: dict[str, Any] = located.data
    for key, value in data.items():
        if key not in PolicyFile.model_fields:
            problems += _schema_problems(
                located,
                ValidationError.from_exception_data(
                    "PolicyFile", [{"type": "extra_forbidden", "loc": (key,), "input": value}]
                ),
            )
            continue
        if key == "categories" and isinstance(value, list):
            fields[key] = [
                _salvage_tree(Category, item, located, (key, i), problems)
                for i, item in enumerate(value)
            ]
        elif key == "organisation" and isinstance(value, dict):
            fields[key] = _salvage_organisation(located, value, problems)
        elif key == "departments" and isinstance(value, list):
            fields[key] = [
                _validate(Department, item, located, (key, i), problems)
                or _placeholder_department(item)
                for i, item in enumerate(value)
            ]
        elif key in _ITEM_MODELS and isinstance(value, list):
            fields[key] = [
                _validate(_ITEM_MODELS[key], item, located, (key, i), problems)
                for i, item in enumerate(value)
            ]
        elif key == "routing" and isinstance(value, dict):
            fields[key] = _salvage_routing(located, value, problems)
        else:
            part = _validate(PolicyFile, {key: value}, located, (), problems)
            if part is not None:
                fields[key] = getattr(part, key)
    return PolicyFile.model_construct(**fields), problems


def _salvage_tree(
    model: type[Category] | type[Unit],
    value: Any,
    located: Located,
    path: YPath,
    problems: list[Problem],
) -> Any:
    """Validate a node without its children, then each child: one bad leaf keeps its siblings."""
    if not isinstance(value, dict) or not isinstance(value.get("children", []), list):
        return _validate(model, value, located, path, problems)
    node = _validate(model, {**value, "children": []}, located, path, problems)
    children = [
        _salvage_tree(model, c, located, (*path, "children", i), problems)
        for i, c in enumerate(value.get("children", []))
    ]
    kept = [c for c in children if c is not None]
    if node is None:  # keep a readable id known, so its uses are not reported again
        ident = value.get("code" if model is Category else "id")
        if not isinstance(ident, str):
            return None
        fields: dict[str, Any] = {name: None for name in model.model_fields}
        fields.update(
            {k: v for k, v in value.items() if k in model.model_fields and isinstance(v, str)}
        )
        fields["children"] = kept
        fields["name"] = str(value.get("name", ident))
        return model.model_construct(**fields)
    return node.model_copy(update={"children": kept})


def _salvage_organisation(
    located: Located, value: dict[str, Any], problems: list[Problem]
) -> Organisation | None:
    units = value.get("units", [])
    if not isinstance(units, list):
        whole: Organisation | None = _validate(
            Organisation, value, located, ("organisation",), problems
        )
        return whole
    head = _validate(Organisation, {**value, "units": []}, located, ("organisation",), problems)
    salvaged = [
        _salvage_tree(Unit, u, located, ("organisation", "units", i), problems)
        for i, u in enumerate(units)
    ]
    if head is None:
        return None
    org: Organisation = head.model_copy(update={"units": [u for u in salvaged if u is not None]})
    return org


_BROKEN = "\0invalid"  # marks a placeholder built from an invalid definition


def _placeholder_department(raw: Any) -> Department | None:
    """An invalid department whose id is readable still counts as known (no cascades)."""
    if isinstance(raw, dict) and isinstance(raw.get("id"), str):
        tier = raw.get("tier") if isinstance(raw.get("tier"), str) else None
        return Department.model_construct(
            id=raw["id"],
            name=str(raw.get("name", raw["id"])),
            name_en=_BROKEN,
            tier=tier or "",
            unit=None,
            pools=[],
        )
    return None


def _salvage_routing(located: Located, value: dict[str, Any], problems: list[Problem]) -> Routing:
    header = {k: v for k, v in value.items() if k != "tables"}
    routing = _validate(Routing, header, located, ("routing",), problems)
    tables: list[Table | None] = []
    raw_tables = value.get("tables", [])
    if not isinstance(raw_tables, list):
        _validate(Routing, {"tables": raw_tables}, located, ("routing",), problems)
        raw_tables = []
    for t_i, raw in enumerate(raw_tables):
        tpath: YPath = ("routing", "tables", t_i)
        if not isinstance(raw, dict) or not isinstance(raw.get("rules", []), list):
            tables.append(_validate(Table, raw, located, tpath, problems))
            continue
        head = _validate(Table, {**raw, "rules": []}, located, tpath, problems)
        rules = [
            _validate(Rule, r, located, (*tpath, "rules", r_i), problems)
            for r_i, r in enumerate(raw.get("rules", []))
        ]
        tables.append(
            None
            if head is None
            else Table.model_construct(
                id=head.id, description=head.description, hit=head.hit, rules=rules
            )
        )
    default = routing.default if routing is not None else None
    return Routing.model_construct(default=default, tables=tables)  # type: ignore[arg-type]


#: problems after which a file is still read: a duplicate key (the first value is kept), a
#: value YAML cannot construct (kept as text; its schema error is not repeated)
_READABLE = ("duplicate key", f"{BAD_SCALAR} date '", f"{BAD_SCALAR} value '")


def read_sources(root: str | os.PathLike[str], limits: Limits | None = None) -> PolicySource:
    """Read and schema-validate every rule file under ``root`` (no cross-file checks)."""
    base = Path(root)
    problems: list[Problem] = []
    files: list[tuple[Located, PolicyFile]] = []
    unreadable: list[str] = []
    digest = hashlib.sha256()
    if not base.exists():
        raise DefinitionError([Problem(str(base), 1, 1, "policy directory does not exist")])
    paths = _yaml_files(base)
    if not paths:
        raise DefinitionError([Problem(str(base), 1, 1, "no *.yaml rule files found")])
    for path in paths:
        display = os.path.relpath(path) if not path.is_absolute() else str(path)
        display = str(path) if display.startswith("..") else display
        raw = path.read_bytes()
        rel = path.relative_to(base).as_posix() if base.is_dir() else path.name
        digest.update(rel.encode() + b"\0" + raw + b"\0")
        located, found = read_yaml(display, raw, limits)
        problems += found
        if located.data is None or any(not p.message.startswith(_READABLE) for p in found):
            unreadable.append(display)  # nothing trustworthy in it
            continue
        if located.data is None or located.data == {}:
            continue
        if not isinstance(located.data, dict):
            problems.append(located.problem((), "a rule file must be a mapping of sections"))
            continue
        try:
            model = PolicyFile.model_validate(located.data)
        except ValidationError:
            model, found = _salvage(located)
            problems += found
        files.append((located, model))
    return PolicySource(base, files, digest.hexdigest()[:16], problems, unreadable)


# --- cross-file assembly ------------------------------------------------------------------


class _Builder:
    def __init__(self, source: PolicySource, today: date | None, strict: bool = True):
        self.source = source
        self.today = today
        self.lint_severity = "error" if strict else "warning"
        self.problems: list[Problem] = list(source.problems)
        self.singletons: dict[str, tuple[Located, Any]] = {}
        self.incomplete = bool(source.problems)

    def err(
        self,
        located: Located,
        path: YPath,
        message: str,
        *,
        key: bool = False,
        suggestion: str | None = None,
        severity: str = "error",
    ) -> None:
        self.problems.append(
            located.problem(path, message, key=key, suggestion=suggestion, severity=severity)
        )

    def err_dir(self, message: str, severity: str = "error") -> None:
        """A problem of the directory as a whole (a section no file has)."""
        self.problems.append(Problem(str(self.source.root), 1, 1, message, severity=severity))

    def single(self, name: str, value: Any, located: Located, path: YPath) -> None:
        if value is None:
            return
        if name in self.singletons:
            other, _ = self.singletons[name]
            line, _col = other.where(path, key=True)
            self.err(located, path, f"'{name}' is already defined in {other.path}:{line}", key=True)
            return
        self.singletons[name] = (located, value)

    def name_hints(self, reg: Registry) -> None:
        """Where a display name stands for an id (``lead: 街道环卫所``), suggest the id."""
        ids = {u.name: u.id for u in reg.units.values()}
        ids.update({name: level for level, name in reg.level_names.items()})
        ids.update({d.name: d.id for d in reg.departments.values()})
        for i, p in enumerate(self.problems):
            m = _NOT_AN_ID.search(p.message)
            if m and p.suggestion is None and m.group(1) in ids:
                self.problems[i] = dataclasses.replace(p, suggestion=ids[m.group(1)])

    # organisation ------------------------------------------------------------------------

    def registry(self) -> Registry | None:
        for located, model in self.source.files:
            self.single("policy", model.policy, located, ("policy",))
            self.single("organisation", model.organisation, located, ("organisation",))
            self.single("calendar", model.calendar, located, ("calendar",))
            for name in ("workflow", "supervision", "escalation", "appeals", "evaluation",
                         "scoring"):
                self.single(name, getattr(model, name), located, (name,))
            if model.routing is not None:
                self.single(
                    "routing.default", model.routing.default, located, ("routing", "default")
                )
        if "organisation" not in self.singletons:
            self.err_dir("no 'organisation' section in any rule file")
            return None
        org_loc, org = self.singletons["organisation"]
        org = typing.cast(Organisation, org)
        levels = tuple(lv.id for lv in org.levels) or DEFAULT_LEVELS
        if len(set(levels)) != len(levels):
            self.err(org_loc, ("organisation", "levels"), "duplicate level ids")
        tiers = tuple(org.tiers) if org.tiers else tuple(reversed(levels))
        if org.tiers and len(set(tiers)) != len(tiers):
            self.err(org_loc, ("organisation", "tiers"), "duplicate tiers")
        units: dict[str, UnitInfo] = {}

        def add_unit(u: Unit, path: YPath, parent: UnitInfo | None) -> None:
            if u.level not in levels:
                self.err(
                    org_loc,
                    (*path, "level"),
                    f"unknown level '{u.level}'",
                    suggestion=suggest(u.level, levels),
                )
                return
            expected = 0 if parent is None else levels.index(parent.level) + 1
            if levels.index(u.level) != expected and parent is not None:
                self.err(
                    org_loc,
                    (*path, "level"),
                    f"unit '{u.id}' is a '{u.level}' inside '{parent.level}' "
                    f"'{parent.id}'; expected level "
                    f"'{levels[expected] if expected < len(levels) else '-'}'",
                )
            if u.id in units:
                self.err(org_loc, (*path, "id"), f"duplicate unit id '{u.id}'")
                return
            ancestry = dict(parent.ancestry) if parent else {}
            ancestry[u.level] = u.id
            info = UnitInfo(
                u.id,
                u.name,
                u.level,
                parent.id if parent else None,
                ancestry,
                tuple(c.id for c in u.children),
            )
            units[u.id] = info
            for i, child in enumerate(u.children):
                add_unit(child, (*path, "children", i), info)

        for i, u in enumerate(org.units):
            add_unit(u, ("organisation", "units", i), None)

        departments: dict[str, DepartmentInfo] = {}
        categories: dict[str, CategoryInfo] = {}
        attributes: dict[str, str] = {}
        attribute_values: dict[str, tuple[Any, ...] | None] = {}
        self.locations: dict[tuple[str, str], tuple[Located, YPath]] = {}
        for located, model in self.source.files:
            for i, d in enumerate(model.departments or []):
                path: YPath = ("departments", i)
                if d is None:
                    continue
                if d.id in departments:
                    self.err(located, (*path, "id"), f"duplicate department id '{d.id}'")
                    continue
                if d.name_en == _BROKEN:  # already reported; known so its uses stay quiet
                    departments[d.id] = DepartmentInfo(d.id, d.name, d.tier, None, (), _BROKEN)
                    continue
                if d.tier not in tiers:
                    self.err(
                        located,
                        (*path, "tier"),
                        f"unknown tier '{d.tier}'",
                        suggestion=suggest(d.tier, tiers),
                    )
                if d.unit is not None and d.unit not in units:
                    self.err(
                        located,
                        (*path, "unit"),
                        f"unknown unit '{d.unit}'",
                        suggestion=suggest(d.unit, units),
                    )
                pools = [p.id for p in d.pools]
                if len(set(pools)) != len(pools):
                    self.err(located, (*path, "pools"), "duplicate pool ids")
                handlers = [h.id for h in d.handlers]
                if len(set(handlers)) != len(handlers):
                    self.err(located, (*path, "handlers"), "duplicate handler ids")
                departments[d.id] = DepartmentInfo(
                    d.id, d.name, d.tier, d.unit, tuple(pools), d.name_en, tuple(handlers)
                )
                self.locations[("department", d.id)] = (located, path)
            for i, c in enumerate(model.categories or []):
                if c is None:
                    continue
                self._add_category(
                    located, c, ("categories", i), None, None, "normal", None, categories
                )
            for i, a in enumerate(model.attributes or []):
                if a is None:
                    continue
                if a.name in attributes:
                    self.err(located, ("attributes", i, "name"), f"duplicate attribute '{a.name}'")
                    continue
                attributes[a.name] = a.type
                attribute_values[a.name] = tuple(a.values) if a.values is not None else None
        meta = typing.cast(PolicyMeta | None, self.singletons.get("policy", (None, None))[1])
        channels = tuple(meta.channels) if meta and meta.channels else DEFAULT_CHANNELS
        # (without them every use would be reported too: one line says it instead)
        if not categories:
            self.incomplete = True
            self.err_dir("no categories defined in any rule file (a 'categories' list)")
        if not departments:
            self.incomplete = True
            self.err_dir("no departments defined in any rule file (a 'departments' list)")
        return Registry(
            levels=levels,
            level_names={lv.id: lv.name or lv.id for lv in org.levels},
            tiers=tiers,
            units=units,
            departments=departments,
            categories=categories,
            attributes=attributes,
            attribute_values=attribute_values,
            channels=channels,
            timezone=org.timezone,
            name=meta.name if meta else (org.name or self.source.root.name),
        )

    def _add_category(
        self,
        located: Located,
        c: Category,
        path: YPath,
        parent: str | None,
        group: str | None,
        urgency: str,
        limit: Any,
        out: dict[str, CategoryInfo],
    ) -> None:
        if c.code in out:
            self.err(located, (*path, "code"), f"duplicate category code '{c.code}'")
            return
        urgency = c.urgency or urgency
        limit = c.time_limit if c.time_limit is not None else limit
        if isinstance(c.time_limit, dict) and "normal" not in c.time_limit:
            self.err(located, (*path, "time_limit"), "a time limit by urgency must give 'normal'")
        out[c.code] = CategoryInfo(c.code, c.name, parent, group or c.code, urgency, limit, c.kind)
        self.locations[("category", c.code)] = (located, path)
        for i, child in enumerate(c.children):
            self._add_category(
                located, child, (*path, "children", i), c.code, group or c.code, urgency, limit, out
            )

    # calendar ----------------------------------------------------------------------------

    def calendar(self, reg: Registry) -> BusinessCalendar | None:
        located, spec = self.singletons.get("calendar", (None, None))
        spec = typing.cast(CalendarSpec, spec) if spec is not None else CalendarSpec()
        periods: list[tuple[time, time]] = []
        for i, text in enumerate(spec.working_hours):
            start_s, end_s = text.split("-")
            try:
                periods.append(
                    (time.fromisoformat(start_s.zfill(5)), time.fromisoformat(end_s.zfill(5)))
                )
            except ValueError as exc:
                if located:
                    self.err(located, ("calendar", "working_hours", i), f"bad time: {exc}")
                return None
        years = []
        for year, ys in sorted(spec.years.items()):
            ypath: YPath = ("calendar", "years", str(year))
            holidays: dict[date, str] = {}
            bad = False
            for i, span in enumerate(ys.holidays):
                end = span.end or span.start
                if span.start.year != year or end.year != year or end < span.start:
                    bad = True
                    self.err(
                        typing.cast(Located, located),
                        (*ypath, "holidays", i),
                        f"holiday span {span.start}..{end} must lie inside {year} "
                        "and end after it starts",
                    )
                    continue
                day = span.start
                while day <= end:
                    holidays[day] = span.name
                    day += timedelta(days=1)
            for i, day in enumerate(ys.workdays):
                problem = None
                if day.year != year:
                    problem = f"make-up workday {day} belongs to year {day.year}, not {year}"
                elif day.isoweekday() < 6:
                    problem = (
                        f"make-up workday {day} is a weekday ({day.strftime('%A')}); "
                        "make-up workdays (调休) fall on weekends"
                    )
                elif day in holidays:
                    problem = f"{day} is listed both as a holiday and as a make-up workday"
                if problem:
                    bad = True
                    self.err(typing.cast(Located, located), (*ypath, "workdays", i), problem)
            if bad:
                continue
            try:
                years.append(CalendarYear(year, holidays, frozenset(ys.workdays)))
            except ValueError as exc:
                if located:
                    self.err(located, ypath, str(exc))
        try:
            cal = BusinessCalendar(
                timezone=reg.timezone, working_periods=periods, years=years, closures=spec.closures
            )
        except (ValueError, KeyError) as exc:
            if located:
                self.err(located, ("calendar",), f"invalid calendar: {exc}")
            else:
                self.problems.append(
                    Problem(str(self.source.root), 1, 1, f"invalid calendar: {exc}")
                )
            return None
        if self.today is not None:
            left = cal.days_until_uncovered(self.today)
            if left <= 60:
                message = (f"holiday data ends on {cal.last_covered_day} ({left} days from "
                           f"{self.today}); add the next year under calendar.years")
                if located is not None:
                    self.err(located, ("calendar",), message, severity="warning")
                elif not self.source.unreadable and not any(  # (a broken calendar's)
                        "calendar" in loc.data for loc, _ in self.source.files):
                    self.err_dir(message, severity="warning")
        return cal

    # routing -----------------------------------------------------------------------------

    def outcome(self, reg: Registry, located: Located, o: Outcome, path: YPath) -> None:
        def dept(d: str, p: YPath) -> None:
            if d not in reg.departments and reg.departments:
                self.err(
                    located, p, f"unknown department '{d}'", suggestion=suggest(d, reg.departments)
                )

        dept(o.lead, (*path, "lead"))
        for i, d in enumerate(o.assist):
            dept(d, (*path, "assist", i))
        for i, d in enumerate(o.summon):
            dept(d, (*path, "summon", i))
        if o.tier is not None and o.tier not in reg.tiers:
            self.err(
                located,
                (*path, "tier"),
                f"unknown tier '{o.tier}'",
                suggestion=suggest(o.tier, reg.tiers),
            )
        if o.pool is not None and o.handler is not None:
            self.err(located, (*path, "handler"),
                     "a rule routes to a pool or to a named handler, not both")
        lead = reg.departments.get(o.lead)
        if lead is not None and lead.name_en != _BROKEN:
            for key, value, known in (("pool", o.pool, lead.pools),
                                      ("handler", o.handler, lead.handlers)):
                if value is not None and value not in known:
                    self.err(
                        located,
                        (*path, key),
                        f"'{value}' is not a {key} of department '{o.lead}'"
                        + (f" ({key}s: {', '.join(known)})" if known else
                           f" (it has no {key}s)"),
                        suggestion=suggest(value, known),
                    )
        if isinstance(o.time_limit, dict) and "normal" not in o.time_limit:
            self.err(located, (*path, "time_limit"), "a time limit by urgency must give 'normal'")
        for i, n in enumerate(o.notify):
            npath = (*path, "notify", i)
            if n.broadcast is None and n.department is None:
                self.err(located, npath, "notify needs 'broadcast' or 'department'")
            for key, value in (("broadcast", n.broadcast), ("within", n.within)):
                if value is not None and value not in reg.levels:
                    self.err(
                        located,
                        (*npath, key),
                        f"unknown level '{value}'",
                        suggestion=suggest(value, reg.levels),
                    )
            if n.department is not None:
                dept(n.department, (*npath, "department"))

    def routing(self, reg: Registry) -> tuple[list[TableSpec], list[list[RouteRule]]]:
        ctx = LowerContext(
            levels=reg.levels,
            units_by_level={lv: frozenset(reg.units_at(lv)) for lv in reg.levels},
            categories=frozenset(reg.categories),
            channels=frozenset(reg.channels),
            attributes=reg.attributes,
            attribute_values=reg.attribute_values,
            check_regex=check_regex,
        )
        specs: list[TableSpec] = []
        rules: list[list[RouteRule]] = []
        codes = sorted(reg.categories)
        table_ids: dict[str, str] = {}
        rule_ids: dict[str, str] = {}
        self.rule_ids = rule_ids
        self.rule_locs: list[list[tuple[Located, YPath]]] = []
        for located, model in self.source.files:
            if model.routing is None:
                continue
            if model.routing.default is not None:
                self.outcome(reg, located, model.routing.default, ("routing", "default"))
            for t_i, table in enumerate(model.routing.tables):
                tpath: YPath = ("routing", "tables", t_i)
                if table is None:
                    self.incomplete = True
                    continue
                if table.id in table_ids:
                    self.err(
                        located,
                        (*tpath, "id"),
                        f"duplicate table id '{table.id}' (first in {table_ids[table.id]})",
                    )
                table_ids.setdefault(table.id, located.path)
                t_specs: list[RuleSpec] = []
                t_rules: list[RouteRule] = []
                t_locs: list[tuple[Located, YPath]] = []
                for r_i, rule in enumerate(table.rules):
                    rpath: YPath = (*tpath, "rules", r_i)
                    if rule is None:
                        self.incomplete = True
                        continue
                    line, _ = located.where(rpath)
                    where = f"{located.path}:{line}"
                    if rule.id in rule_ids:
                        self.err(
                            located,
                            (*rpath, "id"),
                            f"duplicate rule id '{rule.id}' (first at {rule_ids[rule.id]})",
                        )
                        self.incomplete = True  # (a test may name the rule it was meant to be)
                        continue
                    rule_ids[rule.id] = where
                    self.outcome(reg, located, rule.then, (*rpath, "then"))

                    def report(
                        p: YPath,
                        msg: str,
                        hint: str | None,
                        at_key: bool,
                        located: Located = located,
                    ) -> None:
                        if reg.categories or "categor" not in msg:  # (said once)
                            self.err(located, p, msg, suggestion=hint, key=at_key)

                    before = len(self.problems)
                    cond = lower_when(rule.when, ctx, report, (*rpath, "when"))
                    if len(self.problems) > before:
                        self.incomplete = True
                        continue  # a broken condition must not feed lint checks
                    if not rule.enabled:
                        continue
                    t_specs.append(RuleSpec(rule.id, cond))
                    t_rules.append(RouteRule(table.id, rule.id, rule.then, where, cond))
                    t_locs.append((located, rpath))
                self._check_table(table.id, table.hit, t_rules, t_locs, codes)
                specs.append(TableSpec(table.id, table.hit, tuple(t_specs)))
                rules.append(t_rules)
                self.rule_locs.append(t_locs)
        return specs, rules

    def _check_table(
        self,
        table_id: str,
        hit: str,
        rules: list[RouteRule],
        locs: list[tuple[Located, YPath]],
        codes: list[str],
    ) -> None:
        """Shadowing (``first``) and overlap (``unique``), only between rules whose
        category scopes intersect — so a 5,000-rule table stays affordable."""
        if hit == "collect":
            return
        scopes = [category_scope(r.cond, codes) for r in rules]
        by_code: dict[str, list[int]] = {}
        wild: list[int] = []
        for j, later in enumerate(rules):
            scope = scopes[j]
            if scope is None:
                candidates: set[int] = set(range(j))
            else:
                candidates = set(wild)
                for code in scope:
                    candidates.update(by_code.get(code, ()))
            for i in sorted(candidates):
                earlier = rules[i]
                if hit == "first" and analysis.shadows(earlier.cond, later.cond):
                    located, path = locs[j]
                    self.err(
                        located,
                        (*path, "id"),
                        f"rule '{later.rule_id}' can never fire: rule '{earlier.rule_id}' "
                        f"({earlier.source}) matches every case it matches (hit policy "
                        "'first')",
                        severity=self.lint_severity,
                    )
                    break
                if hit != "unique":
                    continue
                pair = (f"rules '{earlier.rule_id}' ({earlier.source}) and "
                        f"'{later.rule_id}'")
                if analysis.may_overlap(earlier.cond, later.cond):
                    message, severity = (
                        f"{pair} can both match the same case under hit policy 'unique' in "
                        f"table '{table_id}'", self.lint_severity)
                elif analysis.may_overlap_by_text(earlier.cond, later.cond):
                    message, severity = (
                        f"{pair} both match a case whose description matches both their "
                        f"regexes (hit policy 'unique' in table '{table_id}'): such a case "
                        "fails to route; make the regexes exclusive or use hit: first",
                        "warning")
                else:
                    continue
                located, path = locs[j]
                self.err(located, (*path, "id"), message, severity=severity)
            if scope is None:
                wild.append(j)
            else:
                for code in scope:
                    by_code.setdefault(code, []).append(j)

    def gaps(self, reg: Registry, rules: list[list[RouteRule]]) -> None:
        """Without a default route, every category needs a rule that matches all of its
        cases: none at all is an error; rules with further conditions (a description
        test, an attribute, …) leave the other cases without a route (a lint)."""
        if "routing.default" in self.singletons or self.incomplete:
            return
        codes = sorted(reg.categories)
        full: set[str] = set()
        partial: dict[str, list[RouteRule]] = {}
        for table in rules:
            for rule in table:
                scope = category_scope(rule.cond, codes)
                for code in codes if scope is None else sorted(scope):
                    if code in full:
                        continue
                    only = Predicate(CATEGORY, "eq", code, "category")
                    if analysis.shadows(rule.cond, only):  # it matches every case of code
                        full.add(code)
                    else:
                        partial.setdefault(code, []).append(rule)
        for code in codes:
            if code in full:
                continue
            located, path = self.locations[("category", code)]
            conditional = partial.get(code)
            if not conditional:
                self.err(
                    located,
                    (*path, "code"),
                    f"category '{code}' has no route and the policy declares no default "
                    "route (routing.default)",
                )
                continue
            names = ", ".join(f"'{r.rule_id}'" for r in conditional[:3])
            more = f" and {len(conditional) - 3} more" if len(conditional) > 3 else ""
            self.err(
                located,
                (*path, "code"),
                f"category '{code}' is routed only when the other conditions of rule(s) "
                f"{names}{more} hold; its other cases have no route and the policy declares "
                "no default route (routing.default)",
                severity=self.lint_severity,
            )

    # life cycle --------------------------------------------------------------------------

    def lifecycle(self, reg: Registry) -> Lifecycle | None:
        graph = workflow.default_graph()
        if "workflow" in self.singletons:
            located, spec = self.singletons["workflow"]

            def locate(key: str) -> tuple[str, int, int]:
                parts = key.split(".")
                path: YPath = ("workflow", "roles", parts[1]) if len(parts) > 1 else ("workflow",)
                line, col = located.where(path, key=True)
                return located.path, line, col

            try:
                graph = workflow.with_overrides(graph, spec.roles, locate=locate)
            except DefinitionError as exc:
                self.problems += exc.problems
        sup = typing.cast(
            SupervisionSpec, self.singletons.get("supervision", (None, SupervisionSpec()))[1]
        )
        esc_loc, esc = self.singletons.get("escalation", (None, EscalationSpec()))
        esc = typing.cast(EscalationSpec, esc)
        path = (
            dict(esc.path)
            if esc.path is not None
            else {reg.tiers[i]: reg.tiers[i + 1] for i in range(len(reg.tiers) - 1)}
        )
        if esc_loc is not None:
            for key, tiers in (("on_overdue", esc.on_overdue), ("summon_at", esc.summon_at)):
                for i, t in enumerate(tiers):
                    if t not in reg.tiers:
                        self.err(
                            esc_loc,
                            ("escalation", key, i),
                            f"unknown tier '{t}'",
                            suggestion=suggest(t, reg.tiers),
                        )
            for low, high in (esc.path or {}).items():
                for key, t in (("key", low), ("value", high)):
                    if t not in reg.tiers:
                        self.err(
                            esc_loc,
                            ("escalation", "path", low),
                            f"unknown tier '{t}'",
                            key=key == "key",
                            suggestion=suggest(t, reg.tiers),
                        )
            for start in path:
                seen = [start]
                nxt = path.get(start)
                while nxt is not None:
                    if nxt in seen:
                        self.err(
                            esc_loc,
                            ("escalation", "path", start),
                            "escalation path has a cycle: " + " → ".join([*seen, nxt]),
                        )
                        break
                    seen.append(nxt)
                    nxt = path.get(nxt)
                else:
                    continue
                break
        if "scoring" in self.singletons:
            from gridflow.scoring import validate_spec

            sc_loc, sc_spec = self.singletons["scoring"]
            for sub, message in validate_spec(sc_spec):
                self.err(sc_loc, ("scoring", *sub), message)
        appeals = typing.cast(AppealsSpec, self.singletons.get("appeals", (None, AppealsSpec()))[1])
        evaluation = typing.cast(
            EvaluationSpec, self.singletons.get("evaluation", (None, EvaluationSpec()))[1]
        )
        return Lifecycle(
            graph=graph,
            warn_at=sup.warn_at,
            escalation_path=path,
            escalate_on_overdue=frozenset(esc.on_overdue),
            escalate_after_returns=esc.after_returns,
            escalate_after_rework=esc.after_rework,
            summon_at=frozenset(esc.summon_at),
            appeal_windows={
                "routing": parse_duration(appeals.routing.window),
                "score": parse_duration(appeals.score.window),
                "resident": parse_duration(appeals.resident.window),
            },
            reopen_window=parse_duration(evaluation.reopen_window),
        )

    def tier_reach(self, reg: Registry, rules: list[list[RouteRule]], path: dict[str, str]) -> None:
        """Warn about tiers no case can ever be at: no department sits there, no route
        names it and the escalation path leads there from none of those."""
        found: set[str | None] = {d.tier for d in reg.departments.values()}
        found |= {r.outcome.tier for table in rules for r in table if r.outcome.tier}
        default = self.singletons.get("routing.default")
        if default is not None:
            found.add(typing.cast(Outcome, default[1]).tier)
        todo, reached = [t for t in found if t], set()
        while todo:
            tier = todo.pop()
            if tier not in reached:
                reached.add(tier)
                if tier in path:
                    todo.append(path[tier])
        org_loc, org = self.singletons["organisation"]
        for i, tier in enumerate(reg.tiers):
            if tier not in reached:
                where: YPath = (
                    ("organisation", "tiers", i) if typing.cast(Organisation, org).tiers
                    else ("organisation",)
                )
                self.err(
                    org_loc, where,
                    f"tier '{tier}' is unreachable: no department is at it, no route names "
                    "it and the escalation path never leads to it",
                    severity="warning",
                )

    # rule tests --------------------------------------------------------------------------

    def tests(self, reg: Registry) -> list[LoadedTest]:
        out: list[LoadedTest] = []
        if not reg.categories:
            return out  # no test case could be valid: "no categories defined" says why
        for located, model in self.source.files:
            for i, t in enumerate(model.tests or []):
                path: YPath = ("tests", i)
                if t is None:
                    continue
                line, _ = located.where(path)
                cases, bad = [], False
                for where, data in [(("case",), t.case),
                                    *((("earlier", k), c) for k, c in enumerate(t.earlier))]:
                    try:
                        cases.append(validate_case(reg, data))
                    except CaseValidationError as exc:
                        bad = True
                        label = "" if len(where) == 1 else f"earlier[{where[1]}]: "
                        for fe in exc.errors:
                            parts = tuple(fe.field.split(".")) if fe.field != "case" else ()
                            self.err(
                                located,
                                (*path, *where, *parts),
                                f"test '{t.name}': {label}{fe.field}: {fe.message}",
                            )
                if bad:
                    continue
                self._check_expect(reg, located, t, path)
                out.append(LoadedTest(t.name, f"{located.path}:{line}", cases[0], t.expect,
                                      tuple(cases[1:])))
        return out

    def _check_expect(self, reg: Registry, located: Located, t: RuleTest, path: YPath) -> None:
        e = t.expect
        for key, value in (("lead", e.lead),):
            if value is not None and value not in reg.departments and reg.departments:
                self.err(
                    located,
                    (*path, "expect", key),
                    f"unknown department '{value}'",
                    suggestion=suggest(value, reg.departments),
                )
        if e.tier is not None and e.tier not in reg.tiers:
            self.err(
                located,
                (*path, "expect", "tier"),
                f"unknown tier '{e.tier}'",
                suggestion=suggest(e.tier, reg.tiers),
            )
        known = self.rule_ids
        if e.rule not in (None, "default") and e.rule not in known and not self.incomplete:
            self.err(
                located,
                (*path, "expect", "rule"),
                f"unknown rule '{e.rule}' (a rule id, or 'default')",
                suggestion=suggest(str(e.rule), known),
            )


def load_policy(
    root: str | os.PathLike[str],
    *,
    today: date | None = None,
    limits: Limits | None = None,
    on_warning: Callable[[Problem], None] | None = None,
    strict: bool = True,
) -> Any:
    """Load, check and compile a policy directory into a :class:`~gridflow.policy.Policy`.

    ``today`` (from the caller's clock) enables the "calendar ends soon" warning.
    ``strict=False`` turns lint findings (shadowed rules, overlaps under ``unique``)
    into warnings, for experiments and generated policies.
    Raises :class:`DefinitionError` listing every error found.
    """
    from gridflow.policy import Policy

    source = read_sources(root, limits)
    builder = _Builder(source, today, strict)
    reg = builder.registry() if source.files else None
    if reg is None:
        raise DefinitionError(builder.problems)
    builder.name_hints(reg)
    cal = builder.calendar(reg)
    specs, rules = builder.routing(reg)
    builder.gaps(reg, rules)
    tests = builder.tests(reg)
    lifecycle = builder.lifecycle(reg)
    if lifecycle is not None and not any(p.severity == "error" for p in builder.problems):
        # (a misspelt tier elsewhere would make the real one look unreachable)
        builder.tier_reach(reg, rules, dict(lifecycle.escalation_path))
    errors = [p for p in builder.problems if p.severity == "error"]
    if errors or cal is None or lifecycle is None:
        raise DefinitionError(builder.problems)
    warnings = [p for p in builder.problems if p.severity != "error"]
    if on_warning:
        for w in warnings:
            on_warning(w)
    meta = typing.cast(PolicyMeta | None, builder.singletons.get("policy", (None, None))[1])
    default_loc = builder.singletons.get("routing.default")
    default = typing.cast(Outcome | None, default_loc[1] if default_loc else None)
    default_source = ""
    if default_loc:
        line, _ = default_loc[0].where(("routing", "default"))
        default_source = f"{default_loc[0].path}:{line}"
    try:
        compiled = CompiledRules(
            specs,
            category_groups={c.code: c.group for c in reg.categories.values()},
            max_rules_per_ruleset=meta.max_rules_per_ruleset if meta else 256,
        )
    except RuleTooComplex as exc:
        problems = []
        for t_index, r_index in exc.culprits:
            located, path = builder.rule_locs[t_index][r_index]
            problems.append(
                located.problem(
                    path,
                    f"rule '{specs[t_index].rules[r_index].rule_id}' is too complex for the "
                    f"rules engine ({exc.detail}); split it into simpler rules or fewer 'any' "
                    "branches",
                )
            )
        raise DefinitionError(problems or [Problem(str(source.root), 1, 1, str(exc))]) from exc
    except Exception as exc:  # the engine rejected something our checks let through
        raise DefinitionError(
            [Problem(str(source.root), 1, 1, f"rules engine refused the policy: {exc}")]
        ) from exc
    router = Router(
        reg,
        cal,
        compiled,
        rules,
        default,
        default_source,
        meta.default_time_limit if meta else None,
        source.version,
    )
    return Policy(
        root=source.root,
        version=source.version,
        registry=reg,
        calendar=cal,
        router=router,
        tests=tuple(tests),
        warnings=tuple(warnings),
        sections={k: v[1] for k, v in builder.singletons.items()},
        lifecycle=lifecycle,
    )
