"""Instruction counts (valgrind's callgrind) as a regression guard that timing noise cannot blur.

Reports, for the code as it is now:
  * instructions per `remotecall_fetch` round trip on the master and on the worker
    (each side run under callgrind twice, with 0 and with N calls; the difference / N),
  * instructions to encode and to decode a frame carrying 64 B, 64 KB and 8 MB.

Counts repeat exactly for the same binary, inputs and environment, whatever else
the machine is doing, so a change's effect shows without timing noise.

    python bench/instructions.py [--calls 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))

MASTER = textwrap.dedent("""
    import sys, fastdist as fd
    n = int(sys.argv[1]); worker_cmd = sys.argv[2:]
    if worker_cmd:
        pid = fd.addprocs(1, exename=worker_cmd[0], exeflags=worker_cmd[1:])[0]
    else:
        pid = fd.addprocs(1)[0]
    for _ in range(20):   # warm up: connection, caches, the fast reader
        fd.remotecall_fetch(int, pid)
    for _ in range(n):
        fd.remotecall_fetch(int, pid)
    fd.rmprocs(pid)
""")

FRAMES = textwrap.dedent("""
    import sys, numpy as np
    from fastdist._core import _wire
    from fastdist.protocol import serialize
    nbytes, what, reps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    value = np.zeros(nbytes // 8) if nbytes >= 8 else b"x" * nbytes
    body, bufs = serialize.dumps(value)
    wire = _wire.pack_prelude(5, 0, 0, 1, 1, len(body), [b.nbytes for b in bufs]) + body + b"".join(bytes(b) for b in bufs)
    for _ in range(reps):
        if what == "encode":
            body, bufs = serialize.dumps(value)
            _wire.pack_prelude(5, 0, 0, 1, 1, len(body), [b.nbytes for b in bufs])
        elif what == "decode":
            (frame,) = _wire.FrameReader().feed(wire)
            serialize.loads(frame.body, frame.buffers)
""")


def callgrind(argv: list[str], env: dict[str, str] | None = None) -> int:
    """Total instructions (Ir) of a command run under callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                        "--trace-children=no", *argv], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return _total(out)


def _total(path: str) -> int:
    with open(path) as f:
        for line in f:
            m = re.match(r"(summary|totals):\s+(\d+)", line)
            if m:
                return int(m.group(2))
    raise RuntimeError(f"no totals in {path}")


def per_call_master(calls: int, env: dict[str, str]) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(MASTER)
    try:
        base = callgrind([sys.executable, f.name, "0"], env)
        more = callgrind([sys.executable, f.name, str(calls)], env)
    finally:
        os.unlink(f.name)
    return (more - base) / calls


def per_call_worker(calls: int, env: dict[str, str]) -> float:
    """Run the worker under callgrind (the master runs natively)."""
    totals = []
    with tempfile.TemporaryDirectory() as tmp, \
            tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(MASTER)
        f.flush()
        for n in (0, calls):
            out = os.path.join(tmp, f"worker-{n}.out")
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-S"]
            subprocess.run([sys.executable, f.name, str(n), *cmd], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            totals.append(_total(out))
    os.unlink(f.name)
    return (totals[1] - totals[0]) / calls


def frame_costs(env: dict[str, str]) -> dict[str, dict[str, float]]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(FRAMES)
    results: dict[str, dict[str, float]] = {}
    try:
        for label, nbytes, reps in (("64 B", 64, 2000), ("64 KB", 64 * 1024, 500),
                                    ("8 MB", 8 * 1024 * 1024, 40)):
            base = callgrind([sys.executable, f.name, str(nbytes), "none", str(reps)], env)
            row = {}
            for what in ("encode", "decode"):
                total = callgrind([sys.executable, f.name, str(nbytes), what, str(reps)], env)
                row[what] = (total - base) / reps
            results[label] = row
    finally:
        os.unlink(f.name)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    # One BLAS thread: spinning helper threads would make the counts vary run to run.
    # No spin-then-block either: how many polls a spin makes depends on timing.
    env = dict(os.environ, FASTDIST_WORKER_TIMEOUT="600", FASTDIST_HEARTBEAT_TIMEOUT="600",
               FASTDIST_FORKSERVER="0", PYTHONHASHSEED="0", OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", FASTDIST_SPIN_US="0")
    figures = {
        "remotecall_fetch_master": per_call_master(args.calls, env),
        "remotecall_fetch_worker": per_call_worker(args.calls, env),
        "frames": frame_costs(env),
    }
    print(f"instructions per remotecall_fetch round trip: master {figures['remotecall_fetch_master']:,.0f}, "
          f"worker {figures['remotecall_fetch_worker']:,.0f}")
    for label, row in figures["frames"].items():
        print(f"frame of {label}: encode {row['encode']:,.0f}  decode {row['decode']:,.0f} instructions")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
