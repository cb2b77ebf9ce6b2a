"""Side-by-side benchmark: fastdist against multiprocessing, concurrent.futures,
loky, dask.distributed and ray, plus raw-socket and memory baselines.

    bash bench/run.sh [--quick] [--only W1,W3] [--peers fastdist,mp,...] [--base REV]

`--base REV` adds fastdist as it was at git revision REV ("fastdist-base"),
built into bench/.build/, to the same run: a before/after comparison whose
figures share the run's conditions.

Every (system, workload) pair runs in its own fresh process (peers.py) with a
timeout; whatever that process leaves behind is killed before the next one
starts. Results go to bench/results.json, bench/RESULTS.md and
bench/ratios.png.
"""

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD = os.path.join(HERE, ".build")
sys.path.insert(0, HERE)

import report  # noqa: E402

PEERS = ["fastdist", "fastdist-tcp", "mp", "cf", "loky", "dask", "ray"]
# fastdist with FASTDIST_UNIX_SOCKETS=0 runs only where the transport matters.
ONLY_WORKLOADS = {"fastdist-tcp": {"W1", "W2", "W3"},
                  "fastdist-base": {"W1", "W2", "W3", "W4", "W5", "W6"}}
BASELINES = ["c", "pysock", "memcpy"]
WORKLOADS = ["W1", "W2", "W3", "W4", "W5", "W6"]
WORKLOADS.append("W8")
# Workloads that only some systems run (W8: the ones its targets compare).
WORKLOAD_PEERS = {"W8": {"fastdist", "mp", "ray"}}
# Which workloads each baseline feeds.
BASELINE_FOR = {"c": {"W1", "W3"}, "pysock": {"W1", "W3"}, "memcpy": {"W3"}}

# Seconds one (system, workload) process may take before it is reported as a
# timeout. Generous: the slowest peers (dask, ray) need most of these.
# W6's is per repetition (each is its own process).
TIMEOUTS = {"W1": 300, "W2": 300, "W3": 420, "W4": 900, "W5": 900, "W6": 300, "baseline": 300}
# W7: fastdist alone, with workers on network-namespace hosts (needs root): w7_hosts.py.
WORKLOADS.insert(WORKLOADS.index("W6") + 1, "W7")
WORKLOAD_PEERS["W7"] = {"fastdist"}
TIMEOUTS["W7"] = 1800
TIMEOUTS["W8"] = 1200


def parse_list(s, allowed, what):
    items = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        sys.exit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def build_pingpong():
    """Compile the C baseline; returns (path or None, error or None)."""
    os.makedirs(BUILD, exist_ok=True)
    exe = os.path.join(BUILD, "pingpong")
    src = os.path.join(HERE, "baseline", "pingpong.c")
    try:
        subprocess.run(["gcc", "-O2", "-o", exe, src], check=True, capture_output=True, text=True, timeout=120)
        return exe, None
    except FileNotFoundError:
        return None, "gcc not found"
    except subprocess.CalledProcessError as e:
        return None, "gcc failed: " + report.sanitize(e.stderr.strip().splitlines()[-1] if e.stderr else "")


def prepare_base(rev):
    """fastdist at git revision `rev`, built in place under bench/.build/base-SHA/
    (once per revision); returns (the directory to put on PYTHONPATH, short sha)."""
    sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify", f"{rev}^{{commit}}"],
                         check=True, capture_output=True, text=True).stdout.strip()
    dest = os.path.join(BUILD, f"base-{sha[:12]}")
    src = os.path.join(dest, "src")
    done = os.path.join(dest, ".built")
    if not os.path.exists(done):
        subprocess.run(["rm", "-rf", dest], check=True)
        os.makedirs(dest)
        archive = subprocess.run(["git", "-C", ROOT, "archive", sha], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=dest,
                       check=True, capture_output=True)
        open(done, "w").close()
    return src, sha[:12]


def tagged_processes(tag):
    """Every process carrying our per-job environment tag (survivors of a
    job: daemonised helpers, orphaned workers)."""
    try:
        import psutil
    except ImportError:
        return []
    found = []
    me = os.getpid()
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        try:
            if p.environ().get("FDBENCH_TAG") == tag:
                found.append(p)
        except Exception:
            continue
    return found


