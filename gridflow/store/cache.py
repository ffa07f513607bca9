"""A small cache of case rows this store committed or read (SQLite fast path).

A command reads its case, checks it, and appends. On SQLite most of the read is spent
decoding the row (JSON, times), so the store keeps the rows it wrote or read and, on the
next read, only asks the database for the case's ``version``: a committed version of a
case never changes (it is written together with its events, in one transaction), so a
matching version means the cached row is exactly the stored row. A mismatch reads the
row. Entries are added only when their transaction commits and dropped when it rolls back.

The projection is kept as the JSON text that was stored and decoded on every hit, so
callers always get their own copy (nothing a caller changes can leak into the cache).
Only a store that commits its own transactions uses the cache: under a host's
transaction gridflow cannot know whether its writes will be committed.
"""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from gridflow.store.records import CaseRecord
from gridflow.store.statements import CASE_FIELDS, decode_json

__all__ = ["CachedCase", "CaseCache"]


_DATA = CASE_FIELDS.index("data")
_FIELDS = operator.attrgetter(*CASE_FIELDS)
_TIMES = tuple(
    i for i, name in enumerate(CASE_FIELDS) if name.endswith("_at")
)


@dataclass(frozen=True, slots=True)
class CachedCase:
    version: int
    fields: tuple[Any, ...]  # CaseRecord's fields in order, ``data`` as its JSON text

    @classmethod
    def of(cls, record: CaseRecord, data_text: str) -> CachedCase:
        values = list(_FIELDS(record))
        values[_DATA] = data_text
        for i in _TIMES:  # as the database returns them: in UTC
            v = values[i]
            if v is not None and v.tzinfo is not UTC:
                values[i] = v.astimezone(UTC)
        return cls(record.version, tuple(values))

    def record(self) -> CaseRecord:
        values = list(self.fields)
        values[_DATA] = decode_json(values[_DATA])
        return CaseRecord(*values)


class CaseCache:
    """A thread-safe LRU map ``case_id -> CachedCase``."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[str, CachedCase] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, case_id: str) -> CachedCase | None:
        with self._lock:
            entry = self._entries.get(case_id)
            if entry is not None:
                self._entries.move_to_end(case_id)
            return entry

    def put_all(self, entries: dict[str, CachedCase]) -> None:
        with self._lock:
            for case_id, entry in entries.items():
                old = self._entries.get(case_id)
                if old is not None and old.version > entry.version:
                    continue  # a newer row was cached meanwhile (another thread)
                self._entries[case_id] = entry
                self._entries.move_to_end(case_id)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def drop(self, case_ids: set[str] | list[str]) -> None:
        with self._lock:
            for case_id in case_ids:
                self._entries.pop(case_id, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
