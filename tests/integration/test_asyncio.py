"""`await` on fastdist Futures: the event loop keeps running while a remote call works."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import pytest

import fastdist as fd

pytestmark = pytest.mark.timeout(60)


def slow_square(x, delay=0.5):
    time.sleep(delay)
    return x * x


def fail(msg):
    raise ValueError(msg)


def test_await_remotecall_does_not_block_the_loop(two_workers):
    w = two_workers[0]
    ticks = []

    async def ticker(stop):
        while not stop.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)

    async def main():
        stop = asyncio.Event()
        t = asyncio.create_task(ticker(stop))
        start = time.monotonic()
        value = await fd.remotecall(slow_square, w, 7, 1.0)
        elapsed = time.monotonic() - start
        stop.set()
        await t
        return value, elapsed

    value, elapsed = asyncio.run(main())
    assert value == 49
    assert elapsed >= 0.95
    # The ticker ran all through the 1 s call: a blocked loop would show a 1 s gap.
    assert len(ticks) >= 10
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert max(gaps) < 0.5


def test_await_uses_no_thread_per_await(two_workers):
    async def main():
        futs = [fd.remotecall(slow_square, two_workers[i % 2], i, 0.3) for i in range(20)]
        before = threading.active_count()
        task = asyncio.gather(*futs)
        await asyncio.sleep(0.1)
        during = threading.active_count()
        return await task, before, during

    values, before, during = asyncio.run(main())
    assert values == [i * i for i in range(20)]
    assert during - before < 5


def test_await_failed_call_raises_remote_exception(two_workers):
    async def main():
        return await fd.remotecall(fail, two_workers[0], "async boom")

    with pytest.raises(fd.RemoteException) as info:
        asyncio.run(main())
    assert info.value.pid == two_workers[0]
    assert isinstance(info.value.__cause__, ValueError)
    assert "async boom" in str(info.value)


def test_await_gather_and_ready_future(two_workers):
    async def main():
        futs = [fd.remotecall(slow_square, w, i, 0.05) for i, w in enumerate(two_workers)]
        first = await asyncio.gather(*futs)
        again = await futs[0]  # cached: returns at once
        return first, again

    assert asyncio.run(main()) == ([0, 1], 0)


def test_await_local_future_put_from_a_thread(two_workers):
    async def main():
        fut = fd.Future()
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, lambda: threading.Thread(target=fut.put, args=("local",)).start())
        return await fut

    assert asyncio.run(main()) == "local"


def test_await_future_owned_by_a_worker(two_workers):
    w = two_workers[1]

    async def main():
        fut = fd.Future(w)
        threading.Timer(0.2, fut.put, args=(123,)).start()
        return await asyncio.wait_for(fut, timeout=10)

    assert asyncio.run(main()) == 123


def test_await_worker_death_raises_process_exited(cluster):
    (w,) = cluster.add(1)

    async def main():
        fut = fd.remotecall(slow_square, w, 3, 30)
        await asyncio.sleep(0.2)
        fd.rmprocs(w, waitfor=10)
        return await asyncio.wait_for(fut, timeout=20)

    with pytest.raises(fd.ProcessExitedException):
        asyncio.run(main())


def test_await_cancelled_then_value_still_fetchable(two_workers):
    w = two_workers[0]

    async def main():
        fut = fd.remotecall(slow_square, w, 5, 0.3)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(fut, timeout=0.05)
        return await fut

    assert asyncio.run(main()) == 25
