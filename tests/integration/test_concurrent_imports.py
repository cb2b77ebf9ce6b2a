"""Calls that arrive together on a fresh worker and each need a package imported."""

from __future__ import annotations

import numpy as np
import pytest

import fastdist as fd

pytestmark = pytest.mark.timeout(120)


# A function of a script's __main__, which travels by value with `np` as a global.
_script: dict[str, object] = {"__name__": "__main__", "np": np}
exec("def total(a):\n    return float(np.sum(a))", _script)
_total = _script["total"]


def test_concurrent_first_imports_on_fresh_workers(cluster):
    # A function pulls in `numpy` by name while arrays pull in numpy's submodules:
    # unpickled at once on several threads, CPython's import deadlock detection
    # hands one of them a half-initialised numpy (a "circular import" error).
    for _ in range(4):
        pids = cluster.add(2)
        arrays = [np.full(100, i, dtype=np.float64) for i in range(16)]
        # One call imports numpy through its function, the others through their arrays.
        futs = [fd.remotecall(_total if i < 2 else len, pids[i % 2], a)
                for i, a in enumerate(arrays)]
        assert [f.fetch(timeout=60) for f in futs] == [0.0, 100.0] + [100] * 14
        fd.rmprocs(pids, waitfor=30)
