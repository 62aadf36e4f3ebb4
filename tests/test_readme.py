"""Every Python example in the README runs (STYLE: no example breaks unnoticed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
# Blocks that are API sketches (placeholders, long-running boots) rather than
# programs are marked by a first line "# sketch".
RUNNABLE = [b for b in BLOCKS if not b.startswith("# sketch")]


def test_readme_has_runnable_examples():
    assert RUNNABLE


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"block{i}" for i in range(len(RUNNABLE))])
def test_readme_example_runs(block):
    exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})
