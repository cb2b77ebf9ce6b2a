"""Liveness: a running, blocked or interrupted call never wedges, starves or kills a worker.

Every test runs with a short FASTDIST_HEARTBEAT_TIMEOUT, so a worker whose
connections stop being read shows up as a dead one within seconds, and most run
on *warm* workers — workers that have served calls before, where the thread
that ran them is still around (most of the failures these tests guard against
showed only there). Each numbered section is one of the symptoms these rules
were written against; the threading model they check is in
docs/ARCHITECTURE.md ("Threading model").
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import itertools
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref

import numpy as np
import pytest

import fastdist as fd
from fastdist._core import _wire

HEARTBEAT = 2.0  # seconds; every blocking state below lasts longer than this


@pytest.fixture
def short_heartbeat(monkeypatch):
    monkeypatch.setenv("FASTDIST_HEARTBEAT_TIMEOUT", str(HEARTBEAT))


@pytest.fixture
def warm(cluster, short_heartbeat):
    """Two workers that have each served a few calls and a map."""
    ws = cluster.add(2)
    warm_up(ws)
    return ws


def warm_up(ws):
    for w in ws:
        for _ in range(3):
            assert fd.remotecall_fetch(fd.myid, w) == w
    assert set(fd.pmap(lambda _: fd.myid(), range(40))) <= {1, *ws}
    # and a map whose batches of ints travel packed (_fastpath/_packed.pyx)
    assert fd.pmap(lambda x: x + 1, range(400), batch_size="auto") == list(range(1, 401))


def started_channel():
    return fd.RemoteChannel(lambda: fd.Channel(16), 1)


def alive_and_answering(w, ospid=None):
    t = time.monotonic()
    pid = fd.remotecall_fetch(os.getpid, w)
    assert time.monotonic() - t < 1.0, "the worker was slow to answer a quick call"
    if ospid is not None:
        assert pid == ospid
    assert w in fd.workers()


# -- 1. a long call is just a long call ------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_call_longer_than_the_heartbeat_timeout_on_a_warm_worker_completes(warm):
    w = warm[0]
    t = time.monotonic()
    assert fd.remotecall_fetch(time.sleep, w, 2.5 * HEARTBEAT) is None
    assert time.monotonic() - t >= 2.5 * HEARTBEAT
    alive_and_answering(w)


@pytest.mark.timeout(60)
def test_a_quick_call_is_answered_while_a_long_one_runs(warm):
    w = warm[0]
    for _ in range(3):
        slow = fd.remotecall(time.sleep, w, 3)
        time.sleep(0.2)  # the long call is running
        t = time.monotonic()
        assert fd.remotecall_fetch(fd.myid, w) == w
        assert time.monotonic() - t < 0.5
        assert slow.fetch(timeout=10) is None


def nap(x, seconds):
    time.sleep(seconds)
    return x + 1


def map_in_thread(f, xs, w, **kw):
    """pmap(f, xs) on worker `w` alone, in a thread: (thread, what it returned or raised)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fd.pmap(f, xs, pool=fd.WorkerPool([w]), **kw)
        except BaseException as exc:  # noqa: BLE001 - looked at by the test
            outcome["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, outcome


@pytest.mark.timeout(90)
def test_a_packed_map_batch_running_past_the_heartbeat_timeout_is_a_long_call(warm):
    """A batch of plain ints travels packed and runs as one call in the map's lane:
    its elements together run past the heartbeat timeout, the worker answers quick
    calls meanwhile and lives; then an interrupt ends such a batch at once."""
    from fastdist._fastpath._packed import pack

    w = warm[0]
    xs = list(range(32))
    assert pack(xs) is not None
    per = 2.5 * HEARTBEAT / len(xs)
    t, outcome = map_in_thread(lambda x: nap(x, per), xs, w, batch_size=len(xs))
    time.sleep(0.5)
    for _ in range(3):
        alive_and_answering(w)
        time.sleep(HEARTBEAT / 2)
    t.join(timeout=30)
    assert outcome == {"value": [x + 1 for x in xs]}
    ospid = fd.remotecall_fetch(os.getpid, w)

    t, outcome = map_in_thread(lambda x: nap(x, 30), xs, w, batch_size=len(xs))
    time.sleep(0.5)  # inside the batch's first element
    started = time.monotonic()
    fd.interrupt(w)
    t.join(timeout=15)
    assert time.monotonic() - started < 2.0
    assert isinstance(outcome.get("error"), fd.RemoteException), outcome
    assert isinstance(outcome["error"].__cause__, KeyboardInterrupt)
    alive_and_answering(w, ospid)


def hold_the_gil(seconds):
    """Hold the GIL in one C call (no bytecode, no signal check) for about `seconds`."""
    per_item = float("inf")
    for _ in range(3):  # the fastest of three: a busy machine only makes it hold longer
        t = time.perf_counter()
        sum(range(10**6))
        per_item = min(per_item, (time.perf_counter() - t) / 10**6)
    t = time.perf_counter()
    sum(range(int(seconds / per_item)))
    return time.perf_counter() - t


@pytest.mark.timeout(90)
def test_a_call_holding_the_gil_past_the_heartbeat_timeout_leaves_its_worker_alive(warm):
    # Nothing of the worker's Python runs meanwhile: neither its I/O thread nor its
    # heartbeat. Its keepalive thread, which needs no GIL, speaks for it.
    w = warm[0]
    other = fd.remotecall(time.sleep, warm[1], 0)
    held = fd.remotecall_fetch(hold_the_gil, w, 3 * HEARTBEAT)
    assert held > 2 * HEARTBEAT, f"the GIL was held only {held:.1f} s"
    assert other.fetch(timeout=10) is None
    alive_and_answering(w)


MASTER_HOLDS_THE_GIL = f"""
import os, sys, time
os.environ["FASTDIST_HEARTBEAT_TIMEOUT"] = "{HEARTBEAT}"
import fastdist as fd
{inspect.getsource(hold_the_gil)}
ws = fd.addprocs(2)
before = [fd.remotecall_fetch(os.getpid, w) for w in ws]
held = hold_the_gil({3 * HEARTBEAT})
time.sleep({HEARTBEAT} + 1)  # long enough for a worker that gave up on us to be gone
after = [fd.remotecall_fetch(os.getpid, w) for w in ws]
print(f"held {{held:.1f}} workers {{fd.workers() == ws}} same {{before == after}}", flush=True)
fd.rmprocs(ws, waitfor=10)
"""


@pytest.mark.timeout(120)
def test_a_master_holding_the_gil_past_the_heartbeat_timeout_keeps_its_workers(tmp_path):
    # The master's own script in a long C routine: its workers must not take it for
    # dead (they exit when their master goes silent), nor it them afterwards.
    script = tmp_path / "master.py"
    script.write_text(MASTER_HOLDS_THE_GIL)
    import subprocess

    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=100)
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    assert float(words[1]) > 2 * HEARTBEAT, out.stdout
    assert words[3:] == ["True", "same", "True"], out.stdout + out.stderr


