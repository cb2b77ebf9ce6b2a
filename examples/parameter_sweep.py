"""A parameter sweep with `pmap`: a progress bar, retries of flaky evaluations, and a
placeholder for evaluations that fail for good.

Each evaluation fits a small ridge regression for one (alpha, degree) pair and
returns its validation error. A bad parameter fails every time: `on_error`
puts NaN in its place instead of stopping the sweep. Some evaluations hit a
simulated busy resource and fail the first time. As in Julia, `on_error` sees
each failure first; the failures it re-raises are retried after the pauses in
`retry_delays`, when `retry_check` says so. `progress=True` draws a progress
bar on stderr.

Run it:

    python examples/parameter_sweep.py
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
import time

import numpy as np

import fastdist as fd


class ResourceBusyError(ConnectionError):
    """A failure worth retrying (a lost connection, a busy licence server...)."""


def evaluate(alpha: float, degree: int, scratch: str) -> float:
    """Validation error of ridge regression with polynomial features of `degree`."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    # Every third evaluation fails the first time it runs: a marker file remembers.
    marker = os.path.join(scratch, f"{alpha}-{degree}")
    if degree % 3 == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        raise ResourceBusyError(f"resource busy for alpha={alpha}, degree={degree}")

    rng = np.random.default_rng(42)
    x = rng.uniform(-1, 1, 400)
    y = np.sin(3 * x) + 0.1 * rng.standard_normal(400)
    features = np.vander(x, degree + 1)
    train, valid = slice(0, 300), slice(300, 400)
    a = features[train]
    coef = np.linalg.solve(a.T @ a + alpha * np.eye(degree + 1), a.T @ y[train])
    return float(np.mean((features[valid] @ coef - y[valid]) ** 2))


def nan_unless_flaky(exc: BaseException) -> float:
    """`on_error`: NaN for a failed evaluation; a flaky failure is re-raised, to be retried.

    pmap hands `on_error` and `retry_check` the exception `evaluate` raised on
    the worker, of the very class defined in this script.
    """
    if isinstance(exc, ResourceBusyError):
        raise exc
    return math.nan


def retry_flaky(state: int | None, exc: BaseException) -> tuple[int, bool]:
    """`retry_check`: retry ResourceBusyError failures only; count the retries in `state`."""
    retries = (state or 0) + 1
    return retries, isinstance(exc, ResourceBusyError)


def main() -> None:
    fd.addprocs(2)
    try:
        alphas = [-1.0, 0.0, 1e-4, 1e-2, 1.0]  # -1 is a mistake: it always fails
        degrees = range(1, 13)
        grid = list(itertools.product(alphas, degrees))
        with tempfile.TemporaryDirectory() as scratch:
            start = time.perf_counter()
            errors = fd.pmap(
                evaluate,
                [a for a, _ in grid], [d for _, d in grid], [scratch] * len(grid),
                retry_delays=[0.05, 0.1, 0.2],
                retry_check=retry_flaky,
                on_error=nan_unless_flaky,
                progress=True,
            )
            elapsed = time.perf_counter() - start
        failed = sum(math.isnan(e) for e in errors)
        best_error, (best_alpha, best_degree) = min(
            (e, p) for e, p in zip(errors, grid) if not math.isnan(e))
        print(f"{len(grid)} evaluations in {elapsed:.2f} s; {failed} failed for good")
        print(f"best: alpha={best_alpha:g}, degree={best_degree}, "
              f"validation error {best_error:.4f}")
    finally:
        fd.rmprocs(fd.workers())


if __name__ == "__main__":
    main()
