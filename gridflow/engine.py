"""The engine: a facade that carries cases through the 7-step life cycle (BRIEF §4, §6, §7).

An :class:`Engine` is bound to a policy (or a :class:`~gridflow.policy.PolicyHandle`), an
event store and a clock. Every command is ONE store transaction:

1. load the case's current-state row (its projection) and version;
2. check: the workflow graph (state and the actor's role), a reason where the trigger needs
   one, department membership, windows, pending requests;
3. compute the events (routing, calendar arithmetic), fold them onto the projection with
   :func:`gridflow.projection.apply`, and append them with ``expected_version`` — a
   concurrent writer makes the append fail with :class:`ConcurrencyConflict`;
4. re-plan the supervision timers when they changed.

Any exception rolls the transaction back: nothing is written. Every time comes from the
injected clock (``tick(now)`` may pass one explicitly); the engine never reads the wall
clock itself, starts no threads, and imports no database or state-machine library.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from gridflow.calendar import BusinessCalendar, Duration, parse_duration
from gridflow.clock import Clock, SystemClock
from gridflow.errors import (
    CaseNotFound,
    CaseValidationError,
    ConcurrencyConflict,
    FieldError,
    RoleNotAllowed,
    TransitionNotAllowed,
)
from gridflow.handle import PolicyHandle
from gridflow.policy import Policy
from gridflow.projection import apply, initial, iso, parse_time
from gridflow.routing import Decision
from gridflow.schema import CaseIn
from gridflow.scoring import CRITERIA
from gridflow.store import CaseRecord, EventRecord, IdempotencyConflict, NewEvent, Store
from gridflow.store.core import StoreTx
from gridflow.store.tables import MAX_LENGTHS
from gridflow.store.unitofwork import UnitOfWork
from gridflow.workflow import Workflow

__all__ = ["SATISFACTION", "SUPERVISED_STATES", "SYSTEM", "Actor", "CaseView", "Engine"]

#: States in which the time limit runs and supervision timers are armed.
SUPERVISED_STATES: tuple[str, ...] = ("dispatched", "handling", "deferred")
#: Accepted values of ``evaluate(satisfaction=...)``.
SATISFACTION: tuple[str, ...] = ("satisfied", "basically_satisfied", "dissatisfied")
_APPEAL_KINDS = ("routing", "score", "resident")
_MAX_EVIDENCE = 50
_MAX_TEXT = 4000
_KEY_NAMESPACE = uuid.UUID("8f0c3c1e-6d1a-4f55-9a53-2f1e6b7c9d10")


@dataclass(frozen=True)
class Actor:
    """Who fires a command: an id, a workflow role, and where they belong."""

    id: str
    role: str
    department: str | None = None
    unit: str | None = None


#: The actor of supervision and automatic escalation events.
SYSTEM = Actor("gridflow", "system")


@dataclass(frozen=True)
class CaseView:
    """A read-only view of one case (its projection; ``data`` holds every field)."""

    id: str
    state: str
    version: int
    category: str | None
    location: str | None
    unit: str | None
    lead: str | None
    assist: tuple[str, ...]
    summoned: tuple[str, ...]
    tier: str | None
    pool: str | None
    handler: str | None
    reported_at: datetime | None
    dispatched_at: datetime | None
    due_at: datetime | None
    warn_at: datetime | None
    closed_at: datetime | None
    warned: bool
    overdue: bool
    returned_by: tuple[str, ...]
    rework_count: int
    reopen_count: int
    extensions: tuple[Mapping[str, Any], ...]
    pending_extension: Mapping[str, Any] | None
    pending_appeal: Mapping[str, Any] | None
    appeals: tuple[Mapping[str, Any], ...]
    exemptions: tuple[Mapping[str, Any], ...]
    escalations: tuple[Mapping[str, Any], ...]
    satisfaction: str | None
    on_spot: bool
    verified: bool
    evidence: tuple[str, ...]
    decision: Mapping[str, Any] | None
    data: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> CaseView:
        view = object.__new__(cls)
        # The other fields are computed when first read (__getattr__): a replay reads a
        # handful of a command's view, and building all 33 cost as much as the command's
        # projection step.
        view.__dict__.update(id=data["id"], state=data["state"], version=data["version"],
                             data=data)
        return view

    if not TYPE_CHECKING:  # type checkers see the declared fields only

        def __getattr__(self, name: str) -> Any:
            make = _VIEW_FIELDS.get(name)
            data = self.__dict__.get("data")
            if make is None or data is None:
                raise AttributeError(f"'CaseView' object has no attribute '{name}'")
            value = self.__dict__[name] = make(data)
            return value


def _times(key: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda d: parse_time(d[key])


def _tuple(key: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda d: tuple(d[key])


def _plain(key: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda d: d[key]


_VIEW_FIELDS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    **{k: _plain(k) for k in (
        "category", "location", "unit", "lead", "tier", "pool", "handler", "warned", "overdue",
        "rework_count", "reopen_count", "pending_extension", "pending_appeal", "satisfaction",
        "on_spot", "verified", "decision")},
    **{k: _tuple(k) for k in (
        "assist", "summoned", "returned_by", "extensions", "appeals", "exemptions",
        "escalations", "evidence")},
    **{k: _times(k) for k in (
        "reported_at", "dispatched_at", "due_at", "warn_at", "closed_at")},
}



#: (case id, version) that commands must find (:meth:`Engine.expecting`)
_EXPECTED: ContextVar[tuple[str, int] | None] = ContextVar("gridflow_expected", default=None)


def _invalid(name: str, message: str) -> CaseValidationError:
    """A command's argument is invalid."""
    return CaseValidationError([FieldError(name, message)], subject="argument")


def _criteria(kind: str, criteria: str | Iterable[str] | None) -> list[str] | None:
    """The criteria a score appeal contests, checked, in :data:`CRITERIA` order."""
    if criteria is None:
        return None
    if kind != "score":
        raise _invalid("criteria", "only score appeals name criteria")
    names = [criteria] if isinstance(criteria, str) else criteria
    try:
        chosen = list(names)
    except TypeError:
        raise _invalid("criteria", "give a list of criterion names") from None
    unknown = [n for n in chosen if n not in CRITERIA]
    if unknown:
        raise _invalid("criteria", f"unknown criterion {unknown[0]!r}; use "
                                   f"{', '.join(CRITERIA)}")
    if not chosen:
        raise _invalid("criteria", "name at least one criterion (or None for all of them)")
    return [c for c in CRITERIA if c in chosen]


