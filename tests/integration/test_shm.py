"""Large buffers between processes of one host go through shared memory, transparently:
right values both ways, arrays that live in the shared pages, segments reused and
bounded, nothing left behind when a worker dies, and the socket everywhere else."""

from __future__ import annotations

import gc
import os
import signal

import numpy as np
import pytest
from support import wait_until

import fastdist as fd
from fastdist.sharedmem import MAX_SEGMENTS

pytestmark = pytest.mark.timeout(90)

MB = 1 << 20


def _peer_stats(pid: int, peer: int) -> dict:
    return fd.stats(pid)["peers"][peer]


def _checksum(a):
    return float(a.sum()), a.dtype.str, a.shape


def _lives_in_shared_memory(a) -> bool:
    base = a
    while base is not None:
        if type(base).__name__ == "SharedBuffer":
            return True
        nxt = getattr(base, "base", None)
        base = nxt if nxt is not None else getattr(base, "obj", None)
    return False


def _arange(n, scale=1.0):
    return np.arange(n, dtype=np.float64) * scale


def _where_is(a):
    return _lives_in_shared_memory(a)


def _send_until_shared(w, a, limit=5):
    """The first large frame to a peer asks whether it can map our segments; the
    frames after the answer use them."""
    for _ in range(limit):
        fd.remotecall_fetch(_checksum, w, a)
        if _peer_stats(1, w)["shm"]:
            return
    raise AssertionError("the worker never accepted shared memory")


def _fetch_until_shared(w, limit=5):
    """The same for results: the worker's first large reply asks the master."""
    for _ in range(limit):
        fd.remotecall_fetch(_arange, w, 2 * MB)
        if _peer_stats(w, 1)["shm"]:
            return
    raise AssertionError("the master never accepted the worker's shared memory")


def test_large_arrays_travel_through_shared_memory_both_ways(two_workers):
    w = two_workers[0]
    a = np.random.default_rng(1).random(2 * MB)  # 16 MB
    _send_until_shared(w, a)
    sent = _peer_stats(1, w)["shm_msgs_sent"]
    assert fd.remotecall_fetch(_checksum, w, a) == _checksum(a)
    assert fd.remotecall_fetch(_where_is, w, a) is True  # the worker's array is the shared page
    assert _peer_stats(1, w)["shm_msgs_sent"] >= sent + 2
    # Results come back the same way once the master has answered the worker's offer.
    for _ in range(3):
        back = fd.remotecall_fetch(_arange, w, 3 * MB, 0.5)
    assert np.array_equal(back, _arange(3 * MB, 0.5))
    assert _lives_in_shared_memory(back)
    assert _peer_stats(w, 1)["shm"] and _peer_stats(w, 1)["shm_msgs_sent"] >= 1
    # Small buffers and plain values keep the socket.
    small = np.ones(1000)
    before = _peer_stats(1, w)["shm_msgs_sent"]
    assert fd.remotecall_fetch(_checksum, w, small) == _checksum(small)
    assert _peer_stats(1, w)["shm_msgs_sent"] == before


def _sums(d):
    return {k: float(v.sum()) for k, v in d.items()}


def test_a_value_of_many_arrays_travels_in_one_segment(two_workers):
    w = two_workers[0]
    many = {f"a{i}": np.full(12_800 + i, float(i)) for i in range(40)}  # 40 x 100 kB
    _send_until_shared(w, np.ones(2 * MB))
    for _ in range(5):
        sent, segments = _peer_stats(1, w)["shm_msgs_sent"], _peer_stats(1, w)["shm_segments"]
        assert fd.remotecall_fetch(_sums, w, many) == _sums(many)
        assert _peer_stats(1, w)["shm_msgs_sent"] == sent + 1
    assert _peer_stats(1, w)["shm_segments"] <= segments + 1


def test_arrays_held_by_the_receiver_keep_their_segments_and_the_rest_is_bounded(two_workers):
    # The master keeps every result: each holds its segment, so the worker makes new
    # ones up to its limit and then sends through the socket; every value is right.
    w = two_workers[0]
    _fetch_until_shared(w)
    kept = [fd.remotecall_fetch(_arange, w, 2 * MB, float(i)) for i in range(MAX_SEGMENTS + 2)]
    for i, a in enumerate(kept):
        assert np.array_equal(a, _arange(2 * MB, float(i)))
    assert 1 <= _peer_stats(w, 1)["shm_segments"] <= MAX_SEGMENTS
    shared = sum(_lives_in_shared_memory(a) for a in kept)
    assert 1 <= shared <= MAX_SEGMENTS  # and the others came through the socket
    # Let go of them: the segments are filled again, no new ones.
    del kept, a
    gc.collect()
    segments = _peer_stats(w, 1)["shm_segments"]
    for _ in range(20):
        assert fd.remotecall_fetch(_arange, w, 2 * MB, 3.0)[-1] == (2 * MB - 1) * 3.0
    assert _peer_stats(w, 1)["shm_segments"] == segments


def test_pmap_and_futures_carry_large_arrays_through_shared_memory(two_workers):
    arrays = [np.full(MB, float(i)) for i in range(12)]
    for w in two_workers:
        _send_until_shared(w, arrays[0])
    assert fd.pmap(_checksum, arrays) == [_checksum(a) for a in arrays]
    futs = [fd.remotecall(_checksum, w, arrays[i]) for i, w in enumerate(two_workers)]
    assert [f.fetch() for f in futs] == [_checksum(arrays[0]), _checksum(arrays[1])]
    assert sum(_peer_stats(1, w)["shm_msgs_sent"] for w in two_workers) >= 14


