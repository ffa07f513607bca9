"""The policy in force for a directory, swapped atomically on reload."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from datetime import date
from pathlib import Path
from typing import Any

from gridflow.loader import load_policy
from gridflow.policy import Policy
from gridflow.routing import Decision
from gridflow.schema import CaseIn

__all__ = ["PolicyHandle"]


class PolicyHandle:
    """The policy in force for a directory; ``reload()`` swaps it only if the new one loads.

    Readers take ``handle.current`` once per operation, so every decision is made
    under exactly one version, and a directory that fails to load leaves the
    previous policy in force.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        today: Callable[[], date] | None = None,
        loader: Callable[..., Policy] | None = None,
    ):
        self._root = Path(root)
        self._today = today
        self._load: Callable[..., Policy] = loader or load_policy
        self._lock = threading.Lock()
        self._current = self._load(self._root, today=today() if today else None)

    @property
    def current(self) -> Policy:
        return self._current

    def reload(self) -> Policy:
        """Load the directory again; raises DefinitionError and keeps the old policy on failure."""
        with self._lock:
            fresh = self._load(self._root, today=self._today() if self._today else None)
            self._current = fresh
            return fresh

    def route(self, case: CaseIn | Mapping[str, Any]) -> Decision:
        return self._current.route(case)
