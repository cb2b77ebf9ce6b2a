"""fastdist.Executor as a concurrent.futures.Executor on real workers."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import threading
import time

import pytest

import fastdist as fd
from fastdist.workerpool import CachingPool, WorkerPool

pytestmark = pytest.mark.timeout(60)


def square(x):
    return x * x


def slow(x, delay=0.3):
    time.sleep(delay)
    return x


def where(x=None):
    return fd.myid()


def fail(msg):
    raise ValueError(msg)


def test_is_a_concurrent_futures_executor():
    assert issubclass(fd.Executor, cf.Executor)


def test_submit_returns_concurrent_future_with_result(two_workers):
    with fd.Executor() as ex:
        fut = ex.submit(square, 7)
        assert isinstance(fut, cf.Future)
        assert fut.result(timeout=10) == 49
        assert ex.submit(lambda a, b=0: a + b, 1, b=2).result(timeout=10) == 3


def test_submissions_run_on_workers(two_workers):
    with fd.Executor() as ex:
        pids = {f.result(timeout=10) for f in [ex.submit(where) for _ in range(8)]}
    assert pids <= set(two_workers)
    assert os.getpid() not in pids


def wait_running(futs, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not all(f.running() or f.done() for f in futs):
        assert time.monotonic() < deadline, "submissions did not start"
        time.sleep(0.01)


def test_one_call_per_worker_and_queueing_does_not_block_submit(two_workers):
    with fd.Executor() as ex:
        start = time.monotonic()
        futs = [ex.submit(slow, i, 0.5) for i in range(6)]
        # A submit that waited for a free worker would take a whole round (0.5 s).
        assert time.monotonic() - start < 0.4, "submit must not wait for a free worker"
        assert [f.result(timeout=30) for f in futs] == list(range(6))
        elapsed = time.monotonic() - start
    # Two workers, one call each at a time: three rounds of 0.5 s.
    assert 1.45 <= elapsed < 10.0


def test_exception_is_remote_exception(two_workers):
    with fd.Executor() as ex:
        fut = ex.submit(fail, "executor boom")
        exc = fut.exception(timeout=10)
    assert isinstance(exc, fd.RemoteException)
    assert isinstance(exc.__cause__, ValueError)
    assert "executor boom" in str(exc)


def test_queued_submission_can_be_cancelled(two_workers):
    with fd.Executor() as ex:
        busy = [ex.submit(slow, i, 1.0) for i in range(2)]
        wait_running(busy)
        queued = ex.submit(slow, "never", 0.01)
        assert queued.cancel()
        assert queued.cancelled()
        assert not busy[0].cancel(), "a running submission cannot be cancelled"
        assert [f.result(timeout=10) for f in busy] == [0, 1]


def test_wait_and_as_completed(two_workers):
    with fd.Executor() as ex:
        futs = [ex.submit(slow, d, d) for d in (1.5, 0.1)]
        done, _ = cf.wait(futs, return_when=cf.FIRST_COMPLETED, timeout=10)
        assert futs[1] in done
        order = [f.result() for f in cf.as_completed(futs, timeout=10)]
    assert sorted(order) == [0.1, 1.5]


def test_map_order_and_chunksize(two_workers):
    with fd.Executor() as ex:
        assert list(ex.map(square, range(10))) == [x * x for x in range(10)]
        assert list(ex.map(pow, [2, 3, 4], [2, 2])) == [4, 9]
        assert list(ex.map(square, range(25), chunksize=4)) == [x * x for x in range(25)]
        assert list(ex.map(square, [], chunksize=3)) == []
        with pytest.raises(ValueError):
            ex.map(square, range(3), chunksize=0)


def test_map_chunksize_batches_remote_calls(two_workers):
    w = two_workers[0]
    with fd.Executor(WorkerPool([w])) as ex:
        before = fd.stats()["peers"][w]["msgs_sent"]
        assert list(ex.map(square, range(40), chunksize=10)) == [x * x for x in range(40)]
        sent = fd.stats()["peers"][w]["msgs_sent"] - before
    assert sent < 15, f"40 elements in chunks of 10 took {sent} messages"


def test_map_timeout(two_workers):
    ex = fd.Executor()
    assert ex.submit(square, 1).result(timeout=30) == 1  # workers warm, so the bound is fair
    results = ex.map(slow, [0.01, 5.0], [0.01, 5.0], timeout=2.0)
    assert next(results) == 0.01
    with pytest.raises(TimeoutError):
        next(results)
    ex.shutdown(wait=False)


def test_map_error_raised_in_order(two_workers):
    with fd.Executor() as ex:
        results = ex.map(lambda x: 1 // x, [1, 0, 2])
        assert next(results) == 1
        with pytest.raises(fd.RemoteException):
            next(results)


def test_shutdown_rejects_new_and_waits(two_workers):
    ex = fd.Executor()
    futs = [ex.submit(slow, i, 0.2) for i in range(4)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futs)
    with pytest.raises(RuntimeError):
        ex.submit(square, 2)


def test_shutdown_cancel_futures(two_workers):
    ex = fd.Executor()
    futs = [ex.submit(slow, i, 0.4) for i in range(6)]
    wait_running(futs[:2])
    ex.shutdown(wait=True, cancel_futures=True)
    assert [f.result() for f in futs[:2]] == [0, 1]
    assert all(f.cancelled() for f in futs[2:])


def test_shutdown_without_wait_then_results_still_arrive(two_workers):
    ex = fd.Executor()
    futs = [ex.submit(slow, i, 0.1) for i in range(4)]
    ex.shutdown(wait=False)
    assert [f.result(timeout=10) for f in futs] == [0, 1, 2, 3]


def test_explicit_pool(two_workers):
    w = two_workers[1]
    with fd.Executor(WorkerPool([w])) as ex:
        assert {f.result() for f in [ex.submit(where) for _ in range(5)]} == {w}


def test_caching_pool_sends_function_once(two_workers):
    big = list(range(200_000))
    pool = CachingPool(two_workers)
    with fd.Executor(pool) as ex:
        assert list(ex.map(lambda i: big[i], range(20))) == list(range(20))


def test_asyncio_run_in_executor(two_workers):
    async def main():
        loop = asyncio.get_running_loop()
        with fd.Executor() as ex:
            ticks = 0

            async def tick():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.02)

            t = asyncio.create_task(tick())
            values = await asyncio.gather(*(loop.run_in_executor(ex, slow, i, 0.2)
                                            for i in range(4)))
            t.cancel()
            return values, ticks

    values, ticks = asyncio.run(main())
    assert values == [0, 1, 2, 3]
    assert ticks >= 5


def test_worker_death_fails_its_future_and_queue_goes_on(cluster):
    victim, survivor = cluster.add(2)
    with fd.Executor(WorkerPool([victim])) as ex:
        doomed = ex.submit(slow, "x", 30)
        time.sleep(0.3)
        fd.rmprocs(victim, waitfor=10)
        with pytest.raises(fd.ProcessExitedException):
            doomed.result(timeout=20)
        # The pool is empty now: what is submitted fails, it does not hang.
        with pytest.raises(RuntimeError):
            ex.submit(square, 2).result(timeout=20)
    with fd.Executor() as ex:
        futs = [ex.submit(where) for _ in range(3)]
        assert [f.result(timeout=20) for f in futs] == [survivor] * 3


def test_no_workers_runs_on_master(cluster):
    assert fd.workers() == [1]
    with fd.Executor() as ex:
        assert ex.submit(where).result(timeout=10) == 1


def test_many_small_submissions_from_threads(two_workers):
    with fd.Executor() as ex:
        results: list[int] = []
        lock = threading.Lock()

        def client(k):
            futs = [ex.submit(square, k * 100 + i) for i in range(50)]
            vals = [f.result(timeout=30) for f in futs]
            with lock:
                results.extend(vals)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(results) == sorted((k * 100 + i) ** 2 for k in range(4) for i in range(50))


def test_idle_dispatcher_thread_exits(two_workers, monkeypatch):
    from fastdist import executor

    monkeypatch.setattr(executor, "_IDLE_EXIT_SECONDS", 0.1)
    ex = fd.Executor()
    assert ex.submit(square, 3).result(timeout=10) == 9
    deadline = time.monotonic() + 5
    while ex._dispatcher is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ex._dispatcher is None
    assert ex.submit(square, 4).result(timeout=10) == 16
    ex.shutdown()


def test_dropped_executor_still_delivers(two_workers, monkeypatch):
    import gc

    from fastdist import executor

    monkeypatch.setattr(executor, "_IDLE_EXIT_SECONDS", 0.05)
    futs = [fd.Executor().submit(slow, i, 0.6) for i in range(2)]
    time.sleep(0.3)
    gc.collect()
    assert [f.result(timeout=10) for f in futs] == [0, 1]


# -- interpreter exit (the standard library's contract) -----------------------------------

EXIT_SCRIPT = """
import atexit, os, sys, time
import fastdist as fd

