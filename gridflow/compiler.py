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
* the engine is not thread-safe → one process-wide lock serializes every call;
* its ``$mt`` regex automaton gives wrong answers (see "text predicates" below)
  → text tests are evaluated exactly in Python and handed to the engine as
  boolean fields.

Rules are bucketed by category group so a case is posted only to the shards that
can match its category (plus the shards of category-independent rules); within a
table the lowest rule index over all visited shards wins, exactly as one big
ruleset would decide.
"""

from __future__ import annotations

import contextlib
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

from gridflow.conditions import CATEGORY, AllOf, AnyOf, Cond, Predicate
from gridflow.errors import RoutingError

__all__ = [
    "HARD_RULESET_LIMIT",
    "CompiledRules",
    "RuleSpec",
    "RuleTooComplex",
    "TableSpec",
    "TextPredicates",
    "check_regex",
]

HARD_RULESET_LIMIT = 500
WILDCARD = "*"
MARKER = "gf"
HitPolicy = Literal["first", "unique", "collect"]

_LOCK = threading.RLock()
_SERIAL = itertools.count(1)


# --- text predicates ----------------------------------------------------------------------
#
# durable_rules' ``$mt`` regex automaton is not reliable: fuzzing it against Python's
# ``re`` shows wrong answers even for plain substrings (``.*axa.*`` does not match
# "xaxax"), refuses some small patterns (status 503) and crashes the process on
# non-ASCII character ranges. So text tests (contains, prefix, regex) are evaluated
# exactly in Python, once per case, into boolean fields ``p<k>`` of the fact; the
# rules engine combines them with every other test and applies the hit policies.


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.ASCII)


@functools.lru_cache(maxsize=4096)
def check_regex(pattern: str) -> str | None:
    """Why ``pattern`` cannot be used in a rule, or None when it can (Python syntax)."""
    try:
        _compiled(pattern)
    except re.error as exc:
        return str(exc)
    return None


def _text_test(op: str, value: str) -> Any:
    if op == "contains":
        return lambda text: value in text
    if op == "prefix":
        return lambda text: text.startswith(value)
    pattern = _compiled(value)
    return lambda text: pattern.search(text) is not None


# --- conditions → durable JSON -----------------------------------------------------------


class TextPredicates:
    """Registry of the text tests of a compiled policy: (field, op, value) → fact field."""

    def __init__(self) -> None:
        self.index: dict[tuple[str, str, str], int] = {}
        self.tests: list[tuple[str, Any]] = []  # (fact field read, test function)

    def field(self, cond: Predicate) -> str:
        key = (cond.field, cond.op, str(cond.value))
        if key not in self.index:
            self.index[key] = len(self.tests)
            self.tests.append((cond.field, _text_test(cond.op, str(cond.value))))
        return f"p{self.index[key]}"

    def to_json(self, cond: Cond, used: set[int]) -> dict[str, Any]:
        if isinstance(cond, AllOf):
            if not cond.items:
                return {MARKER: 1}
            return {"$and": [self.to_json(c, used) for c in cond.items]}
        if isinstance(cond, AnyOf):
            return {"$or": [self.to_json(c, used) for c in cond.items]}
        f, op, v = cond.field, cond.op, cond.value
        if op in ("contains", "prefix", "regex"):
            name = self.field(cond)
            used.add(int(name[1:]))
            return {name: True}
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
        raise AssertionError(f"unknown op {op}")

    def evaluate(
        self,
        fact: Mapping[str, Any],
        wanted: Sequence[int],
        truth: dict[int, bool],
        out: dict[str, Any],
    ) -> None:
        """Add ``p<k>: True`` for each wanted predicate that holds (absent means false)."""
        for k in wanted:
            holds = truth.get(k)
            if holds is None:
                field, test = self.tests[k]
                value = fact.get(field)
                holds = truth[k] = isinstance(value, str) and bool(test(value))
            if holds:
                out[f"p{k}"] = True


def category_scope(cond: Cond, codes: Sequence[str]) -> frozenset[str] | None:
    """Category codes ``cond`` can possibly match, or None when it does not restrict them."""
    if isinstance(cond, Predicate):
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
    predicates: tuple[int, ...] = ()


MAX_PREDICATES_PER_RULESET = 150  # a message holds < 256 properties in the engine


def _chunks(
    indexes: Sequence[int],
    compiled: Mapping[int, tuple[Any, set[int]]],
    max_rules: int,
) -> list[tuple[list[int], set[int]]]:
    """Split a bucket into shards bounded by rule count and by distinct text predicates."""
    out: list[tuple[list[int], set[int]]] = []
    chunk: list[int] = []
    preds: set[int] = set()
    for i in indexes:
        merged = preds | compiled[i][1]
        if chunk and (len(chunk) >= max_rules or len(merged) > MAX_PREDICATES_PER_RULESET):
            out.append((chunk, preds))
            chunk, merged = [], set(compiled[i][1])
        chunk.append(i)
        preds = merged
    if chunk:
        out.append((chunk, preds))
    return out


def _drop_rulesets(handles: list[int]) -> None:
    with _LOCK:
        for handle in handles:
            with contextlib.suppress(Exception):  # best effort at garbage collection
                durable_rules_engine.delete_ruleset(handle)


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
        self._preds = TextPredicates()
        self._visits: dict[tuple[int, str | None], list[_Shard]] = {}
        codes = sorted(self._groups)
        definitions: dict[str, dict[str, Any]] = {}
        for t_index, table in enumerate(self.tables):
            buckets: dict[str, list[int]] = {}
            for r_index, rule in enumerate(table.rules):
                scope = category_scope(rule.cond, codes)
                groups = (
                    None if scope is None else {self._groups[c] for c in scope if c in self._groups}
                )
                if groups is not None and not groups:
                    continue  # can never match a known category
                if groups is None or len(groups) > fanout_limit:
                    buckets.setdefault(WILDCARD, []).append(r_index)
                else:
                    for g in sorted(groups):
                        buckets.setdefault(g, []).append(r_index)
            compiled: dict[int, tuple[dict[str, Any], set[int]]] = {}
            for indexes in buckets.values():
                for i in indexes:
                    if i not in compiled:
                        used: set[int] = set()
                        compiled[i] = (self._preds.to_json(table.rules[i].cond, used), used)
            per_group: dict[str, list[_Shard]] = {}
            for group, indexes in sorted(buckets.items()):
                for chunk, preds in _chunks(indexes, compiled, max_rules_per_ruleset):
                    name = f"gf{self._serial}_t{t_index}_{len(definitions)}"
                    definitions[name] = {
                        f"r{i}": {"all": [{"m": {"$and": [{MARKER: 1}, compiled[i][0]]}}], "pri": i}
                        for i in chunk
                    }
                    per_group.setdefault(group, []).append(
                        _Shard(name, chunk[0], len(chunk), tuple(sorted(preds)))
                    )
            self._shards.append(per_group)
        self._handles: dict[str, int] = {}
        with _LOCK:
            try:
                for name, definition in definitions.items():
                    self._handles[name] = durable_rules_engine.create_ruleset(
                        name, json.dumps(definition, ensure_ascii=False)
                    )
            except Exception as exc:
                _drop_rulesets(list(self._handles.values()))
                raise RuleTooComplex(self._culprits(), str(exc)) from exc
        self.ruleset_count = len(definitions)
        self.largest_ruleset = max((len(d) for d in definitions.values()), default=0)
        weakref.finalize(self, _drop_rulesets, list(self._handles.values()))


    @property
    def text_predicates(self) -> TextPredicates:
        """The policy's text tests (contains, prefix, regex), evaluated exactly in Python
        and handed to durable_rules as boolean fields ``p<k>``; replays read them to key
        their memo by the same truths."""
        return self._preds
    def _culprits(self) -> list[tuple[int, int]]:
        """Find the rules the engine refuses, by compiling each alone."""
        bad: list[tuple[int, int]] = []
        for t_index, table in enumerate(self.tables):
            for r_index, rule in enumerate(table.rules):
                probe = {
                    "r": {
                        "all": [
                            {"m": {"$and": [{MARKER: 1}, self._preds.to_json(rule.cond, set())]}}
                        ]
                    }
                }
                try:
                    handle = durable_rules_engine.create_ruleset(
                        f"gfprobe{next(_SERIAL)}", json.dumps(probe, ensure_ascii=False)
                    )
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
        truth: dict[int, bool] = {}
        with _LOCK:
            for t_index, table in enumerate(self.tables):
                shards = self._visit(t_index, group)
                found: set[int] = set()
                for shard in shards:
                    if table.hit == "first" and found and min(found) < shard.first_index:
                        break
                    message = dict(fact)
                    if shard.predicates:
                        self._preds.evaluate(fact, shard.predicates, truth, message)
                    found.update(self._post(shard.name, message, as_fact=table.hit != "first"))
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
            status, state = (
                durable_rules_engine.assert_fact if as_fact else durable_rules_engine.assert_event
            )(handle, text)
            if status == 0:
                action = durable_rules_engine.start_action_for_state(handle, state)
                while action:
                    payload = action[1] if isinstance(action, tuple | list) else action
                    # the queued action is '{"r<index>": {...message}}': read the rule name
                    fired.append(int(payload[3 : payload.index('"', 3)]))
                    action = durable_rules_engine.complete_and_start_action(handle, state)
            elif status not in (1, 2):  # 1: no rule matched, 2: observed
                raise RoutingError(f"rules engine returned status {status} for ruleset {ruleset}")
        finally:
            if as_fact:
                durable_rules_engine.retract_fact(handle, text)
        return fired
