"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    namespace: dict = {}

    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)

    assert blocks
    assert set(namespace["merged"]) == set(namespace["model"].state_dict())
