"""Worker pools on real workers: WorkerPool, CachingPool, the default pool, remote,
calls on pools, pools passed to workers, and workers that leave pools."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from _module_workers import os_pid, shared_workers, wait_gone
from support import bytes_sent

import fastdist as fd
from fastdist.protocol.serialize import SerializationError
from fastdist.workerpool import cached_function_count

pytestmark = pytest.mark.timeout(60)

MB = 1 << 20


@pytest.fixture(scope="module")
def ws():
    with shared_workers(2) as pids:
        yield pids


def add(a, b=0, *, c=0):
    return a + b + c


def where():
    return fd.myid()


def cached_count():
    return cached_function_count()


class ExplodesOnWorkers:
    """Pickles anywhere; unpickles only on pid 1."""

    def __reduce__(self):
        return (_rebuild_or_explode, ())


def _rebuild_or_explode():
    if fd.myid() != 1:
        raise ImportError("this object cannot be rebuilt on a worker")
    return ExplodesOnWorkers()


# -- WorkerPool --------------------------------------------------------------------------


def test_worker_pool_take_put_len_isready(ws):
    pool = fd.WorkerPool(ws)
    assert isinstance(pool, fd.AbstractWorkerPool)
    assert len(pool) == 2 and pool.workers() == sorted(ws) and pool.isready()
    a = fd.take(pool)
    b = pool.take()
    assert {a, b} == set(ws)
    assert not fd.isready(pool) and len(pool) == 2, "busy workers still belong to the pool"
    with pytest.raises(TimeoutError):
        pool.take(timeout=0.05)
    fd.put(pool, a)
    assert pool.isready() and pool.take() == a
    pool.put(a).put(b)
    pool.put(99)  # not in the pool: ignored
    assert len(pool) == 2 and fd.isready(pool)
    fd.wait(pool)  # a worker is free: returns, takes nothing
    assert {pool.take(), pool.take()} == set(ws)


def test_take_waits_until_a_worker_is_put_back(ws):
    pool = fd.WorkerPool([ws[0]])
    w = pool.take()
    threading.Timer(0.1, pool.put, (w,)).start()
    start = time.monotonic()
    assert pool.take(timeout=5) == w
    assert time.monotonic() - start >= 0.05


def test_push_adds_and_empty_pool_refuses(ws):
    pool = fd.WorkerPool()
    assert len(pool) == 0 and pool.workers() == []
    with pytest.raises(RuntimeError, match="No active worker"):
        pool.take()
    pool.push(ws[1]).push(ws[1])
    assert len(pool) == 1 and pool.workers() == [ws[1]]
    assert fd.remotecall_fetch(where, pool) == ws[1]


def test_calls_on_a_pool_take_a_free_worker_and_give_it_back(ws):
    pool = fd.WorkerPool(ws)
    assert fd.remotecall_fetch(add, pool, 1, 2, c=3) == 6
    fut = fd.remotecall(add, pool, 10, b=5)
    assert isinstance(fut, fd.Future) and fut.fetch() == 15
    fut = fd.remotecall_wait(add, pool, 1)
    assert fut.isready() and fut.fetch() == 1
    rc = fd.RemoteChannel(lambda: fd.Channel(10))
    fd.remote_do(lambda ch: ch.put(fd.myid()), pool, rc)
    assert rc.take(timeout=10) in ws
    assert {pool.take(timeout=5) for _ in ws} == set(ws), "every worker was given back"
    with pytest.raises(fd.RemoteException):
        fd.remotecall_fetch(add, fd.WorkerPool(ws), "a", 1)


def test_remote_holds_a_worker_for_the_whole_call(ws):
    # Julia's "Test remote()": each remote call occupies one worker until it returns.
    pool = fd.WorkerPool(ws)
    channels = [fd.RemoteChannel() for _ in ws]
    take = fd.remote(lambda ch: ch.take(), pool)
    assert pool.isready()
    tasks = [fd.run_async(take, ch) for ch in channels]
    deadline = time.monotonic() + 10
    while pool.isready():
        assert time.monotonic() < deadline, "both workers should be busy"
        time.sleep(0.01)
    for i, ch in enumerate(channels):
        ch.put(f"v{i}")
    assert [t.result(timeout=10) for t in tasks] == ["v0", "v1"]
    while not pool.isready():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_remotecall_future_keeps_its_worker_until_done(ws):
    pool = fd.WorkerPool([ws[0]])
    rc = fd.RemoteChannel()
    fut = fd.remotecall(lambda ch: ch.take(), pool, rc)
    time.sleep(0.1)
    assert not pool.isready()
    rc.put(7)
    assert fut.fetch(timeout=10) == 7
    assert pool.take(timeout=5) == ws[0]


def test_default_pool_and_remote(ws):
    pool = fd.default_worker_pool()
    assert pool is fd.default_worker_pool()
    assert pool.workers() == fd.workers() and len(pool) == len(fd.workers())
    seen = {fd.remote(where)() for _ in range(20)}
    assert seen <= set(fd.workers())
    assert fd.remote(add, fd.WorkerPool([ws[1]]))(2, 3) == 5
    assert fd.remote(fd.WorkerPool([ws[0]]), where)() == ws[0]  # Julia's argument order


def test_default_pool_on_a_worker_is_pid_1s(ws):
    got = fd.remotecall_fetch(lambda: (fd.default_worker_pool().workers(),
                                       fd.remote(fd.myid)()), ws[0])
    assert got[0] == fd.workers() and got[1] in fd.workers()


def test_without_workers_the_master_works_alone():
    # Julia's first tests, before any addprocs: in a fresh process.
    code = textwrap.dedent("""
        import operator
        import fastdist as fd
        assert fd.default_worker_pool().workers() == [1]
        assert len(fd.default_worker_pool()) == 0
        assert fd.remote(fd.myid)() == 1
        assert fd.pmap(lambda x: x, range(100)) == list(range(100))
        assert fd.pmap(lambda x: fd.myid(), range(5)) == [1] * 5
        assert fd.distributed(lambda i: 1, range(100), operator.add) == 100
        assert fd.spawnat("any", fd.myid).fetch() == 1
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# -- pools on other processes ------------------------------------------------------------


