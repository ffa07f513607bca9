"""pytest plugin: fixtures for testing policies and hosts that embed gridflow.

Registered through the ``pytest11`` entry point, so installing gridflow makes the
fixtures available in any test suite.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gridflow.clock import ManualClock
from gridflow.loader import load_policy
from gridflow.policy import Policy

__all__ = ["gridflow_clock", "gridflow_policy_loader"]


@pytest.fixture
def gridflow_policy_loader() -> Callable[[str | Path], Policy]:
    """Load (and cache per test) policy directories by path."""
    cache: dict[Path, Policy] = {}

    def load(path: str | Path) -> Policy:
        key = Path(path).resolve()
        if key not in cache:
            cache[key] = load_policy(key)
        return cache[key]

    return load


@pytest.fixture
def gridflow_clock() -> ManualClock:
    """A manual clock at Monday 2026-03-09 09:00 Asia/Shanghai."""
    return ManualClock(datetime(2026, 3, 9, 9, 0, tzinfo=ZoneInfo("Asia/Shanghai")))
