"""W7: fastdist across hosts — 2, 8 and 32 workers on 4 "hosts" (network namespaces
joined to this machine by veth pairs, each with its own sshd, as the SSH tests use).

peers.py runs it (`run`) for fastdist alone; report.py and run.py render it
(`TITLE`, `TEXT`, `targets`, `render_scaling_chart`). Needs root (namespaces,
sshd). The worker functions live here too, so top-level imports stay light:
every worker imports this module to find them.

- W7a: from `addprocs` to every worker having answered a call — over SSH with
  the default `max_parallel` (10), with `max_parallel` = the number of workers,
  with `multiplex=True`, and with `one_session=True` (one session per host that
  forks the host's workers); and workers joining an `ElasticManager`, started
  through `ip netns exec` as a batch system would start them. Each repetition
  also records the CPU time that every process involved spent (the master and
  its children, the sshds and everything under them).
- W7b: `pmap` of 100,000 trivial elements (`x -> x + 1`, `batch_size="auto"`)
  over the workers: elements per second, and the master's CPU time (all its
  threads) per element; the same with 2 local workers as the reference, and in
  one batch per worker (what the calls' fixed costs take).
- W7c: a 200 MB float64 array to every worker — a `remotecall` to each with the
  array as its argument, and a closure holding it through a `CachingPool`
  (a fresh pool each repetition: what is timed is the array reaching every
  worker); GB/s summed over all workers.
"""

import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

NHOSTS = 4
SIZES = (2, 8, 32)
MB = 1_000_000
CONFIG = {
    "full": {"reps": 3, "pmap_items": 100_000, "array_nbytes": 200 * MB},
    "quick": {"reps": 1, "pmap_items": 20_000, "array_nbytes": 20 * MB},
}
START_TARGET_SECONDS = 3.0

TITLE = "W7: 2, 8 and 32 workers on 4 hosts"
TEXT = (
    "Workers on 4 \"hosts\" (network namespaces joined to this machine by veth pairs, each "
    "with its own sshd), 2 → 8 → 32 of them, spread evenly over the hosts (2 workers: 2 "
    "hosts). **W7a** (seconds, lower is better): from `addprocs` to every worker having "
    "answered a call, over SSH (`max_parallel` 10, the default, and = n; and "
    "`multiplex=True`, and `one_session=True`: one session per host, which forks that "
    "host's workers), and for workers joining an `ElasticManager` (started with `ip netns "
    "exec`, as a batch system would); the note gives the CPU time all the processes involved "
    "spent (master, ssh, sshd, workers). **W7b**: `pmap` of 100,000 trivial elements "
    "(`batch_size='auto'`) over the workers, elements/s (higher is better), and the master's "
    "CPU time per element (all its threads, ns; lower is better); *2 local workers* is the "
    "reference the target compares with, and *one batch per worker* (`batch_size` = elements "
    "/ n) shows what the calls' fixed costs take from the figure. **W7c**: a 200 MB float64 "
    "array to every worker — a `remotecall` to each with the array as its argument, and a "
    "closure holding it through a `CachingPool` — GB/s summed over the workers (higher is "
    "better). The chart "
    "(`w7_scaling.png`) draws each against the number of workers; where each stops "
    "scaling on this machine, and why, is in `bench/README.md` (W7).\n\n"
    "![W7 scaling](w7_scaling.png)"
)


# --------------------------------------------------------------------------
# on the workers


def nbytes_of(a):
    """On a worker: the size of the array it was sent."""
    return int(a.nbytes)


def holding(a):
    """A closure over `a`: through a CachingPool it reaches each worker once."""
    def held():
        import fastdist

        return fastdist.myid(), int(a.nbytes)

    return held


# --------------------------------------------------------------------------
# the hosts


