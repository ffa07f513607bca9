"""Compile rule conditions onto durable_rules — the only module that imports it.

durable_rules traps handled here (BRIEF §12):

* a ruleset with more than 512 rules hangs at creation → rules are sharded into
  rulesets of at most ``max_rules_per_ruleset`` (default 256);
* one session id per case would exhaust memory → every post uses the fixed sid
  ``"0"``; events are consumed and facts retracted, so the session stays empty;
* an event fires only the lowest-``pri`` matching rule (used for hit policy
  ``first``); facts fire every match (used for ``unique`` and ``collect``);
* identical events are dropped → every message gets a fresh id;
* a catch-all condition matches the session state and loops → every rule also
  tests the marker field ``gf == 1`` which the state never has;
* exceptions in Python actions are swallowed into the session state, and the
  ``durable.engine.Host`` starts background timer threads → gridflow drives the
  engine's own C API (``durable_rules_engine``: create_ruleset, assert_event,
  start_action_for_state, complete_and_start_action) with no Python actions at
  all: the names of the fired rules are read from the engine's action queue, so
  nothing can be swallowed and no thread is started; a non-zero engine status is
  raised as :class:`~gridflow.errors.RoutingError`;
* the engine is not thread-safe → one process-wide lock serializes every call.

Rules are bucketed by category group so a case is posted only to the shards that
can match its category (plus the shards of category-independent rules); within a
table the lowest rule index over all visited shards wins, exactly as one big
ruleset would decide.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import durable_rules_engine

from gridflow.conditions import CATEGORY, AllOf, AnyOf, Cond, Test
from gridflow.errors import RoutingError

try:  # Python 3.11+: the stdlib's own regex parser (private module, stable API)
    from re import _constants as _sre_c  # type: ignore[attr-defined]
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - older Pythons
    import sre_constants as _sre_c  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = [
    "HARD_RULESET_LIMIT",
    "CompiledRules",
    "RuleSpec",
    "RuleTooComplex",
    "TableSpec",
    "check_regex",
    "translate_regex",
]

HARD_RULESET_LIMIT = 500
WILDCARD = "*"
MARKER = "gf"
HitPolicy = Literal["first", "unique", "collect"]

_LOCK = threading.RLock()
_SERIAL = itertools.count(1)


# --- regular expressions ---------------------------------------------------------------
#
# durable_rules has its own regex dialect: the whole value must match, no escapes,
# no anchors, and some characters crash or fail it. Users write Python regexes with
# search semantics; we translate through the stdlib parser and reject what the
# engine cannot express exactly. Semantics: Python ``re.search`` with ``re.ASCII``.

_FORBIDDEN_CHARS = set('%\\]"') | {chr(c) for c in range(32)} | {"\x7f"}
_SPECIAL = set(".*+?|()[{}")
_MAX_REPEAT = 32


class _Unsupported(ValueError):
    pass


def _lit(code: int, in_class: bool = False) -> str:
    ch = chr(code)
    if ch in _FORBIDDEN_CHARS:
        raise _Unsupported(f"the rules engine cannot match the character {ch!r}")
    if in_class:
        if ch in "^-[":
            raise _Unsupported(f"put {ch!r} outside a character class or use another form")
        return ch
    return f"[{ch}]" if ch in _SPECIAL else ch


_CATEGORY_CLASSES = {
    _sre_c.CATEGORY_DIGIT: "0-9",
    _sre_c.CATEGORY_WORD: "a-zA-Z0-9_",
    _sre_c.CATEGORY_SPACE: " ",
}


def _class(items: list[tuple[Any, Any]]) -> str:
    negate = False
    body: list[str] = []
    for op, av in items:
        if op is _sre_c.NEGATE:
            negate = True
        elif op is _sre_c.LITERAL:
            body.append(_lit(av, in_class=True))
        elif op is _sre_c.RANGE:
            lo, hi = av
            if hi > 0x7E or lo < 0x20:
                raise _Unsupported("character ranges must be printable ASCII (e.g. 0-9, a-z)")
            body.append(f"{_lit(lo, True)}-{_lit(hi, True)}")
        elif op is _sre_c.CATEGORY and av in _CATEGORY_CLASSES:
            body.append(_CATEGORY_CLASSES[av])
        else:
            raise _Unsupported(f"unsupported inside a character class: {op}")
    if not body:
        raise _Unsupported("empty character class")
    return "[" + ("^" if negate else "") + "".join(body) + "]"


def _emit(seq: Any, top: bool = False) -> str:
    out: list[str] = []
    items = list(seq)
    for pos, (op, av) in enumerate(items):
        if op is _sre_c.LITERAL:
            out.append(_lit(av))
        elif op is _sre_c.NOT_LITERAL:
            out.append("[^" + _lit(av, in_class=True) + "]")
        elif op is _sre_c.ANY:
            out.append(".")
        elif op is _sre_c.IN:
            if len(av) == 1 and av[0][0] is _sre_c.CATEGORY:
                out.append(_class(av))
            else:
                out.append(_class(av))
        elif op in (_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT):
            lo, hi, sub = av
            inner = _emit(sub)
            sub_items = list(sub)
            if not (len(sub_items) == 1 and sub_items[0][0] in (_sre_c.LITERAL, _sre_c.ANY, _sre_c.IN,
                                                                  _sre_c.NOT_LITERAL)):
                inner = f"({inner})"
            if hi is _sre_c.MAXREPEAT:
                if lo == 0:
                    out.append(inner + "*")
                elif lo == 1:
                    out.append(inner + "+")
                elif lo > _MAX_REPEAT:
                    raise _Unsupported(f"repeat counts above {_MAX_REPEAT} are not supported")
                else:
                    out.append(f"{inner}{{{lo},}}")
            else:
                if hi == 0:
                    out.append("")
                elif hi > _MAX_REPEAT:
                    raise _Unsupported(f"repeat counts above {_MAX_REPEAT} are not supported")
                elif lo == 0 and hi == 1:
                    out.append(inner + "?")
                elif lo == hi:
                    out.append(f"{inner}{{{lo}}}")
                else:
                    out.append(f"{inner}{{{lo},{hi}}}")
        elif op is _sre_c.SUBPATTERN:
            group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise _Unsupported("inline flags are not supported")
            out.append(f"({_emit(sub)})")
        elif op is _sre_c.BRANCH:
            _, branches = av
            out.append("(" + "|".join(_emit(b) for b in branches) + ")")
        elif op is _sre_c.AT:
            if top and ((pos == 0 and av in (_sre_c.AT_BEGINNING, _sre_c.AT_BEGINNING_STRING))
                        or (pos == len(items) - 1 and av in (_sre_c.AT_END,
                                                             _sre_c.AT_END_STRING))):
                continue
            raise _Unsupported("anchors (^ $ \\b \\A \\Z) are only supported at the very start "
                               "or end of the pattern or of a top-level alternative")
        else:
            name = str(op).lower()
            raise _Unsupported(f"unsupported regex feature: {name}")
    return "".join(out)


def _anchored(seq: Any) -> tuple[bool, bool]:
    items = list(seq)
    start = bool(items) and items[0][0] is _sre_c.AT and items[0][1] in (
        _sre_c.AT_BEGINNING, _sre_c.AT_BEGINNING_STRING)
    end = bool(items) and items[-1][0] is _sre_c.AT and items[-1][1] in (
        _sre_c.AT_END, _sre_c.AT_END_STRING)
    return start, end


def translate_regex(pattern: str) -> str:
    """Python search-semantics regex → durable_rules full-match regex (or ValueError)."""
    try:
        parsed = _sre_parse.parse(pattern, re.ASCII)
    except re.error as exc:
        raise ValueError(str(exc)) from None
    items = list(parsed)
    branches: list[Any]
    if len(items) == 1 and items[0][0] is _sre_c.BRANCH:
        branches = list(items[0][1][1])
    else:
        branches = [parsed]
    out: list[str] = []
    for branch in branches:
        start, end = _anchored(branch)
        body = _emit(branch, top=True)
        out.append(("" if start else ".*") + body + ("" if end else ".*"))
    if len(out) == 1:
        return out[0]
    return "|".join(f"({b})" for b in out)


@functools.lru_cache(maxsize=4096)
def check_regex(pattern: str) -> str | None:
    """Why ``pattern`` cannot be used in a rule, or None when it can.

    Besides translating, the pattern is compiled by the engine once: its regex
    automaton has size limits that only the engine itself can tell.
    """
    try:
        translated = translate_regex(pattern)
    except ValueError as exc:
        return str(exc)
    return _probe(translated)


@functools.lru_cache(maxsize=4096)
def _probe(engine_regex: str) -> str | None:
    rule = {"probe": {"all": [{"m": {"$and": [{MARKER: 1}, {"$mt": {"t": engine_regex}}]}}]}}
    name = f"gfprobe{next(_SERIAL)}"
    with _LOCK:
        try:
            handle = durable_rules_engine.create_ruleset(name, json.dumps(rule, ensure_ascii=False))
        except Exception as exc:
            return f"too complex for the rules engine's regex automaton ({exc}); simplify it"
        durable_rules_engine.delete_ruleset(handle)
    return None


def _literal_regex(text: str) -> str:
    return "".join(_lit(ord(ch)) for ch in text)


# --- conditions → durable JSON -----------------------------------------------------------


def _to_json(cond: Cond) -> dict[str, Any]:
    if isinstance(cond, AllOf):
        return {"$and": [_to_json(c) for c in cond.items]} if cond.items else {MARKER: 1}
    if isinstance(cond, AnyOf):
        return {"$or": [_to_json(c) for c in cond.items]}
    f, op, v = cond.field, cond.op, cond.value
    if op == "eq":
        return {f: v}
    if op == "ne":
        return {"$neq": {f: v}}
    if op in ("lt", "lte", "gt", "gte"):
        return {f"${op}": {f: v}}
    if op == "in":
        return {"$or": [{f: x} for x in v]} if len(v) > 1 else {f: v[0]}
    if op == "not_in":
        return {"$and": [{"$neq": {f: x}} for x in v]}
    if op == "prefix":
        return {"$mt": {f: _literal_regex(v) + ".*"}}
    if op == "contains":
        return {"$mt": {f: ".*" + _literal_regex(v) + ".*"}}
    if op == "regex":
        return {"$mt": {f: translate_regex(v)}}
    raise AssertionError(f"unknown op {op}")


def category_scope(cond: Cond, codes: Sequence[str]) -> frozenset[str] | None:
    """Category codes ``cond`` can possibly match, or None when it does not restrict them."""
    if isinstance(cond, Test):
        if cond.field != CATEGORY:
            return None
        if cond.op == "eq":
            return frozenset({cond.value})
        if cond.op == "in":
            return frozenset(cond.value)
        if cond.op == "prefix":
            return frozenset(c for c in codes if c.startswith(cond.value))
        return None
    scopes = [category_scope(c, codes) for c in cond.items]
    if isinstance(cond, AllOf):
        known = [s for s in scopes if s is not None]
        if not known:
            return None
        out = known[0]
        for s in known[1:]:
            out = out & s
        return out
    if any(s is None for s in scopes):
        return None
    return frozenset().union(*[s for s in scopes if s is not None])


# --- compiled tables ---------------------------------------------------------------------


class RuleTooComplex(Exception):
    """The engine refused some rules (its per-rule expansion limits); names them."""

    def __init__(self, culprits: list[tuple[int, int]], detail: str):
        self.culprits = culprits
        self.detail = detail
        super().__init__(f"rules engine refused {len(culprits)} rule(s): {detail}")


@dataclass(frozen=True)
class RuleSpec:
    rule_id: str
    cond: Cond


@dataclass(frozen=True)
class TableSpec:
    table_id: str
    hit: HitPolicy
    rules: tuple[RuleSpec, ...]


@dataclass
class _Shard:
    name: str
    first_index: int
    size: int


def _drop_rulesets(handles: list[int]) -> None:
    with _LOCK:
        for handle in handles:
            try:
                durable_rules_engine.delete_ruleset(handle)
            except Exception:  # pragma: no cover - best effort at garbage collection
                pass


class CompiledRules:
    """All routing tables of one policy, compiled into sharded durable_rules rulesets."""

    def __init__(
        self,
        tables: Sequence[TableSpec],
        *,
        category_groups: Mapping[str, str],
        max_rules_per_ruleset: int = 256,
        fanout_limit: int = 4,
    ):
        if not 1 <= max_rules_per_ruleset <= HARD_RULESET_LIMIT:
            raise ValueError(f"max_rules_per_ruleset must be 1..{HARD_RULESET_LIMIT}")
        self.tables = tuple(tables)
        self._groups = dict(category_groups)
        self._serial = next(_SERIAL)
        self._ids = itertools.count(1)
        # table index → group → shards (sorted by first rule index)
        self._shards: list[dict[str, list[_Shard]]] = []
        self._visits: dict[tuple[int, str | None], list[_Shard]] = {}
        codes = sorted(self._groups)
        definitions: dict[str, dict[str, Any]] = {}
        for t_index, table in enumerate(self.tables):
            buckets: dict[str, list[int]] = {}
            for r_index, rule in enumerate(table.rules):
                scope = category_scope(rule.cond, codes)
                groups = None if scope is None else {self._groups[c] for c in scope if c in self._groups}
                if groups is not None and not groups:
                    continue  # can never match a known category
                if groups is None or len(groups) > fanout_limit:
                    buckets.setdefault(WILDCARD, []).append(r_index)
                else:
                    for g in sorted(groups):
                        buckets.setdefault(g, []).append(r_index)
            per_group: dict[str, list[_Shard]] = {}
            for group, indexes in sorted(buckets.items()):
                for start in range(0, len(indexes), max_rules_per_ruleset):
                    chunk = indexes[start:start + max_rules_per_ruleset]
                    name = f"gf{self._serial}_t{t_index}_{len(definitions)}"
                    definitions[name] = {
                        f"r{i}": {
                            "all": [{"m": {"$and": [{MARKER: 1}, _to_json(table.rules[i].cond)]}}],
                            "pri": i,
                        }
                        for i in chunk
                    }
                    per_group.setdefault(group, []).append(_Shard(name, chunk[0], len(chunk)))
            self._shards.append(per_group)
        self._handles: dict[str, int] = {}
        with _LOCK:
            try:
                for name, definition in definitions.items():
                    self._handles[name] = durable_rules_engine.create_ruleset(
                        name, json.dumps(definition, ensure_ascii=False))
            except Exception as exc:
                _drop_rulesets(list(self._handles.values()))
                raise RuleTooComplex(self._culprits(), str(exc)) from exc
        self.ruleset_count = len(definitions)
        self.largest_ruleset = max((len(d) for d in definitions.values()), default=0)
        weakref.finalize(self, _drop_rulesets, list(self._handles.values()))

    def _culprits(self) -> list[tuple[int, int]]:
        """Find the rules the engine refuses, by compiling each alone."""
        bad: list[tuple[int, int]] = []
        for t_index, table in enumerate(self.tables):
            for r_index, rule in enumerate(table.rules):
                probe = {"r": {"all": [{"m": {"$and": [{MARKER: 1}, _to_json(rule.cond)]}}]}}
                try:
                    handle = durable_rules_engine.create_ruleset(
                        f"gfprobe{next(_SERIAL)}", json.dumps(probe, ensure_ascii=False))
                except Exception:
                    bad.append((t_index, r_index))
                else:
                    durable_rules_engine.delete_ruleset(handle)
        return bad

    def _visit(self, table: int, group: str | None) -> list[_Shard]:
        key = (table, group)
        found = self._visits.get(key)
        if found is None:
            shards = self._shards[table]
            chosen = list(shards.get(WILDCARD, ()))
            if group is not None:
                chosen += shards.get(group, ())
            found = self._visits[key] = sorted(chosen, key=lambda s: s.first_index)
        return found

    def match(self, fact: Mapping[str, Any]) -> list[list[int]]:
        """Rule indexes that fire, per table in table order (each list in rule order)."""
        group = self._groups.get(str(fact.get(CATEGORY)))
        out: list[list[int]] = []
        with _LOCK:
            for t_index, table in enumerate(self.tables):
                shards = self._visit(t_index, group)
                found: set[int] = set()
                for shard in shards:
                    if table.hit == "first" and found and min(found) < shard.first_index:
                        break
                    found.update(self._post(shard.name, fact, as_fact=table.hit != "first"))
                hits = sorted(found)
                if table.hit == "first":
                    hits = hits[:1]
                elif table.hit == "unique" and len(hits) > 1:
                    ids = [table.rules[i].rule_id for i in hits]
                    raise RoutingError(
                        f"table '{table.table_id}' has hit policy 'unique' but rules "
                        f"{', '.join(ids)} all match this case",
                        rule_ids=ids,
                        table=table.table_id,
                    )
                out.append(hits)
        return out

    def _post(self, ruleset: str, fact: Mapping[str, Any], *, as_fact: bool) -> list[int]:
        """Indexes of the rules the engine fires for this message (events: at most one)."""
        handle = self._handles[ruleset]
        message = dict(fact)
        message["id"] = next(self._ids)
        message["sid"] = "0"
        message[MARKER] = 1
        text = json.dumps(message, ensure_ascii=False)
        fired: list[int] = []
        try:
            status, state = (durable_rules_engine.assert_fact if as_fact
                             else durable_rules_engine.assert_event)(handle, text)
            if status == 0:
                action = durable_rules_engine.start_action_for_state(handle, state)
                while action:
                    payload = action[1] if isinstance(action, tuple | list) else action
                    fired.append(int(next(iter(json.loads(payload)))[1:]))
                    action = durable_rules_engine.complete_and_start_action(handle, state)
            elif status not in (1, 2):  # 1: no rule matched, 2: observed
                raise RoutingError(f"rules engine returned status {status} for ruleset {ruleset}")
        finally:
            if as_fact:
                durable_rules_engine.retract_fact(handle, text)
        return fired