def cleanup(proc, tag):
    """Kill the job's process group and anything else that inherited its tag."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    killed = 0
    for _ in range(3):
        left = tagged_processes(tag)
        if not left:
            break
        for p in left:
            try:
                p.kill()
                killed += 1
            except Exception:
                pass
        time.sleep(0.5)
    return killed


def cpu_busy(wait_idle):
    """Percent of both cores busy over one second (other sessions' work shows
    up here); with wait_idle > 0, wait up to that many seconds for < 20%."""
    try:
        import psutil
    except ImportError:
        return None
    deadline = time.monotonic() + wait_idle
    while True:
        busy = psutil.cpu_percent(interval=1.0)
        if busy < 20 or time.monotonic() >= deadline:
            return busy


def run_w6(peer, args, exe, logdir):
    """W6 as one fresh process per (size, repetition), merged into one result:
    a cold start each time, for every system alike."""
    reps = args.reps or (1 if args.quick else 5)
    parts = [run_job(peer, "W6", args, exe, logdir, extra=["--w6-n", str(n)], suffix=f"-{n}-{r}")
             for n in (2, 32) for r in range(reps)]
    merged = {"peer": peer, "workload": "W6", "status": "ok", "error": None, "rows": [],
              "wall_s": round(sum(p["wall_s"] for p in parts), 2),
              "leftovers_killed": sum(p.get("leftovers_killed") or 0 for p in parts),
              "cpu_busy_before": parts[0].get("cpu_busy_before"), "returncode": None}
    by_key = {}
    for p in parts:
        if p["status"] != "ok" and merged["status"] == "ok":
            merged["status"], merged["error"] = p["status"], p.get("error")
        for row in p.get("rows", []):
            if row["key"] in by_key:
                by_key[row["key"]]["samples"].extend(row["samples"])
                by_key[row["key"]]["error"] = by_key[row["key"]]["error"] or row.get("error")
            else:
                by_key[row["key"]] = dict(row, samples=list(row["samples"]))
    merged["rows"] = list(by_key.values())
    # Some repetitions failing is reported on the row, not as a failed system.
    if merged["status"] == "failed" and any(r["samples"] for r in merged["rows"]):
        for r in merged["rows"]:
            r["error"] = r.get("error") or merged["error"]
        merged["status"], merged["error"] = "ok", None
    return merged


def run_job(peer, workload, args, exe, logdir, extra=(), suffix=""):
    busy = cpu_busy(args.wait_idle)
    tag = uuid.uuid4().hex
    fd, out = tempfile.mkstemp(prefix=f"fdbench-{peer}-{workload}-", suffix=".json")
    os.close(fd)
    env = dict(os.environ)
    env["FDBENCH_TAG"] = tag
    env["PYTHONPATH"] = HERE + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if peer == "fastdist-base":
        env["PYTHONPATH"] = args.base_src + os.pathsep + env["PYTHONPATH"]
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep ray on 127.0.0.1
    cmd = [sys.executable, os.path.join(HERE, "peers.py"), peer, workload, "--out", out]
    if args.quick:
        cmd.append("--quick")
    if args.reps:
        cmd += ["--reps", str(args.reps)]
    if exe:
        cmd += ["--exe", exe]
    cmd += list(extra)
    timeout = TIMEOUTS.get(workload, 600) * args.timeout_scale
    log_path = os.path.join(logdir, f"{peer}-{workload}{suffix}.log")
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd=HERE, start_new_session=True,
        )
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = None
    wall = time.monotonic() - t0
    leftovers = cleanup(proc, tag)
    if timed_out:
        proc.wait()

    try:
        with open(out) as f:
            doc = json.load(f)
    except Exception:
        doc = {"peer": peer, "workload": workload, "status": "failed", "error": None, "rows": []}
    finally:
        for p in (out, out + ".tmp"):
            try:
                os.unlink(p)
            except OSError:
                pass

    if timed_out:
        doc["status"] = "timeout"
        doc["error"] = f"no result within {timeout:.0f} s (rows finished before that are kept)"
    elif doc.get("status") in (None, "running"):
        doc["status"] = "failed"
        doc["error"] = f"exited with code {rc} before finishing: " + last_lines(log_path)
    rows = doc.get("rows", [])
    if doc["status"] == "ok" and rows and not any(r.get("samples") for r in rows):
        doc["status"] = "failed"
        doc["error"] = rows[0].get("error")
    doc["error"] = report.sanitize(doc.get("error"))
    for row in doc.get("rows", []):
        row["error"] = report.sanitize(row.get("error"))
    doc.update(peer=peer, workload=workload, wall_s=round(wall, 2), returncode=rc, leftovers_killed=leftovers,
               cpu_busy_before=busy)
    return doc


def last_lines(path, n=2):
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        return " | ".join(lines[-n:])[-400:]
    except OSError:
        return ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and smaller counts (smoke test)")
    ap.add_argument("--only", default=",".join(WORKLOADS), help="workloads to run, e.g. W1,W3")
    ap.add_argument("--peers", default=",".join(PEERS + BASELINES),
                    help="systems to run (baselines c, pysock, memcpy included)")
    ap.add_argument("--reps", type=int, help="repetitions per figure (default 5; quick: 2)")
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every job timeout")
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="before each job, wait up to this many seconds for the CPU to be idle (< 20%% busy)")
    ap.add_argument("--out-dir", help="where RESULTS.md, results.json, ratios.png go "
                    "(default: bench/, or bench/.build/quick/ with --quick)")
    ap.add_argument("--base", help="also run fastdist as it was at this git revision "
                    "(peer fastdist-base): before and after in one run")
    args = ap.parse_args(argv)
    if args.out_dir is None:
        # A smoke test must not overwrite the full run's committed results.
        args.out_dir = os.path.join(BUILD, "quick") if args.quick else HERE

    workloads = parse_list(args.only, WORKLOADS, "workload")
    selected = parse_list(args.peers, PEERS + BASELINES, "peer")
    peers = [p for p in PEERS if p in selected]
    if args.base:
        args.base_src, base_sha = prepare_base(args.base)
        peers.insert(1, "fastdist-base")
    baselines = [b for b in BASELINES if b in selected and BASELINE_FOR[b] & set(workloads)]

    logdir = os.path.join(BUILD, "logs")
    os.makedirs(logdir, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    meta = report.machine_info(ROOT)
    meta["load_before"] = os.getloadavg()
    t_start = time.monotonic()

    jobs = []
    exe = None
    if "c" in baselines:
        exe, err = build_pingpong()
        if err:
            jobs.append({"peer": "c", "workload": "baseline", "status": "failed", "error": err, "rows": []})
            baselines.remove("c")
    plan = [(b, "baseline") for b in baselines] + [
        (p, w) for w in workloads for p in peers if w in ONLY_WORKLOADS.get(p, {w})
        and p in WORKLOAD_PEERS.get(w, {p})
    ]
    for i, (peer, workload) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {peer} {workload} ...", end=" ", flush=True)
        if workload == "W6":
            doc = run_w6(peer, args, exe, logdir)
        else:
            doc = run_job(peer, workload, args, exe, logdir)
        jobs.append(doc)
        print(f"{doc['status']} ({doc['wall_s']:.1f} s)" + (f": {doc['error']}" if doc.get("error") else ""), flush=True)

    meta["load_after"] = os.getloadavg()
    if args.base:
        meta["base"] = base_sha
    results = {
        "config": "quick" if args.quick else "full",
        "workloads": workloads,
        "peers": peers,
        "baselines": baselines,
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t_start, 1),
        "meta": meta,
        "jobs": jobs,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = report.render_markdown(results)
    with open(os.path.join(args.out_dir, "RESULTS.md"), "w") as f:
        f.write(md)
    try:
        report.render_chart(results, os.path.join(args.out_dir, "ratios.png"))
    except Exception as e:  # a missing matplotlib must not lose the tables
        print(f"chart not written: {e!r}", file=sys.stderr)
    if "W8" in workloads:
        try:
            import w8

            w8.render_memory_chart(results, os.path.join(args.out_dir, "w8_memory.png"))
        except Exception as e:
            print(f"W8 memory chart not written: {e!r}", file=sys.stderr)
    if "W7" in workloads:
        try:
            import w7_hosts

            w7_hosts.render_scaling_chart(results, os.path.join(args.out_dir, "w7_scaling.png"))
        except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the tables
            print(f"W7 scaling chart not written: {e!r}", file=sys.stderr)
    print(report.render_targets_text(results))
    print(f"done in {results['duration_s']:.0f} s; wrote RESULTS.md, results.json, ratios.png"
          f" to {os.path.relpath(args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
