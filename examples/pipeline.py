"""A producer/consumer pipeline over RemoteChannels (the pattern of Julia's manual).

The master puts jobs into a `jobs` channel; every worker runs a consumer that
takes jobs until the channel is closed and drained, and puts its answers into a
`results` channel. Both channels live on the master (pid 1) and are passed to
the workers as ordinary arguments. Backpressure comes free: `jobs` holds at most
8 jobs, so the producer blocks while the consumers are behind.

Run it:

    python examples/pipeline.py
"""

from __future__ import annotations

import collections
import time

import fastdist as fd

NJOBS = 40


def consume(jobs: fd.RemoteChannel, results: fd.RemoteChannel) -> int:
    """On a worker: take jobs until `jobs` is closed and drained; return how many."""
    done = 0
    for job_id, seconds in jobs:  # ends when jobs is closed and empty
        time.sleep(seconds)  # the work
        results.put((job_id, seconds, fd.myid()))
        done += 1
    return done


def main() -> None:
    fd.addprocs(2)
    try:
        jobs = fd.RemoteChannel(lambda: fd.Channel(8))
        results = fd.RemoteChannel(lambda: fd.Channel(NJOBS))
        consumers = [fd.remotecall(consume, w, jobs, results) for w in fd.workers()]

        start = time.perf_counter()
        for job_id in range(NJOBS):
            fd.put(jobs, (job_id, 0.01 * (job_id % 5)))  # blocks while 8 jobs wait
        fd.close(jobs)  # consumers finish what is queued, then leave their loops

        by_worker: collections.Counter[int] = collections.Counter()
        finished = set()
        for _ in range(NJOBS):
            job_id, _seconds, worker = fd.take(results, timeout=30)
            finished.add(job_id)
            by_worker[worker] += 1
        elapsed = time.perf_counter() - start

        counts = [fd.fetch(c) for c in consumers]
        assert finished == set(range(NJOBS)) and sum(counts) == NJOBS
        shares = ", ".join(f"worker {w}: {n}" for w, n in sorted(by_worker.items()))
        print(f"{NJOBS} jobs done in {elapsed:.2f} s ({shares})")
        print(f"consumers returned {counts}; jobs channel closed: "
              f"{not jobs.isready()}")
    finally:
        fd.rmprocs(fd.workers())


if __name__ == "__main__":
    main()
