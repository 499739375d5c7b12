"""The README's Python examples run as written (on the real default model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_python_examples():
    assert _python_blocks()


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_example_runs(index, capsys):
    exec(compile(_python_blocks()[index], f"README.md python block {index}", "exec"), {})
    assert capsys.readouterr().out.strip()  # every example prints what it made