def test_a_dead_workers_arrays_stay_readable_and_nothing_is_left_in_dev_shm(cluster):
    before = set(os.listdir("/dev/shm"))
    w = cluster.add(1)[0]
    for _ in range(3):
        got = fd.remotecall_fetch(_arange, w, 2 * MB, 2.0)
    assert _lives_in_shared_memory(got)
    os.kill(fd.remotecall_fetch(os.getpid, w), signal.SIGKILL)
    wait_until(lambda: w not in fd.workers(), 10, "the killed worker to leave")
    assert got[12345] == 12345 * 2.0  # the master's mapping keeps the pages
    assert set(os.listdir("/dev/shm")) == before


def test_segments_left_idle_are_given_back_on_both_sides(two_workers):
    from fastdist.sharedmem import IDLE_SECONDS

    w = two_workers[0]
    a = np.ones(2 * MB)
    _send_until_shared(w, a)
    assert fd.remotecall_fetch(_checksum, w, a) == _checksum(a)  # through a segment now
    for _ in range(3):
        kept = fd.remotecall_fetch(_arange, w, 2 * MB)
    assert _peer_stats(1, w)["shm_segments"] >= 1 and _peer_stats(w, 1)["shm_mapped"] >= 1
    # Nothing for a while: the master's segment goes, and the worker's mapping of it;
    # of the worker's, only the one that our `kept` array still uses stays.
    wait_until(lambda: _peer_stats(1, w)["shm_segments"] == 0
               and _peer_stats(w, 1)["shm_mapped"] == 0
               and _peer_stats(w, 1)["shm_segments"] == 1
               and _peer_stats(1, w)["shm_mapped"] == 1, IDLE_SECONDS + 10,
               "idle segments to be dropped")
    assert kept[-1] == 2 * MB - 1
    # Large transfers after that make segments again.
    assert fd.remotecall_fetch(_checksum, w, a) == _checksum(a)
    assert _peer_stats(1, w)["shm_segments"] == 1


def _send_unmappable_segments(on: bool) -> None:
    """On a worker: make its large frames name a segment nobody can open."""
    from fastdist import node
    from fastdist._core._shm import DESCRIPTOR
    from fastdist.sharedmem import FLAG_SHM, SharedMemory

    shm = node.current().shm
    if not on:
        del shm.outgoing  # back to the class's method
        return

    def forged(conn, flags, buffers):
        flags, buffers = SharedMemory.outgoing(shm, conn, flags, buffers)
        if not flags & FLAG_SHM:
            return flags, buffers
        return flags, [DESCRIPTOR.pack(os.getpid(), 1 << 20, 1, 1 << 30, 1, 4096, 8)
                       for _ in buffers]

    shm.outgoing = forged


def test_a_result_whose_segment_cannot_be_mapped_fails_that_call_only(two_workers):
    w = two_workers[0]
    _fetch_until_shared(w)
    fd.remotecall_fetch(_send_unmappable_segments, w, True)
    try:
        with pytest.raises(fd.RemoteException, match="segment"):
            fd.remotecall_fetch(_arange, w, 2 * MB)
        fut = fd.remotecall(_arange, w, 2 * MB)
        with pytest.raises(fd.RemoteException, match="segment"):
            fut.fetch(timeout=10)
    finally:
        fd.remotecall_fetch(_send_unmappable_segments, w, False)
    assert np.array_equal(fd.remotecall_fetch(_arange, w, 2 * MB), _arange(2 * MB))


class _FailingOutbox:
    """Stands in for a worker's segments when none can be made (no memory, no fds)."""

    nsegments = 0

    def put(self, buffers):
        raise OSError(24, "Too many open files")

    def close(self):
        pass


def _segments_fail(on: bool) -> None:
    from fastdist import node

    shm = node.current().shm
    if on:
        shm._outboxes[1] = _FailingOutbox()
    else:
        shm._outboxes.pop(1, None)


def test_a_segment_that_cannot_be_made_sends_through_the_socket(two_workers):
    w = two_workers[0]
    _fetch_until_shared(w)
    fd.remotecall_fetch(_segments_fail, w, True)
    try:
        sent = _peer_stats(w, 1)["shm_msgs_sent"]
        assert np.array_equal(fd.remotecall_fetch(_arange, w, 2 * MB, 4.0), _arange(2 * MB, 4.0))
        assert _peer_stats(w, 1)["shm_msgs_sent"] == sent
    finally:
        fd.remotecall_fetch(_segments_fail, w, False)


def test_tcp_peers_and_a_disabled_shared_memory_use_the_socket(cluster, monkeypatch):
    a = np.ones(2 * MB)
    monkeypatch.setenv("FASTDIST_UNIX_SOCKETS", "0")  # read when the master connects
    (tcp,) = cluster.add(1)
    monkeypatch.delenv("FASTDIST_UNIX_SOCKETS")
    (unix,) = cluster.add(1, env={"FASTDIST_SHM": "0"})  # this worker neither offers nor accepts
    for w in (tcp, unix):
        for _ in range(3):
            assert fd.remotecall_fetch(_checksum, w, a) == _checksum(a)
            assert np.array_equal(fd.remotecall_fetch(_arange, w, 2 * MB), _arange(2 * MB))
        assert not _peer_stats(1, w)["shm"] and _peer_stats(1, w)["shm_msgs_sent"] == 0
        assert not _peer_stats(w, 1)["shm"]
