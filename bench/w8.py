"""W8: one big array made available to 8 local workers, each of which sums a slice
of it and then all of it — time and memory (PSS over every process of the system).

peers.py runs it (`run`) for fastdist, multiprocessing and ray; report.py and
run.py render it (`TITLE`, `TEXT`, `targets`, `render_memory_chart`). The worker
function lives here too, so top-level imports stay light: every worker imports
this module to find it.

Variants, each timed from "the array exists on the master" to "all sums are back":
- fastdist `SharedArray(a)` (a copy into shared memory), a handle to each worker;
- fastdist, the plain array passed to each worker (a copy per worker);
- fastdist, the array passed read-only (`a.flags.writeable = False`): one copy per host;
- ray: `ray.put(a)` once, tasks read it zero-copy from the object store;
- multiprocessing: `Pool.starmap` with the array as an argument.

Time and memory are measured in separate repetitions (the sampler slows the
hand-over it watches). Memory: a thread samples the proportional set size (PSS, from
/proc/PID/smaps_rollup) of the job's process and all its descendants (ray's
raylet and workers, fastdist's fork server and workers, the pool's processes)
every few ms. "peak" is the largest total during the timed window that two
samples in a row agree on (see `steady_peak`); "extra" is the peak less the total
just before it (what the hand-over cost).
"""

import gc
import os
import threading
import time

