"""One (system, workload) measurement, run in a fresh process by run.py.

    python peers.py PEER WORKLOAD --out FILE [--quick] [--reps N]

PEER is fastdist, mp, cf, loky, dask, ray, or one of the baselines c, pysock,
memcpy (WORKLOAD "baseline"). The result is written to FILE as JSON after
every finished row, so a job that is stopped by its timeout still leaves
what it had measured.

Every system is driven through the same small set of primitives (start, one
blocking call, submit/gather, its map variants, cold start), so the workloads
below are written once. Top-level imports stay minimal: with the spawn start
method a child re-imports this module.
"""

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings

# Keep ray on the loopback interface (by default it binds the host's address)
# and stop it phoning home.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import workloads as wl  # noqa: E402

MB = 1_000_000
W3_SIZES = (8 * MB, 100 * MB)

CONFIG = {
    "full": dict(
        reps=5,
        w1_calls=2000,
        w1_calls_slow=200,
        w2_calls=20000,
        w2_calls_slow=2000,
        w3_calls={8 * MB: 10, 100 * MB: 3},
        w4_items=10000,
        w5_arrays=200,
        w6_sizes=(2, 32),
        w6_reps=5,
        base_rounds=5000,
        more_reps_seconds=0.5,
    ),
    "quick": dict(
        reps=2,
        w1_calls=500,
        w1_calls_slow=50,
        w2_calls=5000,
        w2_calls_slow=500,
        w3_calls={8 * MB: 3, 100 * MB: 1},
        w4_items=2000,
        w5_arrays=40,
        w6_sizes=(2, 32),
        w6_reps=1,
        base_rounds=1000,
        more_reps_seconds=0.0,
    ),
}

NWORKERS = 2

# A row whose repetitions are short gets more of them, until this many seconds have
# gone by in all (at most MAX_REPS): a median of 5 samples of a 2 ms map moves by
# 15 % from run to run on a shared machine. The same rule for every system; the
# reps column says how many each row took. Set from CONFIG by main().
_more_reps_seconds = 0.0
MAX_REPS = 51


def pool_chunksize(n_items, n_workers):
    """multiprocessing.Pool.map's default chunksize rule."""
    chunksize, extra = divmod(n_items, n_workers * 4)
    return chunksize + 1 if extra else max(chunksize, 1)


