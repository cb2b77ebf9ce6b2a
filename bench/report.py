"""Turn results.json into RESULTS.md, the targets check and ratios.png."""

import datetime as dt
import os
import platform
import statistics
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PEER_NAMES = {
    "fastdist": "fastdist",
    "fastdist-tcp": "fastdist over TCP",
    "fastdist-base": "fastdist before (--base)",
    "mp": "multiprocessing.Pool",
    "cf": "concurrent.futures",
    "loky": "loky",
    "dask": "dask.distributed",
    "ray": "ray",
    "c": "C sockets (baseline)",
    "pysock": "Python sockets (baseline)",
    "memcpy": "memory (baseline)",
}
PEER_ORDER = list(PEER_NAMES)
PEERS = ["mp", "cf", "loky", "dask", "ray"]  # the systems fastdist is compared with
BASELINES = ["c", "pysock", "memcpy"]

WORKLOAD_TITLES = {
    "W1": "W1: no-op round trip",
    "W2": "W2: pipelined calls",
    "W3": "W3: array transfer",
    "W4": "W4: map of a trivial function",
    "W5": "W5: np.linalg.norm over arrays sent from the parent",
    "W6": "W6: cold start",
}
WORKLOAD_TEXT = {
    "W1": "One blocking call of a function that does nothing, repeated; time per call. "
    "fastdist also runs over TCP (`FASTDIST_UNIX_SOCKETS=0`, its same-host Unix-socket path off). "
    "The C rows pinned to two cores / one core show how much of a round trip is placement. "
    "Lower is better.",
    "W2": "Calls issued without waiting (alternating between the 2 workers where the system "
    "lets the caller choose), then every result collected; calls per second. Higher is better.",
    "W3": "fastdist runs twice: with its default transport (Unix sockets between processes of "
    "one host, large buffers through shared memory) and over TCP (`FASTDIST_UNIX_SOCKETS=0`); "
    "peers are compared with the default. "
    "A float64 array sent to a worker (the function answers its size) and received from "
    "a worker (the function answers an array of that size, built once per worker so that the "
    "worker's allocation is not what is measured); the master reads one element per page of "
    "every array it receives, so a zero-copy result is paid for when used. GB/s, higher is "
    "better. The C and Python socket rows move 100 MB between preallocated buffers: the "
    "ceiling of the transport.",
    "W4": "map of `x -> x + 1` over the items; seconds for the whole map. Rows marked "
    "*chunk1* send one item per message and are compared with `pmap(batch_size=1)`; rows "
    "marked *chunked* use the system's batching and are compared with "
    "`pmap(batch_size='auto')`. Lower is better.",
    "W5": "`np.linalg.norm` of arrays of 1,000,000 float64 (8 MB each) created in the parent, "
    "so each one has to be sent; seconds for the whole map. Compared as in W4. Lower is better.",
    "W6": "From nothing to n workers each having answered a call (fastdist: `addprocs(n)` then "
    "a call on every worker; Pool / ProcessPoolExecutor / loky with the spawn start method "
    "and n tasks that hold their worker until all n have checked in; dask: `LocalCluster` + "
    "`Client` + `client.run` on every worker; ray: `ray.init(num_cpus=n)` and n actors "
    "answering). Every repetition runs in a fresh process that has imported the system but "
    "started nothing yet, so each one is a cold start for every system; teardown is not timed. "
    "fastdist's row *again in the same process* is a second `addprocs` after the first, "
    "with what the first left running (its fork server). Lower is better.",
}
import w7_hosts  # noqa: E402 - W7's texts and targets live with the workload

WORKLOAD_TITLES["W7"] = w7_hosts.TITLE
WORKLOAD_TEXT["W7"] = w7_hosts.TEXT
import w8  # noqa: E402 - W8's texts and targets live with the workload

WORKLOAD_TITLES["W8"] = w8.TITLE
WORKLOAD_TEXT["W8"] = w8.TEXT

