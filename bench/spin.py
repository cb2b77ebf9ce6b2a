"""Spin-then-block polling, on and off, side by side in one run.

A thread waiting for a reply first polls its socket without sleeping for up to
`FASTDIST_SPIN_US` (default 100 µs), then blocks. This script runs the same
workloads with the spin off (`FASTDIST_SPIN_US=0`) and at the given settings,
each repetition in a fresh master process, alternating the settings so that drift
in the machine's load falls on all of them alike, and prints medians and the
ratio to spin off:

  * W1: `remotecall_fetch` of a no-op (time per call),
  * W1 slow: the same with a function that computes for 1 ms (the spin never
    pays: what it costs),
  * W2: 20,000 pipelined `remotecall`s over 2 workers (calls/s),
  * W4: `pmap(batch_size=1)` over 10,000 ints (seconds),
  * idle: CPU time the master and its 2 workers use in 3 s of doing nothing right
    after that work (it must be ~0: nothing spins while nothing is waited for).

    python bench/spin.py [--reps 5] [--spins 0,100,300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

JOB = textwrap.dedent("""
    import json, os, sys, time
    import fastdist as fd
    from workloads import inc, noop, spin_for

    def cpu_seconds(ospid):
        with open(f"/proc/{ospid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    ws = fd.addprocs(2)
    ospids = [os.getpid()] + [fd.remotecall_fetch(os.getpid, w) for w in ws]
    out = {}
    for _ in range(200):
        fd.remotecall_fetch(noop, ws[0])
    t = time.perf_counter()
    for _ in range(2000):
        fd.remotecall_fetch(noop, ws[0])
    out["w1_us"] = (time.perf_counter() - t) / 2000 * 1e6
    t = time.perf_counter()
    for _ in range(200):
        fd.remotecall_fetch(spin_for, ws[0], 0.001)
    out["w1_slow_us"] = (time.perf_counter() - t) / 200 * 1e6
    t = time.perf_counter()
    futures = [fd.remotecall(noop, ws[i & 1]) for i in range(20000)]
    for f in futures:
        fd.fetch(f)
    out["w2_per_s"] = 20000 / (time.perf_counter() - t)
    t = time.perf_counter()
    fd.pmap(inc, range(10000), batch_size=1)
    out["w4_s"] = time.perf_counter() - t
    before = [cpu_seconds(p) for p in ospids]
    time.sleep(3)
    out["idle_cpu_ms"] = sum(cpu_seconds(p) - b for p, b in zip(ospids, before)) * 1e3
    print(json.dumps(out), flush=True)
    fd.rmprocs(ws)
""")

ROWS = [
    ("w1_us", "W1 no-op round trip", "µs", False),
    ("w1_slow_us", "W1 with 1 ms of work per call", "µs", False),
    ("w2_per_s", "W2 pipelined calls", "calls/s", True),
    ("w4_s", "W4 pmap(batch_size=1), 10,000 ints", "s", False),
    ("idle_cpu_ms", "CPU used in 3 s idle (master + 2 workers)", "ms", False),
]


def _fmt(x: float) -> str:
    """Three significant digits, without exponents."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def run_once(spin_us: int) -> dict[str, float]:
    env = dict(os.environ, FASTDIST_SPIN_US=str(spin_us),
               PYTHONPATH=os.pathsep.join([str(SRC), str(HERE)]))
    proc = subprocess.run([sys.executable, "-c", JOB], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"spin={spin_us} µs failed:\n{proc.stderr}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--spins", default="0,100",
                        help="settings in µs; the first is the reference")
    args = parser.parse_args()
    spins = [int(s) for s in args.spins.split(",")]
    samples: dict[int, list[dict[str, float]]] = {s: [] for s in spins}
    for rep in range(args.reps):
        for s in spins:
            samples[s].append(run_once(s))
            print(f"rep {rep + 1}/{args.reps} spin={s} µs: {samples[s][-1]}", file=sys.stderr)
    ref = spins[0]
    head = " | ".join(f"spin {s} µs" for s in spins)
    print(f"| workload | unit | {head} | " + " | ".join(f"{s} µs vs {ref} µs" for s in spins[1:]) + " |")
    print("|---|---|" + "---|" * (2 * len(spins) - 1))
    for key, label, unit, higher_better in ROWS:
        med = {s: statistics.median(r[key] for r in samples[s]) for s in spins}
        cells = []
        for s in spins:
            lo, hi = min(r[key] for r in samples[s]), max(r[key] for r in samples[s])
            cells.append(f"{_fmt(med[s])} ({_fmt(lo)} – {_fmt(hi)})")
        ratios = []
        for s in spins[1:]:
            if key == "idle_cpu_ms":
                ratios.append("—")
            else:
                faster = med[s] / med[ref] if higher_better else med[ref] / med[s]
                ratios.append(f"{faster:.2f}× faster" if faster >= 1 else f"{1 / faster:.2f}× slower")
        print(f"| {label} | {unit} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