# -- 2. a call waiting on its own worker's state ------------------------------------------------


def take_from(rc):
    return rc.take()


def put_into(rc, v):
    rc.put(v)
    return v


_event = threading.Event()


def wait_for_event():
    _event.clear()
    return _event.wait(60)


def set_event():
    _event.set()


@pytest.mark.timeout(60)
def test_a_call_taking_from_its_own_workers_channel_sees_the_masters_put(warm):
    w = warm[0]
    rc = fd.RemoteChannel(lambda: fd.Channel(1), w)
    fut = fd.remotecall(take_from, w, rc)
    time.sleep(1.5 * HEARTBEAT)
    rc.put("hello")
    assert fut.fetch(timeout=10) == "hello"
    alive_and_answering(w)


@pytest.mark.timeout(60)
def test_a_call_putting_into_its_own_full_channel_waits_for_the_masters_take(warm):
    w = warm[0]
    rc = fd.RemoteChannel(lambda: fd.Channel(1), w)
    rc.put("first")
    fut = fd.remotecall(put_into, w, rc, "second")
    time.sleep(1.5 * HEARTBEAT)
    assert not fut.isready()
    assert rc.take() == "first"
    assert fut.fetch(timeout=10) == "second"
    assert rc.take(timeout=10) == "second"
    alive_and_answering(w)


@pytest.mark.timeout(60)
def test_a_call_waiting_for_a_later_call_to_its_worker_never_deadlocks(warm):
    w = warm[0]
    waiting = fd.remotecall(wait_for_event, w)
    time.sleep(1.5 * HEARTBEAT)
    fd.remotecall_fetch(set_event, w)
    assert waiting.fetch(timeout=10) is True
    alive_and_answering(w)


# -- 3. two master threads, a worker's channel as a queue --------------------------------------


@pytest.mark.timeout(60)
def test_two_master_threads_use_a_workers_channel_as_a_queue(warm):
    w = warm[0]
    rc = fd.RemoteChannel(lambda: fd.Channel(1), w)
    n = 300
    got = []

    def consumer():
        got.extend(rc.take(timeout=20) for _ in range(n))

    t = threading.Thread(target=consumer)
    t.start()
    for i in range(n):
        rc.put(i, timeout=20)
    t.join(30)
    assert not t.is_alive() and got == list(range(n))
    alive_and_answering(w)


# -- 4. producer and consumer, in every placement --------------------------------------------


def produce(rc, n):
    for i in range(n):
        rc.put(i)
    return n


def consume(rc, n):
    return [rc.take() for _ in range(n)]


@pytest.mark.timeout(180)
def test_a_pipeline_through_a_channel_works_in_all_27_placements(warm):
    # (owner of the channel, producer, consumer), each the master or one of two workers.
    places = [1, *warm]
    n = 20
    for owner, producer, consumer in itertools.product(places, repeat=3):
        rc = fd.RemoteChannel(lambda: fd.Channel(1), owner)
        started = time.monotonic()
        consumed = fd.remotecall(consume, consumer, rc, n)
        produced = fd.remotecall(produce, producer, rc, n)
        where = f"owner {owner}, producer {producer}, consumer {consumer}"
        assert produced.fetch(timeout=20) == n, where
        assert consumed.fetch(timeout=20) == list(range(n)), where
        assert time.monotonic() - started < 10, where
    for w in warm:
        alive_and_answering(w)


# -- 5. a worker's first call to a busy worker -------------------------------------------------


def first_call_to(other):
    t = time.monotonic()
    assert fd.remotecall_fetch(fd.myid, other) == other
    return time.monotonic() - t


@pytest.mark.timeout(60)
def test_a_workers_first_call_to_a_busy_worker_is_answered_at_once(cluster, short_heartbeat):
    # The link between two workers is arranged over the busy one's connection to
    # pid 1, which is read whatever its calls do.
    a, b = cluster.add(2)
    warm_up([a, b])
    busy = fd.remotecall(time.sleep, b, 4)
    time.sleep(0.2)
    took = fd.remotecall_fetch(first_call_to, a, b)
    assert took < 1.0, f"the first call took {took:.1f} s"
    assert busy.fetch(timeout=10) is None


# -- 6. interrupt, in every blocking state, on warm and fresh workers ---------------------------


def _other_worker(me):
    return next(w for w in fd.workers() if w not in (me, 1))


def block(state, started):
    """Block in `state` until interrupted (announcing it on `started` first)."""
    me = fd.myid()
    if state == "socket":
        a, b = socket.socketpair()
        with a, b:
            started.put(me)
            return a.recv(1)
    if state == "select":
        r, w = os.pipe()
        try:
            started.put(me)
            return select.select([r], [], [], 60)
        finally:
            os.close(r)
            os.close(w)
    if state == "channel":
        ch = fd.Channel(1)
        started.put(me)
        return ch.take()
    if state == "remote channel":
        rc = fd.RemoteChannel(lambda: fd.Channel(1), 1)
        started.put(me)
        return rc.take()
    if state == "future":
        fut = fd.remotecall(time.sleep, _other_worker(me), 10)
        started.put(me)
        return fut.fetch()
    if state == "nested call":
        started.put(me)
        return fd.remotecall_fetch(time.sleep, _other_worker(me), 10)
    if state == "event":
        started.put(me)
        return threading.Event().wait()
    if state == "lock":
        lock = threading.Lock()
        lock.acquire()
        started.put(me)
        return lock.acquire()
    started.put(me)
    if state == "sleep":
        return time.sleep(60)
    if state == "python":
        while True:
            pass
    if state == "gil":  # C code that never looks at signals: interrupted when it returns
        hold_the_gil(1.0)
        while True:
            pass
    raise ValueError(state)


