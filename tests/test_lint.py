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


def test_mypy_catches_a_misspelt_addprocs_keyword(tmp_path):
    ensure_tool("mypy")
    script = tmp_path / "user_script.py"
    script.write_text("import fastdist as fd\n"
                      "fd.addprocs(2, evn={'A': '1'})\n"
                      "fd.addprocs(['node1'], tunnel=True, max_parallel=4)\n"
                      "fd.addprocs(2, tunnel=True)\n")
    result = run("mypy", "--no-incremental", "--follow-imports=silent", str(script))
    out = result.stdout
    assert result.returncode == 1, out
    assert 'user_script.py:2: error: No overload variant of "addprocs"' in out, out
    assert 'user_script.py:4: error: No overload variant of "addprocs"' in out, out
    assert "user_script.py:3:" not in out, out
