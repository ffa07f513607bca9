"""gridflow's persistence: an append-only case event store on SQLAlchemy.

This package is the only part of gridflow that imports SQLAlchemy. See
:class:`Store` (bind it to a URL, engine, connection or session) and :class:`StoreTx`.
"""

from gridflow.store.core import IdempotencyConflict, Store, StoreTx, make_engine
from gridflow.store.records import (
    CaseRecord,
    EventRecord,
    NewEvent,
    OutboxMessage,
    TimerRecord,
)
from gridflow.store.tables import StoreTables, UTCDateTime, build_tables

__all__ = [
    "CaseRecord",
    "EventRecord",
    "IdempotencyConflict",
    "NewEvent",
    "OutboxMessage",
    "Store",
    "StoreTables",
    "StoreTx",
    "TimerRecord",
    "UTCDateTime",
    "build_tables",
    "make_engine",
]