def test_pool_passed_to_a_worker_goes_back_to_its_owner(ws):
    pool = fd.WorkerPool(ws)

    def use(p):
        took = p.take()
        state = (len(p), p.workers(), p.isready())
        p.put(took)
        return took, state, fd.remotecall_fetch(fd.myid, p)

    took, state, ran_on = fd.remotecall_fetch(use, ws[0], pool)
    assert took in ws and ran_on in ws
    assert state == (2, sorted(ws), True)  # one taken, the other free
    assert len(pool) == 2 and {pool.take(), pool.take()} == set(ws)


def test_pmap_on_a_worker_with_a_pool_from_the_master(ws):
    # Julia: length(unique(remotecall_fetch(wp->pmap(_->myid(), wp, 1:100), id_other, wp)))
    pool = fd.WorkerPool(ws)
    got = fd.remotecall_fetch(lambda p: fd.pmap(lambda _: fd.myid(), p, range(100)), ws[1], pool)
    assert len(got) == 100 and set(got) == set(ws)
    assert {pool.take(), pool.take()} == set(ws), "the pmap gave every worker back"


def test_a_pool_comes_back_as_itself(ws):
    pool = fd.WorkerPool(ws)
    assert fd.remotecall_fetch(lambda p: p, ws[0], pool) is pool


def test_caching_pool_refuses_to_be_serialised(ws):
    pool = fd.CachingPool(ws)
    with pytest.raises((SerializationError, TypeError), match="CachingPool"):
        fd.remotecall_fetch(len, ws[0], pool)


# -- CachingPool ----------------------------------------------------------------------------


