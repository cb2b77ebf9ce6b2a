"""`timeout=` on fetch, wait, take and put: TimeoutError in time, and nothing is lost after."""

from __future__ import annotations

import time

import pytest

import fastdist as fd

pytestmark = pytest.mark.timeout(60)


def take_with_timeout(rc, timeout):
    return fd.take(rc, timeout=timeout)


class Elapsed:
    def __enter__(self):
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc):
        self.seconds = time.monotonic() - self.start
        return False


def test_future_fetch_and_wait_timeout_then_value(two_workers):
    fut = fd.remotecall(time.sleep, two_workers[0], 2.0)
    with Elapsed() as e, pytest.raises(TimeoutError):
        fd.fetch(fut, timeout=0.2)
    assert 0.15 <= e.seconds < 1.5
    with pytest.raises(TimeoutError):
        fd.wait(fut, timeout=0.05)
    assert fd.fetch(fut, timeout=30) is None
    assert fd.wait(fut, timeout=0.01) is fut


def test_future_owned_by_worker_fetch_timeout(two_workers):
    fut = fd.Future(two_workers[1])
    with Elapsed() as e, pytest.raises(TimeoutError):
        fut.fetch(timeout=0.2)
    assert 0.15 <= e.seconds < 2.0
    fut.put("later")
    assert fut.fetch(timeout=10) == "later"


def test_remote_channel_take_timeout_on_empty(two_workers):
    rc = fd.RemoteChannel(lambda: fd.Channel(4), two_workers[0])
    with Elapsed() as e, pytest.raises(TimeoutError):
        fd.take(rc, timeout=0.25)
    assert 0.2 <= e.seconds < 2.0
    with pytest.raises(TimeoutError):
        rc.take(timeout=0.05)
    # The timed-out takes left nothing waiting on the owner to steal the next value.
    fd.put(rc, "first")
    fd.put(rc, "second")
    assert fd.take(rc, timeout=5) == "first"
    assert fd.take(rc, timeout=5) == "second"


def test_remote_channel_fetch_and_wait_timeout(two_workers):
    rc = fd.RemoteChannel(two_workers[1])
    with Elapsed() as e, pytest.raises(TimeoutError):
        fd.fetch(rc, timeout=0.2)
    assert 0.15 <= e.seconds < 2.0
    with pytest.raises(TimeoutError):
        fd.wait(rc, timeout=0.1)
    rc.put(7)
    assert fd.fetch(rc, timeout=5) == 7
    assert fd.isready(rc)
    assert fd.take(rc, timeout=5) == 7


def test_remote_channel_put_timeout_when_full(two_workers):
    rc = fd.RemoteChannel(lambda: fd.Channel(1), two_workers[0])
    fd.put(rc, 1)
    with Elapsed() as e, pytest.raises(TimeoutError):
        fd.put(rc, 2, timeout=0.2)
    assert 0.15 <= e.seconds < 2.0
    assert fd.take(rc) == 1
    assert not fd.isready(rc), "the timed-out put must not have landed"


def test_take_timeout_from_a_worker_on_a_master_channel(two_workers):
    rc = fd.RemoteChannel(lambda: fd.Channel(2))  # owned by pid 1
    with pytest.raises(fd.RemoteException) as info:
        fd.remotecall_fetch(take_with_timeout, two_workers[0], rc, 0.2)
    assert isinstance(info.value.captured.ex, TimeoutError)
    rc.put("v")
    assert fd.remotecall_fetch(take_with_timeout, two_workers[1], rc, 5) == "v"


def test_take_timeout_between_two_workers(two_workers):
    a, b = two_workers
    rc = fd.RemoteChannel(lambda: fd.Channel(1), a)
    with pytest.raises(fd.RemoteException) as info:
        fd.remotecall_fetch(take_with_timeout, b, rc, 0.2)
    assert isinstance(info.value.captured.ex, TimeoutError)


def test_waiting_take_is_woken_by_put_before_timeout(two_workers):
    rc = fd.RemoteChannel(two_workers[0])
    fd.remote_do(lambda ch: (time.sleep(0.2), ch.put("arrived")), two_workers[1], rc)
    with Elapsed() as e:
        assert fd.take(rc, timeout=10) == "arrived"
    assert e.seconds < 5


def test_take_on_closed_empty_channel_raises_closed_not_timeout(two_workers):
    rc = fd.RemoteChannel(two_workers[0])
    fd.close(rc)
    with pytest.raises(fd.ChannelClosedError):
        fd.take(rc, timeout=5)


def test_local_channel_timeouts():
    ch = fd.Channel(1)
    with pytest.raises(TimeoutError):
        ch.take(timeout=0.05)
    with pytest.raises(TimeoutError):
        fd.fetch(ch, timeout=0.05)
    ch.put(1)
    with pytest.raises(TimeoutError):
        fd.put(ch, 2, timeout=0.05)
    assert fd.take(ch, timeout=1) == 1