def slow(x):
    time.sleep(0.5)
    return x * 10

fd.addprocs(2)
ex = fd.Executor()
futs = [ex.submit(slow, i) for i in range(5)]  # more than the workers: some queue
for f in futs:
    # One write per line: callbacks run on several threads at once.
    f.add_done_callback(lambda f: os.write(1, f"done {f.result()}\\n".encode()))
if sys.argv[1] == "shutdown-nowait":
    ex.shutdown(wait=False)

def submit_at_exit():
    try:
        fd.Executor().submit(slow, 1)
    except RuntimeError as exc:
        print("refused:", exc, flush=True)
    else:
        print("accepted", flush=True)

atexit.register(submit_at_exit)
print("script ends", flush=True)
"""


@pytest.mark.parametrize("how", ["dropped", "shutdown-nowait"])
def test_pending_submissions_finish_before_the_program_ends(tmp_path, how):
    import subprocess
    import sys

    script = tmp_path / "ends_at_once.py"
    script.write_text(EXIT_SCRIPT)
    result = subprocess.run([sys.executable, str(script), how], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "script ends"
    assert sorted(line for line in lines if line.startswith("done")) == [
        f"done {i * 10}" for i in range(5)], result.stdout + result.stderr
    assert ("refused: cannot schedule new futures after interpreter shutdown"
            in lines), result.stdout


def test_a_finished_submission_holds_nothing_of_its_call(two_workers):
    import gc
    import weakref

    class Payload:
        pass

    payload = Payload()
    ref = weakref.ref(payload)
    ex = fd.Executor()
    fut = ex.submit(lambda p: 1, payload)
    assert fut.result(timeout=30) == 1
    del payload
    for _ in range(50):
        gc.collect()
        if ref() is None:
            break
        time.sleep(0.05)
    assert ref() is None, "the argument is still held after the call finished"
    ex.shutdown()


class _Made:
    pass


def _make(_):
    return _Made()


def test_map_results_are_not_held_once_yielded(two_workers):
    import gc
    import weakref

    with fd.Executor() as ex:
        for obj in ex.map(_make, range(6)):
            ref = weakref.ref(obj)
            del obj
            gc.collect()
            assert ref() is None, "the executor still holds a result it handed out"