class Hosts:
    """NHOSTS network-namespace hosts with an sshd each (tests/services' fixtures)."""

    def __enter__(self):
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from services.netns import NetnsHosts
        from support import netns_flags

        self.net = NetnsHosts(NHOSTS).start()
        try:
            self.net.start_sshd()
        except BaseException:
            self.net.stop()
            raise
        self.flags = netns_flags(self.net)
        return self

    def __exit__(self, *exc):
        self.net.stop()

    def spread(self, n):
        """How many workers each host gets: n spread evenly (2 workers: 2 hosts)."""
        hosts = self.net.hosts
        counts = [n // len(hosts) + (i < n % len(hosts)) for i in range(len(hosts))]
        return [(h, c) for h, c in zip(hosts, counts) if c]

    def cpu_seconds(self):
        """CPU time of this process and everything below it and below the sshds."""
        return tree_cpu_seconds([os.getpid(), *(h.sshd.pid for h in self.net.hosts)])

    def machines(self, n):
        return [(f"{h.sshd.user}@{h.addr}:{h.sshd.port}", c) for h, c in self.spread(n)]


def tree_cpu_seconds(roots):
    """CPU time spent by the processes under `roots` (themselves included), the ones
    that are gone and were reaped too: everything a start-up costs, on every "host",
    whatever else runs on the machine meanwhile. From /proc/PID/stat."""
    stats, children = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        # utime, stime, and the reaped children's cutime, cstime
        stats[pid] = sum(int(x) for x in fields[11:15])
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0, [r for r in roots if r in stats], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += stats[pid]
        todo.extend(children.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


def answered(fd, pids):
    for p in pids:
        if fd.remotecall_fetch(fd.myid, p) != p:
            raise RuntimeError(f"worker {p} answered wrongly")


def remove_all(fd):
    live = [p for p in fd.workers() if p != 1]
    if live:
        fd.rmprocs(live, waitfor=120)


# --------------------------------------------------------------------------
# the workload


def run(peer, rec, cfg, measure_row):
    if peer.name != "fastdist":
        raise RuntimeError("W7 measures fastdist alone")
    if os.geteuid() != 0:
        raise RuntimeError("W7 needs root (network namespaces, sshd)")
    fd = peer.fd
    conf = CONFIG[rec.doc["config"]]
    reps = max(1, min(cfg["reps"], conf["reps"]))
    peer.stop()  # the workers peers.py started: W7 starts its own
    remove_all(fd)

    w7b_reference(fd, rec, conf, reps, measure_row)
    with Hosts() as hosts:
        em = fd.ElasticManager(addr="0.0.0.0")
        try:
            for n in SIZES:
                w7a_elastic(fd, rec, hosts, em, n, reps, measure_row)
                w7a_ssh(fd, rec, hosts, n, reps, measure_row)
                pids = [p for p in fd.workers() if p != 1]  # the last SSH start's
                try:
                    if len(pids) != n:
                        raise RuntimeError(f"{n} workers did not start over SSH: "
                                           "see the W7a rows")
                    w7b(fd, rec, n, conf, reps, measure_row)
                    w7c(fd, rec, pids, conf, reps, measure_row)
                except Exception as e:  # noqa: BLE001 - recorded; the next size runs
                    rec.row("W7", f"failed {n}", f"W7b/W7c with {n} workers", "", True, [], ref="",
                            error=f"{type(e).__name__}: {e}"[:300])
                finally:
                    remove_all(fd)
        finally:
            em.close()
            remove_all(fd)


def w7a_ssh(fd, rec, hosts, n, reps, measure_row):
    variants = [("ssh", "over SSH, max_parallel=10 (default)", {})]
    if n > 10:
        variants.append(("ssh all", f"over SSH, max_parallel={n}", {"max_parallel": n}))
    variants.append(("ssh multiplex", f"over SSH, multiplex=True, max_parallel={n}",
                     {"multiplex": True, "max_parallel": n}))
    variants.append(("ssh one session", "over SSH, one_session=True (one session per host)",
                     {"one_session": True}))
    for i, (key, label, kw) in enumerate(variants):
        last = i == len(variants) - 1
        cpu = []

        def rep(kw=kw, cpu=cpu):
            remove_all(fd)
            time.sleep(0.5)  # let the last removal's processes go
            c0 = hosts.cpu_seconds()
            t0 = time.perf_counter()
            pids = fd.addprocs(hosts.machines(n), sshflags=hosts.flags, **kw)
            answered(fd, pids)
            seconds = time.perf_counter() - t0
            cpu.append(hosts.cpu_seconds() - c0)
            if len(pids) != n:
                raise RuntimeError(f"{len(pids)} workers, not {n}")
            return seconds

        measure_row(rec, "W7", f"start {key} {n}", f"W7a: {n} workers {label}", "s", False,
                    rep, reps, ref="", note=_cpu_note(cpu))
        if not last:
            remove_all(fd)


def w7a_elastic(fd, rec, hosts, em, n, reps, measure_row):
    env = {k: v for k, v in os.environ.items() if k != "FASTDIST_COOKIE"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["FASTDIST_COOKIE"] = fd.cluster_cookie()
    port = em.address[1]
    cpu = []

    def rep():
        remove_all(fd)
        time.sleep(0.5)
        c0 = hosts.cpu_seconds()
        t0 = time.perf_counter()
        procs = []
        for h, count in hosts.spread(n):
            # em.connect_command(), with the master's address as this host reaches it
            argv = h.exec_argv([sys.executable, "-m", "fastdist.worker", "--join",
                                f"{h.host_side_addr}:{port}"])
            procs += [subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
                      for _ in range(count)]
        try:
            pids = em.wait_for(n, timeout=120)
            answered(fd, pids)
            seconds = time.perf_counter() - t0
            cpu.append(hosts.cpu_seconds() - c0)
        finally:
            remove_all(fd)
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        return seconds

    measure_row(rec, "W7", f"start elastic {n}", f"W7a: {n} workers joining an ElasticManager",
                "s", False, rep, reps, ref="", note=_cpu_note(cpu))


def _cpu_note(cpu):
    def note():
        if not cpu:
            return None
        med = sorted(cpu)[len(cpu) // 2]
        return (f"CPU used: {med:.1f} s (master, ssh, sshd, workers; {os.cpu_count()} cores "
                "on the machine)")
    return note


def _pmap_rows(fd, rec, key, label, items, reps, measure_row, batch_size="auto"):
    import workloads as wl

    xs = list(range(items))
    fd.pmap(wl.inc, xs[:1000], batch_size="auto")  # warm: functions cached, links open
    cpu = []

    def rep():
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = fd.pmap(wl.inc, xs, batch_size=batch_size)
        seconds = time.perf_counter() - t0
        cpu.append((time.process_time() - c0) / items * 1e9)
        if out[0] != 1 or out[-1] != items:
            raise RuntimeError("wrong map result")
        return items / seconds / 1e6

    measure_row(rec, "W7", f"pmap {key}", f"W7b: pmap {label}", "M elements/s",
                True, rep, reps, ref="", note=f"{items:,} elements, batch_size={batch_size!r}")
    rec.row("W7", f"pmap cpu {key}", f"W7b: pmap {label}, master CPU per element", "ns",
            False, cpu, ref="", note="all the master's threads")


def w7b_reference(fd, rec, conf, reps, measure_row):
    pids = fd.addprocs(2)
    try:
        _pmap_rows(fd, rec, "local 2", "over 2 local workers", conf["pmap_items"], reps,
                   measure_row)
    finally:
        fd.rmprocs(pids, waitfor=60)


def w7b(fd, rec, n, conf, reps, measure_row):
    items = conf["pmap_items"]
    _pmap_rows(fd, rec, str(n), f"over {n} workers on {NHOSTS} hosts", items, reps, measure_row)
    # The same elements in one batch per worker: what the calls' fixed costs (n
    # processes woken, on this machine's cores) take from the figure above.
    _pmap_rows(fd, rec, f"one batch {n}", f"over {n} workers on {NHOSTS} hosts, one batch "
               "per worker", items, reps, measure_row, batch_size=-(-items // n))


def w7c(fd, rec, pids, conf, reps, measure_row):
    import numpy as np

    nbytes = conf["array_nbytes"]
    a = np.ones(nbytes // 8)
    n = len(pids)
    mb = f"{nbytes // MB} MB"

    def by_remotecall():
        t0 = time.perf_counter()
        futures = [fd.remotecall(nbytes_of, p, a) for p in pids]
        sizes = [f.fetch() for f in futures]
        seconds = time.perf_counter() - t0
        if sizes != [a.nbytes] * n:
            raise RuntimeError("wrong sizes")
        return n * a.nbytes / seconds / 1e9

    def by_caching_pool():
        pool = fd.CachingPool(pids)
        held = holding(a)
        t0 = time.perf_counter()
        futures = [fd.remotecall(held, pool) for _ in pids]
        got = [f.fetch() for f in futures]
        seconds = time.perf_counter() - t0
        fd.clear(pool)
        if sorted(p for p, _ in got) != sorted(pids) or {s for _, s in got} != {a.nbytes}:
            raise RuntimeError(f"the array did not reach every worker once: {got}")
        return n * a.nbytes / seconds / 1e9

    by_remotecall()  # warm: links open, buffers grown
    measure_row(rec, "W7", f"array remotecall {n}", f"W7c: {mb} to each of {n} workers, "
                "remotecall", "GB/s", True, by_remotecall, reps, ref="",
                note="summed over the workers")
    measure_row(rec, "W7", f"array cachingpool {n}", f"W7c: {mb} to each of {n} workers, "
                "CachingPool", "GB/s", True, by_caching_pool, reps, ref="",
                note="a fresh pool per repetition, summed over the workers")


# --------------------------------------------------------------------------
# report


def targets(results, _row, _missing, median, fmt_value):
    """W7's rows of the Targets table."""
    out = []
    name = f"W7 (a) 32 workers over SSH answering ≤ {START_TARGET_SECONDS:g} s"
    rows = [r for r in (_row(results, "W7", "fastdist", k)
                        for k in ("start ssh 32", "start ssh all 32", "start ssh multiplex 32",
                                  "start ssh one session 32"))
            if r is not None and median(r) is not None]
    if rows:
        best = min(rows, key=median)
        verdict = "PASS" if median(best) <= START_TARGET_SECONDS else "FAIL"
        out.append((name, verdict, f"best: {best['label'].split(': ', 1)[1]}: "
                    f"{fmt_value(median(best), 's')}; " + ", ".join(
                        f"{fmt_value(median(r), 's')}" for r in rows)))
    else:
        out.append((name, "not measured", _missing(results, "W7", "fastdist", "start ssh 32")))
    name = "W7 (b) pmap over 32 workers on 4 hosts ≥ the rate over 2 local workers"
    ref = _row(results, "W7", "fastdist", "pmap local 2")
    big = _row(results, "W7", "fastdist", "pmap 32")
    cpu = _row(results, "W7", "fastdist", "pmap cpu 32")
    if ref is not None and big is not None and median(ref) and median(big):
        verdict = "PASS" if median(big) >= median(ref) else "FAIL"
        detail = (f"{fmt_value(median(big), 'M elements/s')} vs "
                  f"{fmt_value(median(ref), 'M elements/s')}"
                  + (f"; master CPU {median(cpu):.0f} ns per element" if cpu and median(cpu)
                     else ""))
        out.append((name, verdict, detail))
    else:
        out.append((name, "not measured", _missing(results, "W7", "fastdist", "pmap 32")))
    return out


def render_scaling_chart(results, path):
    """w7_scaling.png: W7a, W7b and W7c against the number of workers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    job = next((j for j in results["jobs"] if j["peer"] == "fastdist"
                and j["workload"] == "W7"), None)
    if job is None:
        return
    rows = {r["key"]: r for r in job.get("rows", []) if r.get("samples")}

    def series(prefix):
        xs, ys = [], []
        for n in SIZES:
            r = rows.get(f"{prefix} {n}")
            if r is not None:
                xs.append(n)
                ys.append(sorted(r["samples"])[len(r["samples"]) // 2])
        return xs, ys

    panels = [
        ("W7a: workers started and answering (s)", [
            ("start ssh", "SSH, max_parallel=10"), ("start ssh all", "SSH, max_parallel=n"),
            ("start ssh multiplex", "SSH, multiplex"),
            ("start ssh one session", "SSH, one_session"), ("start elastic", "ElasticManager")]),
        ("W7b: pmap of trivial elements (M elements/s)", [
            ("pmap", "batch_size='auto'"), ("pmap one batch", "one batch per worker")]),
        ("W7b: master CPU per element (ns)", [
            ("pmap cpu", "batch_size='auto'"), ("pmap cpu one batch", "one batch per worker")]),
        ("W7c: 200 MB to every worker (GB/s, total)", [
            ("array remotecall", "remotecall to each"), ("array cachingpool", "CachingPool")]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (title, lines) in zip(axes, panels):
        for prefix, label in lines:
            xs, ys = series(prefix)
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
        ref = rows.get("pmap local 2" if "M elements/s" in title else
                       "pmap cpu local 2" if "CPU" in title else "")
        if ref is not None:
            ax.axhline(sorted(ref["samples"])[len(ref["samples"]) // 2], color="grey",
                       linestyle="--", label="2 local workers")
        if title.startswith("W7a"):
            ax.axhline(START_TARGET_SECONDS, color="red", linestyle=":", label="target (32)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(SIZES), [str(n) for n in SIZES])
        ax.set_xlabel("workers")
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
