"""The tree stays clean: ruff over the code, mypy --strict over the typed public modules."""

from __future__ import annotations

import subprocess
import sys

import pytest
from devtools import ROOT, ensure_tool

pytestmark = pytest.mark.timeout(600)


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True,
                          text=True, check=False)


def test_ruff_is_clean():
    ensure_tool("ruff")
    result = run("ruff", "check", "--no-cache", "src", "tests", "examples")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_on_typed_modules():
    ensure_tool("mypy")
    # The module list and --strict live in pyproject's [tool.mypy].
    result = run("mypy", "--no-incremental")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout
