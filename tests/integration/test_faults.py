"""Faults injected for real: workers killed, stopped, busy, interrupted, masters killed.

Every test here starts real worker processes and hurts them with signals; the
assertions are about what the rest of the cluster sees, and how fast.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from support import UNJOINED_MASTER, os_alive, reap_master, wait_until

import fastdist as fd
from fastdist import node as _node

# How long every pending call on a killed worker may take to fail.
DEATH_NOTICE_SECONDS = 5.0


# -- helpers ------------------------------------------------------------------------------


def open_fds():
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return fds


def worker_ospid(w):
    return fd.remotecall_fetch(os.getpid, w)


def block_until_killed(started):
    started.put(os.getpid())
    time.sleep(600)


def make_future_owned_here():
    # A Future whose value lives on this worker and is not cached by the caller.
    return fd.remotecall(lambda: 41, fd.myid())


def spin(seconds):
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def spin_forever():
    while True:
        pass


def numpy_loop_forever():
    a = np.random.default_rng(0).random((200, 200))
    while True:
        a = np.sin(a @ a) / 200.0


def long_matmul():
    """Long numpy calls (about a second each, GIL released) for more than 4 s in all,
    however fast the machine is."""
    a = np.random.default_rng(0).random((3000, 3000))
    t = time.monotonic()
    while time.monotonic() - t < 4.5:
        a @ a
    return time.monotonic() - t


def ignore_sigterm_and_hold_the_gil(started):
    import ctypes

    started.put(os.getpid())
    libc = ctypes.CDLL(None)
    libc.signal.restype = ctypes.c_void_p
    libc.signal(signal.SIGTERM, ctypes.c_void_p(1))  # SIG_IGN, from any thread
    # Catastrophic backtracking: minutes inside one C call that never releases the GIL,
    # so not even the worker's I/O thread can act on an EXIT frame.
    re.match(r"(a+)+$", "a" * 40 + "b")


class Outcome:
    """Runs a blocking call on a thread; records what it raised and when."""

    def __init__(self, name, fn):
        self.name = name
        self.exc = None
        self.value = None
        self.at = None
        self.thread = threading.Thread(target=self._run, args=(fn,), name=f"test-{name}")
        self.thread.start()

    def _run(self, fn):
        try:
            self.value = fn()
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            self.exc = exc
        self.at = time.monotonic()


# -- worker death -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigkill_mid_call_fails_every_waiter_and_leaks_nothing(cluster):
    w, other = cluster.add(2)
    n = _node.current()
    ospid = worker_ospid(w)
    fd.remotecall_fetch(os.getpid, other)
    pool = fd.WorkerPool([w])  # a pool call then surely goes to w
    assert w in fd.default_worker_pool().workers()

    cached = fd.remotecall(lambda: 42, w)
    assert cached.fetch() == 42
    pushed = fd.remotecall(lambda: 43, w)
    wait_until(pushed.isready, 5, "the pushed result")
    owned = fd.remotecall_fetch(make_future_owned_here, w)
    assert owned.where == w
    rc = fd.RemoteChannel(w)

    fds_before = open_fds()
    sock_fd = n.peers[w].conn.fd
    threads_before = {t.name for t in threading.enumerate()
                      if not t.name.startswith("fastdist-call")}

    started = fd.RemoteChannel(lambda: fd.Channel(10), 1)
    fut = fd.remotecall(block_until_killed, w, started)
    fut2 = fd.remotecall(block_until_killed, w, started)
    waits = [
        Outcome("fetch", fut.fetch),
        Outcome("wait", lambda: fd.wait(fut2)),
        Outcome("remotecall_fetch", lambda: fd.remotecall_fetch(block_until_killed, w, started)),
        Outcome("remotecall_wait", lambda: fd.remotecall_wait(block_until_killed, w, started)),
        Outcome("take", rc.take),
        Outcome("pool", lambda: fd.remotecall_fetch(block_until_killed, pool, started)),
    ]
    for _ in range(5):
        assert started.take(timeout=10) == ospid  # every blocking call is running on w

    killed_at = time.monotonic()
    os.kill(ospid, signal.SIGKILL)
    for o in waits:
        o.thread.join(DEATH_NOTICE_SECONDS + 1)
    for o in waits:
        assert not o.thread.is_alive(), f"{o.name} still waits on the dead worker"
        assert isinstance(o.exc, fd.ProcessExitedException), f"{o.name}: {o.exc!r}"
        assert o.exc.worker_id == w
        assert o.at - killed_at < DEATH_NOTICE_SECONDS, f"{o.name} took {o.at - killed_at:.1f} s"

    # It leaves the cluster and every pool.
    assert w not in fd.workers() and other in fd.workers()
    assert w not in fd.default_worker_pool().workers()
    assert pool.workers() == []
    with pytest.raises(RuntimeError, match="No active worker"):
        fd.remotecall_fetch(os.getpid, pool)
    # Values it owned are gone; values this process already holds are not.
    with pytest.raises(fd.ProcessExitedException):
        owned.fetch(timeout=5)
    with pytest.raises(fd.ProcessExitedException):
        fd.put(rc, 1)
    assert cached.fetch() == 42
    assert pushed.fetch() == 43
    with pytest.raises(fd.ProcessExitedException):
        fd.remotecall_fetch(os.getpid, w)
    with pytest.raises(fd.ProcessExitedException):
        fd.remotecall(os.getpid, w)
    assert fd.remotecall_fetch(lambda: 7, other) == 7

    # Nothing of the dead worker stays open in the master: its socket and both output
    # pipes close, its helper threads end, and no call thread stays blocked on it.
    state = {}

    def settled():
        now = open_fds()
        leaked = {k: v for k, v in now.items() if fds_before.get(k) != v}
        gone = [k for k in fds_before if k not in now]
        names = {t.name for t in threading.enumerate() if not t.name.startswith("fastdist-call")}
        pool_idle = n.callpool.nidle == n.callpool.nthreads
        state.update(leaked=leaked, socket_closed=sock_fd in gone, closed=len(gone),
                     new_threads=names - threads_before, idle=n.callpool.nidle,
                     helpers=n.callpool.nthreads)
        return (not leaked and sock_fd in gone and len(gone) >= 3
                and names <= threads_before and pool_idle)

    try:
        wait_until(settled, 10, "the master to drop every fd and thread of the dead worker")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {state}") from None
    assert not os_alive(ospid)


def script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


@pytest.mark.timeout(60)
def test_addprocs_with_a_launcher_that_exits_raises_and_changes_nothing(cluster, tmp_path):
    (w,) = cluster.add(1)
    exits = script(tmp_path, "exits.sh", """\
        #!/bin/sh
        echo "about to fail"
        exit 3
        """)
    t = time.monotonic()
    with pytest.raises(fd.ClusterError, match="exit code 3"):
        fd.addprocs(2, exename=exits)
    assert time.monotonic() - t < 10
    assert fd.workers() == [w]
    assert fd.default_worker_pool().workers() == [w]
    assert fd.remotecall_fetch(lambda: 1, w) == 1


@pytest.mark.timeout(60)
def test_worker_dying_while_it_joins_fails_addprocs_promptly(cluster, tmp_path, monkeypatch):
    # This launcher runs a real worker that dies the moment the master's IDENTIFY
    # arrives: after the handshake, before it has joined.
    dies = script(tmp_path, "dies_on_join.py", f"""\
        #!{sys.executable}
        import os, runpy, sys
        import fastdist.cluster
        fastdist.cluster._join = lambda *a: os._exit(7)
        sys.argv = ["fastdist.worker", *sys.argv[3:]]  # drop "-m fastdist.worker"
        runpy.run_module("fastdist.worker", run_name="__main__")
        """)
    monkeypatch.setenv("FASTDIST_WORKER_TIMEOUT", "60")
    before = fd.workers()
    t = time.monotonic()
    with pytest.raises(fd.ClusterError):
        fd.addprocs(2, exename=dies)
    assert time.monotonic() - t < 10, "addprocs waited for a worker that had died"
    assert fd.workers() == before


@pytest.mark.timeout(60)
def test_worker_hanging_while_it_joins_fails_addprocs_after_the_timeout(cluster, tmp_path,
                                                                        monkeypatch):
    hangs = script(tmp_path, "stops_on_join.py", f"""\
        #!{sys.executable}
        import os, runpy, signal, sys
        import fastdist.cluster
        fastdist.cluster._join = lambda *a: os.kill(os.getpid(), signal.SIGSTOP)
        sys.argv = ["fastdist.worker", *sys.argv[3:]]
        runpy.run_module("fastdist.worker", run_name="__main__")
        """)
    monkeypatch.setenv("FASTDIST_WORKER_TIMEOUT", "3")
    t = time.monotonic()
    with pytest.raises(fd.ClusterError, match="FASTDIST_WORKER_TIMEOUT"):
        fd.addprocs(1, exename=hangs)
    assert time.monotonic() - t < 10
    assert fd.workers() == [1]
    # The stopped process is killed (the cluster fixture fails on any left behind).


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stage", ["starting", "listening"])
def test_sigkill_during_launch_raises_cluster_error(cluster, monkeypatch, stage):
    import fastdist.cluster

    (w,) = cluster.add(1)
    read_address = fastdist.cluster.read_worker_address
    killed = []

    def kill_then_read(config, pid):
        # The master is about to read a new worker's address: kill that worker while it
        # is still starting, or just after it has printed its address (it listens, and
        # the master is about to connect).
        if stage == "starting":
            os.kill(config.ospid, signal.SIGKILL)
            killed.append(config.ospid)
            return read_address(config, pid)
        address = read_address(config, pid)
        os.kill(config.ospid, signal.SIGKILL)
        killed.append(config.ospid)
        wait_until(lambda: not os_alive(config.ospid), 5, "the killed worker to be gone")
        return address

    monkeypatch.setattr(fastdist.cluster, "read_worker_address", kill_then_read)
    t = time.monotonic()
    with pytest.raises(fd.ClusterError):
        fd.addprocs(2)
    assert time.monotonic() - t < 10
    assert len(killed) == 2
    assert fd.workers() == [w]
    assert fd.default_worker_pool().workers() == [w]
    monkeypatch.undo()
    (w2,) = cluster.add(1)
    assert w2 > w and fd.remotecall_fetch(lambda: 5, w2) == 5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["busy_ignoring_sigterm", "sigstopped"])
def test_rmprocs_kills_an_unresponsive_worker(cluster, how):
    (w,) = cluster.add(1)
    ospid = worker_ospid(w)
    if how == "sigstopped":
        os.kill(ospid, signal.SIGSTOP)
    else:
        started = fd.RemoteChannel(lambda: fd.Channel(1), 1)
        fd.remote_do(ignore_sigterm_and_hold_the_gil, w, started)
        assert started.take(timeout=10) == ospid

        def unresponsive():
            try:
                fd.remotecall(os.getpid, w).fetch(timeout=1)
            except TimeoutError:
                return True
            return False

        # Once the call holds the GIL, the worker can no longer answer anything.
        wait_until(unresponsive, 15, "the worker to stop answering")
    t = time.monotonic()
    fd.rmprocs(w, waitfor=20)
    assert time.monotonic() - t < 10
    assert w not in fd.workers()
    wait_until(lambda: not os_alive(ospid), 5, f"worker process {ospid} to be gone")


MASTER_SCRIPT = """\
import os, sys, time
import fastdist as fd

def spin():
    while True:
        pass

pids = fd.addprocs(2)
fd.remote_do(spin, pids[1])
print(" ".join(str(fd.remotecall_fetch(os.getpid, p)) for p in pids), flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(60)
def test_workers_never_outlive_a_killed_master(tmp_path):
    path = tmp_path / "master.py"
    path.write_text(MASTER_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    master = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, env=env,
                              start_new_session=True)
    ospids: list[int] = []
    try:
        line = master.stdout.readline().decode()
        ospids = [int(x) for x in line.split()]
        assert len(ospids) == 2 and all(os_alive(p) for p in ospids), line
        master.kill()
        master.wait(10)
        wait_until(lambda: not any(os_alive(p) for p in ospids), 5,
                   f"workers {ospids} to exit after their master was killed")
    finally:
        reap_master(master, ospids)


@pytest.mark.timeout(60)
def test_workers_exit_when_the_master_dies_before_connecting(tmp_path):
    path = tmp_path / "master.py"
    path.write_text(UNJOINED_MASTER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), FASTDIST_WORKER_TIMEOUT="60")
    master = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, env=env,
                              start_new_session=True)
    ospids = []
    try:
        for _ in range(2):
            ospids.append(int(master.stdout.readline()))
        wait_until(lambda: all(os_alive(p) for p in ospids), 5, "the workers to start")
        master.kill()
        master.wait(10)
        wait_until(lambda: not any(os_alive(p) for p in ospids), 5,
                   f"workers {ospids} to exit after their master died")
    finally:
        reap_master(master, ospids)


