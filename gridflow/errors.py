"""The gridflow exception tree.

Two families: :class:`DefinitionError` (something wrong in a rule file or workflow
definition, found when it is loaded) and :class:`GridflowRuntimeError` (a case,
command or query that cannot be carried out). ``str(err)`` is always the readable
message with its location; the parts are also available as attributes.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "IDENT_PATTERN",
    "CalendarRangeError",
    "CaseNotFound",
    "CaseValidationError",
    "ConcurrencyConflict",
    "DefinitionError",
    "FieldError",
    "GridflowError",
    "GridflowRuntimeError",
    "Problem",
    "RoleNotAllowed",
    "RoutingError",
    "TransitionNotAllowed",
    "WorkflowDefinitionError",
    "field_errors",
    "plain_message",
    "suggest",
    "suggest_choice",
]


def suggest(name: str, candidates: Iterable[str], *, cutoff: float = 0.75) -> str | None:
    """The candidate closest to ``name`` when it is close enough to be a likely typo."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=cutoff)
    return matches[0] if matches else None


def suggest_choice(err: Mapping[str, Any]) -> str | None:
    """For a pydantic error on a value outside a fixed set of choices (``hit: uniqe``),
    the allowed value closest to the one given."""
    expected = (err.get("ctx") or {}).get("expected")
    if (err.get("type") in ("literal_error", "enum") and isinstance(err.get("input"), str)
            and isinstance(expected, str)):
        return suggest(err["input"], re.findall(r"'([^']*)'", expected))
    return None


#: the pattern of ids (departments, tiers, units, rules...): ``schema.Ident``
IDENT_PATTERN = r"^[A-Za-z][A-Za-z0-9_\-]*$"


def plain_message(err: Mapping[str, Any]) -> str:
    """A pydantic error's message, in words for someone editing a rule file or a case."""
    kind, value = err.get("type"), err.get("input")
    if kind == "timezone_aware":
        return "needs a UTC offset, e.g. 2026-03-09 08:05+08:00"
    if kind == "string_pattern_mismatch" and (err.get("ctx") or {}).get("pattern") == IDENT_PATTERN:
        return (f"{value!r} is not an id: an id is a letter, then letters, digits, "
                "'_' or '-'")
    return str(err["msg"]).removeprefix("Value error, ")


def field_errors(errors: Iterable[Mapping[str, Any]]) -> list[FieldError]:
    """Pydantic's errors (``exc.errors()``) of a case, one :class:`FieldError` each."""
    out = []
    for err in errors:
        loc = ".".join(str(p) for p in err["loc"]) or "case"
        msg = plain_message(err)
        if err["type"] == "missing":
            msg = "required field missing"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif hint := suggest_choice(err):
            msg += f" (did you mean '{hint}'?)"
        out.append(FieldError(loc, msg))
    return out


@dataclass(frozen=True, order=True)
class Problem:
    """One finding in a definition, located in its file (line and column are 1-based)."""

    path: str
    line: int
    col: int
    message: str
    suggestion: str | None = None
    severity: str = "error"

    def __str__(self) -> str:
        text = f"{self.path}:{self.line}:{self.col}: {self.message}"
        if self.suggestion:
            text += f" (did you mean '{self.suggestion}'?)"
        if self.severity != "error":
            text = f"{text} [{self.severity}]"
        return text


class GridflowError(Exception):
    """Base of every error gridflow raises on purpose."""

    exit_code = 1


class DefinitionError(GridflowError):
    """A rule file, policy directory or workflow definition is invalid.

    Carries every problem found in one pass; ``str()`` lists them one per line as
    ``path:line:col: message``.
    """

    def __init__(self, problems: Sequence[Problem]):
        self.problems: tuple[Problem, ...] = tuple(sorted(problems))
        super().__init__("\n".join(str(p) for p in self.problems) or "invalid definition")

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")


class WorkflowDefinitionError(DefinitionError):
    """The workflow graph (states, triggers, roles) is inconsistent."""


class GridflowRuntimeError(GridflowError):
    """A command or query on valid definitions could not be carried out."""


@dataclass(frozen=True)
class FieldError:
    """One invalid field of an input document (``field`` is a dotted path)."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class CaseValidationError(GridflowRuntimeError):
    """A case (or a command's arguments: ``subject="argument"``) is invalid; names every
    bad field."""

    def __init__(
        self, errors: Sequence[FieldError], *, source: str | None = None, subject: str = "case"
    ):
        self.errors: tuple[FieldError, ...] = tuple(errors)
        self.source = source
        self.subject = subject
        prefix = f"{source}: " if source else ""
        lines = [f"{prefix}invalid {subject}: {e}" for e in self.errors]
        super().__init__("\n".join(lines) or f"{prefix}invalid {subject}")

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(e.field for e in self.errors)


class RoutingError(GridflowRuntimeError):
    """Routing could not produce a decision (e.g. overlap under ``unique`` at run time)."""

    def __init__(self, message: str, *, rule_ids: Sequence[str] = (), table: str | None = None):
        self.rule_ids = tuple(rule_ids)
        self.table = table
        super().__init__(message)


class TransitionNotAllowed(GridflowRuntimeError):
    """The trigger cannot fire from the case's current state."""

    def __init__(
        self,
        trigger: str,
        state: str,
        *,
        case_id: str | None = None,
        role: str | None = None,
        reason: str | None = None,
        possible: Sequence[str] | None = None,
    ):
        self.trigger = trigger
        self.state = state
        self.case_id = case_id
        self.role = role
        #: the triggers that may fire from ``state`` (when the refusal is about the state)
        self.possible_triggers = tuple(possible) if possible is not None else None
        where = f"case {case_id}: " if case_id else ""
        msg = reason or f"'{trigger}' is not allowed from state '{state}'"
        if reason is None and possible is not None:
            msg += f" (possible there: {', '.join(possible) or 'nothing, it is final'})"
        super().__init__(f"{where}{msg}")


class RoleNotAllowed(TransitionNotAllowed):
    """The trigger exists from this state but the actor's role may not fire it."""

    def __init__(
        self,
        trigger: str,
        state: str,
        role: str,
        allowed: Sequence[str],
        *,
        case_id: str | None = None,
    ):
        self.allowed_roles = tuple(allowed)
        hint = suggest(role, allowed) if isinstance(role, str) else None
        super().__init__(
            trigger,
            state,
            case_id=case_id,
            role=role,
            reason=(
                f"role '{role}' may not '{trigger}' (allowed: {', '.join(allowed) or 'nobody'})"
                + (f"; did you mean '{hint}'?" if hint else "")
            ),
        )


class ConcurrencyConflict(GridflowRuntimeError):
    """Another writer changed the case first; reload and retry the command."""

    def __init__(self, case_id: str, expected_version: int, actual_version: int | None = None):
        self.case_id = case_id
        self.expected_version = expected_version
        self.actual_version = actual_version
        seen = "" if actual_version is None else f", found {actual_version}"
        super().__init__(
            f"case {case_id}: concurrent update (expected version {expected_version}{seen}); retry"
        )


class CaseNotFound(GridflowRuntimeError):
    def __init__(self, case_id: str):
        self.case_id = case_id
        super().__init__(f"case {case_id}: not found")


class CalendarRangeError(GridflowRuntimeError):
    """A date falls outside the holiday data (chinese-calendar plus the policy's own years)."""

    def __init__(self, day: Any, covered: str | None = None):
        self.day = day
        self.covered = covered
        extra = f" (covered: {covered})" if covered else ""
        super().__init__(
            f"no holiday data for {day}{extra}; add the year to the policy calendar"
        )
