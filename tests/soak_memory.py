"""Soak: memory over a million remote calls and a million RemoteChannel puts and takes,
with the resident size of master and worker read as it goes. Flat is the goal; a
leak shows as a steady climb (tests/integration/test_memory.py does 100k in CI).

    python tests/soak_memory.py                  # 1,000,000 of each
    python tests/soak_memory.py --n 200000 --report-every 50000

Exits non-zero if either process grew by more than --max-growth-mib after warm-up.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import fastdist as fd  # noqa: E402


def noop():
    return None


def rss_mib(ospid: int) -> float:
    with open(f"/proc/{ospid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {ospid}")


def soak(name, step, n, every, wpid):
    warm = min(n // 10, 50_000)
    for i in range(warm):
        step(i)
    gc.collect()
    m0, w0 = rss_mib(os.getpid()), rss_mib(wpid)
    print(f"{name}: after {warm} warm-up ops  master {m0:.1f} MiB  worker {w0:.1f} MiB",
          flush=True)
    t = time.perf_counter()
    for i in range(n):
        step(i)
        if (i + 1) % every == 0:
            dt = time.perf_counter() - t
            print(f"{name}: {i + 1:>9} ops  {dt / (i + 1) * 1e6:6.1f} us/op  "
                  f"master {rss_mib(os.getpid()) - m0:+6.2f} MiB  "
                  f"worker {rss_mib(wpid) - w0:+6.2f} MiB", flush=True)
    gc.collect()
    return rss_mib(os.getpid()) - m0, rss_mib(wpid) - w0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--report-every", type=int, default=100_000)
    parser.add_argument("--max-growth-mib", type=float, default=8.0)
    args = parser.parse_args()
    (w,) = fd.addprocs(1)
    try:
        wpid = fd.remotecall_fetch(os.getpid, w)
        grew = {}
        grew["remotecall_fetch"] = soak("remotecall_fetch",
                                        lambda i: fd.remotecall_fetch(noop, w),
                                        args.n, args.report_every, wpid)
        rc = fd.RemoteChannel(lambda: fd.Channel(16), w)

        def put_take(i):
            rc.put(i)
            if rc.take() != i:
                raise AssertionError("channel returned the wrong value")

        # Each step is one put and one take: n steps are 2n channel operations.
        grew["RemoteChannel put+take"] = soak("RemoteChannel put+take", put_take, args.n,
                                              args.report_every, wpid)
    finally:
        fd.rmprocs(fd.workers(), waitfor=30)
    bad = {k: v for k, v in grew.items() if max(v) > args.max_growth_mib}
    for k, (m, wk) in grew.items():
        print(f"{k}: master {m:+.2f} MiB, worker {wk:+.2f} MiB")
    if bad:
        print(f"grew by more than {args.max_growth_mib} MiB: {sorted(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
