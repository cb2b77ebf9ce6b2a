"""Every script in examples/ runs as a user would run it, and prints what it promises."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fastdist as fd

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

# What each example must print (regular expressions searched in its stdout).
EXPECTED: dict[str, list[str]] = {
    "pmap_demo.py": [
        r"started \d+ workers in [\d.]+ s",
        r"24 random walks of 2,000,000 steps: mean largest excursion [\d.]+",
        r"serial: [\d.]+ s\s+pmap on \d+ workers: [\d.]+ s\s+speed-up x[\d.]+",
    ],
    "monte_carlo_pi.py": [
        r"pi ~ (?P<pi>\d\.\d{5}) \(error [\d.]+\) from 16,000,000 samples on 2 workers",
        r"2 chunks, one per worker, all done: True",
    ],
    "image_pmap.py": [
        r"blurred 64 images of 512x512 on 2 workers in [\d.]+ s \(\d+ MB moved\)",
        r"mean pixel after blur and normalisation: 0\.\d{3}",
    ],
    "pipeline.py": [
        r"40 jobs done in [\d.]+ s \(worker \d+: \d+, worker \d+: \d+\)",
        r"consumers returned \[\d+, \d+\]; jobs channel closed: True",
    ],
    "parameter_sweep.py": [
        r"60 evaluations in [\d.]+ s; 12 failed for good",
        r"best: alpha=[\d.e-]+, degree=\d+, validation error 0\.0\d+",
    ],
}


def run_example(path: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    # The fastdist this test imported (the installed one, or a built source tree).
    here = str(Path(fd.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, str(path), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def check_pi(result: subprocess.CompletedProcess[str], elapsed: float) -> None:
    match = re.search(EXPECTED["monte_carlo_pi.py"][0], result.stdout)
    assert match and abs(float(match["pi"]) - math.pi) < 0.01, result.stdout


def check_progress_bar(result: subprocess.CompletedProcess[str], elapsed: float) -> None:
    assert "60/60" in result.stderr, result.stderr
    assert "60/60" not in result.stdout


def check_quick(result: subprocess.CompletedProcess[str], elapsed: float) -> None:
    # Under 15 s on an idle two-core machine; the bound leaves room for a busy one.
    assert elapsed < 60, f"pmap_demo took {elapsed:.1f} s"


CHECKS = {
    "monte_carlo_pi.py": check_pi,
    "parameter_sweep.py": check_progress_bar,
    "pmap_demo.py": check_quick,
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs_and_prints_its_result(path: Path) -> None:
    start = time.monotonic()
    result = run_example(path)
    elapsed = time.monotonic() - start
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    assert "Traceback" not in result.stderr, report
    for pattern in EXPECTED.get(path.name, []):
        assert re.search(pattern, result.stdout), f"missing {pattern!r}\n{report}"
    if path.name in CHECKS:
        CHECKS[path.name](result, elapsed)


def test_every_example_has_a_docstring_saying_how_to_run_it() -> None:
    for path in EXAMPLES:
        text = path.read_text()
        assert text.startswith('"""'), path.name
        assert f"python examples/{path.name}" in text, f"{path.name}: no 'Run it' line"
