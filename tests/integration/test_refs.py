"""References that travel: RemoteChannels and Futures across processes, and distributed
reference counting that frees values exactly when nobody holds them."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest

import fastdist as fd

pytestmark = pytest.mark.timeout(90)


def refs_on(pid: int) -> int:
    return fd.stats(pid)["refs"]


def settle(pid: int, expected: int, timeout: float = 10.0) -> int:
    """Wait until `pid` holds `expected` values (give-backs travel in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        n = refs_on(pid)
        if n == expected or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def keep(name, value):
    """Store a value in the worker's __main__ (a global that outlives the call)."""
    import __main__

    setattr(__main__, name, value)


def kept(name):
    import __main__

    return getattr(__main__, name)


def drop(name):
    import __main__

    delattr(__main__, name)


def produce(rc, n):
    for i in range(n):
        rc.put(i)
    rc.close()


def consume(rc):
    return list(rc)


def test_producer_consumer_through_channel_owned_by_a_third(cluster):
    owner, producer, consumer = cluster.add(3)
    rc = fd.RemoteChannel(lambda: fd.Channel(4), owner)
    got = fd.remotecall(consume, consumer, rc)
    fd.remotecall_wait(produce, producer, rc, 50)
    assert got.fetch(timeout=30) == list(range(50))


def test_future_set_by_one_worker_fetched_by_another(cluster):
    a, b = cluster.add(2)
    fut = fd.Future(a)
    reader = fd.remotecall(lambda f: f.fetch() * 2, b, fut)
    fd.remotecall_fetch(lambda f: f.put(21), a, fut)
    assert reader.fetch(timeout=20) == 42
    assert fut.fetch() == 21


def test_unbuffered_remote_channel_hands_the_same_mutated_array(two_workers):
    w = two_workers[0]
    rc = fd.RemoteChannel(lambda: fd.Channel(0), w)

    def send_ten(ch):
        a = np.zeros(1000)
        for i in range(10):
            a[:] = i  # mutated between puts: each put must have delivered its own value
            ch.put(a)
        ch.close()

    fd.remotecall(send_ten, two_workers[1], rc)
    received = [x.copy() for x in rc]
    assert [int(x[0]) for x in received] == list(range(10))
    assert all((x == x[0]).all() for x in received)


def test_channel_iteration_until_closed_and_errors(two_workers):
    w = two_workers[0]
    rc = fd.RemoteChannel(lambda: fd.Channel(100), w)
    for i in range(5):
        fd.put(rc, i)
    assert fd.isready(rc) and fd.fetch(rc) == 0
    fd.close(rc)
    assert list(rc) == list(range(5))
    with pytest.raises(fd.ChannelClosedError):
        rc.put(1)
    with pytest.raises(fd.ChannelClosedError):
        rc.take()
    with pytest.raises(TimeoutError):
        fd.RemoteChannel(w).take(timeout=0.2)


def test_remote_channel_default_and_put_returns_channel(two_workers):
    rc = fd.RemoteChannel(two_workers[0])
    assert fd.put(rc, "x") is rc
    assert rc.isready() is not True or rc.isready()
    assert rc.take() == "x"
    local = fd.RemoteChannel()
    assert local.where == 1
    local.put(5)
    assert fd.take(local) == 5


def test_channel_from_id_on_owner_and_elsewhere(two_workers):
    w = two_workers[0]
    rc = fd.RemoteChannel(lambda: fd.Channel(3), w)
    rrid = fd.remoteref_id(rc)
    size = fd.remotecall_fetch(lambda r: fd.channel_from_id(r).size, w, rrid)
    assert size == 3
    with pytest.raises(KeyError):
        fd.channel_from_id(rrid)
    with pytest.raises(KeyError):
        fd.channel_from_id(fd.RRID(1, 10**12))


def test_custom_channel_type_behind_remote_channel(two_workers):
    class Doubling(fd.Channel):
        def put(self, v, timeout=None):
            return super().put(v * 2, timeout)

    rc = fd.RemoteChannel(lambda: Doubling(5), two_workers[0])
    rc.put(21)
    assert rc.take() == 42
    with pytest.raises(fd.RemoteException):
        fd.RemoteChannel(lambda: "not a channel", two_workers[0])


def test_references_returned_and_nested_keep_working(two_workers):
    a, b = two_workers
    rc = fd.remotecall_fetch(lambda: fd.RemoteChannel(lambda: fd.Channel(2)), a)
    assert rc.where == a
    rc.put("via returned ref")
    outer = fd.RemoteChannel(lambda: fd.Channel(2), b)
    outer.put(rc)  # a channel inside another channel
    inner = outer.take()
    assert inner == rc and hash(inner) == hash(rc)
    assert inner.take() == "via returned ref"


def test_equality_and_hash_by_rrid(two_workers):
    fut = fd.remotecall(lambda: 1, two_workers[0])
    back = fd.remotecall_fetch(lambda f: f, two_workers[1], fut)
    assert back == fut and hash(back) == hash(fut)
    assert back is fut  # the same live object on this process
    assert fut != fd.Future()


def test_dropped_futures_and_channels_are_freed(two_workers):
    w = two_workers[0]
    base = settle(w, refs_on(w))
    futs = [fd.remotecall(np.zeros, w, 10) for _ in range(300)]
    for f in futs[:150]:
        f.fetch()
    chans = [fd.RemoteChannel(w) for _ in range(50)]
    assert refs_on(w) >= base + 50
    del futs, chans
    assert settle(w, base) == base


def test_value_held_by_a_third_process_survives_until_dropped(cluster):
    owner, holder = cluster.add(2)
    fut = fd.Future(owner)
    fd.remotecall_fetch(lambda f: f.put("kept") and None, owner, fut)  # not cached here
    base = refs_on(owner)
    # The holder keeps a reference in a global; the master drops its own.
    fd.remotecall_fetch(keep, holder, "held", fut)
    del fut
    gc.collect()
    time.sleep(0.5)
    assert refs_on(owner) == base, "the holder's reference must keep the value alive"
    assert fd.remotecall_fetch(lambda: kept("held").fetch(), holder) == "kept"
    # Fetched and cached there: the holder gives its hold back, and the value goes.
    assert settle(owner, base - 1) == base - 1


def test_unfetched_reference_held_elsewhere_keeps_value(cluster):
    owner, holder = cluster.add(2)
    rc = fd.RemoteChannel(lambda: fd.Channel(1), owner)
    rc.put("still here")
    base = refs_on(owner)
    fd.remotecall_fetch(keep, holder, "ch", rc)
    del rc
    gc.collect()
    time.sleep(0.5)
    assert refs_on(owner) == base
    assert fd.remotecall_fetch(lambda: kept("ch").take(), holder) == "still here"
    fd.remotecall_fetch(drop, holder, "ch")
    assert settle(owner, base - 1) == base - 1


def test_many_calls_leave_nothing_behind(two_workers):
    w = two_workers[0]
    base_w = settle(w, refs_on(w))
    base_1 = settle(1, refs_on(1))
    for i in range(10_000):
        fd.remotecall_fetch(abs, w, -i)
    futs = [fd.remotecall(abs, w, -i) for i in range(2000)]
    assert [f.fetch() for f in futs] == list(range(2000))
    del futs
    assert settle(w, base_w) == base_w
    assert settle(1, base_1) == base_1


def _fails(i):
    raise ValueError(f"failed {i}")


def _error_text(fut):
    try:
        fd.fetch(fut)
    except fd.RemoteException as exc:
        return str(exc.captured.ex)
    return "no error"


def _sum_of(fut):
    return float(fd.fetch(fut).sum())


def test_futures_passed_on_before_their_values_arrive_still_reach_them(two_workers, monkeypatch):
    # A remotecall's value is pushed to its caller, and the owner keeps no copy when
    # nobody else holds the Future by then. Passing the Future on at once races the
    # receiver's hold against the end of the call; when the call wins, the caller
    # sends the value back to the owner. Either way the receiver gets the value
    # (errors and out-of-band arrays too) and nothing is left behind.
    from fastdist import node as _node

    owner, other = two_workers
    base, base_other = settle(owner, refs_on(owner)), settle(other, refs_on(other))
    n = _node.current()
    restored = []
    restore = n.queue_restore
    monkeypatch.setattr(n, "queue_restore", lambda *a: (restored.append(a[2]), restore(*a)))
    # (Which side wins is timing: go on until the call has won a few times.)
    for i in range(3000):
        assert fd.remotecall_fetch(fd.fetch, other, fd.remotecall(abs, owner, -i)) == i
        failing = fd.remotecall(_fails, owner, i)
        assert fd.remotecall_fetch(_error_text, other, failing) == f"failed {i}"
        if i >= 200 and len(restored) >= 3:
            break
    for i in range(50):
        fut = fd.remotecall(np.full, owner, 100_000, float(i))  # 800 kB: out of band
        assert fd.remotecall_fetch(_sum_of, other, fut) == i * 100_000
    assert restored, "no value was restored: the race this test is about never happened"
    assert settle(owner, base) == base
    assert settle(other, base_other) == base_other
    assert not [f for f in n.pushes.values() if f.where in two_workers]


def test_owner_death_fails_uncached_but_cached_still_returns(cluster):
    import os
    import signal

    owner = cluster.add(1)[0]
    cached = fd.remotecall(lambda: "cached", owner)
    assert cached.fetch() == "cached"
    empty = fd.Future(owner)
    os.kill(fd.remotecall_fetch(os.getpid, owner), signal.SIGKILL)
    assert cached.fetch() == "cached"
    with pytest.raises(fd.ProcessExitedException):
        empty.fetch(timeout=10)
