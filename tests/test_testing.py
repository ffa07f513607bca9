"""The pytest plugin (gridflow.testing): which policy its fixtures load by default."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

import gridflow.testing

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "wujin"

CHECK_ROOT = """
from pathlib import Path
from typing import Any

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


def test_the_replay_fixture_compares_with_a_policy_directory(
    gridflow_replay: Any, tmp_path: Path
) -> None:
    """``compare=`` takes a directory, as the first argument does: here a copy of the
    example district where exposed garbage (E01-10) is due in 2 working hours, not 4."""
    harness = ROOT / "examples" / "harness"
    changed = Path(shutil.copytree(EXAMPLE, tmp_path / "faster"))
    categories = changed / "categories.yaml"
    text = categories.read_text(encoding="utf-8")
    old = "name_en: exposed garbage, time_limit: 4wh"
    assert old in text
    categories.write_text(text.replace(old, old.replace("4wh", "2wh")), encoding="utf-8")
    report = gridflow_replay(EXAMPLE, harness / "cases.csv", map=harness / "map.yaml",
                             compare=changed)
    assert report["compare"]["routing"]["compared"] == report["routing"]["cases"]
    assert report["compare"]["routing"]["changed"]["time_limit"] > 0
    same = gridflow_replay(EXAMPLE, harness / "cases.csv", map=harness / "map.yaml",
                           compare=EXAMPLE)
    assert not any(same["compare"]["routing"]["changed"].values())
