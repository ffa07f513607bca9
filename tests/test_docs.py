"""The code in README.md and the CLI examples in the docs keep working."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_embedding_example_runs(capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text("utf-8"), re.S)
    assert code, "README has no python example"
    exec(compile(code[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "grid-worker grid goods-on-sidewalk-on-patrol" in out
    assert "dispatched" in out
    assert "mark_overdue" in out


def test_readme_links_to_existing_docs() -> None:
    text = (ROOT / "README.md").read_text("utf-8")
    for link in re.findall(r"\]\((docs/[^)]+)\)", text):
        assert (ROOT / link).exists(), link
