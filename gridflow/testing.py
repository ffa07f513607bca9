"""pytest plugin: fixtures for testing policies and hosts that embed gridflow.

Registered through the ``pytest11`` entry point, so installing gridflow makes the
fixtures available in any test suite. The policy the fixtures use by default is the
``gridflow_policy`` ini setting (or ``--gridflow-policy DIR``): a rule-file directory,
relative to the directory of the pytest configuration file; without one, the example
district of a source checkout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gridflow.clock import ManualClock
from gridflow.engine import Engine
from gridflow.loader import load_policy
from gridflow.policy import Policy

__all__ = [
    "gridflow_case_strategy",
    "gridflow_clock",
    "gridflow_engine",
    "gridflow_engine_factory",
    "gridflow_policy",
    "gridflow_policy_loader",
    "gridflow_replay",
]

#: The policy the fixtures use when none is configured (the repository's example district).
EXAMPLE_POLICY = Path(__file__).resolve().parent.parent / "examples" / "wujin"


def pytest_addoption(parser: pytest.Parser) -> None:
    help_text = ("directory of the rule files the gridflow fixtures load by default "
                 "(gridflow_policy, gridflow_engine)")
    parser.addini("gridflow_policy", help_text + "; relative to the configuration file")
    parser.addoption("--gridflow-policy", metavar="DIR", help=help_text)


def _configured_policy(config: pytest.Config) -> Path:
    """The option, else the ini setting, else the example district (if it is there)."""
    given = config.getoption("--gridflow-policy")
    if given:
        return Path(given)
    ini = config.getini("gridflow_policy")
    if ini:
        base = config.inipath.parent if config.inipath is not None else config.rootpath
        return base / str(ini)
    if EXAMPLE_POLICY.is_dir():
        return EXAMPLE_POLICY
    raise pytest.UsageError(
        "the gridflow fixtures need a policy: set 'gridflow_policy = <rule-file directory>' "
        "in your pytest configuration, pass --gridflow-policy DIR, or give "
        "gridflow_engine_factory a directory"
    )


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


@pytest.fixture
def gridflow_engine_factory(
    request: pytest.FixtureRequest,
    gridflow_clock: ManualClock,
    gridflow_policy_loader: Callable[[str | Path], Policy],
) -> Iterator[Callable[..., Engine]]:
    """Build engines on private in-memory SQLite stores that share ``gridflow_clock``:
    ``factory(policy_dir_or_policy=None, **engine_kwargs)`` (``None``: the configured
    policy)."""
    made: list[Engine] = []

    def make(policy: str | Path | Policy | None = None, **kwargs: Any) -> Engine:
        if policy is None:
            policy = _configured_policy(request.config)
        loaded = policy if isinstance(policy, Policy) else gridflow_policy_loader(policy)
        kwargs.setdefault("clock", gridflow_clock)
        engine = Engine(loaded, **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.dispose()


@pytest.fixture
def gridflow_engine(gridflow_engine_factory: Callable[..., Engine]) -> Engine:
    """An :class:`Engine` on in-memory SQLite with ``gridflow_clock`` (a ManualClock) and
    the configured policy (``gridflow_policy`` setting; default: the example district of
    a source checkout)."""
    return gridflow_engine_factory()


@pytest.fixture
def gridflow_policy(
    request: pytest.FixtureRequest, gridflow_policy_loader: Callable[[str | Path], Policy]
) -> Policy:
    """The configured policy (``gridflow_policy`` setting or ``--gridflow-policy``;
    default: the example district of a source checkout)."""
    return gridflow_policy_loader(_configured_policy(request.config))


@pytest.fixture
def gridflow_case_strategy() -> Callable[..., Any]:
    """``gridflow.strategies.cases``: ``strategy(policy)`` draws valid case documents for a
    policy (needs Hypothesis; see also ``case_ins`` and ``log_records`` in that module)."""
    from gridflow.strategies import cases

    return cases


@pytest.fixture
def gridflow_replay(
    gridflow_policy_loader: Callable[[str | Path], Policy],
) -> Callable[..., dict[str, Any]]:
    """Replay a log: ``gridflow_replay(policy_or_dir, log, map=None, **replay_kwargs)``
    where ``log`` is a CSV/JSONL path or an iterable of ``LogRecord``; returns the report
    (see :func:`gridflow.replay.replay`). ``compare=`` takes a policy or a directory, as
    the first argument does. Runs on in-memory SQLite unless ``store=``."""
    from gridflow.importer import LogReader, load_mapping
    from gridflow.replay import replay

    def run(policy: str | Path | Policy, log: Any, map: str | Path | None = None,
            **kwargs: Any) -> dict[str, Any]:
        loaded = policy if isinstance(policy, Policy) else gridflow_policy_loader(policy)
        other = kwargs.get("compare")
        if other is not None and not isinstance(other, Policy):
            kwargs["compare"] = gridflow_policy_loader(other)
        if isinstance(log, str | Path):
            mapping = load_mapping(map, loaded) if map is not None else None
            log = LogReader(log, mapping, policy=loaded)
        return replay(loaded, log, **kwargs)

    return run
