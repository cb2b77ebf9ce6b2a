"""Shared pytest configuration for the fastdist test suite.

``services.plugin`` provides fixtures that start real servers (sshd, network
namespace hosts, a one-node Slurm cluster) for the integration tests.
``cluster`` starts real local workers and, at teardown, removes them and fails
the test if any worker process is left behind.
"""

from __future__ import annotations

import os
import time

import pytest

pytest_plugins = ["services.plugin"]


def child_pids(parent: int | None = None) -> set[int]:
    """Live (non-zombie) processes whose parent is `parent`; by default this process's,
    with the workers of its fastdist fork server in place of the server (which lives as
    long as this process: a helper, not a worker)."""
    if parent is not None:
        return _children(parent)
    found = _children(os.getpid())
    for pid in [p for p in found if _is_fork_server(p)]:
        found.discard(pid)
        found |= _children(pid)
    return found


def _children(parent: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid == parent and state != "Z":
            found.add(int(entry))
    return found


def _is_fork_server(pid: int) -> bool:
    # By command line, not fastdist.forkserver.server_pid(): that is known only once the
    # server answers, and a test may look in between.
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"fastdist.forkserver" in f.read().split(b"\0")
    except OSError:
        return False


def wait_no_children(before: set[int], timeout: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = child_pids() - before
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


class Cluster:
    """Adds workers for one test; removes every worker at the end."""

    def __init__(self) -> None:
        import fastdist as fd

        self.fd = fd
        self.pids: list[int] = []

    def add(self, n: int = 2, **kwargs: object) -> list[int]:
        pids = self.fd.addprocs(n, **kwargs)
        self.pids.extend(pids)
        return pids

    def teardown(self) -> None:
        fd = self.fd
        live = [p for p in fd.workers() if p != 1]
        if live:
            fd.rmprocs(live, waitfor=30)


@pytest.fixture
def cluster():
    """Real local worker processes: `cluster.add(n, **addprocs_kwargs)`."""
    from fastdist import forkserver

    if forkserver.enabled():
        # Up front, so a test watching for new children of this process sees workers only.
        forkserver.get_server()
    before = child_pids()
    c = Cluster()
    try:
        yield c
    finally:
        c.teardown()
        left = wait_no_children(before)
        assert not left, f"worker processes left behind: {sorted(left)}"


@pytest.fixture
def two_workers(cluster):
    """The pids of two fresh local workers."""
    return cluster.add(2)