MATRIX_COLUMNS = [
    ("W1", "rtt", "W1 round trip"),
    ("W2", "pipelined", "W2 pipelined"),
    ("W3", "8MB to", "W3 8 MB to"),
    ("W3", "8MB from", "W3 8 MB from"),
    ("W3", "100MB to", "W3 100 MB to"),
    ("W3", "100MB from", "W3 100 MB from"),
    ("W4", "chunk1", "W4 chunk 1"),
    ("W4", "chunked", "W4 chunked"),
    ("W5", "chunk1", "W5 chunk 1"),
    ("W5", "chunked", "W5 chunked"),
    ("W6", "2 workers", "W6 2 workers"),
    ("W6", "32 workers", "W6 32 workers"),
]
MATRIX_COLUMNS.append(("W8", "time", "W8 1 GB to 8 workers"))


# --------------------------------------------------------------------------
# machine


def sanitize(text):
    """Keep local paths out of the written results."""
    if not text:
        return text
    text = str(text).replace(ROOT, "<repo>")
    home = os.path.expanduser("~")
    if home and home != "/":
        text = text.replace(home, "~")
    return text


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _version(dist):
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "not installed"


def machine_info(root):
    cpu = "unknown"
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    osname = "unknown"
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            osname = line.split("=", 1)[1].strip('"')
    try:
        gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except Exception:
        gcc = "not found"
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except Exception:
        commit = ""
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "os": osname,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gcc": gcc,
        "commit": commit,
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "packages": {
            d: _version(d)
            for d in ("fastdist", "numpy", "cloudpickle", "loky", "dask", "distributed", "ray", "matplotlib", "psutil")
        },
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# --------------------------------------------------------------------------
# numbers


def median(row):
    s = row.get("samples") or []
    return statistics.median(s) if s else None


def rows_of(results, workload, peer):
    out = []
    for job in results["jobs"]:
        if job["peer"] != peer:
            continue
        for row in job.get("rows", []):
            if row["workload"] == workload:
                out.append(row)
    return out


def fd_rows(results, workload):
    return {r["key"]: r for r in rows_of(results, workload, "fastdist") if median(r) is not None}


def ratio(row, ref_row):
    """Peer time / fastdist time: above 1, fastdist is that many times faster."""
    if row is None or ref_row is None:
        return None
    a, b = median(row), median(ref_row)
    if not a or not b:
        return None
    return b / a if row["higher_better"] else a / b


def job_status(results, peer, workload):
    for job in results["jobs"]:
        if job["peer"] == peer and job["workload"] in (workload, "baseline"):
            return job
    return None


def fmt_value(v, unit):
    if v is None:
        return "—"
    if unit == "µs":
        return f"{v / 1000:.2f} ms" if v >= 10000 else (f"{v:.0f} µs" if v >= 100 else f"{v:.1f} µs")
    if unit == "s":
        if v < 0.01:
            return f"{v * 1000:.2f} ms"
        return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"
    if unit == "GB/s":
        return f"{v:.3f} GB/s" if v < 0.1 else f"{v:.2f} GB/s"
    if unit == "calls/s":
        return f"{v:,.0f}/s"
    return f"{v:.4g} {unit}"


def fmt_ratio(r):
    if r is None:
        return "—"
    return f"{r:.3g}×" if r < 1000 else f"{r:,.0f}×"


# --------------------------------------------------------------------------
# targets


def _row(results, workload, peer, key):
    for r in rows_of(results, workload, peer):
        if r["key"] == key and median(r) is not None:
            return r
    return None


def _missing(results, workload, peer, key):
    job = job_status(results, peer, workload)
    if job is None:
        return f"{PEER_NAMES[peer]} not run"
    if job.get("status") != "ok":
        return f"{PEER_NAMES[peer]}: {job.get('status')}"
    for r in rows_of(results, workload, peer):
        if r["key"] == key and r.get("error"):
            return f"{PEER_NAMES[peer]}: {r['error']}"
    return f"{PEER_NAMES[peer]}: no figure"


