"""Rule conditions as plain data, lowered from the ``when`` blocks of rule files.

The intermediate form (:class:`Predicate`, :class:`AllOf`, :class:`AnyOf`) is what the
compiler turns into durable_rules JSON. It is also what traces print. Conditions
read a *fact*: a flat dict built from a case by :func:`gridflow.routing.case_fact`,
with the field names defined here.

Semantics (documented in docs/rule-files.md): a test on a field the fact does not
have is false — for every operator, ``ne`` and ``not_in`` included.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gridflow.errors import suggest
from gridflow.history import HISTORY_FIELDS, HistorySpec, window_of
from gridflow.schema import Match, When, WhenHistory, WhenTime

__all__ = [
    "AllOf",
    "AnyOf",
    "Cond",
    "LowerContext",
    "Op",
    "Predicate",
    "attr_field",
    "describe",
    "level_field",
    "lower_when",
    "tests_of",
]

Op = Literal["eq", "ne", "in", "not_in", "lt", "lte", "gt", "gte", "prefix", "contains", "regex"]

CATEGORY = "category"
DESCRIPTION = "description"
ADDRESS = "address"
REPORTER = "reporter"
CHANNEL = "channel"
URGENCY = "urgency"
TIME_FIELDS = {
    "working_hours": "t_working",
    "workday": "t_workday",
    "weekend": "t_weekend",
    "holiday": "t_holiday",
    "hour": "t_hour",
    "weekday": "t_weekday",
}


def level_field(index: int) -> str:
    """Fact field holding the case's unit at hierarchy level ``index`` (0 = top)."""
    return f"loc_{index}"


def attr_field(name: str) -> str:
    return f"a_{name}"


@dataclass(frozen=True)
class Predicate:
    field: str
    op: Op
    value: Any
    label: str

    def __str__(self) -> str:
        return f"{self.label} {self.op} {self.value!r}"


@dataclass(frozen=True)
class AllOf:
    items: tuple[Cond, ...]


@dataclass(frozen=True)
class AnyOf:
    items: tuple[Cond, ...]


Cond = Predicate | AllOf | AnyOf

Report = Callable[[tuple[str | int, ...], str, "str | None", bool], None]
"""report(path, message, suggestion, at_key) — at_key: point at the mapping key itself."""

_EQUALITY: tuple[Op, ...] = ("eq", "ne", "in", "not_in")
_ORDER: tuple[Op, ...] = ("lt", "lte", "gt", "gte")
_TEXT: tuple[Op, ...] = ("contains", "regex")


@dataclass
class LowerContext:
    """What lowering needs to know about the policy to check references."""

    levels: Sequence[str]
    units_by_level: Mapping[str, frozenset[str]]
    categories: frozenset[str]
    channels: frozenset[str]
    attributes: Mapping[str, str]  # name → type
    attribute_values: Mapping[str, Sequence[Any] | None] = field(default_factory=dict)
    check_regex: Callable[[str], str | None] = lambda _p: None


def _match_ops(m: Match) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for name in (
        "eq",
        "ne",
        "in_",
        "not_in",
        "lt",
        "lte",
        "gt",
        "gte",
        "prefix",
        "contains",
        "contains_any",
        "regex",
    ):
        value = getattr(m, name)
        if value is not None:
            out.append(("in" if name == "in_" else name, value))
    return out


def _alias(op: str) -> tuple[str | int, ...]:
    return ("in",) if op == "in" else (op,)


