"""Workers shared by the tests of one module (pools, pmap, spawn): starting two
workers per test would cost more than the tests themselves.

`start()` adds workers; `stop()` removes every worker and returns the worker
processes left behind, which a fixture asserts is empty. A test that must
change membership (kill or remove a worker) adds an extra worker of its own.
"""

from __future__ import annotations

import os
import time

import fastdist as fd


def _children() -> set[int]:
    me = os.getpid()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            found.add(int(entry))
    return found


class ModuleWorkers:
    def __init__(self) -> None:
        self.before: set[int] = set()

    def start(self, n: int = 2) -> list[int]:
        self.before = _children()
        return fd.addprocs(n)

    def stop(self, timeout: float = 10.0) -> set[int]:
        live = [p for p in fd.workers() if p != 1]
        if live:
            fd.rmprocs(live, waitfor=30)
        deadline = time.monotonic() + timeout
        while True:
            left = _children() - self.before
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)


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
