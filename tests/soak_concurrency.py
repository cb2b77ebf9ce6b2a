"""Soak: the randomized concurrency check (integration/_concurrency_model.py) for as long
as asked, seed after seed, on one cluster of two local workers.

    python tests/soak_concurrency.py --minutes 10 [--steps 200] [--first-seed 1000]

Prints one line per run and a summary: runs, steps, steps by kind, failures (each
with its seed: `FASTDIST_TEST_SEED=<seed> pytest tests/integration/test_concurrency_random.py`
runs it again). Exit status 1 if any run failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "integration"))

from _concurrency_model import ModelError, Run

import fastdist as fd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=200, help="steps per run")
    ap.add_argument("--first-seed", type=int, default=1000)
    ap.add_argument("--heartbeat", type=float, default=3.0,
                    help="FASTDIST_HEARTBEAT_TIMEOUT, short so a wedged worker dies fast")
    args = ap.parse_args(argv)
    os.environ["FASTDIST_HEARTBEAT_TIMEOUT"] = str(args.heartbeat)
    workers = fd.addprocs(2)
    end = time.monotonic() + args.minutes * 60
    seed = args.first_seed
    runs = steps = 0
    counts: dict[str, int] = {}
    failures: list[str] = []
    started = time.monotonic()
    while time.monotonic() < end:
        run = Run(seed, workers, kills=seed % 2)
        t = time.monotonic()
        try:
            run.steps(args.steps)
            status = "ok"
        except ModelError as exc:
            failures.append(str(exc))
            status = "FAILED"
            print(exc, flush=True)
        runs += 1
        steps += run.nsteps
        for k, v in run.counts.items():
            counts[k] = counts.get(k, 0) + v
        print(f"seed {seed}: {status}, {run.nsteps} steps in {time.monotonic() - t:.1f} s",
              flush=True)
        workers = run.workers
        if status != "ok":
            # Start afresh: the failed run may have left calls behind.
            fd.rmprocs([p for p in fd.workers() if p != 1], waitfor=30)
            workers = fd.addprocs(2)
        seed += 1
    took = time.monotonic() - started
    print(f"\n{runs} runs, {steps} steps in {took / 60:.1f} min ({steps / took:.0f} steps/s), "
          f"{len(failures)} failed")
    print("steps by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    fd.rmprocs([p for p in fd.workers() if p != 1], waitfor=30)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
