"""Run the Python examples of the documentation site, so they cannot go stale.

Every ```python block of a page in docs/ runs, in page order, in one namespace
per page, so a block may use names that earlier blocks of the same page
defined. A block preceded by the line ``<!-- skip-test -->`` does not run. A
```text block preceded by ``<!-- output -->`` must equal what the Python block
just before it printed. README.md is not checked here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"

SKIP_MARKER = "<!-- skip-test -->"
OUTPUT_MARKER = "<!-- output -->"
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclasses.dataclass
class Block:
    """One fenced block of a page."""

    language: str
    code: str
    line: int  # 1-based line of the opening fence
    marker: str | None  # the HTML comment on the line before the fence, if any


def read_blocks(page: Path) -> list[Block]:
    """Return the fenced blocks of a Markdown page, in order.

    Raises:
        ValueError: if a fence is never closed.
    """
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue

        previous = lines[index - 1].strip() if index > 0 else ""
        marker = previous if previous.startswith("<!--") else None
        body: list[str] = []
        end = index + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            body.append(lines[end])
            end += 1
        if end == len(lines):
            raise ValueError(f"{page.name}:{index + 1}: the code fence is never closed.")

        blocks.append(Block(opening.group(1), "\n".join(body) + "\n", index + 1, marker))
        index = end + 1
    return blocks


def doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def test_reader_finds_python_blocks() -> None:
    pages_with_code = [page.name for page in doc_pages() if any(b.language == "python" for b in read_blocks(page))]
    for name in ("index.md", "lifecycle.md", "lora.md", "full-tune.md", "stacking.md", "recipes.md"):
        assert name in pages_with_code, f"docs/{name} has no ```python block"


def test_output_markers_follow_python() -> None:
    for page in doc_pages():
        blocks = read_blocks(page)
        for position, block in enumerate(blocks):
            if block.marker != OUTPUT_MARKER:
                continue
            assert block.language == "text", f"{page.name}:{block.line}: {OUTPUT_MARKER} must precede a ```text block"
            assert position > 0, f"{page.name}:{block.line}: {OUTPUT_MARKER} has no Python block before it"
            source = blocks[position - 1]
            assert source.language == "python", f"{page.name}:{block.line}: the block before {OUTPUT_MARKER} is not Python"
            assert source.marker != SKIP_MARKER, f"{page.name}:{block.line}: the output of a skipped block is not checked"


@pytest.mark.parametrize("page", doc_pages(), ids=lambda page: page.name)
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # files that an example writes land in a temporary folder
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    printed: dict[int, str] = {}

    blocks = read_blocks(page)
    for position, block in enumerate(blocks):
        if block.language != "python" or block.marker == SKIP_MARKER:
            continue
        # Line numbers in a traceback point into the page itself.
        source = "\n" * block.line + block.code
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            exec(compile(source, str(page), "exec"), namespace)
        printed[position] = stdout.getvalue()

    for position, block in enumerate(blocks):
        if block.marker == OUTPUT_MARKER:
            expected = block.code.rstrip("\n")
            actual = printed[position - 1].rstrip("\n")
            assert actual == expected, f"{page.name}:{block.line}: the printed output differs from the page"


def test_site_builds_strict(tmp_path: Path) -> None:
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python", "griffe_fieldz"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed; install the docs extra and griffe-fieldz")
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).with_name("mkdocs"))
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
