"""fastdist in one minute: start local workers, run a numpy-heavy `pmap`, time it.

Each task simulates a long random walk and returns its statistics: work that
numpy runs on one core, so spreading the tasks over worker processes is what
makes it faster. The same map runs serially first, for comparison.

Run it:

    python examples/pmap_demo.py            # one worker per core
    python examples/pmap_demo.py 4          # four workers
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

import fastdist as fd

NTASKS = 24
NSTEPS = 2_000_000


def walk_stats(seed: int) -> tuple[float, float]:
    """The final position and the largest excursion of a Gaussian random walk."""
    steps = np.random.default_rng(seed).standard_normal(NSTEPS)
    path = np.cumsum(steps)
    return float(path[-1]), float(np.abs(path).max())


def main() -> None:
    nworkers = int(sys.argv[1]) if len(sys.argv) > 1 else (os.cpu_count() or 2)
    start = time.perf_counter()
    fd.addprocs(nworkers)
    started = time.perf_counter() - start
    try:
        start = time.perf_counter()
        serial = [walk_stats(seed) for seed in range(NTASKS)]
        t_serial = time.perf_counter() - start

        start = time.perf_counter()
        parallel = fd.pmap(walk_stats, range(NTASKS))
        t_pmap = time.perf_counter() - start

        assert parallel == serial, "pmap must return the serial results, in order"
        mean_excursion = np.mean([excursion for _, excursion in parallel])
        print(f"started {fd.nworkers()} workers in {started:.2f} s")
        print(f"{NTASKS} random walks of {NSTEPS:,} steps: "
              f"mean largest excursion {mean_excursion:.1f}")
        print(f"serial: {t_serial:.2f} s   pmap on {fd.nworkers()} workers: {t_pmap:.2f} s   "
              f"speed-up x{t_serial / t_pmap:.2f}")
    finally:
        fd.rmprocs(fd.workers())


if __name__ == "__main__":
    main()