def touch(a):
    """Read one element per 4 KiB page, so that a zero-copy (mapped) result is
    paid for when it is used, as an array that was copied already was."""
    flat = a.reshape(-1)
    return float(flat[:: 4096 // flat.itemsize].sum())


class BarrierServer:
    """Parent side of workloads.socket_barrier: collects n check-ins, then
    releases them all."""

    def __init__(self, n):
        self.n = n
        self.dir = tempfile.mkdtemp(prefix="fdbench-")
        self.path = os.path.join(self.dir, "b.sock")
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(max(n, 16))
        self.srv.settimeout(600)
        self.pids = []
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        conns = []
        try:
            for _ in range(self.n):
                c, _ = self.srv.accept()
                conns.append(c)
                self.pids.append(int(c.makefile("rb").readline()))
            for c in conns:
                c.sendall(b"g")
        except Exception as e:  # reported by close()
            self.error = e
        finally:
            for c in conns:
                c.close()

    def close(self):
        self.thread.join(5)
        self.srv.close()
        try:
            os.unlink(self.path)
            os.rmdir(self.dir)
        except OSError:
            pass
        if self.error:
            raise RuntimeError(f"barrier failed: {self.error!r}")


def check_distinct(pids, n, what):
    if len(set(pids)) != n:
        raise RuntimeError(f"{what}: expected {n} distinct worker processes, got {len(set(pids))}")


# --------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------


class Peer:
    name = "?"
    slow = False  # fewer calls in W1/W2
    w1_label = "blocking call"
    w2_label = "submit all, then gather"

    def load(self):
        """Import the system (ImportError = not installed)."""

    def start(self, n):
        raise NotImplementedError

    def stop(self):
        pass

    def call(self, fn, *args):
        raise NotImplementedError

    def submit(self, i, fn, *args):
        raise NotImplementedError

    def gather(self, handles):
        raise NotImplementedError

    def maps(self, n_items):
        """[(key, label, callable(fn, items) -> list)]; key "chunk1" is one
        item per message, "chunked" is the system's batching."""
        raise NotImplementedError

    def maps_w5(self, n_items):
        return self.maps(n_items)

    def startup(self, n):
        """Seconds from nothing to n workers having answered; tears down."""
        raise NotImplementedError


class FastdistPeer(Peer):
    name = "fastdist"
    w1_label = "remotecall_fetch(noop, 2)"
    w2_label = "remotecall, alternating workers, then fetch all"

    def load(self):
        import fastdist

        self.fd = fastdist

    def start(self, n):
        self.pids = self.fd.addprocs(n)
        if len(self.pids) != n:
            raise RuntimeError(f"addprocs({n}) returned {self.pids!r}")

    def stop(self):
        pids = getattr(self, "pids", None)
        if pids:
            self.fd.rmprocs(*pids)
            self.pids = []

    def call(self, fn, *args):
        return self.fd.remotecall_fetch(fn, self.pids[0], *args)

    def submit(self, i, fn, *args):
        return self.fd.remotecall(fn, self.pids[i % len(self.pids)], *args)

    def gather(self, handles):
        fetch = self.fd.fetch
        return [fetch(h) for h in handles]

    def maps(self, n_items):
        pmap = self.fd.pmap
        return [
            ("chunk1", "pmap(batch_size=1)", lambda f, xs: pmap(f, xs, batch_size=1)),
            ("chunked", "pmap(batch_size='auto')", lambda f, xs: pmap(f, xs, batch_size="auto")),
        ]

    def startup(self, n):
        fd = self.fd
        t0 = time.perf_counter()
        pids = fd.addprocs(n)
        futs = [fd.remotecall(wl.getpid, p) for p in pids]
        got = [fd.fetch(f) for f in futs]
        t = time.perf_counter() - t0
        fd.rmprocs(*pids)
        check_distinct(got, n, "fastdist")
        return t


class FastdistTcpPeer(FastdistPeer):
    """fastdist with its same-host Unix-socket path switched off: the
    transport the TCP targets are about."""

    name = "fastdist-tcp"

    def load(self):
        os.environ["FASTDIST_UNIX_SOCKETS"] = "0"
        super().load()


class FastdistBasePeer(FastdistPeer):
    """fastdist as it was at another revision (run.py --base puts it first on
    PYTHONPATH): before and after in one run."""

    name = "fastdist-base"


class MpPeer(Peer):
    name = "mp"
    w1_label = "Pool.apply"
    w2_label = "Pool.apply_async, then .get() all"

    def load(self):
        import multiprocessing

        self.mp = multiprocessing

    def start(self, n):
        self.pool = self.mp.Pool(n)  # the platform default start method (fork)

    def stop(self):
        if getattr(self, "pool", None) is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def call(self, fn, *args):
        return self.pool.apply(fn, args)

    def submit(self, i, fn, *args):
        return self.pool.apply_async(fn, args)

    def gather(self, handles):
        return [h.get() for h in handles]

    def maps(self, n_items):
        p = self.pool
        return [
            ("chunked", "Pool.map (default chunksize)", lambda f, xs: p.map(f, xs)),
            ("chunk1", "Pool.map(chunksize=1)", lambda f, xs: p.map(f, xs, chunksize=1)),
        ]

    def maps_w5(self, n_items):
        p = self.pool
        return [
            ("chunked", "Pool.map (default chunksize)", lambda f, xs: p.map(f, xs)),
            ("chunk1", "Pool.imap (chunksize=1)", lambda f, xs: list(p.imap(f, xs))),
        ]

    def startup(self, n):
        ctx = self.mp.get_context("spawn")
        bar = BarrierServer(n)
        t0 = time.perf_counter()
        pool = ctx.Pool(n)
        got = pool.map(wl.socket_barrier, [bar.path] * n, chunksize=1)
        t = time.perf_counter() - t0
        pool.terminate()
        pool.join()
        bar.close()
        check_distinct(got, n, "Pool")
        return t


class CfPeer(Peer):
    name = "cf"
    w1_label = "executor.submit().result()"
    w2_label = "executor.submit, then .result() all"

    def load(self):
        import concurrent.futures

        self.cf = concurrent.futures

    def make(self, n):
        return self.cf.ProcessPoolExecutor(n)

    def start(self, n):
        self.n = n
        self.ex = self.make(n)

    def stop(self):
        if getattr(self, "ex", None) is not None:
            self.ex.shutdown(wait=True)
            self.ex = None

    def call(self, fn, *args):
        return self.ex.submit(fn, *args).result()

    def submit(self, i, fn, *args):
        return self.ex.submit(fn, *args)

    def gather(self, handles):
        return [h.result() for h in handles]

    def maps(self, n_items):
        ex = self.ex
        cs = pool_chunksize(n_items, self.n)
        return [
            ("chunk1", "executor.map (default chunksize=1)", lambda f, xs: list(ex.map(f, xs))),
            (
                "chunked",
                f"executor.map(chunksize={cs}, Pool's rule)",
                lambda f, xs: list(ex.map(f, xs, chunksize=cs)),
            ),
        ]

    def startup(self, n):
        import multiprocessing

        bar = BarrierServer(n)
        t0 = time.perf_counter()
        ex = self.cf.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))
        got = list(ex.map(wl.socket_barrier, [bar.path] * n))
        t = time.perf_counter() - t0
        ex.shutdown(wait=True)
        bar.close()
        check_distinct(got, n, "ProcessPoolExecutor")
        return t


