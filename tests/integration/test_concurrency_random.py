"""Random interleavings of calls, nested calls, channel operations in every ownership,
long calls, maps, timeouts, interrupts and kills, checked against a model
(_concurrency_model.py). A few short seeded runs here; `python
tests/soak_concurrency.py --minutes N` runs them for as long as asked."""

from __future__ import annotations

import os

import pytest
from _concurrency_model import Run

# Seeds run in the suite; FASTDIST_TEST_SEED adds one (a soak's failing seed, say).
SEEDS = [1, 2, 3]
if os.environ.get("FASTDIST_TEST_SEED"):
    SEEDS.append(int(os.environ["FASTDIST_TEST_SEED"]))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_concurrent_work_matches_the_model(cluster, monkeypatch, seed):
    # A wedged worker shows up as a dead one within seconds.
    monkeypatch.setenv("FASTDIST_HEARTBEAT_TIMEOUT", "3")
    workers = cluster.add(2)
    run = Run(seed, workers, kills=1 if seed % 2 else 0)
    run.steps(120)
    cluster.pids.extend(run.added)
    assert run.nsteps == 120
    assert {"call", "nested", "put", "take"} <= set(run.counts), run.counts
