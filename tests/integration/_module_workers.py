"""Workers shared by the tests of one module (pools, pmap, spawn): starting two
workers per test would cost more than the tests themselves.

`start()` adds workers; `stop()` removes every worker and returns the worker
processes left behind (counted as the `cluster` fixture counts them), which a
fixture asserts is empty. A test that must change membership (kill or remove
a worker) adds an extra worker of its own.
"""

from __future__ import annotations

import os
import time

from conftest import child_pids, wait_no_children

import fastdist as fd


class ModuleWorkers:
    def __init__(self) -> None:
        self.before: set[int] = set()

    def start(self, n: int = 2) -> list[int]:
        self.before = child_pids()
        return fd.addprocs(n)

    def stop(self, timeout: float = 10.0) -> set[int]:
        live = [p for p in fd.workers() if p != 1]
        if live:
            fd.rmprocs(live, waitfor=30)
        return wait_no_children(self.before, timeout)


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
