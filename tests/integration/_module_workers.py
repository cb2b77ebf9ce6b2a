"""Workers shared by the tests of one module (pools, pmap, spawn): starting two
workers per test would cost more than the tests themselves.

`shared_workers(n)` adds workers for a module-scoped fixture; at its end it removes
every worker and asserts that no worker process is left behind (counted as the
`cluster` fixture counts them). A test that must change membership (kill or
remove a worker) adds an extra worker of its own.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

from conftest import child_pids, wait_no_children

import fastdist as fd


@contextlib.contextmanager
def shared_workers(n: int = 2) -> Iterator[list[int]]:
    """`n` workers for the tests of a module; afterwards every worker is removed, and
    none of their processes may be left behind."""
    before = child_pids()
    pids = fd.addprocs(n)
    yield pids
    live = [p for p in fd.workers() if p != 1]
    if live:
        fd.rmprocs(live, waitfor=30)
    left = wait_no_children(before, 10.0)
    assert not left, f"worker processes left behind: {sorted(left)}"


def os_pid(w: int) -> int:
    """The operating-system pid of worker `w`."""
    return int(fd.remotecall_fetch(os.getpid, w))


def wait_gone(w: int, timeout: float = 10.0) -> None:
    """Wait until this process no longer counts `w` among the workers."""
    deadline = time.monotonic() + timeout
    while w in fd.workers():
        if time.monotonic() > deadline:
            raise AssertionError(f"worker {w} still listed after {timeout} s")
        time.sleep(0.02)
