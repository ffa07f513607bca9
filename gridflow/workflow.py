"""The case life cycle: the workflow graph as data, and the state machine that runs it.

The graph (states, triggers, which roles may fire which trigger) is plain frozen data so
that it can be validated at load time, overridden by policy files, diagrammed and tested
without touching the state machine. :class:`Workflow` then runs transitions through ONE
shared ``transitions.Machine`` per graph. This is the only gridflow module that imports
``transitions`` (BRIEF §12).

Why one shared machine with short-lived models: building a ``Machine`` per case is slow
and ``Machine.add_model`` keeps a strong reference in a list it scans linearly, so every
model is removed again right after its transition -- even when the transition fails.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transitions import Machine

from gridflow.errors import (
    GridflowRuntimeError,
    Problem,
    RoleNotAllowed,
    TransitionNotAllowed,
    WorkflowDefinitionError,
    suggest,
)

__all__ = [
    "BUILTIN_LOCATION",
    "DEFAULT_ROLES",
    "Locator",
    "StateSpec",
    "TriggerSpec",
    "Workflow",
    "WorkflowGraph",
    "build_graph",
    "default_graph",
    "to_dot",
    "to_mermaid",
    "with_overrides",
]

Locator = Callable[[str], tuple[str, int, int]]
"""Maps a definition key (``"triggers.dispatch.roles"``) to ``(path, line, col)``."""

BUILTIN_LOCATION: tuple[str, int, int] = ("<builtin workflow>", 1, 1)

DEFAULT_ROLES: tuple[str, ...] = (
    "grid_worker",  # 网格员
    "grid_chief",  # 网格长
    "liaison",  # 联络员
    "volunteer",  # 志愿者
    "dispatcher",  # 派遣员
    "duty_chief",  # 值班长
    "clerk",  # 受理员
    "handler",  # 专业部门处置人员
    "supervisor",  # 监督员
    "resident",  # 居民
    "reviewer",  # 申诉审核
    "system",  # 系统 (timers, callbacks)
)

# Names become attributes of the transitions model object; keep them plain identifiers
# and away from the names transitions itself binds (trigger, may_*, is_*, to_*, state).
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_RESERVED_PREFIXES = ("may_", "is_", "to_")
_RESERVED_NAMES = frozenset({"state", "trigger", "may_trigger"})


# --------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class StateSpec:
    """One state of the life cycle; ``terminal`` states are where a case may rest for good.

    A terminal state may still have outgoing triggers (an evaluated case can be reopened or
    appealed); "terminal" only means the case needs no further work to be complete.
    """

    name: str
    description: str
    terminal: bool = False


@dataclass(frozen=True)
class TriggerSpec:
    """One trigger: from which states, to which state (``None`` = internal), by which roles."""

    name: str
    sources: tuple[str, ...]
    dest: str | None
    roles: tuple[str, ...]
    needs_reason: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        # Policy loaders hand over lists (or a single string); store tuples so specs stay
        # hashable and a lone "handling" is not split into characters.
        for name in ("sources", "roles"):
            value: Any = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    @property
    def internal(self) -> bool:
        """True when firing leaves the state unchanged (extension request, escalation, ...)."""
        return self.dest is None


@dataclass(frozen=True)
class WorkflowGraph:
    """A validated workflow definition (build it with :func:`build_graph`)."""

    states: tuple[StateSpec, ...]
    triggers: tuple[TriggerSpec, ...]
    initial: str
    roles: tuple[str, ...]
    _state_index: dict[str, StateSpec] = field(init=False, repr=False, compare=False)
    _trigger_index: dict[str, TriggerSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "states", tuple(self.states))
        object.__setattr__(self, "triggers", tuple(self.triggers))
        object.__setattr__(self, "roles", tuple(self.roles))
        object.__setattr__(self, "_state_index", {s.name: s for s in self.states})
        object.__setattr__(self, "_trigger_index", {t.name: t for t in self.triggers})

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.states)

    @property
    def trigger_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.triggers)

    @property
    def terminal_states(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.states if s.terminal)

    @property
    def open_states(self) -> tuple[str, ...]:
        """Non-terminal states: a case in one of these still needs work (and supervision)."""
        return tuple(s.name for s in self.states if not s.terminal)

    def has_state(self, name: str) -> bool:
        return name in self._state_index

    def has_trigger(self, name: str) -> bool:
        return name in self._trigger_index

    def state(self, name: str) -> StateSpec:
        """The state called ``name``; ``KeyError`` (with a suggestion) if there is none."""
        try:
            return self._state_index[name]
        except KeyError:
            raise KeyError(_unknown("state", name, self._state_index)) from None

    def trigger(self, name: str) -> TriggerSpec:
        """The trigger called ``name``; ``KeyError`` (with a suggestion) if there is none."""
        try:
            return self._trigger_index[name]
        except KeyError:
            raise KeyError(_unknown("trigger", name, self._trigger_index)) from None

    def triggers_from(self, state: str) -> tuple[TriggerSpec, ...]:
        """Triggers that may fire from ``state`` (any role), in definition order."""
        return tuple(t for t in self.triggers if state in t.sources)

    def roles_for(self, trigger: str) -> tuple[str, ...]:
        return self.trigger(trigger).roles


def _unknown(kind: str, name: str, candidates: Iterable[str]) -> str:
    hint = suggest(name, candidates)
    return f"unknown {kind} '{name}'" + (f" (did you mean '{hint}'?)" if hint else "")


# --------------------------------------------------------------------------- default graph


def _s(name: str, description: str, terminal: bool = False) -> StateSpec:
    return StateSpec(name, description, terminal)


def _t(
    name: str,
    sources: str,
    dest: str | None,
    roles: str,
    description: str,
    *,
    needs_reason: bool = False,
) -> TriggerSpec:
    return TriggerSpec(
        name, tuple(sources.split()), dest, tuple(roles.split()), needs_reason, description
    )


_DEFAULT_STATES: tuple[StateSpec, ...] = (
    _s("reported", "信息收集 collected — recorded, waiting to be filed"),
    _s("filed", "案卷建立 filed — accepted as a case, waiting for dispatch"),
    _s("dispatched", "任务派遣 dispatched to a department or pool, not yet accepted"),
    _s("handling", "任务处理 being handled by the responsible department"),
    _s("handled", "处理反馈 result reported with evidence, waiting for verification"),
    _s("verified", "核查 verified on site, waiting to be closed"),
    _s("closed", "结案 closed, waiting for evaluation (回访 callback)"),
    _s("evaluated", "综合评价 evaluated and scored on the 4 criteria", terminal=True),
    _s("cancelled", "不予立案/作废 not filed or voided, with a reason", terminal=True),
    _s("deferred", "挂账 deferred — cannot be solved now, handling suspended"),
)

_DEFAULT_TRIGGERS: tuple[TriggerSpec, ...] = (
    # the 7 steps (step 1, intake, creates the case in `reported` and is not a trigger)
    _t("file", "reported", "filed", "clerk duty_chief grid_chief",
       "立案 accept the report as a case"),
    _t("dispatch", "filed", "dispatched", "dispatcher duty_chief system",
       "派遣 send to the responsible department (rules propose, a person may override)"),
    _t("accept", "dispatched", "handling", "handler grid_worker",
       "签收 the assigned handler accepts the task"),
    _t("claim", "dispatched", "handling", "handler grid_worker",
       "认领 one eligible handler claims the case from a pool"),
    _t("feedback", "handling", "handled", "handler grid_worker",
       "处理反馈 report the result with evidence (photos, notes)"),
    _t("verify", "handled", "verified", "supervisor grid_worker grid_chief",
       "核查 on-site verification passes"),
    _t("close", "verified", "closed", "supervisor duty_chief system",
       "结案 close the verified case"),
    _t("evaluate", "closed", "evaluated", "system clerk resident",
       "综合评价 score the case (resident callback 回访)"),
    # side paths
    _t("resolve_on_spot", "reported", "handled", "grid_worker grid_chief",
       "就地解决 a grid worker records a small matter already solved on the spot"),
    _t("cancel", "reported filed", "cancelled", "clerk duty_chief",
       "不予立案/作废 refuse or void the report", needs_reason=True),
    _t("reassign", "dispatched handling", None, "dispatcher duty_chief",
       "改派/转交 give the case to another handler (or, not yet accepted, a pool) of the "
       "lead department", needs_reason=True),
    _t("return_case", "dispatched handling", "filed", "handler",
       "回退 misrouted — back to the command centre for re-dispatch", needs_reason=True),
    _t("request_extension", "handling", None, "handler",
       "申请延期 ask for more time", needs_reason=True),
    _t("approve_extension", "handling", None, "duty_chief dispatcher",
       "批准延期 approve the extension — the deadline moves"),
    _t("deny_extension", "handling", None, "duty_chief dispatcher",
       "驳回延期 deny the extension — the deadline stays"),
    _t("defer", "handling", "deferred", "duty_chief",
       "挂账 suspend a case that cannot be solved now", needs_reason=True),
    _t("resume", "deferred", "handling", "duty_chief dispatcher",
       "恢复处理 resume a deferred case"),
    _t("rework", "handled", "handling", "supervisor grid_worker grid_chief",
       "返工 verification fails — back to the same department", needs_reason=True),
    _t("reopen", "closed evaluated", "handling", "resident duty_chief",
       "重新办理 reopen a closed case (resident not satisfied)", needs_reason=True),
    _t("escalate", "reported filed dispatched handling deferred handled", None,
       "system grid_chief liaison duty_chief dispatcher",
       "升级 move the case one tier up", needs_reason=True),
    _t("summon", "dispatched handling", None, "liaison duty_chief",
       "吹哨报到 summon departments for joint handling (会办)"),
    _t("warn", "dispatched handling deferred", None, "system",
       "督办预警 supervision warning — most of the time limit used"),
    _t("mark_overdue", "dispatched handling deferred", None, "system",
       "超期督办 supervision — the time limit has passed"),
    # appeals (BRIEF §7): filing is internal; a reviewer upholds or rejects
    _t("appeal_routing", "dispatched handling", None, "handler",
       "派遣申诉 the department says 'not ours'", needs_reason=True),
    _t("uphold_routing_appeal", "dispatched handling", "filed", "reviewer",
       "派遣申诉成立 routing appeal upheld — back to dispatch, time not held against it"),
    _t("appeal_score", "evaluated", None, "handler grid_worker",
       "评分申诉 contest a score deduction", needs_reason=True),
    _t("uphold_score_appeal", "evaluated", None, "reviewer",
       "评分申诉成立 score appeal upheld — score recomputed with the exemption"),
    _t("appeal_resident", "closed evaluated", None, "resident",
       "居民申诉 the reporter contests the closure", needs_reason=True),
    _t("uphold_resident_appeal", "closed evaluated", "handling", "reviewer",
       "居民申诉成立 resident appeal upheld — reopened for rework"),
    _t("reject_appeal", "dispatched handling closed evaluated", None, "reviewer",
       "驳回申诉 appeal rejected — the case stays as it is", needs_reason=True),
)  # fmt: skip


def default_graph() -> WorkflowGraph:
    """The 7-step flow with its side paths and the default roles of BRIEF §3/§4/§7."""
    return build_graph(_DEFAULT_STATES, _DEFAULT_TRIGGERS, "reported", DEFAULT_ROLES)


# --------------------------------------------------------------------------- validation


class _Collector:
    """Gathers problems so that one error can list all of them (policy staff fix in one go)."""

    def __init__(self, locate: Locator | None):
        self._locate = locate
        self.problems: list[Problem] = []

    def where(self, key: str) -> tuple[str, int, int]:
        # Fall back to the nearest located parent key: a loader may know where
        # `triggers.dispatch` is but not each of its fields.
        if self._locate is not None:
            parts = key.split(".")
            while parts:
                try:
                    return self._locate(".".join(parts))
                except LookupError:
                    parts.pop()
        return BUILTIN_LOCATION

    def add(self, key: str, message: str, suggestion: str | None = None) -> None:
        path, line, col = self.where(key)
        self.problems.append(Problem(path, line, col, message, suggestion))


def _check_name(out: _Collector, kind: str, name: object, key: str) -> bool:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        out.add(key, f"{kind} name {name!r} must be lower-case letters, digits and '_'")
        return False
    if name in _RESERVED_NAMES or name.startswith(_RESERVED_PREFIXES):
        out.add(key, f"{kind} name '{name}' is reserved by the state machine")
        return False
    return True


def build_graph(
    states: Iterable[StateSpec],
    triggers: Iterable[TriggerSpec],
    initial: str,
    roles: Iterable[str],
    *,
    locate: Locator | None = None,
) -> WorkflowGraph:
    """Validate a workflow definition and return it as a :class:`WorkflowGraph`.

    Every problem is collected and raised together in one :class:`WorkflowDefinitionError`,
    so a definition error is found at load time, never when a case first hits it.
    ``locate`` maps keys -- ``initial``, ``roles``, ``states.<name>``, ``triggers.<name>``,
    ``triggers.<name>.sources|dest|roles`` -- to a file location; a ``LookupError`` from it
    falls back to the parent key, then to ``<builtin workflow>:1:1``.
    """
    states = tuple(states)
    triggers = tuple(triggers)
    roles = tuple(roles)
    out = _Collector(locate)

    # roles
    seen_roles: set[str] = set()
    for role in roles:
        if not isinstance(role, str) or not role:
            out.add("roles", f"role {role!r} must be a non-empty string")
        elif role in seen_roles:
            out.add("roles", f"duplicate role '{role}'")
        seen_roles.add(role)

    # states
    state_names: dict[str, StateSpec] = {}
    for spec in states:
        if not isinstance(spec, StateSpec):
            out.add("states", f"not a state definition: {spec!r}")
            continue
        key = f"states.{spec.name}"
        if not _check_name(out, "state", spec.name, key):
            continue
        if spec.name in state_names:
            out.add(key, f"duplicate state '{spec.name}'")
            continue
        state_names[spec.name] = spec

    if not isinstance(initial, str) or not initial:
        out.add("initial", "no initial state given")
    elif initial not in state_names:
        out.add(
            "initial",
            f"initial state '{initial}' is not a declared state",
            suggest(initial, state_names),
        )

    # triggers
    trigger_names: dict[str, TriggerSpec] = {}
    for tspec in triggers:
        if not isinstance(tspec, TriggerSpec):
            out.add("triggers", f"not a trigger definition: {tspec!r}")
            continue
        key = f"triggers.{tspec.name}"
        if not _check_name(out, "trigger", tspec.name, key):
            continue
        if tspec.name in trigger_names:
            out.add(key, f"duplicate trigger '{tspec.name}'")
            continue
        trigger_names[tspec.name] = tspec
        if not tspec.sources:
            out.add(f"{key}.sources", f"trigger '{tspec.name}' has no source state")
        for source in tspec.sources:
            if source not in state_names:
                out.add(
                    f"{key}.sources",
                    f"trigger '{tspec.name}': unknown source state '{source}'",
                    suggest(source, state_names),
                )
        if tspec.dest is not None and tspec.dest not in state_names:
            out.add(
                f"{key}.dest",
                f"trigger '{tspec.name}': unknown destination state '{tspec.dest}'",
                suggest(tspec.dest, state_names),
            )
        if not tspec.roles:
            out.add(f"{key}.roles", f"trigger '{tspec.name}' has no allowed role")
        for role in tspec.roles:
            if role not in seen_roles:
                out.add(
                    f"{key}.roles",
                    f"trigger '{tspec.name}': unknown role '{role}'",
                    suggest(role, seen_roles),
                )

    # graph shape: only judged on the parts that are well defined, to avoid echo errors
    edges: dict[str, set[str]] = {name: set() for name in state_names}
    for tspec in trigger_names.values():
        if tspec.dest is not None and tspec.dest in state_names:
            for source in tspec.sources:
                if source in edges:
                    edges[source].add(tspec.dest)

    if initial in state_names:
        reachable = _closure([initial], edges)
        for name in state_names:
            if name not in reachable:
                out.add(f"states.{name}", f"state '{name}' is unreachable from '{initial}'")

    terminals = [name for name, spec in state_names.items() if spec.terminal]
    if state_names and not terminals:
        out.add("states", "no terminal state: no case could ever be complete")
    elif terminals:
        reverse: dict[str, set[str]] = {name: set() for name in state_names}
        for source, dests in edges.items():
            for dest in dests:
                reverse[dest].add(source)
        finishing = _closure(terminals, reverse)
        for name, spec in state_names.items():
            if not spec.terminal and name not in finishing:
                out.add(
                    f"states.{name}",
                    f"state '{name}' has no path to a terminal state (a case would be stuck)",
                )

    if out.problems:
        raise WorkflowDefinitionError(out.problems)
    return WorkflowGraph(states, triggers, initial, roles)


def _closure(start: Iterable[str], edges: Mapping[str, set[str]]) -> set[str]:
    seen = set(start)
    todo = deque(seen)
    while todo:
        for nxt in edges.get(todo.popleft(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def with_overrides(
    graph: WorkflowGraph,
    role_overrides: Mapping[str, Sequence[str]],
    *,
    locate: Locator | None = None,
) -> WorkflowGraph:
    """``graph`` with the roles of some triggers replaced by policy data; re-validated.

    ``role_overrides`` is the ``workflow: roles: {trigger: [role, ...]}`` section of a policy
    file. An override REPLACES the trigger's role list. Problems are keyed
    ``triggers.<name>.roles`` for ``locate``.
    """
    out = _Collector(locate)
    usable: dict[str, tuple[str, ...]] = {}
    for name, new_roles in role_overrides.items():
        if not graph.has_trigger(name):
            out.add(
                f"triggers.{name}.roles",
                f"roles given for unknown trigger '{name}'",
                suggest(name, graph.trigger_names),
            )
        elif isinstance(new_roles, str) or not isinstance(new_roles, Sequence):
            out.add(
                f"triggers.{name}.roles",
                f"roles of trigger '{name}' must be a list of role names",
            )
        else:
            usable[name] = tuple(new_roles)
    triggers = tuple(
        TriggerSpec(t.name, t.sources, t.dest, usable[t.name], t.needs_reason, t.description)
        if t.name in usable
        else t
        for t in graph.triggers
    )
    try:
        result = build_graph(graph.states, triggers, graph.initial, graph.roles, locate=locate)
    except WorkflowDefinitionError as err:
        # one report: bad trigger names together with what the usable overrides broke
        raise WorkflowDefinitionError([*out.problems, *err.problems]) from None
    if out.problems:
        raise WorkflowDefinitionError(out.problems)
    return result


# --------------------------------------------------------------------------- state machine


class _Token:
    """The throw-away model one transition runs on (its state is set by ``add_model``).

    It stores only ``state``: the ``trigger``/``may_trigger`` partials transitions tries to
    attach would point back at the token (a reference cycle), so it is dropped and the
    token dies by reference counting the moment it is removed from the machine.
    """

    __slots__ = ("__weakref__", "state")

    state: str

    def __setattr__(self, name: str, value: object) -> None:
        if name == "state":
            object.__setattr__(self, name, value)


class _SharedMachine(Machine):
    """A ``Machine`` that binds no convenience methods onto the models it is given.

    ``Machine.add_model`` normally attaches a ``partial`` per trigger, a ``may_<trigger>``
    per trigger and an ``is_<state>`` per state to every model: ~100 µs for this graph, ten
    times the transition itself. :class:`Workflow` fires events through
    ``machine.events[name].trigger(model)`` -- exactly what those bound methods call -- so
    the bindings are skipped. (Hooks are part of transitions 0.9's typed ``Machine``.)
    """

    def _add_trigger_to_model(self, trigger: str, model: object) -> None:
        return None

    def _add_model_to_state(self, state: Any, model: object) -> None:
        return None


class Workflow:
    """Runs a validated graph on one shared ``transitions.Machine``.

    The workflow holds no per-case data: the caller passes the case's current state and gets
    the next one back, so the store (events) stays the single source of truth. A model is
    added to the machine only for the duration of one transition, then removed.
    """

    def __init__(self, graph: WorkflowGraph):
        # Re-validate: a WorkflowGraph can be constructed directly, bypassing build_graph.
        self.graph = build_graph(graph.states, graph.triggers, graph.initial, graph.roles)
        self._terminal = frozenset(self.graph.terminal_states)
        self._open = self.graph.open_states
        self._triggers = {t.name: t for t in self.graph.triggers}
        self._roles = {t.name: frozenset(t.roles) for t in self.graph.triggers}
        self._sources = {t.name: frozenset(t.sources) for t in self.graph.triggers}
        self._machine = _SharedMachine(
            model=None,
            states=[s.name for s in self.graph.states],
            initial=self.graph.initial,
            transitions=[
                {"trigger": t.name, "source": list(t.sources), "dest": t.dest}
                for t in self.graph.triggers
            ],
            auto_transitions=False,
            send_event=True,
            ignore_invalid_triggers=False,
            name="gridflow",
        )

    @property
    def machine(self) -> Machine:
        """The shared ``transitions.Machine`` (read-only use: diagnostics and tests)."""
        return self._machine

    @property
    def open_states(self) -> tuple[str, ...]:
        return self._open

    def is_terminal(self, state: str) -> bool:
        self._require_state(state)
        return state in self._terminal

    def allowed_triggers(self, state: str, role: str | None = None) -> list[str]:
        """Triggers that may fire from ``state`` (by ``role``, if given), in graph order."""
        self._require_state(state)
        return [
            t.name
            for t in self.graph.triggers
            if state in self._sources[t.name] and (role is None or role in self._roles[t.name])
        ]

    def next_state(self, state: str, trigger: str, role: str, *, case_id: str | None = None) -> str:
        """Fire ``trigger`` by ``role`` from ``state`` and return the resulting state.

        Raises :class:`TransitionNotAllowed` (unknown trigger or state, or not allowed from
        ``state``) or :class:`RoleNotAllowed`; nothing is changed or retained either way.
        """
        spec = self._triggers.get(trigger)
        if spec is None:
            raise TransitionNotAllowed(
                trigger,
                state,
                case_id=case_id,
                role=role,
                reason=_unknown("trigger", trigger, self._triggers),
            )
        if state not in self._sources[trigger]:
            if not self.graph.has_state(state):
                raise TransitionNotAllowed(trigger, state, case_id=case_id, role=role,
                                           reason=_unknown("state", state, self.graph.state_names))
            raise TransitionNotAllowed(trigger, state, case_id=case_id, role=role,
                                       possible=self.allowed_triggers(state))
        if role not in self._roles[trigger]:
            raise RoleNotAllowed(trigger, state, role, spec.roles, case_id=case_id)

        machine = self._machine
        token = _Token()
        machine.add_model(token, initial=state)
        try:
            fired = machine.events[trigger].trigger(token)
            result = token.state
        finally:
            machine.remove_model(token)
        if not fired:  # no conditions are registered, so this means the machine disagrees
            raise TransitionNotAllowed(
                trigger,
                state,
                case_id=case_id,
                role=role,
                reason=f"the state machine refused '{trigger}' from '{state}'",
            )
        return result

    def _require_state(self, state: str) -> None:
        if not self.graph.has_state(state):
            raise GridflowRuntimeError(_unknown("state", state, self.graph.state_names))


# --------------------------------------------------------------------------- diagrams


# Mermaid entity codes keep label punctuation from being read as diagram syntax.
_MERMAID_ESCAPES = str.maketrans(
    {"#": "#35;", ":": "#58;", ";": "#59;", '"': "#quot;", "\n": " ", "\r": " "}
)


def _mermaid_text(text: str) -> str:
    return text.translate(_MERMAID_ESCAPES)


def _label(spec: TriggerSpec, show_roles: bool) -> str:
    return f"{spec.name} ({', '.join(spec.roles)})" if show_roles else spec.name


def to_mermaid(graph: WorkflowGraph, *, show_roles: bool = False) -> str:
    """A Mermaid ``stateDiagram-v2``; internal triggers appear as labelled self-loops."""
    lines = ["stateDiagram-v2"]
    for s in graph.states:
        if s.description:
            lines.append(f"    {s.name} : {_mermaid_text(s.description)}")
    lines.append(f"    [*] --> {graph.initial}")
    for t in graph.triggers:
        label = _mermaid_text(_label(t, show_roles))
        for source in t.sources:
            lines.append(f"    {source} --> {t.dest or source} : {label}")
    for name in graph.terminal_states:
        lines.append(f"    {name} --> [*]")
    return "\n".join(lines) + "\n"


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: WorkflowGraph, *, show_roles: bool = False) -> str:
    """A Graphviz digraph; terminal states are double circles, internal triggers dashed loops."""
    lines = [
        "digraph workflow {",
        "    rankdir=LR;",
        '    node [shape=box, style=rounded, fontname="sans-serif"];',
        '    edge [fontname="sans-serif", fontsize=10];',
        '    "__start__" [shape=point, label=""];',
    ]
    for s in graph.states:
        shape = ", shape=doublecircle" if s.terminal else ""
        label = f"{s.name}\n{s.description}" if s.description else s.name
        lines.append(f"    {_dot_quote(s.name)} [label={_dot_quote(label)}{shape}];")
    lines.append(f'    "__start__" -> {_dot_quote(graph.initial)};')
    for t in graph.triggers:
        label = _dot_quote(_label(t, show_roles))
        style = ", style=dashed" if t.internal else ""
        for source in t.sources:
            dest = t.dest or source
            lines.append(f"    {_dot_quote(source)} -> {_dot_quote(dest)} [label={label}{style}];")
    lines.append("}")
    return "\n".join(lines) + "\n"
