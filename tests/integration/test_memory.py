"""Memory stays flat under many calls: 100k remote calls and 100k channel operations
leave the resident size of master and worker where it was after a warm-up, and
every per-call record (waiters, references, stored values) is gone.

tests/soak_memory.py runs the same for a million of each.
"""

from __future__ import annotations

import gc
import os
import time

import pytest

import fastdist as fd
from fastdist import node as _node

NCALLS = 100_000
NCHANNEL = 25_000  # put + take pairs: 50k channel operations
WARMUP = 20_000
# A leak of 32 bytes per call would show as 3 MiB over 100k calls.
MAX_GROWTH_KIB = 3 * 1024


def noop():
    return None


def rss_kib(ospid):
    with open(f"/proc/{ospid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {ospid}")


def records():
    """What this process keeps per call or reference (all should return to a baseline)."""
    gc.collect()
    n = _node.current()
    return {"waiters": len(n.waiters), "live_refs": len(n.live_refs), "store": len(n.store),
            "fds": len(os.listdir("/proc/self/fd"))}


def measure(w, wpid):
    # Records first: the first call of `records` on the worker imports this module there.
    worker_records = fd.remotecall_fetch(records, w)
    master_records = records()
    return rss_kib(os.getpid()), rss_kib(wpid), master_records, worker_records


def assert_flat(before, after, what):
    m0, w0, mrec0, wrec0 = before
    m1, w1, mrec1, wrec1 = after
    for key in mrec0:
        assert mrec1[key] <= mrec0[key], f"{what}: master records grew: {mrec0} -> {mrec1}"
        assert wrec1[key] <= wrec0[key], f"{what}: worker records grew: {wrec0} -> {wrec1}"
    assert m1 - m0 < MAX_GROWTH_KIB, f"{what}: master RSS grew by {m1 - m0} KiB"
    assert w1 - w0 < MAX_GROWTH_KIB, f"{what}: worker RSS grew by {w1 - w0} KiB"


@pytest.mark.timeout(300)
def test_many_remote_calls_keep_memory_flat(cluster):
    (w,) = cluster.add(1)
    wpid = fd.remotecall_fetch(os.getpid, w)
    for _ in range(WARMUP):
        fd.remotecall_fetch(noop, w)
    before = measure(w, wpid)
    for _ in range(NCALLS):
        fd.remotecall_fetch(noop, w)
    assert_flat(before, measure(w, wpid), f"{NCALLS} remotecall_fetch")


@pytest.mark.timeout(300)
def test_many_channel_puts_and_takes_keep_memory_flat(cluster):
    (w,) = cluster.add(1)
    wpid = fd.remotecall_fetch(os.getpid, w)
    rc = fd.RemoteChannel(lambda: fd.Channel(16), w)
    for i in range(WARMUP // 2):
        rc.put(i)
        assert rc.take() == i
    before = measure(w, wpid)
    for i in range(NCHANNEL):
        rc.put(i)
        assert rc.take() == i
    assert_flat(before, measure(w, wpid), f"{NCHANNEL} RemoteChannel put/take pairs")


@pytest.mark.timeout(300)
def test_many_futures_are_freed_on_their_owner(cluster):
    # remotecall keeps the value on the worker until the caller's Future is gone:
    # distributed reference counting must give every one of them back.
    (w,) = cluster.add(1)
    wpid = fd.remotecall_fetch(os.getpid, w)
    for _ in range(2_000):
        fd.remotecall(noop, w).fetch()
    before = measure(w, wpid)
    for _ in range(10_000):
        fd.remotecall(noop, w).fetch()
    # The reference-count give-backs travel in batches: wait until they have all landed.
    deadline = time.monotonic() + 10
    after = measure(w, wpid)
    while after[3]["store"] and time.monotonic() < deadline:
        time.sleep(0.05)
        after = measure(w, wpid)
    assert after[3]["store"] == 0, "the worker still holds values of dropped Futures"
    assert_flat(before, after, "10000 remotecall Futures")