# -- liveness -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_stopped_worker_is_declared_dead_but_busy_ones_are_not(cluster, monkeypatch):
    monkeypatch.setenv("FASTDIST_HEARTBEAT_TIMEOUT", "3")
    stopped, spinning, crunching, chatty = cluster.add(4)
    ospid = worker_ospid(stopped)
    started = fd.RemoteChannel(lambda: fd.Channel(10), 1)
    pending = fd.remotecall(block_until_killed, stopped, started)
    assert started.take(timeout=10) == ospid
    busy_py = fd.remotecall(spin, spinning, 10)
    busy_np = fd.remotecall(long_matmul, crunching)
    # Steady traffic with another worker meanwhile: it must not hide the silence.
    chatting = threading.Event()
    chatter = Outcome("chatter", lambda: [fd.remotecall_fetch(time.sleep, chatty, 0.02)
                                          for _ in iter(chatting.is_set, True)])

    os.kill(ospid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    waiter = Outcome("remotecall_fetch", lambda: fd.remotecall_fetch(os.getpid, stopped))
    try:
        with pytest.raises(fd.ProcessExitedException):
            pending.fetch(timeout=20)
    finally:
        chatting.set()
        chatter.thread.join(5)
    assert chatter.exc is None and len(chatter.value) > 50
    noticed = time.monotonic() - stopped_at
    # Silence is measured from the last bytes seen, up to a tick (1 s) before the stop.
    assert 2 <= noticed < 3 + 3, f"declared dead after {noticed:.1f} s with a 3 s timeout"
    waiter.thread.join(2)
    assert isinstance(waiter.exc, fd.ProcessExitedException)
    assert stopped not in fd.workers()

    # The busy ones outlast the timeout several times over and stay members.
    assert busy_py.fetch(timeout=30) > 0
    assert busy_np.fetch(timeout=60) > 3, "the numpy call was meant to outlast the timeout"
    assert {spinning, crunching} <= set(fd.workers())
    assert fd.remotecall_fetch(lambda: 1, spinning) == 1
    assert fd.remotecall_fetch(lambda: 2, crunching) == 2
    wait_until(lambda: not os_alive(ospid), 10, "the stopped worker to be killed")


def slow_reader(seconds, switch_interval):
    # A thread that always wants the GIL, and a long switch interval: this worker's
    # I/O thread gets the GIL back only every `switch_interval` s, so it reads slowly.
    sys.setswitchinterval(switch_interval)
    threading.Thread(target=spin, args=(seconds,), daemon=True).start()


@pytest.mark.timeout(60)
def test_a_long_transfer_is_not_mistaken_for_silence(cluster, monkeypatch):
    # While a worker reads one long frame it has nothing to answer with (a ping queued
    # behind the frame arrives only after it): the sender must still hear from it.
    monkeypatch.setenv("FASTDIST_HEARTBEAT_TIMEOUT", "3")
    (w,) = cluster.add(1)
    fd.remotecall_fetch(slow_reader, w, 40, 0.05)
    nbytes, took = 400 * 2**20, 0.0
    while took < 4.5:  # the transfer must outlast the timeout to test anything
        assert nbytes <= 1600 * 2**20, f"even {nbytes >> 21} MiB took only {took:.1f} s"
        big = np.ones(nbytes, dtype=np.uint8)
        t = time.monotonic()
        assert fd.remotecall_fetch(lambda a: a.nbytes, w, big) == big.nbytes
        took = time.monotonic() - t
        del big
        nbytes *= 2
    assert w in fd.workers()


# -- interrupt ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loop", [spin_forever, numpy_loop_forever])
def test_interrupt_stops_a_running_loop_and_the_worker_serves_on(cluster, loop):
    (w,) = cluster.add(1)
    ospid = worker_ospid(w)
    started = fd.RemoteChannel(lambda: fd.Channel(10), 1)

    def run(ch):
        ch.put(1)
        loop()

    fut = fd.remotecall(run, w, started)
    started.take(timeout=10)
    time.sleep(0.3)  # well inside the loop
    t = time.monotonic()
    fd.interrupt(w)
    with pytest.raises(fd.RemoteException) as info:
        fut.fetch(timeout=10)
    assert time.monotonic() - t < 1.0
    assert isinstance(info.value.__cause__, KeyboardInterrupt)
    assert "KeyboardInterrupt" in str(info.value)
    assert fd.remotecall_fetch(os.getpid, w) == ospid
    assert fd.remotecall_fetch(spin, w, 0.2) > 0


@pytest.mark.timeout(60)
def test_interrupting_an_idle_worker_does_nothing(cluster):
    (w,) = cluster.add(1)
    ospid = worker_ospid(w)
    fd.interrupt(w)
    fd.interrupt()
    fd.interrupt([w])
    # A call started afterwards is not hit by a stale interrupt.
    assert fd.remotecall_fetch(spin, w, 0.5) > 0
    assert fd.remotecall_fetch(os.getpid, w) == ospid
    assert w in fd.workers()


def nested_calls_forever(started):
    started.put(1)
    while True:
        fd.remotecall_fetch(int, 1, "7")  # waits for pid 1, reading that link itself


@pytest.mark.timeout(90)
def test_interrupting_nested_calls_loses_no_other_call(cluster):
    # A call waiting for a reply reads its connection itself and dispatches every frame
    # it finds there, most of them other calls'. An interrupt must not land in the
    # middle of that, or those frames are dropped and their callers hang.
    (w,) = cluster.add(1)
    stop = threading.Event()

    def other_calls():
        n = 0
        while not stop.is_set():
            try:
                assert fd.remotecall(lambda x: x, w, n).fetch(timeout=10) == n
            except fd.RemoteException as exc:  # the interrupt hit this call: fine
                assert isinstance(exc.__cause__, KeyboardInterrupt)
            n += 1
        return n

    started = fd.RemoteChannel(lambda: fd.Channel(1), 1)
    others = [Outcome(f"other-{i}", other_calls) for i in range(2)]
    interrupted = 0
    end = time.monotonic() + 6
    try:
        while time.monotonic() < end and not any(o.exc for o in others):
            fut = fd.remotecall(nested_calls_forever, w, started)
            started.take(timeout=10)
            time.sleep(0.03)  # a few nested round trips, with other calls' frames among them
            fd.interrupt(w)
            with pytest.raises(fd.RemoteException) as info:
                fut.fetch(timeout=10)
            assert isinstance(info.value.__cause__, KeyboardInterrupt)
            interrupted += 1
    finally:
        stop.set()
        for o in others:
            o.thread.join(15)
    for o in others:
        assert o.exc is None, f"{o.name}: {o.exc!r}"
        assert o.value > 0
    assert interrupted > 20
    assert fd.remotecall_fetch(lambda: 3, w) == 3


# -- a host cut off --------------------------------------------------------------------------


def _ssh_flags(net):
    flags = []
    for h in net.hosts:
        flags += ["-i", h.sshd.key_path]
    return flags + ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]


