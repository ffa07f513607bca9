"""Tests for gridflow.workflow: the graph as data, its validation, and the shared machine."""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections import deque
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gridflow.workflow as wf
from gridflow.errors import (
    GridflowRuntimeError,
    RoleNotAllowed,
    TransitionNotAllowed,
    WorkflowDefinitionError,
)
from gridflow.workflow import (
    DEFAULT_ROLES,
    StateSpec,
    TriggerSpec,
    Workflow,
    WorkflowGraph,
    build_graph,
    default_graph,
    to_dot,
    to_mermaid,
    with_overrides,
)

GRAPH = default_graph()
WORKFLOW = Workflow(GRAPH)

EXPECTED_STATES = {
    "reported",
    "filed",
    "dispatched",
    "handling",
    "handled",
    "verified",
    "closed",
    "evaluated",
    "cancelled",
    "deferred",
}


def _successors(graph: WorkflowGraph) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {s: set() for s in graph.state_names}
    for t in graph.triggers:
        for source in t.sources:
            edges[source].add(t.dest or source)
    return edges


def _reach(start: set[str], edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(start), deque(start)
    while todo:
        for nxt in edges[todo.popleft()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _expected(state: str, trigger: str, role: str) -> str | type[Exception]:
    """An oracle written from the graph data alone, independent of Workflow."""
    if not GRAPH.has_trigger(trigger):
        return TransitionNotAllowed
    spec = GRAPH.trigger(trigger)
    if state not in spec.sources:
        return TransitionNotAllowed
    if role not in spec.roles:
        return RoleNotAllowed
    return spec.dest or state


# --------------------------------------------------------------------------- default graph


def test_default_graph_states_and_roles() -> None:
    assert set(GRAPH.state_names) == EXPECTED_STATES
    assert GRAPH.initial == "reported"
    assert set(GRAPH.terminal_states) == {"evaluated", "cancelled"}
    assert set(WORKFLOW.open_states) == EXPECTED_STATES - {"evaluated", "cancelled"}
    assert GRAPH.roles == DEFAULT_ROLES
    assert {"grid_worker", "reviewer", "system", "volunteer"} <= set(GRAPH.roles)


def test_every_state_and_trigger_has_a_bilingual_description() -> None:
    items: list[StateSpec | TriggerSpec] = [*GRAPH.states, *GRAPH.triggers]
    for item in items:
        assert item.description
        assert any("\u4e00" <= ch <= "\u9fff" for ch in item.description), item.name
        assert any(ch.isascii() and ch.isalpha() for ch in item.description), item.name


def test_every_state_reachable_from_initial() -> None:
    assert _reach({GRAPH.initial}, _successors(GRAPH)) == set(GRAPH.state_names)


def test_every_open_state_reaches_a_terminal_state() -> None:
    edges = _successors(GRAPH)
    terminals = set(GRAPH.terminal_states)
    for state in GRAPH.open_states:
        assert _reach({state}, edges) & terminals, state


def test_every_trigger_has_known_roles() -> None:
    for t in GRAPH.triggers:
        assert t.roles, t.name
        assert set(t.roles) <= set(GRAPH.roles), t.name


def test_reason_required_on_the_documented_triggers() -> None:
    needs = {t.name for t in GRAPH.triggers if t.needs_reason}
    assert needs == {
        "cancel",
        "reassign",
        "return_case",
        "request_extension",
        "defer",
        "rework",
        "reopen",
        "escalate",
        "appeal_routing",
        "appeal_score",
        "appeal_resident",
        "reject_appeal",
    }


def test_machine_matches_graph() -> None:
    """The transitions machine knows exactly the triggers the graph allows from each state."""
    machine = WORKFLOW.machine
    assert set(machine.states) == set(GRAPH.state_names)
    for state in GRAPH.state_names:
        assert set(machine.get_triggers(state)) == set(WORKFLOW.allowed_triggers(state))
    assert not any(name.startswith("to_") for name in machine.events)  # no auto transitions
    assert machine.models == []


def test_graph_lookups() -> None:
    assert GRAPH.state("handling").description.startswith("任务处理")
    assert GRAPH.trigger("escalate").internal
    assert not GRAPH.trigger("dispatch").internal
    assert GRAPH.roles_for("verify") == ("supervisor", "grid_worker", "grid_chief")
    assert [t.name for t in GRAPH.triggers_from("verified")] == ["close"]
    with pytest.raises(KeyError, match="did you mean 'dispatch'"):
        GRAPH.trigger("dispach")
    with pytest.raises(KeyError, match="did you mean 'handling'"):
        GRAPH.state("handlng")


def test_trigger_spec_normalises_lists_and_strings() -> None:
    spec = TriggerSpec("x", ["a", "b"], None, "system")  # type: ignore[arg-type]
    assert spec.sources == ("a", "b")
    assert spec.roles == ("system",)
    hash(spec)


# --------------------------------------------------------------------------- transitions

CASES: list[tuple[str, str, str, str | type[Exception]]] = [
    # the 7 steps
    ("reported", "file", "clerk", "filed"),
    ("reported", "file", "grid_chief", "filed"),
    ("filed", "dispatch", "dispatcher", "dispatched"),
    ("filed", "dispatch", "system", "dispatched"),
    ("dispatched", "accept", "handler", "handling"),
    ("dispatched", "claim", "grid_worker", "handling"),
    ("handling", "feedback", "handler", "handled"),
    ("handled", "verify", "supervisor", "verified"),
    ("verified", "close", "system", "closed"),
    ("closed", "evaluate", "resident", "evaluated"),
    # side paths
    ("reported", "resolve_on_spot", "grid_worker", "handled"),
    ("reported", "cancel", "clerk", "cancelled"),
    ("filed", "cancel", "duty_chief", "cancelled"),
    ("dispatched", "return_case", "handler", "filed"),
    ("handling", "return_case", "handler", "filed"),
    ("handling", "request_extension", "handler", "handling"),
    ("handling", "approve_extension", "duty_chief", "handling"),
    ("handling", "deny_extension", "dispatcher", "handling"),
    ("handling", "defer", "duty_chief", "deferred"),
    ("deferred", "resume", "dispatcher", "handling"),
    ("handled", "rework", "grid_chief", "handling"),
    ("closed", "reopen", "resident", "handling"),
    ("evaluated", "reopen", "duty_chief", "handling"),
    ("reported", "escalate", "grid_chief", "reported"),
    ("deferred", "escalate", "system", "deferred"),
    ("handled", "escalate", "grid_chief", "handled"),
    ("dispatched", "reassign", "duty_chief", "dispatched"),
    ("handling", "summon", "liaison", "handling"),
    ("dispatched", "warn", "system", "dispatched"),
    ("deferred", "mark_overdue", "system", "deferred"),
    # appeals
    ("handling", "appeal_routing", "handler", "handling"),
    ("dispatched", "uphold_routing_appeal", "reviewer", "filed"),
    ("handling", "uphold_routing_appeal", "reviewer", "filed"),
    ("evaluated", "appeal_score", "grid_worker", "evaluated"),
    ("evaluated", "uphold_score_appeal", "reviewer", "evaluated"),
    ("closed", "appeal_resident", "resident", "closed"),
    ("evaluated", "uphold_resident_appeal", "reviewer", "handling"),
    ("handling", "reject_appeal", "reviewer", "handling"),
    ("evaluated", "reject_appeal", "reviewer", "evaluated"),
    # wrong state
    ("filed", "verify", "supervisor", TransitionNotAllowed),
    ("reported", "dispatch", "dispatcher", TransitionNotAllowed),
    ("cancelled", "reopen", "resident", TransitionNotAllowed),
    ("cancelled", "file", "clerk", TransitionNotAllowed),
    ("verified", "rework", "supervisor", TransitionNotAllowed),
    ("evaluated", "escalate", "system", TransitionNotAllowed),
    ("handling", "reassign", "dispatcher", "handling"),
    ("handled", "reassign", "dispatcher", TransitionNotAllowed),
    ("closed", "appeal_score", "handler", TransitionNotAllowed),
    ("filed", "reject_appeal", "reviewer", TransitionNotAllowed),
    ("handled", "resolve_on_spot", "grid_worker", TransitionNotAllowed),
    # wrong role
    ("reported", "file", "handler", RoleNotAllowed),
    ("reported", "file", "resident", RoleNotAllowed),
    ("filed", "dispatch", "handler", RoleNotAllowed),
    ("dispatched", "accept", "volunteer", RoleNotAllowed),
    ("handling", "defer", "handler", RoleNotAllowed),
    ("handling", "uphold_routing_appeal", "handler", RoleNotAllowed),
    ("handled", "verify", "handler", RoleNotAllowed),
    ("reported", "resolve_on_spot", "resident", RoleNotAllowed),
    ("handling", "warn", "duty_chief", RoleNotAllowed),
    ("handling", "feedback", "nobody", RoleNotAllowed),
    # unknown names
    ("handling", "flie", "clerk", TransitionNotAllowed),
    ("nowhere", "file", "clerk", TransitionNotAllowed),
]


@pytest.mark.parametrize(("state", "trigger", "role", "expected"), CASES)
def test_next_state_table(
    state: str, trigger: str, role: str, expected: str | type[Exception]
) -> None:
    assert _expected(state, trigger, role) == expected  # the table agrees with the graph
    before = WORKFLOW.allowed_triggers("reported")
    if isinstance(expected, str):
        assert WORKFLOW.next_state(state, trigger, role, case_id="C-1") == expected
    else:
        with pytest.raises(expected) as info:
            WORKFLOW.next_state(state, trigger, role, case_id="C-1")
        assert type(info.value) is expected
        assert isinstance(info.value, TransitionNotAllowed)
        assert info.value.trigger == trigger
        assert info.value.state == state
        assert str(info.value).startswith("case C-1: ")
        if expected is TransitionNotAllowed and WORKFLOW.graph.has_state(state) \
                and trigger in WORKFLOW.graph.trigger_names:
            # a refusal about the state names what the state allows instead
            possible = info.value.possible_triggers
            assert possible == tuple(WORKFLOW.allowed_triggers(state))
            assert trigger not in possible
            assert all(t in str(info.value) for t in possible)
    # refused or not, nothing is retained and the workflow behaves the same afterwards
    assert WORKFLOW.machine.models == []
    assert WORKFLOW.allowed_triggers("reported") == before
    assert WORKFLOW.next_state("reported", "file", "clerk") == "filed"


def test_error_messages_are_clear() -> None:
    with pytest.raises(TransitionNotAllowed, match="did you mean 'file'"):
        WORKFLOW.next_state("reported", "flie", "clerk")
    with pytest.raises(TransitionNotAllowed, match=r"unknown state 'handlng'.*'handling'"):
        WORKFLOW.next_state("handlng", "feedback", "handler")
    with pytest.raises(TransitionNotAllowed, match="'verify' is not allowed from state 'filed'"):
        WORKFLOW.next_state("filed", "verify", "supervisor")
    with pytest.raises(RoleNotAllowed) as info:
        WORKFLOW.next_state("reported", "file", "handler")
    assert info.value.allowed_roles == ("clerk", "duty_chief", "grid_chief")
    assert info.value.role == "handler"
    assert "role 'handler' may not 'file'" in str(info.value)
    assert "did you mean" not in str(info.value)
    with pytest.raises(RoleNotAllowed, match="did you mean 'clerk'"):
        WORKFLOW.next_state("reported", "file", "clark")


def test_full_seven_step_flow_and_on_the_spot_flow() -> None:
    steps = [
        ("file", "clerk"),
        ("dispatch", "system"),
        ("claim", "handler"),
        ("request_extension", "handler"),
        ("approve_extension", "duty_chief"),
        ("feedback", "handler"),
        ("rework", "supervisor"),
        ("feedback", "handler"),
        ("verify", "grid_worker"),
        ("close", "supervisor"),
        ("evaluate", "system"),
    ]
    state = GRAPH.initial
    for trigger, role in steps:
        state = WORKFLOW.next_state(state, trigger, role)
    assert state == "evaluated"
    assert WORKFLOW.is_terminal(state)

    state = "reported"
    for trigger, role in [
        ("resolve_on_spot", "grid_worker"),
        ("verify", "grid_chief"),
        ("close", "system"),
        ("evaluate", "resident"),
    ]:
        state = WORKFLOW.next_state(state, trigger, role)
    assert state == "evaluated"


def test_allowed_triggers_and_is_terminal() -> None:
    assert WORKFLOW.allowed_triggers("verified") == ["close"]
    assert WORKFLOW.allowed_triggers("handling", "reviewer") == [
        "uphold_routing_appeal",
        "reject_appeal",
    ]
    assert WORKFLOW.allowed_triggers("cancelled") == []
    assert "reopen" in WORKFLOW.allowed_triggers("evaluated", "resident")
    assert WORKFLOW.is_terminal("cancelled")
    assert not WORKFLOW.is_terminal("closed")
    with pytest.raises(GridflowRuntimeError, match="did you mean 'closed'"):
        WORKFLOW.is_terminal("clsoed")
    with pytest.raises(GridflowRuntimeError):
        WORKFLOW.allowed_triggers("nowhere")


def test_no_models_leak_after_1000_calls_including_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """BRIEF §12: add_model keeps strong references; every token must be released."""
    alive: list[weakref.ref[object]] = []

    class TrackedToken(wf._Token):
        __slots__ = ()

        def __init__(self) -> None:
            alive.append(weakref.ref(self))

    monkeypatch.setattr(wf, "_Token", TrackedToken)
    workflow = Workflow(GRAPH)
    calls = [
        ("reported", "file", "clerk"),
        ("handling", "escalate", "system"),
        ("filed", "verify", "supervisor"),  # refused: wrong state
        ("reported", "file", "handler"),  # refused: wrong role
        ("handling", "nonsense", "handler"),  # refused: unknown trigger
    ]
    gc.disable()  # on the normal and refused paths tokens die by reference counting
    try:
        for i in range(1000):
            state, trigger, role = calls[i % len(calls)]
            with contextlib.suppress(TransitionNotAllowed):
                workflow.next_state(state, trigger, role)
        assert workflow.machine.models == []
        assert len(alive) == 400  # the two allowed calls of every five went through a model
        assert all(ref() is None for ref in alive)
    finally:
        gc.enable()

    # a failure raised inside transitions itself (a callback) must release the model too;
    # transitions keeps the error on its EventData (a cycle), so the token needs the GC here
    def boom(event: object) -> None:
        raise RuntimeError("callback failed")

    workflow.machine.before_state_change = [boom]
    for _ in range(10):
        with pytest.raises(RuntimeError, match="callback failed"):
            workflow.next_state("filed", "dispatch", "dispatcher")
    assert workflow.machine.models == []
    gc.collect()
    assert len(alive) == 410
    assert all(ref() is None for ref in alive)


# --------------------------------------------------------------------------- build_graph errors


def _mini(
    *,
    states: list[StateSpec] | None = None,
    triggers: list[TriggerSpec] | None = None,
    initial: str = "new",
    roles: tuple[str, ...] = ("clerk", "system"),
) -> WorkflowGraph:
    base_states = [
        StateSpec("new", "new"),
        StateSpec("open", "open"),
        StateSpec("done", "done", terminal=True),
    ]
    base_triggers = [
        TriggerSpec("start", ("new",), "open", ("clerk",)),
        TriggerSpec("finish", ("open",), "done", ("clerk", "system")),
    ]
    return build_graph(
        base_states + (states or []), base_triggers + (triggers or []), initial, roles
    )


def _messages(err: WorkflowDefinitionError) -> list[str]:
    return [p.message for p in err.problems]


def test_mini_graph_is_valid() -> None:
    graph = _mini()
    assert Workflow(graph).next_state("new", "start", "clerk") == "open"


def test_typo_in_dest_gives_suggestion() -> None:
    with pytest.raises(WorkflowDefinitionError) as info:
        _mini(triggers=[TriggerSpec("skip", ("new",), "dnoe", ("clerk",))])
    (problem,) = info.value.problems
    assert "unknown destination state 'dnoe'" in problem.message
    assert problem.suggestion == "done"
    assert (problem.path, problem.line, problem.col) == ("<builtin workflow>", 1, 1)
    assert "did you mean 'done'?" in str(info.value)


def test_typo_in_source_and_role_gives_suggestion() -> None:
    with pytest.raises(WorkflowDefinitionError) as info:
        _mini(triggers=[TriggerSpec("skip", ("opne",), "done", ("clerc",))])
    assert {p.suggestion for p in info.value.problems} == {"open", "clerk"}


def test_unreachable_state() -> None:
    with pytest.raises(WorkflowDefinitionError) as info:
        _mini(
            states=[StateSpec("orphan", "orphan")],
            triggers=[TriggerSpec("drop", ("orphan",), "done", ("system",))],
        )
    assert _messages(info.value) == ["state 'orphan' is unreachable from 'new'"]


def test_dead_end_state() -> None:
    with pytest.raises(WorkflowDefinitionError) as info:
        _mini(
            states=[StateSpec("limbo", "limbo")],
            triggers=[
                TriggerSpec("park", ("open",), "limbo", ("system",)),
                TriggerSpec("poke", ("limbo",), None, ("system",)),  # internal: no way out
            ],
        )
    assert _messages(info.value) == [
        "state 'limbo' has no path to a terminal state (a case would be stuck)"
    ]


def test_trigger_with_no_role() -> None:
    with pytest.raises(WorkflowDefinitionError) as info:
        _mini(triggers=[TriggerSpec("poke", ("open",), None, ())])
    assert _messages(info.value) == ["trigger 'poke' has no allowed role"]


def test_duplicates_missing_initial_and_bad_names() -> None:
    with pytest.raises(WorkflowDefinitionError) as info:
        _mini(
            states=[StateSpec("open", "again")],
            triggers=[
                TriggerSpec("start", ("new",), "open", ("clerk",)),
                TriggerSpec("may_go", ("new",), "open", ("clerk",)),
                TriggerSpec("Bad Name", ("new",), "open", ("clerk",)),
            ],
            initial="neww",
            roles=("clerk", "system", "clerk"),
        )
    messages = _messages(info.value)
    assert "duplicate state 'open'" in messages
    assert "duplicate trigger 'start'" in messages
    assert "duplicate role 'clerk'" in messages
    assert "initial state 'neww' is not a declared state" in messages
    assert "trigger name 'may_go' is reserved by the state machine" in messages
    assert any("'Bad Name' must be lower-case" in m for m in messages)
    initial = next(p for p in info.value.problems if "initial" in p.message)
    assert initial.suggestion == "new"


def test_no_terminal_state() -> None:
    with pytest.raises(WorkflowDefinitionError) as info:
        build_graph(
            [StateSpec("a", "a"), StateSpec("b", "b")],
            [TriggerSpec("go", ("a",), "b", ("system",))],
            "a",
            ("system",),
        )
    assert "no terminal state: no case could ever be complete" in _messages(info.value)


def test_all_problems_reported_together_with_locations() -> None:
    positions = {
        "triggers.skip.dest": ("workflow.yaml", 12, 11),
        "triggers.poke": ("workflow.yaml", 20, 5),  # parent of triggers.poke.roles
        "states.orphan": ("workflow.yaml", 4, 5),
        "states.limbo": ("workflow.yaml", 5, 5),
    }
    seen_keys: list[str] = []

    def locate(key: str) -> tuple[str, int, int]:
        seen_keys.append(key)
        return positions[key]  # KeyError -> falls back to the parent key, then builtin

    with pytest.raises(WorkflowDefinitionError) as info:
        build_graph(
            [
                StateSpec("new", "new"),
                StateSpec("done", "done", terminal=True),
                StateSpec("orphan", "orphan"),
                StateSpec("limbo", "limbo"),
            ],
            [
                TriggerSpec("finish", ("new",), "done", ("clerk",)),
                TriggerSpec("skip", ("new",), "dnoe", ("clerk",)),
                TriggerSpec("poke", ("new",), None, ()),
                TriggerSpec("park", ("new",), "limbo", ("clerk",)),
                TriggerSpec("drop", ("orphan",), "done", ("clerk",)),
                TriggerSpec("oops", ("new",), None, ("clrek",)),
            ],
            "new",
            ("clerk",),
            locate=locate,
        )
    err = info.value
    rendered = str(err).splitlines()
    assert len(err.problems) == 5
    assert len(rendered) == 5
    assert "workflow.yaml:4:5: state 'orphan' is unreachable from 'new'" in rendered
    assert any(line.startswith("workflow.yaml:5:5: state 'limbo' has no path") for line in rendered)
    assert (
        "workflow.yaml:12:11: trigger 'skip': unknown destination state 'dnoe' "
        "(did you mean 'done'?)" in rendered
    )
    assert "workflow.yaml:20:5: trigger 'poke' has no allowed role" in rendered
    assert (
        "<builtin workflow>:1:1: trigger 'oops': unknown role 'clrek' (did you mean 'clerk'?)"
        in rendered
    )
    assert "triggers.poke.roles" in seen_keys and "triggers.poke" in seen_keys
    assert "triggers.oops.roles" in seen_keys and "triggers.oops" in seen_keys
    assert "triggers" in seen_keys


def test_workflow_revalidates_a_hand_built_graph() -> None:
    bad = WorkflowGraph(
        (StateSpec("a", "a"), StateSpec("done", "done", terminal=True)),
        (TriggerSpec("go", ("a",), "dnoe", ("system",)),),
        "a",
        ("system",),
    )
    with pytest.raises(WorkflowDefinitionError, match="did you mean 'done'"):
        Workflow(bad)


# --------------------------------------------------------------------------- overrides


def test_override_takes_effect() -> None:
    graph = with_overrides(GRAPH, {"dispatch": ["duty_chief"], "verify": ("grid_worker",)})
    workflow = Workflow(graph)
    assert graph.roles_for("dispatch") == ("duty_chief",)
    assert workflow.next_state("filed", "dispatch", "duty_chief") == "dispatched"
    with pytest.raises(RoleNotAllowed):
        workflow.next_state("filed", "dispatch", "dispatcher")
    with pytest.raises(RoleNotAllowed):
        workflow.next_state("handled", "verify", "supervisor")
    # untouched triggers and the original graph are unchanged
    assert graph.roles_for("file") == GRAPH.roles_for("file")
    assert GRAPH.roles_for("dispatch") == ("dispatcher", "duty_chief", "system")
    assert WORKFLOW.next_state("filed", "dispatch", "dispatcher") == "dispatched"


def test_override_unknown_trigger_suggests() -> None:
    def locate(key: str) -> tuple[str, int, int]:
        assert key == "triggers.dispach.roles"
        return ("policy/workflow.yaml", 3, 5)

    with pytest.raises(WorkflowDefinitionError) as info:
        with_overrides(GRAPH, {"dispach": ["duty_chief"]}, locate=locate)
    assert str(info.value) == (
        "policy/workflow.yaml:3:5: roles given for unknown trigger 'dispach' "
        "(did you mean 'dispatch'?)"
    )


def test_override_is_revalidated_and_reported_together() -> None:
    positions = {
        "triggers.dispach.roles": ("policy/workflow.yaml", 3, 5),
        "triggers.verify.roles": ("policy/workflow.yaml", 4, 13),
        "triggers.file.roles": ("policy/workflow.yaml", 5, 11),
        "triggers.close.roles": ("policy/workflow.yaml", 6, 12),
    }
    with pytest.raises(WorkflowDefinitionError) as info:
        with_overrides(
            GRAPH,
            {"dispach": ["duty_chief"], "verify": ["supervisr"], "file": [], "close": "system"},
            locate=positions.__getitem__,
        )
    assert str(info.value).splitlines() == [
        "policy/workflow.yaml:3:5: roles given for unknown trigger 'dispach' "
        "(did you mean 'dispatch'?)",
        "policy/workflow.yaml:4:13: trigger 'verify': unknown role 'supervisr' "
        "(did you mean 'supervisor'?)",
        "policy/workflow.yaml:5:11: trigger 'file' has no allowed role",
        "policy/workflow.yaml:6:12: roles of trigger 'close' must be a list of role names",
    ]


# --------------------------------------------------------------------------- property test

TRIGGERS = st.sampled_from([*GRAPH.trigger_names, "bogus", "fiel"])
ROLES = st.sampled_from([*GRAPH.roles, "stranger"])


@settings(max_examples=200)
@given(st.lists(st.tuples(TRIGGERS, ROLES), max_size=60))
def test_random_walk_only_moves_through_allowed_transitions(
    steps: list[tuple[str, str]],
) -> None:
    state = GRAPH.initial
    for trigger, role in steps:
        expected = _expected(state, trigger, role)
        if isinstance(expected, str):
            state = WORKFLOW.next_state(state, trigger, role)
            assert state == expected
        else:
            before = state
            with pytest.raises(TransitionNotAllowed) as info:
                WORKFLOW.next_state(state, trigger, role)
            assert type(info.value) is expected
            assert state == before
        assert state in EXPECTED_STATES
        assert WORKFLOW.machine.models == []
    assert WORKFLOW.machine.models == []


# --------------------------------------------------------------------------- diagrams


def test_mermaid_contains_every_state_and_trigger() -> None:
    text = to_mermaid(GRAPH)
    assert text.startswith("stateDiagram-v2\n")
    assert "[*] --> reported" in text
    assert "evaluated --> [*]" in text and "cancelled --> [*]" in text
    for state in GRAPH.state_names:
        assert f"    {state} : " in text
    for t in GRAPH.triggers:
        for source in t.sources:
            assert f"    {source} --> {t.dest or source} : {t.name}\n" in text
    assert "handling --> handling : request_extension" in text  # internal = self-loop
    with_roles = to_mermaid(GRAPH, show_roles=True)
    assert "filed --> dispatched : dispatch (dispatcher, duty_chief, system)" in with_roles


def test_diagrams_escape_label_punctuation() -> None:
    graph = build_graph(
        [StateSpec("new", 'new: "raw"; #1'), StateSpec("done", "done", terminal=True)],
        [TriggerSpec("go", ("new",), "done", ("system",))],
        "new",
        ("system",),
    )
    line = next(li for li in to_mermaid(graph).splitlines() if li.startswith("    new : "))
    assert line == "    new : new#58; #quot;raw#quot;#59; #35;1"
    assert '[label="new\\nnew: \\"raw\\"; #1"]' in to_dot(graph)


def test_dot_contains_every_state_and_trigger() -> None:
    text = to_dot(GRAPH)
    assert text.startswith("digraph workflow {")
    assert text.rstrip().endswith("}")
    for state in GRAPH.state_names:
        assert f'"{state}" [label="{state}\\n' in text
    for t in GRAPH.triggers:
        for source in t.sources:
            assert f'"{source}" -> "{t.dest or source}" [label="{t.name}"' in text
    assert '"evaluated" [label=' in text and "doublecircle" in text
    assert '"handling" -> "handling" [label="summon", style=dashed];' in text


def test_docs_show_the_current_graph() -> None:
    """docs/workflow.md embeds to_mermaid(default_graph()); regenerate it when the graph changes."""
    docs = Path(__file__).resolve().parent.parent / "docs" / "workflow.md"
    text = docs.read_text(encoding="utf-8")
    assert f"```mermaid\n{to_mermaid(GRAPH)}```" in text
    for t in GRAPH.triggers:
        assert f"| `{t.name}` |" in text
    for s in GRAPH.states:
        assert f"| `{s.name}` |" in text
