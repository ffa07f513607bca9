"""Hypothesis strategies for harnesses: valid cases and case-log records for a policy.

Needs ``hypothesis`` (``pip install 'gridflow[testing]'``; gridflow itself does not
import this module).

    from hypothesis import given
    from gridflow.strategies import cases

    POLICY = gridflow.load_policy("policies/wujin")

    @given(cases(POLICY))
    def test_every_case_gets_a_department(case):
        assert POLICY.route(case).lead in POLICY.registry.departments

Every drawn case passes :meth:`Policy.validate_case`: known categories, units and
channels, declared attributes with their types and allowed values. Descriptions (and
addresses and reporters, when drawn) often contain the words the policy's rules look
for, so the text rules fire; times fall on days the policy's calendar covers, working
hours and holidays included.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

try:
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gridflow.strategies needs hypothesis: pip install 'gridflow[testing]'"
    ) from exc

from gridflow.conditions import ADDRESS, DESCRIPTION, REPORTER, tests_of
from gridflow.importer import LogRecord
from gridflow.policy import Policy
from gridflow.schema import CaseIn

__all__ = ["case_ins", "cases", "log_records", "reported_times"]

_FILLER = ["群众反映", "路口", "小区", "楼下", "请处理", "x", "1", " "]
_ADDRESS_FILLER = ["景荣小区", "1号楼", "蓝天路", "3单元", " "]
_REPORTER_FILLER = ["gw-", "12345-", "居民", "0", "1"]


def _words(policy: Policy, field: str = DESCRIPTION) -> list[str]:
    """The texts the policy's rules look for in ``field`` (eq, in, contains and prefix
    tests)."""
    out: list[str] = []
    for table in policy.router.rules:
        for rule in table:
            for t in tests_of(rule.cond):
                if t.field == field and t.op in ("contains", "prefix", "eq", "in"):
                    values = t.value if isinstance(t.value, list | tuple) else [t.value]
                    out.extend(str(v) for v in values if str(v) not in out)
    return out


def reported_times(policy: Policy, *, start: date | None = None, days: int = 365
                   ) -> st.SearchStrategy[datetime]:
    """Aware times on days the policy's calendar covers (``start``: default 2026-01-01)."""
    first = start or date(2026, 1, 1)
    cal = policy.calendar
    tz = cal.timezone
    covered = [first + timedelta(days=i) for i in range(days)
               if cal.covers(first + timedelta(days=i))]
    if not covered:
        raise ValueError(f"the calendar covers none of the {days} days from {first}")
    return st.builds(
        lambda d, minute: datetime(d.year, d.month, d.day, tzinfo=tz) + timedelta(minutes=minute),
        st.sampled_from(covered), st.integers(0, 24 * 60 - 1),
    )


def _attribute(policy: Policy, name: str) -> st.SearchStrategy[Any]:
    allowed = policy.registry.attribute_values.get(name)
    if allowed:
        return st.sampled_from(list(allowed))
    kind = policy.registry.attributes[name]
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(0, 500)
    if kind == "number":
        return st.one_of(st.integers(0, 500), st.floats(0, 500, allow_nan=False))
    return st.text(max_size=8)


def cases(policy: Policy, *, with_time: bool = True, start: date | None = None,
          days: int = 365) -> st.SearchStrategy[dict[str, Any]]:
    """Valid case documents (dicts, as hosts submit them) for ``policy``."""
    reg = policy.registry
    words = _words(policy) or ["问题"]
    description = st.lists(st.sampled_from(words + _FILLER), max_size=5).map("".join)
    address_words = _words(policy, ADDRESS) + _ADDRESS_FILLER
    reporter_words = _words(policy, REPORTER) + _REPORTER_FILLER
    optional: dict[str, st.SearchStrategy[Any]] = {
        "address": st.lists(st.sampled_from(address_words), min_size=1, max_size=3).map("".join),
        # the rules' own reporters, or made of their prefixes and some filler
        "reporter": st.one_of(
            st.sampled_from(reporter_words),
            st.lists(st.sampled_from(reporter_words), min_size=1, max_size=2).map("".join),
        ),
        "urgency": st.sampled_from(["normal", "urgent", "emergency"]),
        "attributes": st.fixed_dictionaries(
            {}, optional={name: _attribute(policy, name) for name in sorted(reg.attributes)}
        ),
    }
    if with_time:
        optional["reported_at"] = reported_times(policy, start=start, days=days).map(
            lambda t: t.isoformat()
        )
    return st.fixed_dictionaries(
        {
            "category": st.sampled_from(sorted(reg.categories)),
            "location": st.sampled_from(sorted(reg.units)),
            "description": description,
            "channel": st.sampled_from(list(reg.channels)),
        },
        optional=optional,
    )


def case_ins(policy: Policy, **kwargs: Any) -> st.SearchStrategy[CaseIn]:
    """Like :func:`cases`, validated into :class:`CaseIn`."""
    return cases(policy, **kwargs).map(policy.validate_case)


@st.composite
def _record(draw: st.DrawFn, policy: Policy, start: date | None, days: int, row: int
            ) -> LogRecord:
    doc = draw(cases(policy, with_time=False))
    reported = draw(reported_times(policy, start=start, days=days))
    doc["reported_at"] = reported.isoformat()
    doc["id"] = f"H{row:06d}"
    case = policy.validate_case(doc)
    status = draw(st.sampled_from(["closed", "closed", "closed", "open", "cancelled",
                                   "deferred"]))
    on_spot = status == "closed" and draw(st.integers(0, 4)) == 0
    gaps = draw(st.lists(st.integers(0, 3 * 24 * 60), min_size=7, max_size=7))
    times: dict[str, datetime] = {}
    t = reported
    names = ("filed_at", "dispatched_at", "accepted_at", "handled_at", "verified_at",
             "closed_at", "evaluated_at")
    for name, gap in zip(names, gaps, strict=True):
        t = t + timedelta(minutes=gap)
        if draw(st.integers(0, 3)) > 0:  # sometimes missing: the replay fills it
            times[name] = t.astimezone(UTC) if draw(st.booleans()) else t
    if status != "closed":
        times.pop("closed_at", None)
        times.pop("evaluated_at", None)
    satisfaction = draw(st.sampled_from([None, "satisfied", "basically_satisfied",
                                         "dissatisfied"])) if status == "closed" else None
    departments = sorted(policy.registry.departments)
    return LogRecord(
        row=row,
        case=case,
        department=draw(st.sampled_from([None, *departments])),
        satisfaction=satisfaction,
        status=status,
        on_spot=on_spot,
        returns=draw(st.integers(0, 2)) if not on_spot else 0,
        rework=draw(st.integers(0, 2)) if not on_spot else 0,
        extension=draw(st.sampled_from([None, "1wd", "4wh"])) if not on_spot else None,
        **times,
    )


def log_records(policy: Policy, *, min_size: int = 0, max_size: int = 20,
                start: date | None = None, days: int = 30) -> st.SearchStrategy[list[LogRecord]]:
    """Case-log records (as :mod:`gridflow.importer` yields them) in ``reported_at``
    order, with later steps in time order and some missing, statuses, returns, rework
    and extensions — input for replay property tests."""

    @st.composite
    def build(draw: st.DrawFn) -> list[LogRecord]:
        n = draw(st.integers(min_size, max_size))
        records = [draw(_record(policy, start, days, i + 2)) for i in range(n)]
        return sorted(records, key=lambda r: (r.case.reported_at, r.row))

    return build()