BLOCKING_STATES = ["python", "sleep", "channel", "remote channel", "future", "nested call",
                   "socket", "select", "event", "lock", "gil"]


def interrupt_and_check(w, state, ospid):
    started = started_channel()
    fut = fd.remotecall(block, w, state, started)
    assert started.take(timeout=10) == w
    time.sleep(0.3)  # well inside the blocking call
    t = time.monotonic()
    fd.interrupt(w)
    with pytest.raises(fd.RemoteException) as info:
        fut.fetch(timeout=15)
    took = time.monotonic() - t
    assert isinstance(info.value.__cause__, KeyboardInterrupt), f"{state}: {info.value!r}"
    limit = 3.0 if state == "gil" else 1.0
    assert took < limit, f"{state}: interrupted after {took:.2f} s"
    alive_and_answering(w, ospid)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("temperature", ["fresh", "warm"])
def test_interrupt_reaches_the_call_in_every_blocking_state(cluster, short_heartbeat,
                                                             temperature):
    ws = cluster.add(2)
    if temperature == "warm":
        warm_up(ws)
    w = ws[0]
    ospid = fd.remotecall_fetch(os.getpid, w) if temperature == "warm" else None
    for state in BLOCKING_STATES:
        interrupt_and_check(w, state, ospid)
        ospid = fd.remotecall_fetch(os.getpid, w)
    # After all that: long calls still run to their end, nothing left pending hits them.
    assert fd.remotecall_fetch(time.sleep, w, 1.5 * HEARTBEAT) is None


@pytest.mark.timeout(120)
def test_an_interrupt_sent_as_the_call_starts_to_sleep_still_reaches_it(warm):
    # The SIGINT may be taken just before the call enters the sleep, which it then
    # does not end: it is sent again until the call has it.
    w = warm[0]
    for _ in range(40):
        started = started_channel()
        fut = fd.remotecall(block, w, "sleep", started)
        started.take(timeout=10)
        fd.interrupt(w)  # at once: the call is somewhere between its put and its sleep
        with pytest.raises(fd.RemoteException) as info:
            fut.fetch(timeout=5)
        assert isinstance(info.value.__cause__, KeyboardInterrupt)
    alive_and_answering(w)


@pytest.mark.timeout(60)
def test_an_outside_sigint_interrupts_the_running_call_and_the_worker_lives(warm):
    w = warm[0]
    ospid = fd.remotecall_fetch(os.getpid, w)
    started = started_channel()
    fut = fd.remotecall(block, w, "sleep", started)
    started.take(timeout=10)
    os.kill(ospid, signal.SIGINT)  # `kill -INT`, as from a terminal
    with pytest.raises(fd.RemoteException) as info:
        fut.fetch(timeout=10)
    assert isinstance(info.value.__cause__, KeyboardInterrupt)
    alive_and_answering(w, ospid)


@pytest.mark.timeout(120)
def test_every_outside_sigint_reaches_the_call_also_just_after_an_interrupt(warm):
    # The SIGINT comes as the call starts to sleep (it may be taken just before the
    # sleep begins), and a few milliseconds after `interrupt` ended the call before:
    # neither makes it be lost or taken for fastdist's own.
    w = warm[0]
    ospid = fd.remotecall_fetch(os.getpid, w)
    for i in range(60):
        started = started_channel()
        fut = fd.remotecall(block, w, "sleep", started)
        started.take(timeout=10)
        if i % 2:
            os.kill(ospid, signal.SIGINT)
        else:
            fd.interrupt(w)
        with pytest.raises(fd.RemoteException) as info:
            fut.fetch(timeout=5)
        assert isinstance(info.value.__cause__, KeyboardInterrupt), f"round {i}"
    alive_and_answering(w, ospid)


