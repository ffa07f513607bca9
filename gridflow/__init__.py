"""gridflow: route, track and score grid-governance cases with declarative YAML rule files.

Typical use::

    import gridflow
    policy = gridflow.load_policy("examples/wujin")
    decision = policy.route({"category": "E04-06", "location": "qdj-g3"})
"""

from gridflow.calendar import BusinessCalendar, CalendarYear, Duration, parse_duration
from gridflow.engine import Actor, Engine
from gridflow.errors import (
    CalendarRangeError,
    CaseNotFound,
    CaseValidationError,
    ConcurrencyConflict,
    DefinitionError,
    GridflowError,
    GridflowRuntimeError,
    Problem,
    RoleNotAllowed,
    RoutingError,
    TransitionNotAllowed,
    WorkflowDefinitionError,
)
from gridflow.handle import PolicyHandle
from gridflow.history import History
from gridflow.loader import load_policy
from gridflow.policy import Policy, RuleTestResult
from gridflow.routing import Decision
from gridflow.schema import CaseIn
from gridflow.store import IdempotencyConflict, Store, StoreSchemaError, TransactionConflict

__version__ = "0.1.0"

__all__ = [
    "Actor",
    "BusinessCalendar",
    "CalendarRangeError",
    "CalendarYear",
    "CaseIn",
    "CaseNotFound",
    "CaseValidationError",
    "ConcurrencyConflict",
    "Decision",
    "DefinitionError",
    "Duration",
    "Engine",
    "GridflowError",
    "GridflowRuntimeError",
    "History",
    "IdempotencyConflict",
    "Policy",
    "PolicyHandle",
    "Problem",
    "RoleNotAllowed",
    "RoutingError",
    "RuleTestResult",
    "Store",
    "StoreSchemaError",
    "TransactionConflict",
    "TransitionNotAllowed",
    "WorkflowDefinitionError",
    "__version__",
    "load_policy",
    "parse_duration",
]