def compute_targets(results):
    """[(target, verdict, detail)]; verdict is PASS, FAIL or 'not measured'."""
    out = []

    def need(workload, peer, key):
        r = _row(results, workload, peer, key)
        return r, (None if r else _missing(results, workload, peer, key))

    def check(name, cond, detail):
        out.append((name, "PASS" if cond else "FAIL", detail))

    def skip(name, why):
        out.append((name, "not measured", why))

    # W1
    fd, e = need("W1", "fastdist", "rtt")
    c, e2 = need("W1", "c", "c tcp rtt")
    name = "W1 fastdist round trip ≤ 1.0× C TCP ping-pong"
    if fd and c:
        x = median(fd) / median(c)
        pinned = [(w, _row(results, "W1", "c", f"c tcp rtt {w}")) for w in ("two cores pinned", "one core pinned")]
        extra = "; ".join(f"{w}: {fmt_value(median(r), 'µs')}" for w, r in pinned if r)
        tcp = _row(results, "W1", "fastdist-tcp", "rtt")
        if tcp:
            extra += f"; fastdist over TCP: {fmt_value(median(tcp), 'µs')} ({median(tcp) / median(c):.2f}×)"
        check(name, x <= 1.0, f"fastdist {fmt_value(median(fd), 'µs')} vs C {fmt_value(median(c), 'µs')}: {x:.2f}×"
              + (f" (C {extra})" if extra else ""))
    else:
        skip(name, e or e2)
    mp, e2 = need("W1", "mp", "rtt")
    name = "W1 fastdist ≥ 4× faster than Pool.apply"
    if fd and mp:
        x = median(mp) / median(fd)
        check(name, x >= 4, f"fastdist {fmt_value(median(fd), 'µs')} vs Pool.apply {fmt_value(median(mp), 'µs')}: "
              f"Pool.apply takes {x:.2f}× as long")
    else:
        skip(name, e or e2)

    # W2
    fd, e = need("W2", "fastdist", "pipelined")
    mp, e2 = need("W2", "mp", "pipelined")
    name = "W2 fastdist ≥ 10× Pool.apply_async throughput"
    if fd and mp:
        x = median(fd) / median(mp)
        check(name, x >= 10, f"fastdist {fmt_value(median(fd), 'calls/s')} vs Pool.apply_async "
              f"{fmt_value(median(mp), 'calls/s')}: {x:.2f}×")
    else:
        skip(name, e or e2)

    # W3
    for d, word in (("to", "to a worker"), ("from", "from a worker")):
        # "over TCP": fastdist with its Unix-socket path off, when it was run.
        fd, e = need("W3", "fastdist-tcp", f"100MB {d}")
        who = "fastdist over TCP"
        if not fd:
            fd, e = need("W3", "fastdist", f"100MB {d}")
            who = "fastdist (default transport)"
        c, e2 = need("W3", "c", f"c tcp {d}")
        name = f"W3 100 MB {word} over TCP ≥ 0.8× C TCP bulk"
        if fd and c:
            x = median(fd) / median(c)
            extra = ""
            dflt = _row(results, "W3", "fastdist", f"100MB {d}")
            cu = _row(results, "W3", "c", f"c unix {d}")
            if dflt and who != "fastdist (default transport)" and cu:
                extra = (f" (default transport: {fmt_value(median(dflt), 'GB/s')} vs C Unix "
                         f"{fmt_value(median(cu), 'GB/s')})")
            check(name, x >= 0.8, f"{who} {fmt_value(median(fd), 'GB/s')} vs C {fmt_value(median(c), 'GB/s')}: "
                  f"{x:.2f}×{extra}")
        else:
            skip(name, e or e2)
    for d, word in (("to", "to a worker"), ("from", "from a worker")):
        name = f"W3 faster than every peer {word} (8 MB and 100 MB)"
        parts, ok, why = [], True, None
        for size in ("8MB", "100MB"):
            fd, e = need("W3", "fastdist", f"{size} {d}")
            if not fd:
                why = e
                break
            peers = [(p, _row(results, "W3", p, f"{size} {d}")) for p in PEERS]
            peers = [(p, r) for p, r in peers if r]
            if not peers:
                why = "no peer figures"
                break
            best_p, best = max(peers, key=lambda pr: median(pr[1]))
            ok = ok and median(fd) > median(best)
            parts.append(
                f"{size[:-2]} MB: fastdist {fmt_value(median(fd), 'GB/s')} vs best peer {PEER_NAMES[best_p]} "
                f"{fmt_value(median(best), 'GB/s')}"
            )
        if why:
            skip(name, why)
        else:
            check(name, ok, "; ".join(parts))

    # W4
    fd, e = need("W4", "fastdist", "chunked")
    mp, e2 = need("W4", "mp", "chunked")
    name = "W4 pmap(batch_size='auto') ≤ 1.0× Pool.map (default chunksize)"
    if fd and mp:
        x = median(fd) / median(mp)
        check(name, x <= 1.0, f"fastdist {fmt_value(median(fd), 's')} vs Pool.map {fmt_value(median(mp), 's')}: "
              f"{x:.2f}×")
    else:
        skip(name, e or e2)
    fd, e = need("W4", "fastdist", "chunk1")
    mp, e2 = need("W4", "mp", "chunk1")
    name = "W4 pmap(batch_size=1) ≤ 0.5× Pool.map(chunksize=1)"
    if fd and mp:
        x = median(fd) / median(mp)
        check(name, x <= 0.5, f"fastdist {fmt_value(median(fd), 's')} vs Pool.map(chunksize=1) "
              f"{fmt_value(median(mp), 's')}: {x:.2f}×")
    else:
        skip(name, e or e2)

    # W5
    fd, e = need("W5", "fastdist", "chunk1")
    name = "W5 pmap ≤ 0.25× the best peer"
    peers = [(p, r) for p in PEERS for r in rows_of(results, "W5", p) if median(r) is not None]
    if fd and peers:
        best_p, best = min(peers, key=lambda pr: median(pr[1]))
        x = median(fd) / median(best)
        auto = _row(results, "W5", "fastdist", "chunked")
        extra = f" (pmap(batch_size='auto'): {fmt_value(median(auto), 's')})" if auto else ""
        check(
            name,
            x <= 0.25,
            f"pmap(batch_size=1) {fmt_value(median(fd), 's')}{extra} vs {PEER_NAMES[best_p]} "
            f"{best['label']} {fmt_value(median(best), 's')}: {x:.2f}×",
        )
    else:
        skip(name, e or "no peer figures")

    # W6
    for n, limit in ((2, 0.2), (32, 3.0)):
        fd, e = need("W6", "fastdist", f"{n} workers")
        name = f"W6 {n} workers answering ≤ {limit:g} s"
        if fd:
            check(name, median(fd) <= limit, f"fastdist {fmt_value(median(fd), 's')}")
        else:
            skip(name, e)

    # W8
    out.extend(w8.targets(results, _row, _missing, median, fmt_value))

    # W7
    out.extend(w7_hosts.targets(results, _row, _missing, median, fmt_value))

    wanted = set(results.get("workloads", []))
    return [t for t in out if t[0].split()[0] in wanted]