@dataclass(slots=True)
class _Ctx:
    """What a command's effect sees (everything is already loaded and checked)."""

    engine: Engine
    policy: Policy
    workflow: Workflow
    tx: StoreTx
    record: CaseRecord
    proj: dict[str, Any]
    actor: Actor
    trigger: str
    state: str  # the state after the trigger
    now: datetime

    @property
    def calendar(self) -> BusinessCalendar:
        return self.policy.calendar

    def refuse(self, message: str) -> TransitionNotAllowed:
        return TransitionNotAllowed(
            self.trigger,
            self.record.state,
            case_id=self.record.case_id,
            role=self.actor.role,
            reason=message,
        )

    def require_member(self, *, lead_only: bool) -> None:
        """The actor must belong to the lead (or, unless ``lead_only``, a summoned) department."""
        lead = self.proj.get("lead")
        allowed = [lead] if lead_only else [lead, *self.proj.get("summoned", [])]
        dept = self.actor.department
        if dept is None or dept not in allowed:
            who = f"actor '{self.actor.id}'" + (f" of department '{dept}'" if dept else "")
            what = "the lead department" if lead_only else "the lead or a summoned department"
            raise self.refuse(f"{who} may not '{self.trigger}': {what} is '{lead}'"
                              + ("" if lead_only or not self.proj.get("summoned") else
                                 f" (summoned: {', '.join(self.proj['summoned'])})"))


Effect = Callable[[_Ctx], tuple[dict[str, Any], list[NewEvent]]]