class LokyPeer(CfPeer):
    name = "loky"

    def load(self):
        import loky

        self.loky = loky

    def make(self, n):
        return self.loky.get_reusable_executor(max_workers=n)

    def stop(self):
        if getattr(self, "ex", None) is not None:
            self.ex.shutdown(wait=True, kill_workers=True)
            self.ex = None

    def startup(self, n):
        bar = BarrierServer(n)
        t0 = time.perf_counter()
        ex = self.loky.get_reusable_executor(max_workers=n)
        got = list(ex.map(wl.socket_barrier, [bar.path] * n))
        t = time.perf_counter() - t0
        ex.shutdown(wait=True, kill_workers=True)
        bar.close()
        check_distinct(got, n, "loky")
        return t


class DaskPeer(Peer):
    name = "dask"
    slow = True
    w1_label = "client.submit().result()"
    w2_label = "client.submit(pure=False), then client.gather"

    def load(self):
        import logging

        import dask.distributed

        self.dd = dask.distributed
        logging.getLogger("distributed").setLevel(logging.ERROR)
        warnings.simplefilter("ignore")

    def _cluster(self, n):
        cluster = self.dd.LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=40,
        )
        return cluster, self.dd.Client(cluster)

    def start(self, n):
        self.cluster, self.client = self._cluster(n)
        self.client.wait_for_workers(n)

    def stop(self):
        if getattr(self, "client", None) is not None:
            self.client.close()
            self.cluster.close()
            self.client = None

    def call(self, fn, *args):
        return self.client.submit(fn, *args, pure=False).result()

    def submit(self, i, fn, *args):
        return self.client.submit(fn, *args, pure=False)

    def gather(self, handles):
        return self.client.gather(handles)

    def maps(self, n_items):
        c = self.client
        return [
            (
                "chunk1",
                "client.map(pure=False) + gather (one task per item, its default)",
                lambda f, xs: c.gather(c.map(f, xs, pure=False)),
            )
        ]

    def startup(self, n):
        t0 = time.perf_counter()
        cluster, client = self._cluster(n)
        client.wait_for_workers(n)
        got = client.run(wl.getpid)  # a call on every worker
        t = time.perf_counter() - t0
        client.close()
        cluster.close()
        check_distinct(list(got.values()), n, "dask")
        return t


