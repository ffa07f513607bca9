"""Plain records exchanged with the event store (no database types leak out of here)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["CaseRecord", "EventRecord", "NewEvent", "OutboxMessage", "TimerRecord"]


@dataclass
class CaseRecord:
    """The current-state row of one case (its projection plus the columns worklists query).

    ``version`` is the number of events the case has; the store uses it for optimistic
    concurrency. ``updated_at`` is filled by the store (the time of the latest event) and
    ignored on writes. Every datetime is timezone-aware; the store returns them in UTC.
    """

    case_id: str
    version: int
    state: str
    data: dict[str, Any]
    idempotency_key: str | None = None
    category: str | None = None
    unit: str | None = None
    lead_department: str | None = None
    pool: str | None = None
    handler: str | None = None
    tier: str | None = None
    due_at: datetime | None = None
    warn_at: datetime | None = None
    reported_at: datetime | None = None
    dispatched_at: datetime | None = None
    closed_at: datetime | None = None
    policy_version: str | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True)
class NewEvent:
    """An event to append; the store assigns its id and per-case sequence number."""

    type: str
    actor_id: str
    actor_role: str
    at: datetime
    reason: str | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)
    policy_version: str | None = None


@dataclass(frozen=True)
class EventRecord:
    """A stored, immutable event. ``seq`` runs 1, 2, 3, … per case without gaps."""

    id: int
    case_id: str
    seq: int
    type: str
    actor_id: str
    actor_role: str
    at: datetime
    reason: str | None
    payload: dict[str, Any]
    policy_version: str | None

    def to_dict(self) -> dict[str, Any]:
        """The event as JSON-ready data (``at`` as an ISO 8601 string in UTC)."""
        return {
            "event_id": self.id,
            "case_id": self.case_id,
            "seq": self.seq,
            "type": self.type,
            "actor_id": self.actor_id,
            "actor_role": self.actor_role,
            "at": self.at.isoformat(),
            "reason": self.reason,
            "payload": self.payload,
            "policy_version": self.policy_version,
        }


@dataclass(frozen=True)
class TimerRecord:
    """A deadline timer of a case (``kind`` e.g. ``warn``, ``overdue``, ``escalate``)."""

    id: int
    case_id: str
    kind: str
    due_at: datetime
    fired_at: datetime | None


@dataclass(frozen=True)
class OutboxMessage:
    """One integration event waiting to be published (``payload`` is ``EventRecord.to_dict()``)."""

    id: int
    event_id: int
    case_id: str
    seq: int
    type: str
    payload: dict[str, Any]
    created_at: datetime