class _Lowerer:
    def __init__(self, ctx: LowerContext, report: Report):
        self.ctx = ctx
        self._report = report

    def report(
        self,
        path: tuple[str | int, ...],
        message: str,
        suggestion: str | None,
        at_key: bool = False,
    ) -> None:
        self._report(path, message, suggestion, at_key)

    def field(
        self,
        path: tuple[str | int, ...],
        fact_field: str,
        label: str,
        cond: Any,
        allowed: Sequence[str],
        check_value: Callable[[tuple[str | int, ...], Any], None] | None = None,
        scalar_op: Op = "eq",
        list_op: Op = "in",
    ) -> Cond | None:
        """Lower one field's condition (scalar, list or operator mapping)."""
        if isinstance(cond, Match):
            ops = _match_ops(cond)
            if not ops:
                self.report(path, f"no operator given for {label}", None)
                return None
        elif isinstance(cond, list):
            if not cond:
                self.report(path, f"empty list for {label} matches nothing", None)
                return None
            ops = [(list_op, cond)]
        else:
            ops = [(scalar_op, cond)]
        tests: list[Cond] = []
        for op, value in ops:
            where = (*path, *_alias(op)) if isinstance(cond, Match) else path
            if op not in allowed:
                self.report(
                    where,
                    f"operator '{op}' is not allowed on {label} (allowed: {', '.join(allowed)})",
                    suggest(op, allowed),
                )
                continue
            lowered = self._op(where, fact_field, label, op, value, check_value)
            if lowered is not None:
                tests.append(lowered)
        if not tests:
            return None
        return tests[0] if len(tests) == 1 else AllOf(tuple(tests))

    def _op(
        self,
        where: tuple[str | int, ...],
        fact_field: str,
        label: str,
        op: str,
        value: Any,
        check_value: Callable[[tuple[str | int, ...], Any], None] | None,
    ) -> Cond | None:
        if op == "contains_any":
            items = list(value)
            return AnyOf(tuple(Predicate(fact_field, "contains", v, label) for v in items))
        if op == "prefix" and isinstance(value, list):
            return AnyOf(
                tuple(
                    t
                    for i, v in enumerate(value)
                    if (t := self._op((*where, i), fact_field, label, "prefix", v, check_value))
                )
            )
        if op in ("in", "not_in"):
            if not value:
                self.report(where, f"empty list for {label}", None)
                return None
            if check_value:
                for i, v in enumerate(value):
                    check_value((*where, i), v)
            return Predicate(fact_field, op, tuple(value), label)  # type: ignore[arg-type]
        if op == "regex":
            problem = self.ctx.check_regex(value)
            if problem:
                self.report(where, f"invalid regex {value!r}: {problem}", None)
                return None
        if check_value and op in ("eq", "ne"):
            check_value(where, value)
        return Predicate(fact_field, op, value, label)  # type: ignore[arg-type]

    # --- fields -------------------------------------------------------------------

    def when(self, when: When, path: tuple[str | int, ...]) -> Cond:
        parts: list[Cond] = []

        def add(c: Cond | None) -> None:
            if c is not None:
                parts.append(c)

        ctx = self.ctx
        if when.category is not None:
            add(
                self.field(
                    (*path, "category"),
                    CATEGORY,
                    "category",
                    when.category,
                    ("eq", "ne", "in", "not_in", "prefix"),
                    self._category_value,
                )
            )
            self._check_prefixes(when.category, (*path, "category"))
        if when.description is not None:
            add(
                self.field(
                    (*path, "description"),
                    DESCRIPTION,
                    "description",
                    when.description,
                    ("contains", "contains_any", "regex"),
                    scalar_op="contains",
                    list_op="contains_any",  # type: ignore[arg-type]
                )
            )
        if when.address is not None:
            add(
                self.field(
                    (*path, "address"),
                    ADDRESS,
                    "address",
                    when.address,
                    ("eq", "contains", "contains_any", "prefix", "regex"),
                    scalar_op="contains",
                    list_op="contains_any",  # type: ignore[arg-type]
                )
            )
        if when.reporter is not None:
            add(
                self.field(
                    (*path, "reporter"),
                    REPORTER,
                    "reporter",
                    when.reporter,
                    ("eq", "ne", "in", "not_in", "prefix", "contains", "regex"),
                )
            )
        if when.channel is not None:
            add(
                self.field(
                    (*path, "channel"),
                    CHANNEL,
                    "channel",
                    when.channel,
                    _EQUALITY,
                    self._known("channel", ctx.channels),
                )
            )
        if when.urgency is not None:
            add(
                self.field(
                    (*path, "urgency"),
                    URGENCY,
                    "urgency",
                    when.urgency,
                    _EQUALITY,
                    self._known("urgency", frozenset({"normal", "urgent", "emergency"})),
                )
            )
        if when.location is not None:
            for level, units in when.location.items():
                lpath = (*path, "location", level)
                if level not in ctx.levels:
                    self.report(lpath, f"unknown level '{level}'", suggest(level, ctx.levels), True)
                    continue
                idx = list(ctx.levels).index(level)
                add(
                    self.field(
                        lpath,
                        level_field(idx),
                        f"location.{level}",
                        units,
                        ("eq", "in"),
                        self._known(f"{level} unit", ctx.units_by_level.get(level, frozenset())),
                    )
                )
        if when.reported is not None:
            add(self.reported(when.reported, (*path, "reported")))
        if when.attributes is not None:
            for name, cond in when.attributes.items():
                add(self.attribute(name, cond, (*path, "attributes", name)))
        if when.history is not None:
            add(self.history(when.history, (*path, "history")))
        if when.any is not None:
            branches = [self.when(w, (*path, "any", i)) for i, w in enumerate(when.any)]
            if not branches:
                self.report((*path, "any"), "'any' needs at least one branch", None)
            else:
                parts.append(AnyOf(tuple(branches)))
        if len(parts) == 1:
            return parts[0]
        return AllOf(tuple(parts))

    def reported(self, rep: WhenTime, path: tuple[str | int, ...]) -> Cond | None:
        parts: list[Cond] = []
        for key in ("working_hours", "workday", "weekend", "holiday"):
            value = getattr(rep, key)
            if value is not None:
                parts.append(Predicate(TIME_FIELDS[key], "eq", value, f"reported.{key}"))
        for key, lo, hi in (("hour", 0, 23), ("weekday", 1, 7)):
            value = getattr(rep, key)
            if value is None:
                continue

            def in_range(
                where: tuple[str | int, ...], v: Any, lo: int = lo, hi: int = hi, key: str = key
            ) -> None:
                if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                    self.report(where, f"reported.{key} must be an integer {lo}..{hi}", None)

            c = self.field(
                (*path, key),
                TIME_FIELDS[key],
                f"reported.{key}",
                value,
                (*_EQUALITY, *_ORDER),
                in_range,
            )
            if isinstance(value, Match):
                for op in _ORDER:
                    bound = getattr(value, op)
                    if bound is not None:
                        in_range((*path, key, op), bound)
            if c is not None:
                parts.append(c)
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else AllOf(tuple(parts))

    def history(self, h: WhenHistory, path: tuple[str | int, ...]) -> Cond | None:
        try:
            window = window_of(h.within)
        except ValueError as exc:
            self.report((*path, "within"), str(exc), None)
            return None
        if len(set(h.same)) != len(h.same):
            self.report((*path, "same"), "a field is listed twice", None)
            return None
        spec = HistorySpec(tuple(f for f in HISTORY_FIELDS if f in h.same), window)
        return Predicate(spec.field, "gte", h.at_least, spec.label())

    def attribute(self, name: str, cond: Any, path: tuple[str | int, ...]) -> Cond | None:
        kind = self.ctx.attributes.get(name)
        if kind is None:
            self.report(
                path,
                f"unknown attribute '{name}' (declare it under 'attributes')",
                suggest(name, self.ctx.attributes),
                True,
            )
            return None
        allowed: tuple[str, ...]
        if kind == "string":
            allowed = (*_EQUALITY, "prefix", "contains", "contains_any", "regex")
        elif kind in ("number", "integer"):
            allowed = (*_EQUALITY, *_ORDER)
        else:
            allowed = ("eq", "ne")
        values = self.ctx.attribute_values.get(name)

        def typed(where: tuple[str | int, ...], v: Any) -> None:
            ok = {
                "string": isinstance(v, str),
                "number": isinstance(v, int | float) and not isinstance(v, bool),
                "integer": isinstance(v, int) and not isinstance(v, bool),
                "boolean": isinstance(v, bool),
            }[kind]
            if not ok:
                self.report(where, f"attribute '{name}' is {kind}; {v!r} is not", None)
            elif values is not None and v not in values:
                self.report(
                    where,
                    f"{v!r} is not an allowed value of '{name}'",
                    suggest(str(v), [str(x) for x in values]),
                )

        lowered = self.field(path, attr_field(name), f"attributes.{name}", cond, allowed, typed)
        if isinstance(cond, Match):
            for op in ("lt", "lte", "gt", "gte"):
                v = getattr(cond, op)
                if v is not None and op in allowed:
                    typed((*path, op), v)
        return lowered

    def _category_value(self, where: tuple[str | int, ...], value: Any) -> None:
        if not isinstance(value, str) or value not in self.ctx.categories:
            self.report(
                where, f"unknown category '{value}'", suggest(str(value), self.ctx.categories)
            )

    def _check_prefixes(self, cond: Any, path: tuple[str | int, ...]) -> None:
        if not isinstance(cond, Match) or cond.prefix is None:
            return
        prefixes = cond.prefix if isinstance(cond.prefix, list) else [cond.prefix]
        for i, p in enumerate(prefixes):
            if not any(code.startswith(p) for code in self.ctx.categories):
                where = (*path, "prefix", i) if isinstance(cond.prefix, list) else (*path, "prefix")
                self.report(where, f"prefix '{p}' matches no category", None)

    def _known(
        self, what: str, known: frozenset[str]
    ) -> Callable[[tuple[str | int, ...], Any], None]:
        def check(where: tuple[str | int, ...], value: Any) -> None:
            if not isinstance(value, str) or value not in known:
                self.report(where, f"unknown {what} '{value}'", suggest(str(value), known))

        return check


def lower_when(
    when: When, ctx: LowerContext, report: Report, path: tuple[str | int, ...] = ()
) -> Cond:
    """Lower a ``when`` block; reference and type problems go to ``report``."""
    return _Lowerer(ctx, report).when(when, path)


def tests_of(cond: Cond) -> list[Predicate]:
    """Every test in a condition, in order (for traces)."""
    if isinstance(cond, Predicate):
        return [cond]
    out: list[Predicate] = []
    for item in cond.items:
        out.extend(tests_of(item))
    return out


def describe(cond: Cond) -> str:
    if isinstance(cond, Predicate):
        return str(cond)
    joiner = " and " if isinstance(cond, AllOf) else " or "
    if not cond.items:
        return "always" if isinstance(cond, AllOf) else "never"
    return "(" + joiner.join(describe(c) for c in cond.items) + ")"
