"""Make sure a development tool from the `test` extra is installed, installing it if not.

The lint and docs tests run tools (ruff, mypy, mkdocs) rather than skip when
they are missing: the requirement comes from pyproject's `test` extra.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def requirement_of(name: str) -> str:
    """The `test` extra's requirement string for distribution `name`."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]["test"]
    for req in extras:
        if re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower() == name.lower():
            return str(req)
    raise LookupError(f"{name} is not in the test extra of pyproject.toml")


def ensure_tool(module: str, distribution: str | None = None) -> None:
    """Import-check `module`; pip-install its `test` requirement when it is missing."""
    if importlib.util.find_spec(module) is not None:
        return
    req = requirement_of(distribution or module)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", req], check=True)
    importlib.invalidate_caches()
    if importlib.util.find_spec(module) is None:
        raise RuntimeError(f"installed {req} but cannot import {module}")