class RayPeer(Peer):
    name = "ray"
    slow = True
    w1_label = "ray.get(f.remote())"
    w2_label = "f.remote() all, then ray.get(list)"

    def load(self):
        import ray

        self.ray = ray
        self._remote = {}

    def _init(self, n):
        self.ray.init(
            num_cpus=n,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )

    def start(self, n):
        self._init(n)

    def stop(self):
        if self.ray.is_initialized():
            self.ray.shutdown()

    def r(self, fn):
        rf = self._remote.get(fn)
        if rf is None:
            rf = self._remote[fn] = self.ray.remote(fn)
        return rf

    def call(self, fn, *args):
        return self.ray.get(self.r(fn).remote(*args))

    def submit(self, i, fn, *args):
        return self.r(fn).remote(*args)

    def gather(self, handles):
        return self.ray.get(handles)

    def maps(self, n_items):
        ray = self.ray
        return [
            (
                "chunk1",
                "one task per item: ray.get([f.remote(x) ...]), its default",
                lambda f, xs: ray.get([self.r(f).remote(x) for x in xs]),
            )
        ]

    def startup(self, n):
        ray = self.ray
        t0 = time.perf_counter()
        self._init(n)
        actor = ray.remote(num_cpus=1)(wl.Pinger)
        actors = [actor.remote() for _ in range(n)]
        got = ray.get([a.ping.remote() for a in actors])
        t = time.perf_counter() - t0
        del actors
        ray.shutdown()
        self._remote = {}
        check_distinct(got, n, "ray")
        return t


PEERS = {
    "fastdist": FastdistPeer,
    "fastdist-tcp": FastdistTcpPeer,
    "fastdist-base": FastdistBasePeer,
    "mp": MpPeer,
    "cf": CfPeer,
    "loky": LokyPeer,
    "dask": DaskPeer,
    "ray": RayPeer,
}

# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------


class Recorder:
    def __init__(self, path, peer, workload, cfg_name):
        self.path = path
        self.doc = {
            "peer": peer,
            "workload": workload,
            "config": cfg_name,
            "status": "running",
            "error": None,
            "rows": [],
        }
        self.flush()

    def flush(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f)
        os.replace(tmp, self.path)

    def row(self, workload, key, label, unit, higher_better, samples, ref=None, note=None, error=None):
        self.doc["rows"].append(
            dict(
                workload=workload,
                key=key,
                label=label,
                unit=unit,
                higher_better=higher_better,
                samples=samples,
                ref=ref if ref is not None else key,
                note=note() if callable(note) else note,
                error=error,
            )
        )
        self.flush()
        s = f"{min(samples):.4g}..{max(samples):.4g}" if samples else error
        print(f"  {workload} {self.doc['peer']:>8} {label}: {s} {unit}", file=sys.stderr, flush=True)

    def status(self, status, error=None):
        self.doc["status"] = status
        self.doc["error"] = error
        self.flush()


def measure_row(rec, workload, key, label, unit, higher_better, fn, reps, ref=None, note=None):
    """fn() -> one sample; a failure is recorded on the row, not fatal."""
    samples = []
    start = time.perf_counter()
    try:
        for _ in range(reps):
            samples.append(fn())
        while len(samples) < MAX_REPS and time.perf_counter() - start < _more_reps_seconds:
            samples.append(fn())
    except Exception as e:
        traceback.print_exc()
        rec.row(workload, key, label, unit, higher_better, samples, ref, note, error=short_error(e))
        return
    rec.row(workload, key, label, unit, higher_better, samples, ref, note)


