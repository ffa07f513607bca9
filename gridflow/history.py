"""Case history for routing conditions (BRIEF §5: "≥3 cases of the same category at the
same address within 30 days").

A rule's ``history`` condition counts the cases reported in a window before the case
(``within``, calendar time) that share some of its fields (``same``); the count includes
the case itself. Routing reads the counts from a :class:`CaseHistory`: an engine counts
in its store, a routing replay counts the log's earlier rows, rule tests count the
``earlier`` cases written beside them (:class:`History`, in memory).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from pydantic import ValidationError

from gridflow.calendar import parse_duration
from gridflow.errors import CaseValidationError, RoutingError, field_errors
from gridflow.schema import CaseIn

__all__ = ["HISTORY_FIELDS", "CaseHistory", "History", "HistorySpec", "window_of"]

#: The case fields a history condition may compare (``same``), in this order.
HISTORY_FIELDS = ("category", "location", "address", "reporter")
_PREFIX = "h_"
_WALL = {"days": 86_400, "hours": 3_600, "minutes": 60}


def window_of(text: str) -> timedelta:
    """A history window: calendar time (``30d``, ``72h``, ``90m``). Working time is
    refused (``ValueError``): "the last 30 days" means the days on the wall calendar."""
    d = parse_duration(text)
    seconds = _WALL.get(d.unit)
    if seconds is None:
        raise ValueError(f"a history window counts calendar time ('30d', '72h'), not {text!r}")
    return timedelta(seconds=round(d.amount * seconds))


@dataclass(frozen=True, slots=True)
class HistorySpec:
    """Which cases a history condition counts: ``same`` fields, in ``HISTORY_FIELDS``
    order, reported within ``window`` before the case."""

    same: tuple[str, ...]
    window: timedelta

    @property
    def field(self) -> str:
        """The fact field holding the count (one per distinct spec of a policy)."""
        return f"{_PREFIX}{'_'.join(self.same)}_{int(self.window.total_seconds())}s"

    @classmethod
    def of_field(cls, name: str) -> HistorySpec | None:
        """The spec of a fact field made by :attr:`field`; ``None`` for other fields."""
        if not name.startswith(_PREFIX) or not name.endswith("s"):
            return None
        *same, seconds = name[len(_PREFIX):-1].split("_")
        if not same or not seconds.isdigit() or any(s not in HISTORY_FIELDS for s in same):
            return None
        return cls(tuple(same), timedelta(seconds=int(seconds)))

    def label(self) -> str:
        return f"history(same {'+'.join(self.same)}, within {_text(self.window)})"

    def values(self, case: CaseIn) -> tuple[str, ...] | None:
        """The case's values of the ``same`` fields; ``None`` when one is missing (a case
        without an address has no "same address" history)."""
        out = []
        for name in self.same:
            value = getattr(case, name)
            if not isinstance(value, str) or not value.strip():
                return None
            out.append(value)
        return tuple(out)


def _text(window: timedelta) -> str:
    seconds = int(window.total_seconds())
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class CaseHistory(Protocol):
    """Where routing reads the history counts from: :class:`History`, or a store
    transaction (``StoreTx``, a batch's ``UnitOfWork``)."""

    def count_reported(
        self, same: Sequence[str], values: Sequence[str], since: datetime, before: datetime
    ) -> int:
        """How many other cases were reported in ``[since, before)`` with ``values`` in
        the ``same`` fields."""
        ...


class History:
    """An in-memory :class:`CaseHistory`: the cases given (or :meth:`add`-ed) so far.

    ``only``: the ``same`` combinations that will be asked for (e.g. ``{s.same for s in
    policy.router.history_specs}``); then only their counts are kept, not the cases (a
    replay of a million rows), and other combinations raise ``ValueError``.
    :meth:`forget_before` drops what no window will reach any more (a streaming replay)."""

    def __init__(
        self,
        cases: Iterable[CaseIn | Mapping[str, Any]] = (),
        *,
        only: Iterable[Sequence[str]] | None = None,
    ):
        self._cases: list[tuple[float, Mapping[str, object]]] | None = (
            [] if only is None else None
        )
        self._index: dict[tuple[str, ...], dict[tuple[object, ...], list[float]]] = {
            tuple(same): {} for same in only or ()
        }
        self._n = 0
        self._horizon: float | None = None  # cases reported before it are forgotten
        for case in cases:
            self.add(case)

    def __len__(self) -> int:
        """The number of cases added (forgotten ones included)."""
        return self._n

    def forget_before(self, when: datetime) -> None:
        """Drop the cases reported before ``when``: the counts of windows starting at or
        after it stay exact, a count of a window starting before it raises
        :class:`~gridflow.errors.RoutingError` (it would be too low). A replay of a log in
        time order calls it as the log advances, so that memory holds the cases its
        windows can still reach, not the whole log."""
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValueError(f"naive datetime {when.isoformat()}: give an aware time")
        t = when.astimezone(UTC).timestamp()
        if self._horizon is not None and t <= self._horizon:
            return
        self._horizon = t
        if self._cases is not None:
            self._cases = [entry for entry in self._cases if entry[0] >= t]
        for index in self._index.values():
            gone = []
            for key, times in index.items():
                cut = bisect.bisect_left(times, t)
                if cut == len(times):
                    gone.append(key)
                elif cut:
                    del times[:cut]
            for key in gone:
                del index[key]

    def add(self, case: CaseIn | Mapping[str, Any]) -> None:
        """Remember a case, a :class:`CaseIn` or a document as ``route`` takes it (one
        without ``reported_at`` has no place in time: skipped)."""
        if not isinstance(case, CaseIn):
            try:
                case = CaseIn.model_validate(case)
            except ValidationError as exc:
                raise CaseValidationError(field_errors(exc.errors()), source="history") from None
        if case.reported_at is not None:
            self.add_fields(case.reported_at, {n: getattr(case, n) for n in HISTORY_FIELDS})

    def add_fields(self, reported_at: datetime, fields: Mapping[str, object]) -> None:
        """Remember a case by its report time and ``HISTORY_FIELDS`` values."""
        at = reported_at.astimezone(UTC).timestamp()
        self._n += 1
        if self._horizon is not None and at < self._horizon:
            return  # no window a count may still ask for reaches it
        if self._cases is not None:
            self._cases.append((at, fields))
        for same, index in self._index.items():
            self._put(index, same, at, fields)

    @staticmethod
    def _put(index: dict[tuple[object, ...], list[float]], same: tuple[str, ...], at: float,
             fields: Mapping[str, object]) -> None:
        values = tuple(fields.get(name) for name in same)
        if all(isinstance(v, str) and v.strip() for v in values):
            bisect.insort(index.setdefault(values, []), at)

    def count_reported(
        self, same: Sequence[str], values: Sequence[str], since: datetime, before: datetime
    ) -> int:
        key = tuple(same)
        start = since.astimezone(UTC).timestamp()
        if self._horizon is not None and start < self._horizon:
            kept = datetime.fromtimestamp(self._horizon, UTC).isoformat()
            raise RoutingError(
                f"history: cannot count the cases reported from {since.isoformat()} on, the "
                f"cases before {kept} are no longer kept (a case far out of order: sort the "
                "log by reported_at)"
            )
        index = self._index.get(key)
        if index is None:
            if self._cases is None:
                raise ValueError(f"this history keeps no counts by {'+'.join(key)}")
            index = self._index[key] = {}
            for at, fields in self._cases:
                self._put(index, key, at, fields)
        times = index.get(tuple(values), [])
        lo = bisect.bisect_left(times, start)
        hi = bisect.bisect_left(times, before.astimezone(UTC).timestamp())
        return hi - lo