class Engine:
    """Carries cases through the life cycle. See docs/embedding.md.

    ``policy``: a :class:`Policy` or a :class:`PolicyHandle` (read once per command, so a
    reload never splits a command across versions). ``store``: a :class:`Store`, or
    ``None`` for a private in-memory SQLite store. ``clock``: the source of every time
    (default :class:`SystemClock`; tests and replays pass a ``ManualClock``). ``ids``: the
    factory of case ids for cases that bring neither an ``id`` nor an idempotency key.
    """

    def __init__(
        self,
        policy: Policy | PolicyHandle,
        store: Store | None = None,
        clock: Clock | None = None,
        *,
        ids: Callable[[], str] | None = None,
    ):
        if not isinstance(policy, Policy | PolicyHandle):
            raise TypeError(f"policy must be a Policy or PolicyHandle, not {type(policy).__name__}")
        self._policy = policy
        self._owns_store = store is None
        if store is None:
            store = Store()
            store.create_all()
        self.store = store
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._ids: Callable[[], str] = ids if ids is not None else (lambda: uuid.uuid4().hex)
        self._workflows: dict[int, tuple[Policy, Workflow]] = {}
        self._uow: UnitOfWork | None = None
        self._moves: dict[tuple[Workflow, str, str, str], str] = {}  # next-state memo (batch)
        # case id → (projection's case, the CaseIn it is the dump of): the latest reports
        # in a batch, whose working set hands the same dict to a later dispatch
        self._reported: dict[str, tuple[Mapping[str, Any], CaseIn]] = {}

    # -- plumbing ---------------------------------------------------------------------

    @contextmanager
    def expecting(self, case_id: str, version: int) -> Iterator[None]:
        """Commands on ``case_id`` inside the block run only if the case is still at
        ``version`` (``view.version`` when the user loaded it), else
        :class:`ConcurrencyConflict`, nothing written: a user acting on a stale screen
        is told so instead of the command applying to whatever the case became. Without
        it, commands on one case take turns and each runs on the state the last left."""
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise _invalid("version", "must be a case version (an integer ≥ 1)")
        token = _EXPECTED.set((case_id, version))
        try:
            yield
        finally:
            _EXPECTED.reset(token)

    @contextmanager
    def batch(self, *, size: int = 20_000) -> Iterator[UnitOfWork]:
        """Batch mode (replays, bulk loads): commands inside the block work on an in-memory
        working set and are stored in one transaction per ``size`` commands (and at the
        end); see :mod:`gridflow.store.unitofwork`. The stored events and states are the
        ones the same commands store outside a batch. If the block raises, everything
        since the last commit is rolled back."""
        if self._uow is not None:
            raise RuntimeError("this engine is already in a batch")
        uow = UnitOfWork(self.store, size=size)
        self._uow = uow
        try:
            yield uow
        except BaseException:
            uow.rollback()
            raise
        else:
            uow.commit()
        finally:
            self._uow = None
            self._moves.clear()

    def _transaction(self, *, readonly: bool = False) -> AbstractContextManager[StoreTx]:
        uow = self._uow
        if uow is not None:  # it implements the part of StoreTx the engine uses
            return cast("AbstractContextManager[StoreTx]", uow.transaction(readonly=readonly))
        return self.store.transaction(readonly=readonly)

    def _next_state(
        self, workflow: Workflow, state: str, trigger: str, role: str, case_id: str | None
    ) -> str:
        """``workflow.next_state``; inside a batch its (pure) answers are remembered."""
        if self._uow is None:
            return workflow.next_state(state, trigger, role, case_id=case_id)
        key = (workflow, state, trigger, role)
        found = self._moves.get(key)
        if found is None:
            found = self._moves[key] = workflow.next_state(state, trigger, role, case_id=case_id)
        return found

    @property
    def policy(self) -> Policy:
        """The policy in force now."""
        p = self._policy
        return p.current if isinstance(p, PolicyHandle) else p

    def workflow(self, policy: Policy | None = None) -> Workflow:
        """The (cached) workflow of ``policy`` (default: the policy in force)."""
        policy = policy if policy is not None else self.policy
        entry = self._workflows.get(id(policy))
        if entry is None or entry[0] is not policy:
            if len(self._workflows) >= 8:
                self._workflows.clear()
            entry = (policy, Workflow(policy.lifecycle.graph))
            self._workflows[id(policy)] = entry
        return entry[1]

    def dispose(self) -> None:
        """Dispose the store if the engine created it (a host's store is left alone)."""
        if self._owns_store:
            self.store.dispose()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dispose()

    def _now(self) -> datetime:
        now = self.clock.now()
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("the clock must return timezone-aware times")
        return now

    @staticmethod
    def _check_actor(actor: Actor) -> None:
        if not isinstance(actor, Actor):
            raise TypeError(f"actor must be an Actor, not {type(actor).__name__}")
        errors = []
        if not isinstance(actor.id, str) or not actor.id.strip():
            errors.append(FieldError("actor.id", "must be a non-empty string"))
        if not isinstance(actor.role, str) or not actor.role:
            errors.append(FieldError("actor.role", "must be a non-empty string"))
        if errors:
            raise CaseValidationError(errors)

    @staticmethod
    def _text(name: str, value: object, *, required: bool) -> str | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                raise _invalid(name, "is required")
            return None
        if not isinstance(value, str):
            raise _invalid(name, f"must be a string, not {type(value).__name__}")
        if len(value) > _MAX_TEXT:
            raise _invalid(name, f"is {len(value)} characters long (at most {_MAX_TEXT})")
        return value

    @staticmethod
    def _evidence(evidence: Iterable[str] | str | None) -> list[str]:
        if evidence is None:
            return []
        if isinstance(evidence, str):
            evidence = [evidence]
        out = []
        for i, item in enumerate(evidence):
            if not isinstance(item, str) or not item.strip():
                raise _invalid(f"evidence[{i}]", "must be a non-empty string (a URL)")
            if len(item) > 2000:
                raise _invalid(f"evidence[{i}]", "is longer than 2000 characters")
            out.append(item)
        if len(out) > _MAX_EVIDENCE:
            raise _invalid("evidence", f"at most {_MAX_EVIDENCE} items")
        return out

    @staticmethod
    def _record(
        proj: Mapping[str, Any], policy_version: str | None, before: CaseRecord | None = None
    ) -> CaseRecord:
        """The store's row of a projection; times unchanged since ``before`` are reused."""
        decision = proj["decision"]
        if before is None:
            due, warn, reported, dispatched, closed = (
                parse_time(proj["due_at"]), parse_time(proj["warn_at"]),
                parse_time(proj["reported_at"]), parse_time(proj["dispatched_at"]),
                parse_time(proj["closed_at"]),
            )
        else:
            old = before.data
            due, warn, reported, dispatched, closed = (
                before.due_at if old["due_at"] == (t := proj["due_at"]) else parse_time(t),
                before.warn_at if old["warn_at"] == (t := proj["warn_at"]) else parse_time(t),
                before.reported_at if old["reported_at"] == (t := proj["reported_at"])
                else parse_time(t),
                before.dispatched_at if old["dispatched_at"] == (t := proj["dispatched_at"])
                else parse_time(t),
                before.closed_at if old["closed_at"] == (t := proj["closed_at"])
                else parse_time(t),
            )
        # positional: the CaseRecord field order (a keyword call costs twice as much)
        return CaseRecord(
            proj["id"], proj["version"], proj["state"], dict(proj), proj["idempotency_key"],
            proj["category"], proj["unit"], proj["lead"], proj["pool"], proj["handler"],
            proj["tier"], due, warn, reported, dispatched, closed,
            decision.get("policy_version", policy_version) if decision else policy_version,
        )

    @staticmethod
    def _timers(proj: Mapping[str, Any]) -> list[tuple[str, datetime]]:
        if proj["state"] not in SUPERVISED_STATES or proj["due_at"] is None:
            return []
        out: list[tuple[str, datetime]] = []
        if not proj["warned"] and proj["warn_at"] is not None:
            out.append(("warn", datetime.fromisoformat(proj["warn_at"])))
        if not proj["overdue"]:
            out.append(("overdue", datetime.fromisoformat(proj["due_at"])))
        return out

    @classmethod
    def _replan(cls, tx: StoreTx, case_id: str, old: Mapping[str, Any],
                new: Mapping[str, Any]) -> None:
        """Re-arm the timers when the supervised deadline changed. Timers of a case that
        left supervision are not deleted: ``tick`` skips them (one write less)."""
        if (old["due_at"] == new["due_at"] and old["state"] == new["state"]
                and old["warn_at"] == new["warn_at"] and old["warned"] == new["warned"]
                and old["overdue"] == new["overdue"]):
            return  # what the timers derive from is unchanged
        timers = cls._timers(new)
        if timers and timers != cls._timers(old):
            tx.set_timers(case_id, timers)

    def _event(
        self, trigger: str, actor: Actor, now: datetime, reason: str | None,
        payload: Mapping[str, Any], policy: Policy,
    ) -> NewEvent:
        return NewEvent(trigger, actor.id, actor.role, now, reason, payload, policy.version)

    def _escalation(
        self, policy: Policy, workflow: Workflow, proj: Mapping[str, Any], now: datetime,
        actor: Actor, reason: str, cause: str, *, required: bool = False, trigger: str = "escalate",
    ) -> NewEvent | None:
        """The event moving the case one tier up (``None`` at the top unless ``required``)."""
        self._next_state(workflow, proj["state"], "escalate", actor.role, proj["id"])
        reg = policy.registry
        tier = proj["tier"] or reg.tiers[0]
        above = policy.lifecycle.tier_above(tier)
        if above is None:
            if required:
                raise TransitionNotAllowed(
                    trigger, proj["state"], case_id=proj["id"], role=actor.role,
                    reason=f"cannot escalate: tier '{tier}' is the top of the escalation path",
                )
            return None
        location = proj["location"]
        unit = reg.unit_for_tier(location, above) if location in reg.units else None
        payload = {"from_tier": tier, "to_tier": above, "unit": unit, "cause": cause}
        return self._event("escalate", actor, now, reason, payload, policy)

    def _warn_time(
        self, policy: Policy, start: datetime, due: datetime, working: bool
    ) -> datetime:
        share = policy.lifecycle.warn_at
        cal = policy.calendar
        if working:
            hours = max(cal.working_hours_between(start, due), 0.0)
            return cal.add(start, Duration(hours * share, "working_hours"))
        return start + (due - start) * share

    def _deadline(
        self, policy: Policy, start: datetime, limit_text: str | None
    ) -> tuple[str | None, str | None]:
        """(due_at, warn_at) as ISO text for a time limit starting at ``start``."""
        if not limit_text:
            return None, None
        limit = parse_duration(limit_text)
        due = policy.calendar.add(start, limit)
        warn = self._warn_time(policy, start, due, limit.is_working)
        return iso(due), iso(warn)

    # -- the command runner -----------------------------------------------------------

    def _run(
        self,
        case_id: str,
        actor: Actor,
        trigger: str,
        reason: str | None,
        effect: Effect | None = None,
        *,
        reason_field: str = "reason",
    ) -> CaseView:
        self._check_actor(actor)
        if not isinstance(case_id, str) or not case_id:
            raise _invalid("case_id", "must be a non-empty string")
        policy = self.policy
        workflow = self.workflow(policy)
        now = self._now()
        with self._transaction() as tx:
            record = tx.require_case(case_id, for_update=True)
            expected = _EXPECTED.get()
            if expected is not None and expected[0] == case_id and expected[1] != record.version:
                raise ConcurrencyConflict(case_id, expected[1], record.version)
            state = self._next_state(workflow, record.state, trigger, actor.role, case_id)
            if state != record.state and record.data.get("pending_appeal") is not None:
                self._keep_appeal_decidable(workflow, record, trigger, state, actor)
            spec = workflow.graph.trigger(trigger)
            reason = self._text(reason_field, reason, required=spec.needs_reason)
            proj = record.data
            ctx = _Ctx(self, policy, workflow, tx, record, proj, actor, trigger, state, now)
            payload, follow = effect(ctx) if effect is not None else ({}, [])
            if state != record.state:
                payload["state"] = state
            events = [self._event(trigger, actor, now, reason, payload, policy)]
            new = apply(proj, events[0])
            for extra in follow:
                events.append(extra)
                new = apply(new, extra)
            # Follow-up events computed from the state after the main event (escalations).
            for make in ctx_followers(ctx, new):
                events.append(make)
                new = apply(new, make)
            tx.append(self._record(new, policy.version, record), record.version, events)
            self._replan(tx, case_id, proj, new)
            return CaseView.from_data(new)

    @staticmethod
    def _keep_appeal_decidable(
        workflow: Workflow, record: CaseRecord, trigger: str, state: str, actor: Actor
    ) -> None:
        """A pending appeal is decided before the case moves where it could not be upheld
        (a reopen while a resident appeal waits, handling while the department contests the
        routing): otherwise it could only be rejected."""
        kind = record.data["pending_appeal"]["kind"]
        uphold = f"uphold_{kind}_appeal"
        if trigger != uphold and uphold not in workflow.allowed_triggers(state):
            raise TransitionNotAllowed(
                trigger, record.state, case_id=record.case_id, role=actor.role,
                reason=f"a {kind} appeal is pending: decide it first (decide_appeal)",
            )

    # -- step 1: intake ---------------------------------------------------------------

    def report(
        self,
        case: CaseIn | Mapping[str, Any],
        actor: Actor,
        *,
        idempotency_key: str | None = None,
        on_spot: bool = False,
        evidence: Iterable[str] = (),
    ) -> CaseView:
        """信息收集: record a case (state ``reported``).

        The case is validated against the policy (``CaseValidationError`` naming every bad
        field; nothing written). The same ``idempotency_key`` returns the existing case.
        ``on_spot=True`` records a small matter the grid worker already solved (evidence
        required): the case goes straight to ``handled`` and is verified and closed like
        any other.
        """
        self._check_actor(actor)
        policy = self.policy
        workflow = self.workflow(policy)
        if actor.role not in workflow.graph.roles:
            raise RoleNotAllowed("report", "-", actor.role, workflow.graph.roles)
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str) or not idempotency_key.strip():
                raise _invalid("idempotency_key", "must be a non-empty string")
            if len(idempotency_key) > 128:
                raise _invalid("idempotency_key", "is longer than 128 characters")
        case_in = policy.validate_case(case)
        proofs = self._evidence(evidence)
        if on_spot:
            if not proofs:
                raise _invalid("evidence", "on-the-spot resolution needs photo evidence")
            self._next_state(workflow, "reported", "resolve_on_spot", actor.role, None)
        elif proofs:
            raise _invalid("evidence", "evidence is only taken with on_spot=True at intake")
        now = self._now()
        if case_in.id is not None:
            case_id = case_in.id
        elif idempotency_key is not None:
            case_id = uuid.uuid5(_KEY_NAMESPACE, idempotency_key).hex
        else:
            case_id = self._ids()
            if not isinstance(case_id, str) or not case_id or len(case_id) > 64:
                raise ValueError(f"the id factory returned an invalid case id: {case_id!r}")
        if case_in.reported_at is None:  # reported now: routing's time conditions read it
            case_in = case_in.model_copy(update={"reported_at": now})
        reported_at = case_in.reported_at
        assert reported_at is not None
        events = [
            self._event(
                "reported", actor, now, None,
                {
                    "state": "reported",
                    "case_id": case_id,
                    "case": case_in.model_dump(mode="json", exclude_none=True),
                    "idempotency_key": idempotency_key,
                    "reported_at": iso(reported_at),
                },
                policy,
            )
        ]
        if on_spot:
            if policy.router.history_specs:
                with self._transaction(readonly=True) as tx:
                    decision = policy.router.route(case_in, trace=False, history=tx)
            else:
                decision = policy.router.route(case_in, trace=False)
            reg = policy.registry
            lead, tier = decision.lead, decision.tier
            if actor.department is not None and actor.department in reg.departments:
                lead, tier = actor.department, reg.departments[actor.department].tier
            unit = reg.unit_for_tier(case_in.location, tier) or decision.unit
            events.append(self._event(
                "resolve_on_spot", actor, now, None,
                {
                    "state": "handled",
                    "decision": self._decision_data(decision, None),
                    "lead": lead,
                    "tier": tier,
                    "unit": unit,
                    "pool": None,
                    "evidence": proofs,
                },
                policy,
            ))
        proj = initial()
        for ev in events:
            proj = apply(proj, ev)
        record = self._record(proj, policy.version)
        if self._uow is not None:  # only a batch keeps the projection's dict for a dispatch
            if len(self._reported) >= 4096:
                self._reported.clear()
            self._reported[case_id] = (proj["case"], case_in)
        try:
            with self._transaction() as tx:
                if idempotency_key is not None:
                    existing = tx.case_by_idempotency_key(idempotency_key)
                    if existing is not None:
                        return CaseView.from_data(existing.data)
                tx.insert_case(record, events)
        except IdempotencyConflict as conflict:
            return self.get(conflict.existing_case_id)
        except ConcurrencyConflict:
            # A racing writer inserted the same key (its key-derived id) first.
            if idempotency_key is None:
                raise
            with self._transaction(readonly=True) as tx:
                existing = tx.case_by_idempotency_key(idempotency_key)
            if existing is None:
                raise
            return CaseView.from_data(existing.data)
        return CaseView.from_data(proj)

    # -- step 2: file / cancel --------------------------------------------------------

    def file(self, case_id: str, actor: Actor, *, note: str | None = None) -> CaseView:
        """案卷建立: accept the report as a case (``reported → filed``)."""
        return self._run(case_id, actor, "file", note, reason_field="note")

    def cancel(self, case_id: str, actor: Actor, reason: str) -> CaseView:
        """不予立案/作废 (reason required)."""
        return self._run(case_id, actor, "cancel", reason)

    # -- step 3: dispatch -------------------------------------------------------------

    @staticmethod
    def _decision_data(decision: Decision, due: str | None) -> dict[str, Any]:
        """What the projection keeps of a decision: its JSON form without ``hits``,
        ``due_at`` and ``case_id`` (``decision.to_dict(exclude=…)``, same keys in the same
        order, built by hand: pydantic's serializer cost more than the rest of a dispatch),
        then the matched rules and the deadline."""
        d = decision
        return {
            "category": d.category, "urgency": d.urgency, "lead": d.lead,
            "lead_name": d.lead_name, "assist": list(d.assist), "tier": d.tier,
            "unit": d.unit, "time_limit": d.time_limit, "priority": d.priority,
            "pool": d.pool, "handler": d.handler, "tags": list(d.tags),
            "notify": [{"kind": n.kind, "target": n.target, "units": list(n.units)}
                       for n in d.notify],
            "summon": list(d.summon), "rule": d.rule, "source": d.source,
            "default": d.default, "policy_version": d.policy_version,
            "matched": [h.rule for h in d.hits], "due_at": due,
        }

    def _case_in(self, case_id: str, case: Mapping[str, Any]) -> CaseIn | Mapping[str, Any]:
        """The validated case a projection's ``case`` came from, when this engine reported
        it (routing then skips validating it again); else ``case`` itself."""
        known = self._reported.get(case_id)
        return known[1] if known is not None and known[0] is case else case

    def dispatch(
        self,
        case_id: str,
        actor: Actor,
        *,
        override: tuple[str, str] | None = None,
    ) -> CaseView:
        """任务派遣: route the case (excluding departments that returned it) and start the
        clock. ``override=(department, reason)`` replaces the proposed lead department."""

        def effect(c: _Ctx) -> tuple[dict[str, Any], list[NewEvent]]:
            policy, reg = c.policy, c.policy.registry
            decision = policy.router.route(self._case_in(c.record.case_id, c.proj["case"]),
                                           exclude=c.proj["excluded"], with_due=False,
                                           trace=False, history=c.tx)
            lead, tier, unit, pool = decision.lead, decision.tier, decision.unit, decision.pool
            handler = decision.handler
            payload: dict[str, Any] = {}
            location = c.proj["location"]
            if override is not None:
                if not isinstance(override, tuple | list) or len(override) != 2:
                    raise _invalid("override", "must be a (department, reason) pair")
                new_lead, why = override
                if new_lead not in reg.departments:
                    raise _invalid("override.department", f"unknown department {new_lead!r}")
                payload["override"] = {
                    "proposed": decision.lead,
                    "lead": new_lead,
                    "reason": self._text("override.reason", why, required=True),
                }
                lead, pool, handler = new_lead, None, None
                tier = reg.departments[new_lead].tier
                unit = reg.unit_for_tier(location, tier) or reg.departments[new_lead].unit
            # an escalation holds: a case dispatched again (returned, routing appeal upheld)
            # stays at the highest tier an escalation took it to, if the route is lower;
            # the tier of the earlier route alone does not hold (the department was wrong)
            reached = [e["to"] for e in c.proj["escalations"] if e["to"] in reg.tiers]
            floor = max(reached, key=reg.tier_rank, default=None)
            if (
                floor is not None
                and tier in reg.tiers
                and reg.tier_rank(floor) > reg.tier_rank(tier)
            ):
                tier = floor
                unit = reg.unit_for_tier(location, tier) or unit
            due, warn = self._deadline(policy, c.now, decision.time_limit)
            payload.update({
                "decision": self._decision_data(decision, due),
                "lead": lead,
                "tier": tier,
                "unit": unit,
                "pool": pool,
                "summoned": [d for d in decision.summon if d != lead],
                "due_at": due,
                "warn_at": warn,
            })
            if handler is not None:
                payload["handler"] = handler
            return payload, []

        return self._run(case_id, actor, "dispatch", None, effect)

    # -- step 4: handle ---------------------------------------------------------------

    def accept(self, case_id: str, actor: Actor) -> CaseView:
        """签收: a handler of the lead department accepts the task (``→ handling``); a case
        the routing rule assigned to a named handler, that handler only."""

        def effect(c: _Ctx) -> tuple[dict[str, Any], list[NewEvent]]:
            c.require_member(lead_only=True)
            named = c.proj["handler"]
            if named is not None and c.actor.id != named:
                raise c.refuse(f"the case is assigned to handler '{named}'; "
                               f"actor '{c.actor.id}' may not accept it")
            return {"department": c.actor.department}, []

        return self._run(case_id, actor, "accept", None, effect)

    def claim(self, case_id: str, actor: Actor) -> CaseView:
        """认领: one eligible handler claims a case routed to a pool. A second claim is
        refused (the case is no longer ``dispatched``) or, under a race, conflicts."""

        def effect(c: _Ctx) -> tuple[dict[str, Any], list[NewEvent]]:
            if c.proj["pool"] is None:
                raise c.refuse("the case was not routed to a pool; the lead department accepts it")
            c.require_member(lead_only=True)
            if c.actor.unit is not None and c.proj["unit"] not in (None, c.actor.unit):
                raise c.refuse(
                    f"actor '{c.actor.id}' of unit '{c.actor.unit}' is not eligible for a case "
                    f"of unit '{c.proj['unit']}'"
                )
            return {"department": c.actor.department, "pool": c.proj["pool"]}, []

        return self._run(case_id, actor, "claim", None, effect)

    def reassign(
        self, case_id: str, actor: Actor, reason: str, *,
        handler: str | None = None, pool: str | None = None,
    ) -> CaseView:
        """改派: before anyone accepts it, give the dispatched case to another named
        ``handler`` or ``pool`` of the same lead department, or (neither) to the department
        as a whole. 转交: while it is being handled, hand it over to another person
        (``handler``: their actor id; the host knows its staff, gridflow does not). The
        department, deadline and timers stay; to change the department, return the case
        or dispatch it again with an override."""

        def effect(c: _Ctx) -> tuple[dict[str, Any], list[NewEvent]]:
            lead = c.proj["lead"]
            info = c.policy.registry.departments[lead]
            if handler is not None and pool is not None:
                raise _invalid("handler", "give a handler or a pool, not both")
            if c.record.state == "handling":
                return self._hand_over(c, handler, pool), []
            if handler is not None and handler not in info.handlers:
                known = ", ".join(info.handlers) or "none"
                raise _invalid("handler", f"{handler!r} is not a handler of department "
                                          f"'{lead}' (handlers: {known})")
            if pool is not None and pool not in info.pools:
                known = ", ".join(info.pools) or "none"
                raise _invalid("pool", f"{pool!r} is not a pool of department '{lead}' "
                                       f"(pools: {known})")
            before = (c.proj["handler"], c.proj["pool"])
            if (handler, pool) == before:
                raise c.refuse("the case is already assigned that way")
            return {"handler": handler, "pool": pool,
                    "from_handler": before[0], "from_pool": before[1]}, []

        return self._run(case_id, actor, "reassign", reason, effect)

    @classmethod
    def _hand_over(cls, c: _Ctx, handler: str | None, pool: str | None) -> dict[str, Any]:
        """转交: the payload of a reassign while the case is being handled."""
        if pool is not None:
            raise _invalid("pool", "a case being handled is handed over to a person "
                                   "(handler=…); to put it back into a pool, return it")
        if handler is None:
            raise _invalid("handler", "is required: who takes over the case being handled")
        name = cls._text("handler", handler, required=True)
        assert name is not None
        if len(name) > MAX_LENGTHS["handler"]:
            raise _invalid("handler", f"is longer than {MAX_LENGTHS['handler']} characters")
        current = c.proj["handler"]
        if name == current:
            raise c.refuse(f"'{name}' is already handling the case")
        return {"handler": name, "pool": c.proj["pool"],
                "from_handler": current, "from_pool": c.proj["pool"]}

    def return_case(self, case_id: str, actor: Actor, reason: str) -> CaseView:
        """回退: misrouted — back to ``filed`` for re-dispatch without this department.
        Returned by ``escalate_after_returns`` distinct departments → one tier up."""

        def effect(c: _Ctx) -> tuple[dict[str, Any], list[NewEvent]]:
            c.require_member(lead_only=True)
            return {"department": c.actor.department}, []

        return self._run(case_id, actor, "return_case", reason, effect)

    def request_extension(
        self, case_id: str, actor: Actor, reason: str, extra: str
    ) -> CaseView:
        """申请延期: ask for ``extra`` more time (e.g. ``"2wd"``)."""

        def effect(c: _Ctx) -> tuple[dict[str, Any], list[NewEvent]]:
            c.require_member(lead_only=True)
            if c.proj["pending_extension"] is not None:
                raise c.refuse("an extension request is already pending")
            if not isinstance(extra, str):
                raise _invalid("extra", "must be a duration text such as '2wd'")
            try:
                duration = parse_duration(extra)
            except ValueError as exc:
                raise _invalid("extra", str(exc)) from None
            return {"extra": str(duration)}, []

        return self._run(case_id, actor, "request_extension", reason, effect)

    def approve_extension(self, case_id: str, actor: Actor, *, note: str | None = None) -> CaseView:
        """批准延期: the deadline moves by the requested time; timers are re-planned."""

        def effect(c: _Ctx) -> tuple[dict[str, Any], list[NewEvent]]:
            pending = c.proj["pending_extension"]
            if pending is None:
                raise c.refuse("no extension request is pending")
            extra = parse_duration(pending["extra"])
            old_due = parse_time(c.proj["due_at"])
            if old_due is None:
                return {"due_at": None, "warn_at": None}, []
            new_due = c.calendar.add(old_due, extra)
            start = parse_time(c.proj["dispatched_at"]) or c.now
            limit = c.proj["time_limit"]
            working = parse_duration(limit).is_working if limit else extra.is_working
            warn = self._warn_time(c.policy, start, new_due, working)
            return {"extra": pending["extra"], "previous_due_at": c.proj["due_at"],
                    "due_at": iso(new_due), "warn_at": iso(warn)}, []

        return self._run(case_id, actor, "approve_extension", note, effect)

    def deny_extension(self, case_id: str, actor: Actor, *, note: str | None = None) -> CaseView:
        """驳回延期: the deadline stays."""

        def effect(c: _Ctx) -> tuple[dict[str, Any], list[NewEvent]]:
            if c.proj["pending_extension"] is None:
                raise c.refuse("no extension request is pending")
            return {}, []

        return self._run(case_id, actor, "deny_extension", note, effect)

    def defer(self, case_id: str, actor: Actor, reason: str) -> CaseView:
        """挂账: suspend a case that cannot be solved now (``→ deferred``)."""
        return self._run(case_id, actor, "defer", reason)

    def resume(self, case_id: str, actor: Actor, *, note: str | None = None) -> CaseView:
        """恢复处理 (``deferred → handling``). The time the case was deferred does not count
        against it: the deadline (and a warning not yet given) moves by the paused time,
        in the time limit's kind of time, as scoring reckons it; timers are re-planned."""

        def effect(c: _Ctx) -> tuple[dict[str, Any], list[NewEvent]]:
            since, due = parse_time(c.proj["deferred_at"]), parse_time(c.proj["due_at"])
            if since is None or due is None or c.now <= since:
                return {}, []
            limit = c.proj["time_limit"]
            cal = c.calendar
            if parse_duration(limit).is_working if limit else True:
                paused = Duration(max(cal.working_hours_between(since, c.now), 0.0),
                                  "working_hours")
            else:
                paused = Duration((c.now - since).total_seconds() / 60.0, "minutes")
            if paused.amount <= 0:
                return {}, []
            new_due = cal.add(due, paused)
            warn = parse_time(c.proj["warn_at"])
            new_warn = cal.add(warn, paused) if warn is not None else None
            return {"paused": str(paused), "previous_due_at": c.proj["due_at"],
                    "due_at": iso(new_due), "warn_at": iso(new_warn) if new_warn else None,
                    "overdue": bool(c.proj["overdue"]) and new_due <= c.now,
                    "warned": bool(c.proj["warned"]) and (new_warn is None
                                                          or new_warn <= c.now)}, []

        return self._run(case_id, actor, "resume", note, effect, reason_field="note")

    # -- step 5: feedback -------------------------------------------------------------

    def feedback(
        self,
        case_id: str,
        actor: Actor,
        *,
        evidence: Iterable[str] = (),
        note: str | None = None,
    ) -> CaseView:
        """处理反馈: report the result with evidence (photo URLs) and/or a note."""

        def effect(c: _Ctx) -> tuple[dict[str, Any], list[NewEvent]]:
            c.require_member(lead_only=False)
            proofs = self._evidence(evidence)
            if not proofs and note is None:
                raise _invalid("evidence", "feedback needs evidence (photo URLs) or a note")
            return {"evidence": proofs, "department": c.actor.department}, []

        note = self._text("note", note, required=False)
        return self._run(case_id, actor, "feedback", note, effect, reason_field="note")

    # -- step 6: verify, rework, close ------------------------------------------------

    def verify(self, case_id: str, actor: Actor, *, note: str | None = None) -> CaseView:
        """核查: on-site verification passes (``handled → verified``)."""
        return self._run(case_id, actor, "verify", note, reason_field="note")

    def rework(self, case_id: str, actor: Actor, reason: str) -> CaseView:
        """返工: verification failed — back to ``handling`` by the same department.
        Reworked ``escalate_after_rework`` times → one tier up."""
        return self._run(case_id, actor, "rework", reason)

    def close(
        self, case_id: str, actor: Actor, *, note: str | None = None, resolution: str = "normal"
    ) -> CaseView:
        """结案 (``verified → closed``). ``resolution``: how the case was closed, a key of
        the policy's scoring ``resolution`` table (default table: ``normal``, ``deferred``,
        ``special``); recorded in the event unless it is ``normal``, which leaves it to
        scoring (``deferred`` when the case was ever deferred, else ``normal``)."""

        def effect(c: _Ctx) -> tuple[dict[str, Any], list[NewEvent]]:
            table = c.policy.scoring.resolution
            if not isinstance(resolution, str) or resolution not in table:
                raise _invalid("resolution", f"must be one of {', '.join(table)}")
            return ({} if resolution == "normal" else {"resolution": resolution}), []

        return self._run(case_id, actor, "close", note, effect, reason_field="note")

    # -- step 7: evaluate, reopen -----------------------------------------------------

    def evaluate(
        self, case_id: str, actor: Actor, satisfaction: str, *, note: str | None = None
    ) -> CaseView:
        """综合评价 / 回访: record the resident's satisfaction (``closed → evaluated``)."""

        def effect(c: _Ctx) -> tuple[dict[str, Any], list[NewEvent]]:
            if satisfaction not in SATISFACTION:
                raise _invalid("satisfaction", f"must be one of {', '.join(SATISFACTION)}")
            return {"satisfaction": satisfaction}, []

        return self._run(case_id, actor, "evaluate", note, effect, reason_field="note")

    def _reopen_deadline(self, c: _Ctx) -> dict[str, Any]:
        due, warn = self._deadline(c.policy, c.now, c.proj["time_limit"])
        return {"due_at": due, "warn_at": warn, "department": c.proj["lead"]}

    def reopen(self, case_id: str, actor: Actor, reason: str) -> CaseView:
        """重新办理: reopen a closed case within the policy's reopen window."""

        def effect(c: _Ctx) -> tuple[dict[str, Any], list[NewEvent]]:
            closed = parse_time(c.proj["closed_at"])
            window = c.policy.lifecycle.reopen_window
            if closed is not None:
                limit = c.calendar.add(closed, window)
                if c.now > limit:
                    raise c.refuse(
                        f"the reopen window ({window} after closure) ended at {limit.isoformat()}"
                    )
            return self._reopen_deadline(c), []

        return self._run(case_id, actor, "reopen", reason, effect)

    # -- escalation and joint handling ------------------------------------------------

    def escalate(self, case_id: str, actor: Actor, reason: str) -> CaseView:
        """升级: move the case one tier up (error at the top of the escalation path)."""

        def effect(c: _Ctx) -> tuple[dict[str, Any], list[NewEvent]]:
            ev = self._escalation(c.policy, c.workflow, c.proj, c.now, c.actor, "-", "person",
                                  required=True)
            assert ev is not None
            return dict(ev.payload), []

        return self._run(case_id, actor, "escalate", reason, effect)

    def summon(
        self, case_id: str, actor: Actor, departments: Sequence[str], reason: str | None = None
    ) -> CaseView:
        """吹哨报到: summon departments for joint handling (only at the ``summon_at`` tiers)."""

        def effect(c: _Ctx) -> tuple[dict[str, Any], list[NewEvent]]:
            tier = c.proj["tier"]
            allowed = c.policy.lifecycle.summon_at
            if tier not in allowed:
                raise c.refuse(
                    f"departments can only be summoned at tier {', '.join(sorted(allowed))}; "
                    f"the case is at tier '{tier}'"
                )
            if isinstance(departments, str) or not departments:
                raise _invalid("departments", "give a non-empty list of department ids")
            reg = c.policy.registry
            for i, d in enumerate(departments):
                if d not in reg.departments:
                    raise _invalid(f"departments[{i}]", f"unknown department {d!r}")
            new = [d for d in dict.fromkeys(departments) if d != c.proj["lead"]]
            return {"departments": new}, []

        return self._run(case_id, actor, "summon", reason, effect)

    # -- appeals ----------------------------------------------------------------------

    def appeal(
        self,
        case_id: str,
        actor: Actor,
        kind: str,
        reason: str,
        *,
        criteria: str | Iterable[str] | None = None,
    ) -> CaseView:
        """申诉: file a ``routing``, ``score`` or ``resident`` appeal within its window
        (from dispatch, evaluation and closure respectively). One pending appeal per case.

        ``criteria`` (score appeals only): the criteria contested, of ``timeliness``,
        ``resolution``, ``quality`` and ``satisfaction``; upheld, only those are exempt.
        ``None`` contests the whole score (upheld: every criterion is exempt)."""
        if kind not in _APPEAL_KINDS:
            raise _invalid("kind", f"must be one of {', '.join(_APPEAL_KINDS)}")
        contested = _criteria(kind, criteria)
        anchor_field = {"routing": "dispatched_at", "score": "evaluated_at",
                        "resident": "closed_at"}[kind]
        anchor_name = {"routing": "dispatch", "score": "evaluation", "resident": "closure"}[kind]

        def effect(c: _Ctx) -> tuple[dict[str, Any], list[NewEvent]]:
            if c.proj["pending_appeal"] is not None:
                raise c.refuse(
                    f"a {c.proj['pending_appeal']['kind']} appeal is already pending"
                )
            if kind == "routing":
                c.require_member(lead_only=True)
            anchor = parse_time(c.proj[anchor_field])
            window = c.policy.lifecycle.appeal_windows[kind]
            payload: dict[str, Any] = {"kind": kind, "department": c.actor.department}
            if contested is not None:
                payload["criteria"] = contested
            if anchor is not None:
                deadline = c.calendar.add(anchor, window)
                if c.now > deadline:
                    raise c.refuse(
                        f"the {kind} appeal window ({window} after {anchor_name}) closed at "
                        f"{deadline.isoformat()}"
                    )
                payload["deadline"] = iso(deadline)
            return payload, []

        return self._run(case_id, actor, f"appeal_{kind}", reason, effect)

    def decide_appeal(
        self, case_id: str, actor: Actor, *, upheld: bool, reason: str | None = None
    ) -> CaseView:
        """A reviewer decides the pending appeal. Upheld: routing → back to ``filed`` (the
        department is excluded from re-routing and its time is exempt); score → an
        exemption is recorded; resident → reopened to ``handling``. Rejected (reason
        required): the case stays as it is."""
        view = self.get(case_id)
        pending = view.pending_appeal
        if pending is None:
            self._check_actor(actor)
            raise TransitionNotAllowed(
                "decide_appeal", view.state, case_id=case_id, role=actor.role,
                reason="no appeal is pending",
            )
        kind = pending["kind"]
        trigger = f"uphold_{kind}_appeal" if upheld else "reject_appeal"

        def effect(c: _Ctx) -> tuple[dict[str, Any], list[NewEvent]]:
            current = c.proj["pending_appeal"]
            if current is None or current["kind"] != kind:
                raise c.refuse("the pending appeal changed; reload the case")
            payload: dict[str, Any] = {"kind": kind, "upheld": bool(upheld)}
            if not upheld:
                return payload, []
            if kind == "routing":
                start = c.proj["dispatched_at"]
                hours = None
                if start is not None:
                    hours = round(c.calendar.working_hours_between(
                        datetime.fromisoformat(start), c.now), 4)
                payload["exemption"] = {"kind": "routing", "department": current["department"],
                                        "from": start, "to": iso(c.now), "working_hours": hours}
            elif kind == "score":
                payload["exemption"] = {"kind": "score", "department": current["department"],
                                        "filed_by": current["filed_by"],
                                        "reason": current["reason"]}
                if current.get("criteria") is not None:
                    payload["exemption"]["criteria"] = list(current["criteria"])
            else:
                payload.update(self._reopen_deadline(c))
            return payload, []

        return self._run(case_id, actor, trigger, reason, effect)

    # -- supervision ------------------------------------------------------------------

    def tick(self, now: datetime | None = None, *, limit: int = 100) -> list[EventRecord]:
        """Fire the supervision timers due at ``now`` (default: the clock): ``warn`` at the
        policy's share of the time limit, ``mark_overdue`` at the deadline (plus one
        tier of escalation where the case's tier is in ``escalate_on_overdue``).

        Idempotent: a timer fires once, so a second call with the same ``now`` does nothing.
        Safe with several workers on one database (timers are claimed by the store).
        """
        when = now if now is not None else self._now()
        if when.tzinfo is None or when.utcoffset() is None:
            raise _invalid("now", "must be timezone-aware")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise _invalid("limit", "must be a positive integer")  # (0 would never end)
        policy = self.policy
        workflow = self.workflow(policy)
        fired: list[EventRecord] = []
        while True:
            with self._transaction() as tx:
                timers = tx.claim_due_timers(when, limit)
                for timer in timers:
                    fired += self._fire(tx, policy, workflow, timer.case_id, timer.kind,
                                        timer.due_at, when)
            if len(timers) < limit:
                return fired

    def _fire(
        self, tx: StoreTx, policy: Policy, workflow: Workflow, case_id: str, kind: str,
        due_at: datetime, now: datetime,
    ) -> list[EventRecord]:
        record = tx.get_case(case_id, for_update=True)
        if record is None:
            return []
        proj = record.data
        if record.state not in SUPERVISED_STATES:
            return []
        if kind == "warn":
            if proj["warned"] or parse_time(proj["warn_at"]) != due_at:
                return []
            trigger = "warn"
        elif kind == "overdue":
            if proj["overdue"] or parse_time(proj["due_at"]) != due_at:
                return []
            trigger = "mark_overdue"
        else:
            return []
        try:
            self._next_state(workflow, record.state, trigger, SYSTEM.role, case_id)
        except TransitionNotAllowed:
            return []
        # a warning says when it was due and when the case is due (the deadline)
        payload = ({"due_at": iso(due_at)} if kind == "overdue"
                   else {"warn_at": iso(due_at), "due_at": proj["due_at"]})
        events = [self._event(trigger, SYSTEM, now, None, payload, policy)]
        new = apply(proj, events[0])
        if trigger == "mark_overdue" and new["tier"] in policy.lifecycle.escalate_on_overdue:
            esc = self._escalation(policy, workflow, new, now, SYSTEM,
                                   f"overdue at tier '{new['tier']}'", "overdue")
            if esc is not None:
                events.append(esc)
                new = apply(new, esc)
        written = tx.append(self._record(new, policy.version, record), record.version, events)
        self._replan(tx, case_id, proj, new)
        return written

    # -- queries ----------------------------------------------------------------------

    def get(self, case_id: str) -> CaseView:
        """The case as it is now (``CaseNotFound`` if there is none)."""
        with self._transaction(readonly=True) as tx:
            return CaseView.from_data(tx.require_case(case_id).data)

    def history(self, case_id: str) -> list[EventRecord]:
        """Every event of the case, oldest first."""
        with self._transaction(readonly=True) as tx:
            events = tx.history(case_id)
            if not events and tx.get_case(case_id) is None:
                raise CaseNotFound(case_id)
            return events

    def worklist(
        self,
        *,
        department: str | None = None,
        pool: str | None = None,
        handler: str | None = None,
        unit: str | None = None,
        states: Iterable[str] | None = None,
        limit: int | None = None,
    ) -> list[CaseView]:
        """Open cases (or those in ``states``) of a lead department / pool / handler /
        unit, most urgent deadline first."""
        chosen = list(states) if states is not None else list(self.workflow().open_states)
        with self._transaction(readonly=True) as tx:
            records = tx.query_cases(
                states=chosen, lead_department=department, pool=pool, handler=handler,
                unit=unit, limit=limit,
            )
        return [CaseView.from_data(r.data) for r in records]

    def overdue(self, now: datetime | None = None) -> list[CaseView]:
        """Supervised cases whose deadline has passed at ``now``."""
        when = now if now is not None else self._now()
        with self._transaction(readonly=True) as tx:
            # open_only: supervised cases are open; it lets the store use its index of
            # open cases by deadline
            records = tx.query_cases(states=SUPERVISED_STATES, due_before=when, open_only=True)
        return [CaseView.from_data(r.data) for r in records]

    def near_due(self, within: Duration | str, now: datetime | None = None) -> list[CaseView]:
        """Supervised cases not yet overdue whose deadline falls within ``within`` of ``now``
        (``within`` is measured on the policy's calendar, e.g. ``"4wh"``)."""
        when = now if now is not None else self._now()
        span = parse_duration(within) if isinstance(within, str) else within
        horizon = self.policy.calendar.add(when, span)
        with self._transaction(readonly=True) as tx:
            records = tx.query_cases(states=SUPERVISED_STATES, due_before=horizon,
                                     open_only=True)
        return [
            CaseView.from_data(r.data) for r in records
            if r.due_at is not None and r.due_at > when
        ]


def ctx_followers(c: _Ctx, new: Mapping[str, Any]) -> list[NewEvent]:
    """Automatic escalations a command causes (repeated returns or rework, BRIEF §6)."""
    life = c.policy.lifecycle
    if c.trigger == "return_case" and len(new["returned_by"]) >= life.escalate_after_returns:
        reason = f"repeated returns by {len(new['returned_by'])} departments"
        ev = c.engine._escalation(c.policy, c.workflow, new, c.now, SYSTEM, reason,
                                  "repeated returns")
        return [ev] if ev is not None else []
    if c.trigger == "rework" and new["rework_count"] >= life.escalate_after_rework:
        reason = f"reworked {new['rework_count']} times"
        ev = c.engine._escalation(c.policy, c.workflow, new, c.now, SYSTEM, reason,
                                  "repeated rework")
        return [ev] if ev is not None else []
    return []