def test_caching_pool_sends_a_16mb_closure_once_per_worker(ws):
    big = np.ones(2 * MB)  # 16 MB
    pool = fd.CachingPool(ws)

    def pick(i):
        return float(big[i]) + i

    before = bytes_sent()
    assert fd.pmap(pick, pool, range(100)) == [1.0 + i for i in range(100)]
    assert fd.pmap(pick, pool, range(100)) == [1.0 + i for i in range(100)]
    for _ in range(4):
        assert fd.remotecall_fetch(pick, pool, 3) == 4.0
    after = bytes_sent()
    for w in ws:
        sent = after[w] - before[w]
        assert 16 * MB <= sent < 17 * MB, f"worker {w}: {sent / MB:.1f} MB, expected one copy"
    assert all(fd.remotecall_fetch(cached_count, w) >= 1 for w in ws)

    fd.clear(pool)
    assert [fd.remotecall_fetch(cached_count, w) for w in ws] == [0, 0]
    before = bytes_sent()
    assert fd.remotecall_fetch(pick, pool, 5) == 6.0
    after = bytes_sent()
    assert max(after[w] - before[w] for w in ws) >= 16 * MB, "after clear it travels again"
    assert pool.clear() is pool


def test_plain_pmap_sends_the_closure_once_per_worker_per_call(ws):
    big = np.arange(MB // 4, dtype=np.float64)  # 2 MB

    def pick(i):
        return float(big[i])

    before = bytes_sent()
    assert fd.pmap(pick, range(200)) == [float(i) for i in range(200)]
    after = bytes_sent()
    for w in ws:
        assert 2 * MB <= after[w] - before[w] < 3 * MB
    assert [fd.remotecall_fetch(cached_count, w) for w in ws] == [0, 0], \
        "pmap's own cache is freed when it returns"


def test_caching_pool_function_that_cannot_load_fails_every_call_fast(ws):
    bomb = ExplodesOnWorkers()
    pool = fd.CachingPool(ws)
    start = time.monotonic()
    with pytest.raises(fd.RemoteException) as info:
        fd.pmap(lambda x: (bomb, x)[1], pool, range(20))
    assert "cannot be rebuilt" in str(info.value)
    for _ in range(3):
        with pytest.raises(fd.RemoteException, match="cannot be rebuilt"):
            fd.remotecall_fetch(lambda: bomb, pool)
    assert time.monotonic() - start < 10


class FixedPool(fd.AbstractWorkerPool):
    """A minimal user-written pool: a fixed list, one call per worker."""

    def __init__(self, pids):
        self._all = list(pids)
        self._free = list(pids)
        self._cond = threading.Condition()

    def push(self, w):
        with self._cond:
            self._all.append(w)
            self._free.append(w)
            self._cond.notify()
        return self

    def put(self, w):
        with self._cond:
            self._free.append(w)
            self._cond.notify()
        return self

    def take(self, timeout=None):
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout):
                raise TimeoutError
            return self._free.pop(0)

    def __len__(self):
        return len(self._all)

    def isready(self):
        return bool(self._free)

    def workers(self):
        return list(self._all)


def test_user_defined_pool_works_with_calls_and_pmap(ws):
    pool = FixedPool(ws)
    assert fd.remotecall_fetch(add, pool, 2, 2) == 4
    assert fd.pmap(lambda x: -x, pool, range(30), batch_size=4) == [-x for x in range(30)]
    assert sorted(pool._free) == sorted(ws)


# -- workers leaving pools --------------------------------------------------------------------


def test_killed_and_removed_workers_leave_every_pool(ws):
    extra = fd.addprocs(2)
    pool = fd.WorkerPool([*ws, *extra])
    caching = fd.CachingPool(extra)
    default = fd.default_worker_pool()
    assert set(extra) <= set(default.workers())

    os.kill(os_pid(extra[0]), signal.SIGKILL)
    wait_gone(extra[0])
    fd.rmprocs(extra[1], waitfor=30)
    for p in (pool, caching, default):
        assert not set(extra) & set(p.workers())
    assert pool.workers() == sorted(ws) and len(caching) == 0
    assert {pool.take(), pool.take()} == set(ws)
    with pytest.raises(RuntimeError, match="No active worker"):
        caching.take()
