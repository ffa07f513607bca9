"""The current state of a case, folded from its events (pure functions, no I/O).

:func:`project` is *the* definition of a case's state: the engine computes the new state
of a case by folding the events of a command onto the stored state with :func:`apply`
(the same code), so ``project(history) == stored data`` always holds.

Everything an event changes is carried in the event itself (``payload``): the engine does
the routing, calendar arithmetic and checks, the projection only records the outcome. The
projection is plain JSON data (times as ISO 8601 strings in UTC, lists not tuples), so it
survives a round trip through the database unchanged.

Event types are the workflow's trigger names (``file``, ``dispatch``, ``warn``,
``mark_overdue``, ``escalate``, ``appeal_routing``, ...) plus ``reported`` for intake.
Every event whose trigger changes the state carries ``payload["state"]``: the state after it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from gridflow.events import EventLike

__all__ = ["EventLike", "apply", "initial", "iso", "parse_time", "project"]


_ISO: dict[datetime, str] = {}  # recent answers: a replay formats the same times often


def iso(when: datetime) -> str:
    """A time as the projection stores it: ISO 8601 in UTC."""
    if when.tzinfo is UTC:
        return when.isoformat()
    if when.tzinfo is None:  # local time (the engine refuses naive times before this)
        return when.astimezone(UTC).isoformat()
    text = _ISO.get(when)
    if text is None:
        text = when.astimezone(UTC).isoformat()
        if len(_ISO) >= 4096:
            _ISO.clear()
        _ISO[when] = text
    return text


def parse_time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def initial() -> dict[str, Any]:
    """The state of a case before its first event."""
    return {
        "id": None,
        "version": 0,
        "state": None,
        "case": None,
        "idempotency_key": None,
        "category": None,
        "location": None,
        "reported_at": None,
        "reported_by": None,
        "on_spot": False,
        "unit": None,
        "lead": None,
        "assist": [],
        "summoned": [],
        "tier": None,
        "pool": None,
        "handler": None,
        "decision": None,
        "notify": [],
        "time_limit": None,
        "dispatched_at": None,
        "due_at": None,
        "warn_at": None,
        "warned": False,
        "overdue": False,
        "returned_by": [],
        "excluded": [],
        "rework_count": 0,
        "reopen_count": 0,
        "extensions": [],
        "pending_extension": None,
        "deferred_at": None,
        "evidence": [],
        "verified": False,
        "verified_at": None,
        "closed_at": None,
        "evaluated_at": None,
        "satisfaction": None,
        "cancel_reason": None,
        "escalations": [],
        "pending_appeal": None,
        "appeals": [],
        "exemptions": [],
        "updated_at": None,
    }


def project(events: Iterable[EventLike]) -> dict[str, Any]:
    """Fold a case's events (oldest first) into its state."""
    state = initial()
    for event in events:
        state = apply(state, event)
    return state


def apply(state: Mapping[str, Any], event: EventLike) -> dict[str, Any]:
    """The state after ``event``; ``state`` itself is not modified (nested lists are copied
    on write), so a failed command can never corrupt the state it started from."""
    s = dict(state)
    p = event.payload
    at = iso(event.at)
    s["version"] = int(s.get("version", 0)) + 1
    s["updated_at"] = at
    if "state" in p:
        s["state"] = p["state"]
    handler = _HANDLERS.get(event.type)
    if handler is not None:
        handler(s, event, p, at)
    return s


# --------------------------------------------------------------------------- handlers


