"""Start-up figures: time from the call that asks for N workers to N workers answering.

fastdist (`addprocs(N)` local workers; `addprocs([(host, 4)])` over ssh to a private
sshd), `multiprocessing.Pool(N)` with the spawn start method, and Dask's
`LocalCluster`, side by side in one run. Each (system, N) runs in a fresh process
that has already imported the system; the medians of the repetitions are printed
as a table (the range and the first, coldest, repetition beside them: a system that
keeps helpers between repetitions, such as a fork server, is faster after its
first). Teardown follows each repetition, untimed.

    python bench/startup.py                 # N = 2, 8, 32 local; 4 over ssh; 5 reps
    python bench/startup.py --reps 9 --ns 2,32 --no-ssh
    python bench/startup.py --profile       # also: where a worker's start-up goes

Dask is looked for in this interpreter, then in `bench/.venv` (see setup_env.sh);
without it its rows say "not installed". The ssh rows need root (they start sshd).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SRC = ROOT / "src"
TESTS = ROOT / "tests"
VENV_PYTHON = HERE / ".venv" / "bin" / "python"
TARGET_32_LOCAL_S = 3.0


# -- one system, in its own process ------------------------------------------------------


def _barrier_init(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier


def _check_in(_: int) -> int:
    # Every task holds its worker until all N have checked in: N distinct processes.
    _BARRIER.wait(timeout=120)
    return os.getpid()


def measure_fastdist(n: int, reps: int) -> list[float]:
    import fastdist as fd

    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        pids = fd.addprocs(n)
        futures = [fd.remotecall(fd.myid, p) for p in pids]
        assert [fd.fetch(f) for f in futures] == pids
        samples.append(time.perf_counter() - t0)
        fd.rmprocs(pids, waitfor=60)
    return samples


def measure_fastdist_ssh(n: int, reps: int, multiplex: bool) -> list[float]:
    sys.path.insert(0, str(TESTS))
    from services.sshd import SSHServer

    import fastdist as fd

    srv = SSHServer("127.0.0.1").start()
    try:
        flags = []
        it = iter(srv.sshflags)
        for flag in it:
            if flag == "-p":
                next(it)
            else:
                flags.append(flag)
        spec = f"{srv.user}@{srv.host}:{srv.port}"
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            pids = fd.addprocs([(spec, n)], sshflags=flags, multiplex=multiplex)
            futures = [fd.remotecall(fd.myid, p) for p in pids]
            assert [fd.fetch(f) for f in futures] == pids
            samples.append(time.perf_counter() - t0)
            fd.rmprocs(pids, waitfor=60)
            time.sleep(0.2)  # let the sessions close before the next round's logins
        return samples
    finally:
        srv.stop()


def measure_mp_spawn(n: int, reps: int) -> list[float]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        barrier = ctx.Barrier(n)
        with ctx.Pool(n, initializer=_barrier_init, initargs=(barrier,)) as pool:
            ospids = pool.map(_check_in, range(n), chunksize=1)
            samples.append(time.perf_counter() - t0)
            assert len(set(ospids)) == n
    return samples


def measure_dask(n: int, reps: int) -> list[float]:
    import logging

    from dask.distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address=None, host="127.0.0.1")
        client = Client(cluster)
        client.wait_for_workers(n)
        assert len(client.run(os.getpid)) == n
        samples.append(time.perf_counter() - t0)
        client.close()
        cluster.close()
    return samples


def inner(system: str, n: int, reps: int) -> None:
    warm = {"fastdist": "fastdist", "fastdist-fresh": "fastdist", "fastdist-ssh": "fastdist",
            "fastdist-ssh-mux": "fastdist", "mp-spawn": "multiprocessing",
            "dask": "dask.distributed"}[system]
    __import__(warm)  # the measuring process has already imported the system
    if system in ("fastdist", "fastdist-fresh"):
        samples = measure_fastdist(n, reps)
    elif system == "fastdist-ssh":
        samples = measure_fastdist_ssh(n, reps, multiplex=False)
    elif system == "fastdist-ssh-mux":
        samples = measure_fastdist_ssh(n, reps, multiplex=True)
    elif system == "mp-spawn":
        samples = measure_mp_spawn(n, reps)
    else:
        samples = measure_dask(n, reps)
    print("RESULT " + json.dumps(samples), flush=True)


# -- the run ------------------------------------------------------------------------------


def interpreter_for(system: str) -> str | None:
    if system != "dask":
        return sys.executable
    for python in (sys.executable, str(VENV_PYTHON)):
        if Path(python).exists() and subprocess.run(
                [python, "-c", "import dask.distributed"], capture_output=True,
                check=False).returncode == 0:
            return python
    return None


def run_job(system: str, n: int, reps: int, timeout: float) -> tuple[list[float] | None, str]:
    python = interpreter_for(system)
    if python is None:
        return None, "not installed"
    env = dict(os.environ)
    # fastdist from this tree, in every interpreter (the venv's copy may be older)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    if system == "fastdist-fresh":
        env["FASTDIST_FORKSERVER"] = "0"  # every worker a fresh interpreter, as spawn does
    try:
        done = subprocess.run([python, __file__, "--inner", system, "--n", str(n),
                               "--reps", str(reps)], capture_output=True, text=True,
                              timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return None, f"timeout ({timeout:g} s)"
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]), ""
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"failed: {tail[:120]}"


def fmt(samples: list[float] | None, note: str) -> tuple[str, str]:
    if samples is None:
        return note, ""
    med = statistics.median(samples)
    return f"{med:.3f} s", f"{min(samples):.3f} – {max(samples):.3f}"


def where_time_goes() -> None:
    """A worker's own start-up: interpreter, imports, until its address line."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
    bare = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import fastdist"], env=env, check=True)
    with_import = time.perf_counter() - t0
    proc = subprocess.Popen([sys.executable, "-m", "fastdist.worker", "--bind-to", "127.0.0.1"],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    proc.stdin.write("cookie\n")
    proc.stdin.flush()
    proc.stdout.readline()
    to_address = time.perf_counter() - t0
    proc.kill()
    proc.wait()
    proc.stdin.close()
    proc.stdout.close()
    imp = subprocess.run([sys.executable, "-X", "importtime", "-m", "fastdist.worker", "--help"],
                         env=env, capture_output=True, text=True, check=True).stderr
    rows = []
    for line in imp.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    print("\nOne worker's start-up (fresh interpreter, this machine):")
    print(f"  python -c pass                 {bare * 1e3:7.1f} ms")
    print(f"  python -c 'import fastdist'    {with_import * 1e3:7.1f} ms")
    print(f"  python -m fastdist.worker      {to_address * 1e3:7.1f} ms to its address line")
    print("  heaviest imports (cumulative µs, -X importtime):")
    for us, name in sorted(rows, reverse=True)[:12]:
        print(f"    {us:8d}  {name.strip()}")
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print("  note: PYTHONDONTWRITEBYTECODE is set, so modules without a cached .pyc are "
              "compiled by every worker.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions per figure (>= 5)")
    parser.add_argument("--ns", default="2,8,32", help="local worker counts")
    parser.add_argument("--ssh-n", type=int, default=4, help="workers over ssh")
    parser.add_argument("--no-ssh", action="store_true", help="skip the ssh rows")
    parser.add_argument("--no-dask", action="store_true", help="skip dask")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per job")
    parser.add_argument("--profile", action="store_true", help="show where start-up goes")
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        inner(args.inner, args.n, args.reps)
        return 0
    ns = [int(x) for x in args.ns.split(",") if x]
    jobs: list[tuple[str, int]] = []
    for n in ns:
        jobs += [("fastdist", n), ("fastdist-fresh", n), ("mp-spawn", n)]
        if not args.no_dask:
            jobs.append(("dask", n))
    if not args.no_ssh:
        jobs += [("fastdist-ssh", args.ssh_n), ("fastdist-ssh-mux", args.ssh_n)]
    print(f"Start-up to N workers answering: median of {args.reps} runs (range), "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    results: dict[tuple[str, int], list[float] | None] = {}
    header = (f"| {'system':<26} | {'N':>3} | {'median':>10} | {'range':>15} | "
              f"{'first run':>9} | vs fastdist |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    labels = {"fastdist": "fastdist addprocs(N)", "fastdist-fresh": "fastdist, no fork server",
              "mp-spawn": "multiprocessing.Pool spawn",
              "dask": "dask LocalCluster", "fastdist-ssh": "fastdist over ssh",
              "fastdist-ssh-mux": "fastdist ssh multiplex"}
    for system, n in jobs:
        samples, note = run_job(system, n, args.reps, args.timeout)
        results[(system, n)] = samples
        median, spread = fmt(samples, note)
        base = results.get(("fastdist", n))
        ratio = ""
        if samples and base and system != "fastdist" and not system.startswith("fastdist-ssh"):
            ratio = f"{statistics.median(samples) / statistics.median(base):.1f}×"
        first = f"{samples[0]:.3f} s" if samples else ""
        print(f"| {labels[system]:<26} | {n:>3} | {median:>10} | {spread:>15} | {first:>9} | "
              f"{ratio:>11} |", flush=True)
    fd32, dask32 = results.get(("fastdist", 32)), results.get(("dask", 32))
    if fd32:
        med = statistics.median(fd32)
        verdict = "met" if med < TARGET_32_LOCAL_S and (
            dask32 is None or med < statistics.median(dask32)) else "MISSED"
        print(f"\nTarget: 32 local workers in < {TARGET_32_LOCAL_S:g} s and faster than "
              f"LocalCluster: {verdict} ({med:.3f} s"
              + (f" vs {statistics.median(dask32):.3f} s)" if dask32 else ", dask not measured)"))
        if verdict == "MISSED" or args.profile:
            where_time_goes()
    elif args.profile:
        where_time_goes()
    return 0


if __name__ == "__main__":
    sys.exit(main())
