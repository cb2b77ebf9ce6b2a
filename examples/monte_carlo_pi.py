"""Estimate pi by Monte Carlo with `fd.distributed` and a reducer.

Julia's

    @distributed (+) for i = 1:nbatches
        count_hits(i)
    end

is `fd.distributed(count_hits, range(nbatches), operator.add)`: the batches are
split into one contiguous chunk per worker, each worker adds up the hits of its
chunk, and the master adds the partial sums.

Run it:

    python examples/monte_carlo_pi.py
"""

from __future__ import annotations

import math
import operator
import time

import numpy as np

import fastdist as fd

NBATCHES = 64
BATCH = 250_000


def count_hits(batch: int) -> int:
    """How many of BATCH random points of the unit square fall inside the quarter circle."""
    rng = np.random.default_rng(batch)  # one seed per batch: the estimate is reproducible
    x = rng.random(BATCH)
    y = rng.random(BATCH)
    return int(np.count_nonzero(x * x + y * y <= 1.0))


def main() -> None:
    fd.addprocs(2)
    try:
        start = time.perf_counter()
        hits = fd.distributed(count_hits, range(NBATCHES), operator.add)
        elapsed = time.perf_counter() - start
        samples = NBATCHES * BATCH
        estimate = 4.0 * hits / samples
        print(f"pi ~ {estimate:.5f} (error {abs(estimate - math.pi):.5f}) "
              f"from {samples:,} samples on {fd.nworkers()} workers in {elapsed:.2f} s")

        # Without a reducer, distributed returns at once with one Future per chunk.
        with fd.sync():
            futures = fd.distributed(count_hits, range(NBATCHES))
        print(f"{len(futures)} chunks, one per worker, all done: "
              f"{all(f.isready() for f in futures)}")
    finally:
        fd.rmprocs(fd.workers())


if __name__ == "__main__":
    main()