# C code that computes, then blocks in a system call, never looking at signals in
# between (as a C extension's routine may): a SIGINT that comes while it computes
# trips Python's flag, and ends nothing.
SPIN_THEN_SLEEP_C = r"""
#include <time.h>
int spin_then_sleep(double spin, double sleep_seconds) {
    struct timespec t0, t, rest = {(time_t)sleep_seconds, 0};
    clock_gettime(CLOCK_MONOTONIC, &t0);
    do clock_gettime(CLOCK_MONOTONIC, &t);
    while ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) * 1e-9 < spin);
    return nanosleep(&rest, 0);
}
"""


def spin_then_sleep(library, started):
    lib = ctypes.CDLL(library)  # a CDLL call runs without the GIL
    lib.spin_then_sleep.argtypes = [ctypes.c_double, ctypes.c_double]
    started.put(fd.myid())
    return lib.spin_then_sleep(1.0, 60.0)


@pytest.mark.timeout(60)
def test_a_sigint_taken_just_before_a_blocking_system_call_still_ends_it(warm, tmp_path):
    source = tmp_path / "spin.c"
    source.write_text(SPIN_THEN_SLEEP_C)
    library = tmp_path / "spin.so"
    compiler = os.environ.get("CC", "cc")
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", library, source], check=True)
    w = warm[0]
    ospid = fd.remotecall_fetch(os.getpid, w)
    started = started_channel()
    fut = fd.remotecall(spin_then_sleep, w, str(library), started)
    started.take(timeout=10)
    time.sleep(0.3)  # the C code spins: the SIGINT is taken, and nothing ends
    t = time.monotonic()
    os.kill(ospid, signal.SIGINT)
    with pytest.raises(fd.RemoteException) as info:
        fut.fetch(timeout=10)
    assert isinstance(info.value.__cause__, KeyboardInterrupt)
    assert time.monotonic() - t < 3.0, "the SIGINT waited for the sleep to end"
    alive_and_answering(w, ospid)


# -- 7. Ctrl-C of a master fetch ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_after_ctrl_c_of_a_master_fetch_the_next_call_is_answered_at_once(warm):
    w = warm[0]
    main = threading.main_thread().ident
    assert threading.get_ident() == main
    timer = threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        fd.remotecall_fetch(time.sleep, w, 3)
    t = time.monotonic()
    assert fd.remotecall_fetch(fd.myid, w) == w
    assert time.monotonic() - t < 0.5
    timer.join()


# -- 8. a pool gives a worker one call at a time --------------------------------------------


_state = {"owner": None, "overlaps": 0}


def use_per_worker_state(x, seconds=0.05):
    """Claim this worker's state, hold it a while, check nobody else took it."""
    if _state["owner"] is not None:
        _state["overlaps"] += 1
    _state["owner"] = x
    time.sleep(seconds)
    if _state["owner"] != x:
        _state["overlaps"] += 1
    _state["owner"] = None
    return fd.myid()


def overlaps():
    n, _state["overlaps"] = _state["overlaps"], 0
    return n


@pytest.mark.timeout(120)
@pytest.mark.parametrize("batch_size", [1, 3, "auto"])
def test_pmap_gives_a_worker_one_element_at_a_time(warm, batch_size):
    ran_on = fd.pmap(use_per_worker_state, range(120), batch_size=batch_size)
    assert set(ran_on) <= {1, *warm}
    assert [fd.remotecall_fetch(overlaps, w) for w in warm] == [0, 0]


