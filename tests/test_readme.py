"""Every ```python block of README.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number of the block's first line, code)`` for each ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def test_the_block_finder_sees_every_python_fence() -> None:
    text = README.read_text()
    blocks = python_blocks(text)
    assert len(blocks) == text.count("```python\n") >= 2
    first_line, code = blocks[0]
    assert text.splitlines()[first_line - 1] == code.splitlines()[0]


@pytest.mark.slow
def test_every_python_block_runs_as_written(tmp_path, monkeypatch) -> None:
    # In README order, each in a fresh namespace, all in one empty directory: a later block
    # may read what an earlier one wrote (the run-the-export block reads the export).
    monkeypatch.chdir(tmp_path)
    text = README.read_text()
    for first_line, code in python_blocks(text):
        # Padding keeps the traceback's line numbers those of README.md.
        compiled = compile("\n" * (first_line - 1) + code, str(README), "exec")
        exec(compiled, {"__name__": "__main__"})  # the README is the test input