def _reported(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    case = dict(p["case"])
    s["id"] = p["case_id"]
    s["case"] = case
    s["idempotency_key"] = p.get("idempotency_key")
    s["category"] = case.get("category")
    s["location"] = case.get("location")
    s["reported_at"] = p.get("reported_at", at)
    s["reported_by"] = e.actor_id


def _on_spot(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    s["on_spot"] = True
    _set_decision(s, p)
    s["handler"] = e.actor_id
    s["evidence"] = [*s["evidence"], *p.get("evidence", [])]


def _set_decision(s: dict[str, Any], p: Mapping[str, Any]) -> None:
    d = dict(p["decision"])
    s["decision"] = d
    s["lead"] = p["lead"]
    s["assist"] = list(d.get("assist", []))
    s["summoned"] = list(p.get("summoned", []))
    s["tier"] = p["tier"]
    s["unit"] = p.get("unit")
    s["pool"] = p.get("pool")
    s["notify"] = list(d.get("notify", []))
    s["time_limit"] = d.get("time_limit")


def _dispatch(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    _set_decision(s, p)
    s["handler"] = p.get("handler")  # a named handler the rule assigned, else who accepts
    s["dispatched_at"] = at
    s["due_at"] = p.get("due_at")
    s["warn_at"] = p.get("warn_at")
    s["warned"] = False
    s["overdue"] = False
    s["verified"] = False


def _take(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    s["handler"] = e.actor_id


def _reassign(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    s["handler"] = p.get("handler")
    s["pool"] = p.get("pool")


def _feedback(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    s["evidence"] = [*s["evidence"], *p.get("evidence", [])]


def _verify(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    s["verified"] = True
    s["verified_at"] = at


def _close(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    s["closed_at"] = at


def _evaluate(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    s["satisfaction"] = p["satisfaction"]
    s["evaluated_at"] = at


def _cancel(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    s["cancel_reason"] = e.reason


def _back_to_dispatch(s: dict[str, Any]) -> None:
    s["lead"] = None
    s["pool"] = None
    s["handler"] = None
    s["due_at"] = None
    s["warn_at"] = None
    s["pending_extension"] = None


def _return(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    dept = p["department"]
    if dept not in s["returned_by"]:
        s["returned_by"] = [*s["returned_by"], dept]
    if dept not in s["excluded"]:
        s["excluded"] = [*s["excluded"], dept]
    _back_to_dispatch(s)


def _request_extension(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    s["pending_extension"] = {
        "extra": p["extra"],
        "reason": e.reason,
        "requested_by": e.actor_id,
        "requested_at": at,
    }


def _decide_extension(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    request = dict(s["pending_extension"] or {})
    approved = e.type == "approve_extension"
    request.update({"status": "approved" if approved else "denied", "decided_at": at,
                    "decided_by": e.actor_id})
    s["extensions"] = [*s["extensions"], request]
    s["pending_extension"] = None
    if approved:
        s["due_at"] = p["due_at"]
        s["warn_at"] = p.get("warn_at")
        s["warned"] = False
        s["overdue"] = False


def _defer(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    s["deferred_at"] = at


def _resume(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    s["deferred_at"] = None
    if "due_at" in p:  # the deadline moved by the paused time
        s["due_at"] = p["due_at"]
        s["warn_at"] = p.get("warn_at")
        s["warned"] = bool(p.get("warned"))
        s["overdue"] = bool(p.get("overdue"))


def _rework(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    s["rework_count"] = int(s["rework_count"]) + 1
    s["verified"] = False


def _reopen(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    s["reopen_count"] = int(s["reopen_count"]) + 1
    s["verified"] = False
    s["closed_at"] = None
    s["evaluated_at"] = None
    s["satisfaction"] = None
    s["due_at"] = p.get("due_at")
    s["warn_at"] = p.get("warn_at")
    s["warned"] = False
    s["overdue"] = False


def _escalate(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    s["escalations"] = [
        *s["escalations"],
        {"from": p["from_tier"], "to": p["to_tier"], "at": at, "by": e.actor_id,
         "reason": e.reason, "cause": p.get("cause", "person")},
    ]
    s["tier"] = p["to_tier"]
    if p.get("unit") is not None:
        s["unit"] = p["unit"]


def _summon(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    s["summoned"] = [*s["summoned"], *(d for d in p["departments"] if d not in s["summoned"])]


def _warn(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    s["warned"] = True


def _overdue(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    s["warned"] = True
    s["overdue"] = True


def _appeal(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    s["pending_appeal"] = {
        "kind": p["kind"],
        "filed_by": e.actor_id,
        "role": e.actor_role,
        "department": p.get("department"),
        "filed_at": at,
        "reason": e.reason,
    }
    if p.get("criteria") is not None:  # score appeals naming the criteria they contest
        s["pending_appeal"]["criteria"] = list(p["criteria"])


def _decide_appeal(s: dict[str, Any], e: EventLike, p: Mapping[str, Any], at: str) -> None:
    appeal = dict(s["pending_appeal"] or {})
    upheld = e.type != "reject_appeal"
    appeal.update({"upheld": upheld, "decided_by": e.actor_id, "decided_at": at,
                   "decision_reason": e.reason})
    s["appeals"] = [*s["appeals"], appeal]
    s["pending_appeal"] = None
    if "exemption" in p:
        s["exemptions"] = [*s["exemptions"], dict(p["exemption"])]
    if e.type == "uphold_routing_appeal":
        dept = appeal.get("department")
        if dept and dept not in s["excluded"]:
            s["excluded"] = [*s["excluded"], dept]
        _back_to_dispatch(s)
    elif e.type == "uphold_resident_appeal":
        _reopen(s, e, p, at)


_HANDLERS: dict[str, Any] = {
    "reported": _reported,
    "resolve_on_spot": _on_spot,
    "dispatch": _dispatch,
    "accept": _take,
    "claim": _take,
    "reassign": _reassign,
    "feedback": _feedback,
    "verify": _verify,
    "close": _close,
    "evaluate": _evaluate,
    "cancel": _cancel,
    "return_case": _return,
    "request_extension": _request_extension,
    "approve_extension": _decide_extension,
    "deny_extension": _decide_extension,
    "defer": _defer,
    "resume": _resume,
    "rework": _rework,
    "reopen": _reopen,
    "escalate": _escalate,
    "summon": _summon,
    "warn": _warn,
    "mark_overdue": _overdue,
    "appeal_routing": _appeal,
    "appeal_score": _appeal,
    "appeal_resident": _appeal,
    "uphold_routing_appeal": _decide_appeal,
    "uphold_score_appeal": _decide_appeal,
    "uphold_resident_appeal": _decide_appeal,
    "reject_appeal": _decide_appeal,
}
