"""gridflow's persistence: an append-only case event store on SQLAlchemy.

This package is the only part of gridflow that imports SQLAlchemy (and Alembic, for the
migrations in ``gridflow/migrations``). See :class:`Store` (bind it to a URL, engine,
connection or session), :class:`StoreTx` and :func:`upgrade`.
"""

from gridflow.store.core import (
    IdempotencyConflict,
    Store,
    StoreSchemaError,
    StoreTx,
    TransactionConflict,
    make_engine,
)
from gridflow.store.migrate import HEAD, current_revision, upgrade, upgrade_sql
from gridflow.store.records import (
    CaseRecord,
    EventRecord,
    NewEvent,
    OutboxMessage,
    TimerRecord,
)
from gridflow.store.tables import StoreTables, UTCDateTime, build_tables

__all__ = [
    "HEAD",
    "CaseRecord",
    "EventRecord",
    "IdempotencyConflict",
    "NewEvent",
    "OutboxMessage",
    "Store",
    "StoreSchemaError",
    "StoreTables",
    "StoreTx",
    "TimerRecord",
    "TransactionConflict",
    "UTCDateTime",
    "build_tables",
    "current_revision",
    "make_engine",
    "upgrade",
    "upgrade_sql",
]