def render_targets_text(results):
    lines = ["Targets:"]
    for name, verdict, detail in compute_targets(results):
        lines.append(f"  [{verdict}] {name}: {detail}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# markdown


def _spread(row):
    s = row.get("samples") or []
    if not s:
        return "—"
    return f"{fmt_value(min(s), row['unit'])} – {fmt_value(max(s), row['unit'])}"


def render_markdown(results):
    meta = results["meta"]
    quick = results["config"] == "quick"
    L = []
    L.append("# fastdist benchmark results")
    L.append("")
    if quick:
        L.append("**QUICK RUN (`--quick`): fewer repetitions and smaller counts, a smoke test. "
                 "Do not quote these figures.**")
        L.append("")
    L.append("Generated by `bash bench/run.sh`; see `bench/README.md` for what each workload does. "
             "Every system runs with 2 workers, each (system, workload) pair in a fresh process. "
             "Figures are medians over the repetitions, with the range (min – max) of the repetitions. "
             "**vs fastdist** is the system's time divided by fastdist's time from this same run "
             "(for rates: fastdist's rate divided by the system's): above 1×, fastdist is that many "
             "times faster; below 1×, the other is faster.")
    L.append("")
    L.append("## Machine")
    L.append("")
    pk = meta["packages"]
    L.append(f"- CPU: {meta['cpu']}, {meta['cores']} cores; memory {meta['memory_gib']} GiB")
    L.append(f"- OS: {meta['os']}, kernel {meta['kernel']}")
    L.append(f"- Python {meta['python']}; {meta['gcc']}")
    L.append("- Packages: " + ", ".join(f"{k} {v}" for k, v in pk.items()))
    if meta.get("openblas_coretype"):
        L.append(f"- OPENBLAS_CORETYPE={meta['openblas_coretype']} (as set in the environment)")
    L.append(f"- Date: {meta['date']}; fastdist commit {meta.get('commit') or 'unknown'}")
    if meta.get("base"):
        L.append(f"- fastdist before (`--base`): commit {meta['base']}, built from that revision "
                 "and run in this same run; its ratios are its time over this commit's")
    lb, la = meta.get("load_before"), meta.get("load_after")
    if lb and la:
        L.append(f"- Load average (1/5/15 min) before: {lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f}, "
                 f"after: {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}")
    L.append(f"- Whole run: {results['duration_s']:.0f} s ({results['config']} configuration)")
    busy = [j["cpu_busy_before"] for j in results["jobs"] if j.get("cpu_busy_before") is not None]
    if busy:
        L.append(f"- CPU busy with other work in the second before each job: median {statistics.median(busy):.0f}%, "
                 f"max {max(busy):.0f}% (of both cores)")
    if (lb and lb[0] > 1.0) or (busy and statistics.median(busy) > 10):
        L.append("")
        L.append("**The machine was not idle during this run: other processes competed with the benchmark, "
                 "so absolute figures are pessimistic and noisier than usual; ratios within the run still "
                 "compare systems under the same conditions.**")
    L.append("")

    # systems
    L.append("## Systems")
    L.append("")
    L.append("| system | " + " | ".join(results["workloads"]) + " |")
    L.append("|---|" + "---|" * len(results["workloads"]))
    for p in ["fastdist", "fastdist-base", "fastdist-tcp"] + PEERS:
        if p not in results["peers"]:
            continue
        cells = []
        for w in results["workloads"]:
            job = job_status(results, p, w)
            if job is None:
                cells.append("—" if p in ("fastdist-tcp", "fastdist-base") else "not run")
            elif job["status"] == "ok":
                errs = [r for r in job.get("rows", []) if r.get("error")]
                cells.append(f"ok ({job.get('wall_s', 0):.0f} s)" + (f", {len(errs)} row(s) failed" if errs else ""))
            else:
                cells.append(f"**{job['status']}**")
        L.append(f"| {PEER_NAMES[p]} | " + " | ".join(cells) + " |")
    base = []
    for b in BASELINES:
        job = job_status(results, b, "baseline")
        if job is not None:
            st = job["status"] if job["status"] != "ok" else f"ok ({job.get('wall_s', 0):.0f} s)"
            base.append(f"{PEER_NAMES[b].replace(' (baseline)', '')}: {st}")
    if base:
        L.append("")
        L.append("Baselines: " + "; ".join(base) + ".")
    problems = [j for j in results["jobs"] if j.get("status") != "ok" and j.get("error")]
    if problems:
        L.append("")
        for j in problems:
            L.append(f"- {PEER_NAMES.get(j['peer'], j['peer'])} {j['workload']}: {j['status']}: `{j['error']}`")
    L.append("")

    # targets
    L.append("## Targets")
    L.append("")
    L.append("| target | verdict | measured |")
    L.append("|---|---|---|")
    for name, verdict, detail in compute_targets(results):
        v = f"**{verdict}**" if verdict != "PASS" else verdict
        L.append(f"| {name} | {v} | {detail} |")
    L.append("")

    # matrix
    cols = [(w, k, t) for w, k, t in MATRIX_COLUMNS if w in results["workloads"]]
    if cols:
        L.append("## Summary: each system's time relative to fastdist's")
        L.append("")
        L.append("Above 1×: fastdist is faster by that factor. — : no figure (see the tables below).")
        L.append("")
        L.append("| system | " + " | ".join(t for _, _, t in cols) + " |")
        L.append("|---|" + "---|" * len(cols))
        for p in ["fastdist-base", "fastdist-tcp"] + PEERS:
            if p not in results["peers"]:
                continue
            cells = []
            for w, k, _ in cols:
                ref = fd_rows(results, w).get(k)
                row = next((r for r in rows_of(results, w, p) if r["ref"] == k and median(r) is not None), None)
                cells.append(fmt_ratio(ratio(row, ref)))
            L.append(f"| {PEER_NAMES[p]} | " + " | ".join(cells) + " |")
        L.append("")

    # per workload
    for w in results["workloads"]:
        L.append(f"## {WORKLOAD_TITLES[w]}")
        L.append("")
        L.append(WORKLOAD_TEXT[w])
        L.append("")
        L.append("| system | what | median | range (min – max) | reps | vs fastdist | notes |")
        L.append("|---|---|---|---|---|---|---|")
        refs = fd_rows(results, w)
        for p in PEER_ORDER:
            if p in BASELINES:
                job = job_status(results, p, "baseline")
            else:
                if p not in results["peers"]:
                    continue
                job = job_status(results, p, w)
            rows = rows_of(results, w, p)
            if job is None and not rows:
                continue
            for r in rows:
                if r.get("error") and median(r) is None:
                    L.append(f"| {PEER_NAMES[p]} | {r['label']} | **error** | `{r['error']}` | | | {r.get('note') or ''} |")
                    continue
                if p == "fastdist" and r["ref"] == r["key"]:
                    rr = "1 (reference)"
                else:
                    rr = fmt_ratio(ratio(r, refs.get(r["ref"])))
                    if w in ("W4", "W5") and p in PEERS:
                        rr += f" ({'chunk1' if r['ref'] == 'chunk1' else 'chunked'})"
                note = r.get("note") or ""
                if r.get("error"):
                    note += f" (stopped: {r['error']})"
                L.append(
                    f"| {PEER_NAMES[p]} | {r['label']} | {fmt_value(median(r), r['unit'])} | {_spread(r)} "
                    f"| {len(r['samples'])} | {rr} | {note} |"
                )
            if job is not None and job.get("status") != "ok" and p not in BASELINES or (
                p in BASELINES and job is not None and job.get("status") != "ok" and w in ("W1", "W3")
            ):
                L.append(f"| {PEER_NAMES[p]} | | **{job['status']}** | `{job.get('error') or ''}` | | | |")
        L.append("")
    return "\n".join(L)


# --------------------------------------------------------------------------
# chart


def render_chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    panels = []
    for w in results["workloads"]:
        refs = fd_rows(results, w)
        bars = []
        for p in ["fastdist-base", "fastdist-tcp"] + PEERS + BASELINES:
            for r in rows_of(results, w, p):
                x = ratio(r, refs.get(r["ref"]))
                if x is not None:
                    bars.append((f"{PEER_NAMES[p].replace(' (baseline)', '')}: {r['label']}", x, p in BASELINES))
        panels.append((w, bars))

    n = len(panels)
    heights = [max(1.6, 0.26 * len(b) + 1.0) for _, b in panels]
    fig, axes = plt.subplots(n, 1, figsize=(12, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (w, bars) in zip(axes.flat, panels):
        ax.set_title(WORKLOAD_TITLES[w], fontsize=10, loc="left")
        if not bars:
            ax.text(0.5, 0.5, "no ratio: fastdist or the peers have no figure", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        labels = [b[0] if len(b[0]) <= 60 else b[0][:57] + "..." for b in bars]
        vals = [b[1] for b in bars]
        colors = ["#9e9e9e" if b[2] else ("#c0392b" if b[1] < 1 else "#2e86c1") for b in bars]
        y = list(range(len(bars)))
        ax.barh(y, vals, color=colors, height=0.7)
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_ylim(len(bars) - 0.5, -0.5)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axvline(1.0, color="black", lw=1)
        lo, hi = min(vals + [1]), max(vals + [1])
        ax.set_xlim(lo / 2, hi * 4)
        for yi, v in zip(y, vals):
            ax.text(v * 1.08, yi, f"{v:.3g}×", va="center", fontsize=7)
        ax.tick_params(axis="x", labelsize=8)
    axes.flat[-1].set_xlabel(
        "system's time ÷ fastdist's time (log scale). Blue: fastdist faster; red: the other faster; "
        "grey: baselines", fontsize=8)
    title = "fastdist vs peers, 2 workers each: each system's time ÷ fastdist's (same run)"
    if results["config"] == "quick":
        title += " — QUICK RUN"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (sum(heights) + 0.6)))
    fig.savefig(path, dpi=110)
    plt.close(fig)
