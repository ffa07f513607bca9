"""Static analysis of rule conditions: shadowing under ``first``, overlap under ``unique``.

Works on conjunctions of tests (``any`` blocks are expanded into a bounded
disjunctive normal form). Where a question is not decidable from the tests (two
regexes, say) the answer is the safe one: not shadowed, not overlapping.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from gridflow.conditions import AllOf, AnyOf, Cond, Predicate

__all__ = ["dnf", "may_overlap", "may_overlap_by_text", "shadows"]

MAX_TERMS = 32
Term = tuple[Predicate, ...]


def dnf(cond: Cond, limit: int = MAX_TERMS) -> list[Term] | None:
    """Disjunctive normal form as a list of conjunctions, or None when too large."""
    if isinstance(cond, Predicate):
        return [(cond,)]
    if isinstance(cond, AnyOf):
        out: list[Term] = []
        for item in cond.items:
            sub = dnf(item, limit)
            if sub is None:
                return None
            out.extend(sub)
            if len(out) > limit:
                return None
        return out
    terms: list[Term] = [()]
    for item in cond.items:
        sub = dnf(item, limit)
        if sub is None:
            return None
        terms = [a + b for a, b in itertools.product(terms, sub)]
        if len(terms) > limit:
            return None
    return terms


def _implies(b: Predicate, a: Predicate) -> bool:
    """Does test ``b`` holding guarantee test ``a`` holds (same field)?"""
    if a.field != b.field:
        return False
    if a == b:
        return True
    if b.op == "eq":
        return _holds_for(a, b.value)
    if b.op == "in":
        return all(_holds_for(a, v) for v in b.value)
    if a.op == "prefix" and b.op == "prefix":
        return str(b.value).startswith(str(a.value))
    if a.op == "contains" and b.op == "contains":
        return str(a.value) in str(b.value)
    if a.op == "not_in" and b.op == "not_in":
        return set(a.value) <= set(b.value)
    if a.op == "ne" and b.op == "not_in":
        return a.value in b.value
    bounds = {"lt", "lte", "gt", "gte"}
    if a.op in bounds and b.op in bounds:
        x, y = a.value, b.value
        if a.op in ("gt", "gte") and b.op in ("gt", "gte"):
            return bool(y > x or (y == x and (a.op == "gte" or b.op == "gt")))
        if a.op in ("lt", "lte") and b.op in ("lt", "lte"):
            return bool(y < x or (y == x and (a.op == "lte" or b.op == "lt")))
    return False


def _holds_for(t: Predicate, v: Any) -> bool:
    op, x = t.op, t.value
    try:
        if op == "eq":
            return bool(v == x)
        if op == "ne":
            return bool(v != x)
        if op == "in":
            return v in x
        if op == "not_in":
            return v not in x
        if op == "prefix":
            return isinstance(v, str) and v.startswith(x)
        if op == "contains":
            return isinstance(v, str) and x in v
        if op == "lt":
            return bool(v < x)
        if op == "lte":
            return bool(v <= x)
        if op == "gt":
            return bool(v > x)
        if op == "gte":
            return bool(v >= x)
    except TypeError:
        return False
    return False  # regex: not decided


def _term_implies(b: Term, a: Term) -> bool:
    """Every case satisfying conjunction ``b`` satisfies conjunction ``a``."""
    return all(any(_implies(tb, ta) for tb in b) for ta in a)


def shadows(earlier: Cond, later: Cond) -> bool:
    """True when ``later`` can never fire under ``first`` because ``earlier`` always wins."""
    a_terms = dnf(earlier)
    b_terms = dnf(later)
    if a_terms is None or b_terms is None:
        return False
    return all(any(_term_implies(b, a) for a in a_terms) for b in b_terms)


def _field_satisfiable(tests: Sequence[Predicate]) -> bool:
    values: set[Any] | None = None
    for t in tests:
        if t.op == "eq":
            s = {t.value}
        elif t.op == "in":
            s = set(t.value)
        else:
            continue
        values = s if values is None else values & s
    if values is not None:
        return any(all(_holds_for(t, v) for t in tests if t.op != "regex") for v in values)
    prefixes = [str(t.value) for t in tests if t.op == "prefix"]
    for p, q in itertools.combinations(prefixes, 2):
        if not (p.startswith(q) or q.startswith(p)):
            return False
    lo: tuple[float, bool] | None = None
    hi: tuple[float, bool] | None = None
    for t in tests:
        if t.op in ("gt", "gte"):
            cand = (float(t.value), t.op == "gte")
            if lo is None or cand[0] > lo[0] or (cand[0] == lo[0] and not cand[1]):
                lo = cand
        elif t.op in ("lt", "lte"):
            cand = (float(t.value), t.op == "lte")
            if hi is None or cand[0] < hi[0] or (cand[0] == hi[0] and not cand[1]):
                hi = cand
    return not (
        lo is not None
        and hi is not None
        and (lo[0] > hi[0] or (lo[0] == hi[0] and not (lo[1] and hi[1])))
    )


def _term_satisfiable(term: Term) -> bool:
    by_field: dict[str, list[Predicate]] = {}
    for t in term:
        by_field.setdefault(t.field, []).append(t)
    return all(_field_satisfiable(ts) for ts in by_field.values())


def _joint_terms(a: Cond, b: Cond) -> list[Term]:
    """The conjunctions a case satisfying both must satisfy one of (none when too large)."""
    a_terms = dnf(a)
    b_terms = dnf(b)
    if a_terms is None or b_terms is None:
        return []
    return [ta + tb for ta, tb in itertools.product(a_terms, b_terms)]


def may_overlap(a: Cond, b: Cond) -> bool:
    """True when some case certainly can satisfy both (decidable part only)."""
    return any(not any(t.op == "regex" for t in term) and _term_satisfiable(term)
               for term in _joint_terms(a, b))


def may_overlap_by_text(a: Cond, b: Cond) -> bool:
    """True when two conditions that :func:`may_overlap` cannot show to overlap would, if
    their regex tests matched the same description (undecided here: warn, not refuse)."""
    return any(any(t.op == "regex" for t in term)
               and _term_satisfiable(tuple(t for t in term if t.op != "regex"))
               for term in _joint_terms(a, b))


def always(cond: Cond) -> bool:
    return isinstance(cond, AllOf) and not cond.items
