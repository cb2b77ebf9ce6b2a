"""Tests for the call thread pool: it grows for blocked calls, not for a backlog."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from fastdist.callpool import MIN_THREADS, CallPool


@pytest.mark.timeout(30)
def test_a_backlog_of_short_calls_does_not_grow_the_pool() -> None:
    # Thousands of calls queued at once are being taken as fast as they run: that is
    # no stall, and every extra thread would only fight the busy ones for the GIL.
    pool = CallPool(name="backlog-test")
    done = threading.Semaphore(0)
    n = 40_000

    def short() -> None:
        sum(range(200))
        done.release()

    for _ in range(n):
        pool.submit(short)
    for _ in range(n):
        assert done.acquire(timeout=20)
    # A thread or three more when this thread's submitting keeps the GIL from the pool
    # for a whole watchdog window; growing with the backlog (one per 5 ms) made 7-24.
    assert pool.nthreads <= MIN_THREADS + 3


@pytest.mark.timeout(30)
def test_calls_blocked_on_a_later_call_get_threads_of_their_own() -> None:
    # Each of these calls waits for the last one: the pool must keep adding threads
    # until that one runs, or all of them wait forever.
    pool = CallPool(name="blocked-test")
    release = threading.Event()
    finished = threading.Semaphore(0)
    n_blocked = MIN_THREADS + 6

    def blocked() -> None:
        release.wait(20)
        finished.release()

    for _ in range(n_blocked):
        pool.submit(blocked)
    pool.submit(release.set)
    for _ in range(n_blocked):
        assert finished.acquire(timeout=10)
    assert release.is_set()
    assert pool.nthreads >= n_blocked + 1


@pytest.mark.timeout(60)
def test_interrupts_racing_finishing_calls_never_land_after_the_call() -> None:
    # An interrupt aimed at a call that is returning must be dropped with the call:
    # the thread never carries it into what it does next (reading a connection,
    # the next call). Thousands of interrupts against thousands of short calls,
    # with the GIL switching threads as often as it can.
    pool = CallPool(name="race-test")
    stop = threading.Event()
    seen = {"in_call": 0, "late": 0, "calls": 0}

    def user_code() -> None:
        sum(range(100))

    def calls() -> None:
        while not stop.is_set():
            try:
                pool.run_user(user_code)
            except KeyboardInterrupt:
                seen["in_call"] += 1
            try:
                sum(range(100))  # not user code: no interrupt may land here
            except KeyboardInterrupt:
                seen["late"] += 1
            seen["calls"] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    t = threading.Thread(target=calls, name="race-calls")
    t.start()
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            pool.interrupt()
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        t.join(10)
    assert not t.is_alive()
    assert seen["late"] == 0, seen
    assert seen["in_call"] > 10 and seen["calls"] > 100, seen
    assert pool.running_user == {} and pool.interrupt() == 0
