"""The pytest plugin (gridflow.testing): which policy its fixtures load by default."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import gridflow.testing

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "wujin"

CHECK_ROOT = """
from pathlib import Path

def test_policy(gridflow_policy, gridflow_engine):
    want = (Path(__file__).parent / "rules").resolve()
    assert Path(gridflow_policy.root).resolve() == want
    assert Path(gridflow_engine.policy.root).resolve() == want
"""


@pytest.fixture
def rules(pytester: pytest.Pytester) -> Path:
    """The example district copied into the test project, as a host keeps its rules."""
    return Path(shutil.copytree(EXAMPLE, pytester.path / "rules"))


def test_the_ini_setting_names_the_policy(pytester: pytest.Pytester, rules: Path) -> None:
    pytester.makeini("[pytest]\ngridflow_policy = rules\n")
    pytester.makepyfile(CHECK_ROOT)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_the_option_overrides_the_ini_setting(pytester: pytest.Pytester, rules: Path) -> None:
    pytester.makeini("[pytest]\ngridflow_policy = no-such-dir\n")
    pytester.makepyfile(CHECK_ROOT)
    pytester.runpytest("-p", "no:cacheprovider", f"--gridflow-policy={rules}").assert_outcomes(
        passed=1
    )


def test_without_a_policy_the_fixtures_say_what_to_set(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installed package has no example district: the fixtures say how to name one."""
    monkeypatch.setattr(gridflow.testing, "EXAMPLE_POLICY", pytester.path / "no-example")
    pytester.makeini("[pytest]\n")
    pytester.makepyfile("def test_policy(gridflow_policy):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*set 'gridflow_policy = <rule-file directory>'*"])
