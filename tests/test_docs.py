"""The documentation builds without a warning, and names every API it mentions correctly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from devtools import ROOT, ensure_tool

import fastdist as fd

DOCS = ROOT / "docs"
# Written by hand for readers of the internals; they name modules, not the API.
INTERNALS = {"ARCHITECTURE.md", "PROTOCOL.md"}


def user_pages() -> list[Path]:
    return [p for p in sorted(DOCS.rglob("*.md")) if p.name not in INTERNALS]


@pytest.mark.timeout(600)
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    ensure_tool("material", "mkdocs-material")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "index.html").exists()
    assert (tmp_path / "guide" / "ecosystem" / "index.html").exists()


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in sorted(DOCS.rglob("*.md")):
        assert str(page.relative_to(DOCS)) in nav, f"{page} is not in mkdocs.yml's nav"


def test_every_fd_name_in_the_docs_exists() -> None:
    for page in user_pages():
        for name in set(re.findall(r"\bfd\.([A-Za-z_][A-Za-z_0-9]*)", page.read_text())):
            assert hasattr(fd, name), f"{page.name} mentions fd.{name}, which does not exist"


def test_name_map_covers_the_whole_api() -> None:
    text = (DOCS / "julia-names.md").read_text()
    missing = [name for name in fd.__all__ if not re.search(rf"\b{name}\b", text)]
    assert not missing, f"julia-names.md does not mention {missing}"