def short_error(e):
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def w1(peer, rec, cfg):
    n = cfg["w1_calls_slow"] if peer.slow else cfg["w1_calls"]
    for _ in range(max(20, n // 10)):
        peer.call(wl.noop)

    def rep():
        call = peer.call
        noop = wl.noop
        t0 = time.perf_counter()
        for _ in range(n):
            call(noop)
        return (time.perf_counter() - t0) / n * 1e6

    measure_row(rec, "W1", "rtt", peer.w1_label, "µs", False, rep, cfg["reps"], note=f"{n:,} calls per repetition")


def w2(peer, rec, cfg):
    n = cfg["w2_calls_slow"] if peer.slow else cfg["w2_calls"]
    peer.gather([peer.submit(i, wl.noop) for i in range(min(n, 500))])

    def rep():
        submit = peer.submit
        noop = wl.noop
        t0 = time.perf_counter()
        hs = [submit(i, noop) for i in range(n)]
        peer.gather(hs)
        return n / (time.perf_counter() - t0)

    measure_row(rec, "W2", "pipelined", peer.w2_label, "calls/s", True, rep, cfg["reps"], note=f"{n:,} calls")


def w3(peer, rec, cfg):
    import numpy as np

    for size in W3_SIZES:
        k = cfg["w3_calls"][size]
        mb = size // MB
        arr = np.arange(size // 8, dtype=np.float64)

        def to_rep():
            t0 = time.perf_counter()
            for _ in range(k):
                got = peer.call(wl.nbytes_of, arr)
                if got != size:
                    raise RuntimeError(f"worker saw {got} bytes")
            return k * size / (time.perf_counter() - t0) / 1e9

        def from_rep():
            t0 = time.perf_counter()
            for _ in range(k):
                a = peer.call(wl.make_array, size)
                touch(a)
                if a.nbytes != size:
                    raise RuntimeError(f"received {a.nbytes} bytes")
                del a
            return k * size / (time.perf_counter() - t0) / 1e9

        note = f"{k} call(s) per repetition"
        try:  # warm-up: connections, worker-side array, allocator
            peer.call(wl.nbytes_of, arr)
            touch(peer.call(wl.make_array, size))
        except Exception as e:
            traceback.print_exc()
            for d in ("to", "from"):
                rec.row("W3", f"{mb}MB {d}", f"{mb} MB {d} worker", "GB/s", True, [], note=note, error=short_error(e))
            continue
        measure_row(rec, "W3", f"{mb}MB to", f"{mb} MB to worker", "GB/s", True, to_rep, cfg["reps"], note=note)
        measure_row(rec, "W3", f"{mb}MB from", f"{mb} MB from worker", "GB/s", True, from_rep, cfg["reps"], note=note)



def run_maps(peer, rec, cfg, workload, variants, fn, items, check, note):
    for key, label, mapper in variants:
        def rep(mapper=mapper):
            t0 = time.perf_counter()
            out = mapper(fn, items)
            t = time.perf_counter() - t0
            check(out)
            return t

        try:
            check(mapper(fn, items[: max(4, len(items) // 20)]))  # warm-up
        except Exception as e:
            traceback.print_exc()
            rec.row(workload, key, label, "s", False, [], note=note, error=short_error(e))
            continue
        measure_row(rec, workload, key, label, "s", False, rep, cfg["reps"], note=note)


def w4(peer, rec, cfg):
    n = cfg["w4_items"]
    items = list(range(n))

    def check(out):
        out = list(out)
        if out[:2] != [1, 2][: len(out)] or out[-1] != len(out):
            raise RuntimeError("wrong map result")

    run_maps(peer, rec, cfg, "W4", peer.maps(n), wl.inc, items, check, f"{n:,} items")


def w5(peer, rec, cfg):
    import numpy as np

    n = cfg["w5_arrays"]
    size = 1_000_000
    arrays = [np.full(size, float(i)) for i in range(n)]
    expect = [i * size**0.5 for i in range(n)]

    def check(out):
        out = list(out)
        if any(abs(a - b) > 1e-6 * (b + 1) for a, b in zip(out, expect)):
            raise RuntimeError("wrong norms")

    run_maps(peer, rec, cfg, "W5", peer.maps_w5(n), wl.norm, arrays, check, f"{n} arrays of 8 MB")


def w6(peer, rec, cfg):
    """Cold start. run.py calls this once per repetition and size, each time in
    a fresh process (cfg["w6_n"] set), so that nothing a system keeps between
    start-ups in one process (a fork server, a warm import cache) makes its
    later repetitions warmer than the first; the repetitions are merged there.
    Run by hand without w6_n, it does all sizes and repetitions in-process."""
    fresh = cfg.get("w6_n") is not None
    sizes = [cfg["w6_n"]] if fresh else cfg["w6_sizes"]
    for n in sizes:
        def rep(n=n):
            t = peer.startup(n)
            time.sleep(0.5)  # let the previous processes' exit settle
            return t

        reps = 1 if fresh else cfg["w6_reps"]
        note = "each repetition in a fresh process" if fresh else "repetitions in one process"
        measure_row(rec, "W6", f"{n} workers", f"{n} workers answering", "s", False, rep, reps, note=note)
        if fresh and peer.name == "fastdist":
            # The same again in the same process: what a program that adds
            # workers a second time sees (fastdist's fork server is up by now).
            measure_row(rec, "W6", f"{n} workers again", f"{n} workers answering, again in the same process",
                        "s", False, rep, 2, ref=f"{n} workers", note="after a first addprocs in this process")


WORKLOADS = {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "W5": w5, "W6": w6}


def w8(peer, rec, cfg):
    """W8 lives in w8.py: a big array to 8 local workers, time and memory."""
    import w8 as w8_module

    w8_module.run(peer, rec, cfg, measure_row)


WORKLOADS["W8"] = w8
# How many workers a workload starts, when not NWORKERS.
WORKERS_FOR = {"W8": 8}


def w7(peer, rec, cfg):
    """W7 lives in w7_hosts.py: 2, 8 and 32 workers on 4 network-namespace hosts."""
    import w7_hosts

    w7_hosts.run(peer, rec, cfg, measure_row)


WORKLOADS["W7"] = w7
WORKERS_FOR["W7"] = 0  # it starts its own, on other hosts

# --------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------


def base_c(rec, cfg, exe):
    import subprocess

    if not exe or not os.path.exists(exe):
        raise RuntimeError("pingpong binary not built (gcc missing or failed)")
    reps = cfg["reps"]
    rounds = str(cfg["base_rounds"])

    def run(mode, bulk, *cpus):
        out = subprocess.run(
            [exe, mode, rounds, str(bulk), str(reps), *map(str, cpus)],
            capture_output=True, text=True, timeout=300, check=True,
        ).stdout
        return json.loads(out)

    for mode, name in (("tcp", "TCP"), ("unix", "Unix")):
        d = run(mode, 100 * MB)
        note = f"C, {d['rounds']:,} round trips per repetition, placed by the scheduler"
        rec.row("W1", f"c {mode} rtt", f"C {name} ping-pong", "µs", False, d["rtt_us"], ref="rtt", note=note)
        note = "C, 100 MB into a preallocated buffer"
        rec.row("W3", f"c {mode} to", f"C {name} bulk 100 MB, to", "GB/s", True, d["to_gbs"], ref="100MB to", note=note)
        rec.row("W3", f"c {mode} from", f"C {name} bulk 100 MB, from", "GB/s", True, d["from_gbs"], ref="100MB from", note=note)
    # Placement decides most of a round trip here (a wake-up on another core
    # costs tens of µs): show both extremes next to the scheduler's choice.
    if (os.cpu_count() or 1) >= 2:
        for mode, name in (("tcp", "TCP"), ("unix", "Unix")):
            for cpus, where in (((0, 1), "two cores pinned"), ((0, 0), "one core pinned")):
                d = run(mode, 1, *cpus)
                rec.row("W1", f"c {mode} rtt {where}", f"C {name} ping-pong, {where}", "µs", False, d["rtt_us"],
                        ref="rtt", note=f"C, {d['rounds']:,} round trips per repetition")


def _recv_exact(s, mv):
    got = 0
    n = len(mv)
    while got < n:
        k = s.recv_into(mv[got:])
        if not k:
            raise EOFError
        got += k


def _py_sockets(mode, rounds, bulk, reps):
    import numpy as np

    if mode == "tcp":
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        c = socket.create_connection(lsock.getsockname())
        p, _ = lsock.accept()
        lsock.close()
        for s in (p, c):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        p, c = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            p.close()
            buf = np.ones(bulk, dtype=np.uint8)
            mv = memoryview(buf).cast("B")
            msg = bytearray(8)
            for _ in range(reps + 1):
                for _ in range(rounds):
                    _recv_exact(c, memoryview(msg))
                    c.sendall(msg)
                _recv_exact(c, mv)
                c.sendall(b"k")
                _recv_exact(c, memoryview(msg)[:1])
                c.sendall(mv)
        finally:
            os._exit(0)
    c.close()
    buf = np.ones(bulk, dtype=np.uint8)
    mv = memoryview(buf).cast("B")
    msg = bytearray(8)
    mmv = memoryview(msg)
    rtt, to, frm = [], [], []
    for r in range(reps + 1):  # repetition 0 is a warm-up
        t0 = time.perf_counter()
        for _ in range(rounds):
            p.sendall(msg)
            _recv_exact(p, mmv)
        t_rtt = (time.perf_counter() - t0) / rounds * 1e6
        t0 = time.perf_counter()
        p.sendall(mv)
        _recv_exact(p, mmv[:1])
        t_to = bulk / (time.perf_counter() - t0) / 1e9
        t0 = time.perf_counter()
        p.sendall(b"g")
        _recv_exact(p, mv)
        t_from = bulk / (time.perf_counter() - t0) / 1e9
        if r:
            rtt.append(t_rtt)
            to.append(t_to)
            frm.append(t_from)
    os.waitpid(pid, 0)
    p.close()
    return rtt, to, frm


def base_pysock(rec, cfg, exe):
    for mode, name in (("tcp", "TCP"), ("unix", "Unix")):
        rtt, to, frm = _py_sockets(mode, cfg["base_rounds"], 100 * MB, cfg["reps"])
        note = f"Python, {cfg['base_rounds']:,} round trips per repetition"
        rec.row("W1", f"py {mode} rtt", f"Python {name} ping-pong", "µs", False, rtt, ref="rtt", note=note)
        note = "Python sendall / recv_into a preallocated buffer"
        rec.row("W3", f"py {mode} to", f"Python {name} bulk 100 MB, to", "GB/s", True, to, ref="100MB to", note=note)
        rec.row("W3", f"py {mode} from", f"Python {name} bulk 100 MB, from", "GB/s", True, frm, ref="100MB from", note=note)


def base_memcpy(rec, cfg, exe):
    import numpy as np

    size = 100 * MB
    src = np.arange(size // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    k = 3

    def fresh():
        t0 = time.perf_counter()
        for _ in range(k):
            d = np.copy(src)
            del d
        return k * size / (time.perf_counter() - t0) / 1e9

    def pre():
        t0 = time.perf_counter()
        for _ in range(k):
            np.copyto(dst, src)
        return k * size / (time.perf_counter() - t0) / 1e9

    fresh()
    measure_row(rec, "W3", "np.copy", "np.copy 100 MB (new destination)", "GB/s", True, fresh, cfg["reps"], ref="100MB from",
                note="memory bandwidth reference, includes first touch of the new array")
    measure_row(rec, "W3", "np.copyto", "np.copyto 100 MB (preallocated)", "GB/s", True, pre, cfg["reps"], ref="100MB from",
                note="memory bandwidth reference")


BASELINES = {"c": base_c, "pysock": base_pysock, "memcpy": base_memcpy}

# --------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("peer")
    ap.add_argument("workload")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--exe", help="C ping-pong binary")
    ap.add_argument("--w6-n", type=int, help="W6: one cold start of this many workers (one repetition)")
    a = ap.parse_args(argv)

    cfg_name = "quick" if a.quick else "full"
    cfg = dict(CONFIG[cfg_name])
    if a.reps:
        cfg["reps"] = a.reps
        cfg["w6_reps"] = a.reps
    cfg["w6_n"] = a.w6_n
    global _more_reps_seconds
    _more_reps_seconds = cfg["more_reps_seconds"]
    rec = Recorder(a.out, a.peer, a.workload, cfg_name)

    if a.peer in BASELINES:
        try:
            BASELINES[a.peer](rec, cfg, a.exe)
        except Exception as e:
            traceback.print_exc()
            rec.status("failed", short_error(e))
            return 1
        rec.status("ok")
        return 0

    peer = PEERS[a.peer]()
    try:
        peer.load()
    except Exception as e:
        traceback.print_exc()
        rec.status("not installed", short_error(e))
        return 1
    started = False
    try:
        if a.workload != "W6":
            try:
                peer.start(WORKERS_FOR.get(a.workload, NWORKERS))
                started = True
            except Exception as e:
                traceback.print_exc()
                rec.status("failed to start", short_error(e))
                return 1
        WORKLOADS[a.workload](peer, rec, cfg)
        rec.status("ok")
    except Exception as e:
        traceback.print_exc()
        rec.status("failed", short_error(e))
        return 1
    finally:
        if started:
            try:
                peer.stop()
            except Exception:
                traceback.print_exc()
    return 0


if __name__ == "__main__":
    sys.exit(main())