@pytest.mark.timeout(120)
def test_every_pool_gives_a_worker_one_call_at_a_time(warm):
    caching = fd.CachingPool(warm)
    for pool in (fd.default_worker_pool(), fd.WorkerPool(warm), caching):
        futs = [fd.remotecall(use_per_worker_state, pool, i) for i in range(20)]
        assert {f.fetch(timeout=20) for f in futs} <= set(warm)
        f = fd.remote(use_per_worker_state, pool)
        with fd.Executor(pool) as ex:
            done = list(ex.map(use_per_worker_state, range(20)))
        assert set(done) <= set(warm)
        threads = [threading.Thread(target=f, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert [fd.remotecall_fetch(overlaps, w) for w in warm] == [0, 0]
    caching.clear()


@pytest.mark.timeout(60)
def test_plain_calls_beside_a_pools_still_run_at_once(warm):
    w = warm[0]
    pool = fd.WorkerPool([w])
    slow = fd.remotecall(time.sleep, pool, 2)
    t = time.monotonic()
    assert fd.remotecall_fetch(fd.myid, w) == w  # a plain call: not behind the pool's
    assert time.monotonic() - t < 0.5
    assert slow.fetch(timeout=10) is None


# -- 9. every call gets exactly one reply ------------------------------------------------------


class ExitsWhenPickled:
    def __reduce__(self):
        raise SystemExit("no pickling me")


class ExitsWhenUnpickled:
    def __reduce__(self):
        return (_exit_now, ())


def _exit_now():
    raise SystemExit("no unpickling me")


def make_exits_when_pickled():
    return ExitsWhenPickled()


@pytest.mark.timeout(60)
def test_a_result_that_raises_systemexit_when_pickled_is_an_error_reply(warm):
    w = warm[0]
    for _ in range(3):
        with pytest.raises(fd.RemoteException, match="no pickling me"):
            fd.remotecall_fetch(make_exits_when_pickled, w)
        fut = fd.remotecall(make_exits_when_pickled, w)
        with pytest.raises(fd.RemoteException, match="no pickling me"):
            fut.fetch(timeout=10)
    with fd.Executor(fd.WorkerPool(warm)) as ex:
        future = ex.submit(make_exits_when_pickled)
        with pytest.raises(fd.RemoteException):
            future.result(timeout=10)
    # (shutdown(wait=True) returned: every submission was answered)
    alive_and_answering(w)


@pytest.mark.timeout(60)
def test_arguments_that_raise_systemexit_when_unpickled_are_an_error_reply(warm):
    w = warm[0]
    for _ in range(6):
        with pytest.raises(fd.RemoteException, match="no unpickling me"):
            fd.remotecall_fetch(len, w, [ExitsWhenUnpickled()])
        fut = fd.remotecall(len, w, ExitsWhenUnpickled())
        with pytest.raises(fd.RemoteException, match="no unpickling me"):
            fut.fetch(timeout=10)
    alive_and_answering(w)


# -- 10. nothing of a finished call stays alive ---------------------------------------------


_made = []


def take_and_make(arg):
    out = np.ones(arg.size)  # a result as large as the argument
    _made.append(weakref.ref(out))
    return out


def held_by_finished_calls():
    """(results still alive, bytes of receive buffers alive): what finished calls keep."""
    gc.collect()
    return sum(r() is not None for r in _made), _wire.live_recv_buffers()[1]


@pytest.mark.timeout(60)
def test_an_idle_call_thread_keeps_nothing_of_its_last_call(warm):
    w = warm[0]
    arg = np.zeros(5_000_000)  # 40 MB, received into buffers of its own
    assert fd.remotecall_fetch(take_and_make, w, arg).size == arg.size
    assert fd.remotecall(take_and_make, w, arg).fetch(timeout=10).size == arg.size
    # On a helper thread too: a call that ran while the main thread was busy.
    busy = fd.remotecall(time.sleep, w, 1)
    time.sleep(0.1)
    assert fd.remotecall_fetch(take_and_make, w, arg).size == arg.size
    busy.fetch(timeout=10)
    results, nbytes = fd.remotecall_fetch(held_by_finished_calls, w)
    assert results == 0, f"{results} results of finished calls are still alive"
    assert nbytes < arg.nbytes // 4, f"{nbytes} bytes of received arguments are still held"