NWORKERS = 8
GB = 1_000_000_000
CONFIG = {"full": {"nbytes": GB, "reps": 3}, "quick": {"nbytes": GB // 5, "reps": 1}}
SAMPLE_SECONDS = 0.01
# Between repetitions: wait (at most this long) for the memory of the last one to go.
SETTLE_SECONDS = 20.0

TITLE = "W8: a 1 GB array to 8 local workers (shared memory)"
TEXT = (
    "A float64 array of 1 GB made available to 8 local workers (every system starts 8), each of "
    "which sums its eighth of it and then all of it; **time** from \"the array exists on the "
    "master\" to \"all 16 sums are back\", and **memory**: the proportional set size (PSS) summed "
    "over every process of the system (master, workers, helpers such as ray's raylet), sampled "
    "every 10 ms or so — **peak** during the hand-over (the largest total two samples in a row "
    "agree on: PSS is read one process after another, so a sample taken while processes map "
    "the same pages can count some twice), and **extra** = peak less the total just before. "
    "fastdist: `SharedArray(a)` (the reference; a copy into shared memory, then a handle per "
    "worker), the plain array passed to each worker, and the array passed read-only (stored once "
    "per host). ray: `ray.put(a)` once, tasks read it zero-copy. multiprocessing: "
    "`Pool(8).starmap` with the array as an argument. Time and memory come from separate "
    "repetitions (reading PSS holds up the processes it reads). Lower is better."
)


def sum_part(a, i, n):
    """On a worker: the sum of slice i of n of `a`, and the sum of all of it."""
    import numpy as np

    flat = np.asarray(a).reshape(-1)
    step = len(flat) // n
    stop = len(flat) if i == n - 1 else (i + 1) * step
    return float(flat[i * step:stop].sum()), float(flat.sum())


# --------------------------------------------------------------------------
# memory


def _pss_bytes(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _descendants(root):
    """`root` and every process below it (one pass over /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, ()))
    return found


def total_pss():
    return sum(_pss_bytes(p) for p in _descendants(os.getpid()))


class MemorySampler:
    """Samples the total PSS of this process and its descendants on a thread."""

    def __init__(self):
        self.samples = []  # (monotonic seconds, bytes)
        self._stop = threading.Event()
        self._pids = _descendants(os.getpid())
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        while not self.samples:
            time.sleep(0.001)
        return self

    def _run(self):
        last_scan = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_scan > 0.25:  # new processes (ray starts workers on demand)
                self._pids = _descendants(os.getpid())
                last_scan = now
            self.samples.append((now, sum(_pss_bytes(p) for p in self._pids)))
            self._stop.wait(SAMPLE_SECONDS)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), total_pss()))


def steady_peak(totals):
    """The largest total that two samples in a row agree on (a median of three): PSS
    is read one process after another, so a sample taken while processes are mapping
    the same pages counts some of them more than once, in one sample only."""
    if len(totals) < 3:
        return max(totals)
    return max(sorted(totals[i - 1:i + 2])[1] for i in range(1, len(totals) - 1))


def settle(baseline):
    """Wait until the memory of a repetition is given back: the total is near
    `baseline`, or has not fallen for 3 s (caches that keep mappings for a moment,
    ray's object store keeping its pages)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    last, last_drop = None, time.monotonic()
    while time.monotonic() < deadline:
        gc.collect()
        now = total_pss()
        if now <= baseline * 1.05 + 50e6:
            return
        if last is None or now < last - 5e6:
            last_drop = time.monotonic()
        elif time.monotonic() - last_drop > 3.0:
            return
        last = now
        time.sleep(0.5)


# --------------------------------------------------------------------------
# the systems


def _fastdist_variants(peer):
    fd = peer.fd

    def handed(make):
        def run(a):
            x = make(a)
            futs = [fd.remotecall(sum_part, w, x, i, NWORKERS) for i, w in enumerate(peer.pids)]
            return [f.fetch() for f in futs]
        return run

    def read_only(a):
        v = a.view()
        v.flags.writeable = False
        return v

    return [
        ("", "SharedArray(a), a handle to each worker", handed(fd.SharedArray)),
        ("plain ", "the plain array passed to each worker", handed(lambda a: a)),
        ("readonly ", "the array passed read-only (one copy per host)", handed(read_only)),
    ]


def _ray_variants(peer):
    ray = peer.ray
    remote_sum = ray.remote(sum_part)

    def run(a):
        ref = ray.put(a)
        return ray.get([remote_sum.remote(ref, i, NWORKERS) for i in range(NWORKERS)])

    return [("", "ray.put(a) once, tasks read it zero-copy", run)]


def _mp_variants(peer):
    pool = peer.pool

    def run(a):
        return pool.starmap(sum_part, [(a, i, NWORKERS) for i in range(NWORKERS)], chunksize=1)

    return [("", "Pool(8).starmap with the array as an argument", run)]


VARIANTS = {"fastdist": _fastdist_variants, "ray": _ray_variants, "mp": _mp_variants}


def run(peer, rec, cfg, measure_row):
    """W8 for `peer` (already started with NWORKERS workers)."""
    import numpy as np

    conf = CONFIG[rec.doc["config"]]
    if cfg.get("w8_reps"):
        conf = {**conf, "reps": cfg["w8_reps"]}
    a = np.ones(conf["nbytes"] // 8)
    for prefix, label, hand_over in VARIANTS[peer.name](peer):
        _measure(peer, rec, conf, measure_row, a, prefix, label, hand_over)


def _measure(peer, rec, conf, measure_row, a, prefix, label, hand_over):
    import numpy as np

    note = f"{conf['nbytes'] / GB:g} GB, {NWORKERS} workers"
    expect = float(a.size)
    peaks, extras, raw_peaks = [], [], []

    def check(sums):
        if len(sums) != NWORKERS or any(t != expect for _, t in sums) or \
                sum(s for s, _ in sums) != expect:
            raise RuntimeError(f"wrong sums: {sums[:2]}...")

    def timed():
        gc.collect()
        before = total_pss()
        t0 = time.perf_counter()
        sums = hand_over(a)
        t = time.perf_counter() - t0
        check(sums)
        del sums
        settle(before)
        return t

    def sampled():
        gc.collect()
        with MemorySampler() as mem:
            before = mem.samples[-1][1]
            start = time.monotonic()
            sums = hand_over(a)
            end = time.monotonic()
        check(sums)
        window = [b for s, b in mem.samples if start <= s <= end] + [mem.samples[-1][1]]
        peak = steady_peak(window)
        raw_peaks.append(max(window) / GB)
        peaks.append(peak / GB)
        extras.append((peak - before) / GB)
        rec.doc.setdefault("w8_timelines", {})[f"{peer.name}: {label}"] = [
            (round(s - start, 4), b) for s, b in mem.samples]
        del sums
        settle(before)

    try:
        small = np.ones(1 << 20)  # 8 MB: starts every worker, its numpy, shared memory
        for _ in range(2):
            if len(hand_over(small)) != NWORKERS:
                raise RuntimeError("warm-up: wrong number of sums")
        del small
        time.sleep(3.0)  # what the warm-up left in caches goes
    except Exception as e:  # noqa: BLE001 - reported on the row, the other variants go on
        rec.row("W8", prefix + "time", label, "s", False, [], ref="time", note=note,
                error=f"{type(e).__name__}: {e}"[:300])
        return
    # Timed without the memory sampler: reading a process's PSS walks its page tables
    # under its memory-map lock, which holds up the mmap and page faults of a worker
    # taking the array (it made some repetitions twice as long).
    measure_row(rec, "W8", prefix + "time", label, "s", False, timed, conf["reps"], ref="time",
                note=note)
    try:
        for _ in range(conf["reps"]):
            sampled()
    except Exception as e:  # noqa: BLE001 - reported on the row
        rec.row("W8", prefix + "peak", f"{label}: peak memory", "GB", False, [], ref="peak",
                error=f"{type(e).__name__}: {e}"[:300])
        return
    rec.row("W8", prefix + "peak", f"{label}: peak memory", "GB", False, peaks, ref="peak",
            note=f"PSS, all processes; the largest single sample: {max(raw_peaks):.2f} GB")
    rec.row("W8", prefix + "extra", f"{label}: extra memory of the hand-over", "GB", False,
            extras, ref="extra", note="peak less the total just before")


# --------------------------------------------------------------------------
# report


def targets(results, row, missing, median, fmt_value):
    """[(target, verdict, detail)] for W8 (report.compute_targets' helpers passed in)."""
    out = []

    def need(peer, key):
        r = row(results, "W8", peer, key)
        return r, (None if r else missing(results, "W8", peer, key))

    fd_t, e = need("fastdist", "time")
    ray_t, e2 = need("ray", "time")
    mp_t, e3 = need("mp", "time")
    name = "W8 SharedArray time ≤ ray's and ≤ 0.1× multiprocessing's"
    if fd_t and ray_t and mp_t:
        x, y = median(fd_t) / median(ray_t), median(fd_t) / median(mp_t)
        out.append((name, "PASS" if x <= 1 and y <= 0.1 else "FAIL",
                    f"fastdist {fmt_value(median(fd_t), 's')} vs ray "
                    f"{fmt_value(median(ray_t), 's')} ({x:.2f}×) and multiprocessing "
                    f"{fmt_value(median(mp_t), 's')} ({y:.3f}×)"))
    else:
        out.append((name, "not measured", e or e2 or e3))
    fd_p, e = need("fastdist", "peak")
    ray_p, e2 = need("ray", "peak")
    name = "W8 SharedArray peak memory ≤ ray's"
    if fd_p and ray_p:
        out.append((name, "PASS" if median(fd_p) <= median(ray_p) else "FAIL",
                    f"fastdist {median(fd_p):.2f} GB vs ray {median(ray_p):.2f} GB "
                    "(PSS, all processes)"))
    else:
        out.append((name, "not measured", e or e2))
    fd_x, e = need("fastdist", "extra")
    name = "W8 SharedArray extra memory of the hand-over ≤ 1.2× the array"
    if fd_x:
        size = array_gb(results)
        out.append((name, "PASS" if median(fd_x) <= 1.2 * size else "FAIL",
                    f"fastdist {median(fd_x):.2f} GB for a {size:g} GB array"))
    else:
        out.append((name, "not measured", e))
    return out


def array_gb(results):
    for job in results["jobs"]:
        if job.get("workload") == "W8" and job.get("config") in CONFIG:
            return CONFIG[job["config"]]["nbytes"] / GB
    return CONFIG[results.get("config", "full")]["nbytes"] / GB


def render_memory_chart(results, path):
    """Total PSS over time during the last repetition of each W8 variant."""
    lines = {}
    for job in results["jobs"]:
        if job.get("workload") == "W8":
            lines.update(job.get("w8_timelines") or {})
    if not lines:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5))
    for label, points in sorted(lines.items()):
        if points:
            ax.plot([t for t, _ in points], [b / GB for _, b in points], label=label, lw=1.2)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("seconds from \"the array exists on the master\" (symlog scale)")
    ax.set_ylabel("PSS over all processes (GB)")
    ax.set_title(TITLE + ": memory during the last repetition of each system", fontsize=10,
                 loc="left")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