@pytest.mark.timeout(120)
def test_host_cut_off_mid_pmap_finishes_on_the_rest(cluster, netns_hosts, monkeypatch):
    # No TCP error arrives from a host whose link is cut: only the heartbeat notices.
    monkeypatch.setenv("FASTDIST_HEARTBEAT_TIMEOUT", "3")
    h0, h1 = netns_hosts.hosts
    pids = fd.addprocs([(f"{h0.sshd.user}@{h0.addr}", 1), (f"{h1.sshd.user}@{h1.addr}", 1)],
                       sshflags=_ssh_flags(netns_hosts))
    cluster.pids.extend(pids)
    host_of = {p: fd.remotecall_fetch(lambda: fd.node.current().host, p) for p in pids}
    (lost,) = [p for p in pids if host_of[p] == h1.addr]
    (kept,) = [p for p in pids if host_of[p] == h0.addr]

    def where(x):  # by value: the remote hosts cannot import this test module
        time.sleep(0.05)
        return x, fd.myid()

    data = list(range(200))
    cut_at = []

    def source():
        for i in data:
            if i == 40:
                netns_hosts.cut(1)  # mid-run: the host vanishes with calls in flight
                cut_at.append(time.monotonic())
            yield i

    got = fd.pmap(where, source(), retry_delays=[0.1] * 5)
    assert [x for x, _ in got] == data
    ran_on = {p for _, p in got}
    assert lost in ran_on, "the cut-off host worked before it vanished"
    assert {p for _, p in got[-50:]} <= {kept, 1}, "the last elements ran on the survivors"
    assert lost not in fd.workers()
    with pytest.raises(fd.ProcessExitedException):
        fd.remotecall_fetch(os.getpid, lost)
    assert fd.remotecall_fetch(fd.myid, kept) == kept
    netns_hosts.restore(1)
