"""MPIManager with a real OpenMPI and mpi4py: four workers as one MPI job, their ranks,
a collective among them driven by remote calls, their output, and that removing
them ends the mpiexec job with nothing left behind; launch failures are clear."""

from __future__ import annotations

import os
import signal
import time

import pytest
from services._util import ensure_installed
from support import collect_printed, eventually, os_alive

import fastdist as fd
from fastdist.managers.mpi import MPIManager

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def mpi(cluster, monkeypatch):
    """OpenMPI and mpi4py present (installed by tests/services/install.sh and the test
    extra); as root, OpenMPI's consent to run. `cluster` removes the workers and checks
    that no process is left."""
    ensure_installed("mpiexec")
    import mpi4py  # noqa: F401 - fails the test, with the reason, when it is missing

    if os.geteuid() == 0:
        monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT", "1")
        monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")

    def add(np=4, **kw):
        kw.setdefault("mpiexec_args", ("--oversubscribe",))
        kw.setdefault("addr", "127.0.0.1")
        manager = MPIManager(np, **kw)
        pids = fd.addprocs(manager)
        cluster.pids.extend(pids)
        return manager, pids

    return add


def descendants(ospid):
    """Live processes under `ospid` (children, their children ...)."""
    from conftest import child_pids

    found, todo = set(), [ospid]
    while todo:
        kids = child_pids(todo.pop())
        found |= kids
        todo.extend(kids)
    return found


def allreduce_of_ranks():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm.Get_size(), comm.allreduce(comm.Get_rank() + 1)


def cmdline(ospid):
    with open(f"/proc/{ospid}/cmdline", "rb") as f:
        return f.read()


def test_four_workers_are_one_mpi_job_driven_by_remote_calls(mpi):
    manager, pids = mpi(4)
    assert len(pids) == 4 and set(pids) <= set(fd.workers())
    assert sorted(manager.ranks) == sorted(pids)
    assert sorted(manager.ranks.values()) == [0, 1, 2, 3]
    for pid, rank in manager.ranks.items():
        assert fd.remotecall_fetch(
            lambda: __import__("mpi4py.MPI").MPI.COMM_WORLD.Get_rank(), pid) == rank
    # a collective among the workers, each rank's part started by a remote call
    futures = [fd.remotecall(allreduce_of_ranks, p) for p in pids]
    assert [f.fetch() for f in futures] == [(4, 10)] * 4
    # the ranks are mpiexec's processes; the cookie is on none of their command lines
    mpiexec = manager.process
    assert mpiexec is not None and mpiexec.poll() is None
    ospids = {fd.remotecall_fetch(os.getpid, p) for p in pids}
    assert ospids <= descendants(mpiexec.pid)
    cookie = fd.cluster_cookie().encode()
    for ospid in [mpiexec.pid, *ospids]:
        assert cookie not in cmdline(ospid)
    # they are ordinary workers: the default pool, pmap, worker-to-worker calls
    assert set(pids) <= set(fd.default_worker_pool().workers())
    assert fd.pmap(lambda x: x + 1, range(20)) == list(range(1, 21))
    assert fd.remotecall_fetch(lambda t: fd.remotecall_fetch(fd.myid, t), pids[0], pids[3]) \
        == pids[3]


def test_removing_the_workers_ends_the_mpiexec_job(mpi):
    manager, pids = mpi(4)
    futures = [fd.remotecall(allreduce_of_ranks, p) for p in pids]
    assert [f.fetch() for f in futures] == [(4, 10)] * 4
    mpiexec = manager.process
    ospids = [fd.remotecall_fetch(os.getpid, p) for p in pids]
    fd.rmprocs(pids, waitfor=60)
    # every rank finalised MPI and exited: mpiexec ends cleanly, nothing is left
    assert mpiexec.wait(timeout=30) == 0
    assert eventually(lambda: not any(os_alive(p) for p in ospids), 10)
    assert not descendants(mpiexec.pid)
    assert manager.ranks == {}
    assert fd.workers() == [1]


def test_worker_output_is_relayed_under_its_pid(mpi):
    _, pids = mpi(2)
    with collect_printed() as printed:
        fd.remotecall_fetch(lambda: print("said by a rank", flush=True), pids[1])
        seen = printed.wait_for("said by a rank")
    assert f"From worker {pids[1]}:\tsaid by a rank" in seen["out"], seen


def test_removing_some_of_the_workers_ends_the_job(mpi):
    # MPI cannot shrink COMM_WORLD: the others go too, and say so at once.
    manager, pids = mpi(3)
    pending = fd.remotecall(time.sleep, pids[2], 120)
    fd.rmprocs(pids[0], waitfor=60)
    with pytest.raises(fd.ProcessExitedException):
        pending.fetch()
    assert eventually(lambda: fd.workers() == [1], 30), fd.workers()
    assert manager.process.wait(timeout=30) != 0


def test_a_killed_rank_fails_its_calls_and_ends_the_job(mpi):
    _, pids = mpi(2)
    victim = fd.remotecall_fetch(os.getpid, pids[0])
    pending = fd.remotecall(time.sleep, pids[1], 120)
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(fd.ProcessExitedException):
        pending.fetch()
    assert eventually(lambda: fd.workers() == [1], 30), fd.workers()


def test_launch_failures_are_clear_errors(mpi):
    with pytest.raises(fd.ClusterError, match="not on PATH"):
        fd.addprocs(MPIManager(2, mpiexec="no-such-mpiexec"))
    # More ranks than cores without --oversubscribe: OpenMPI refuses, and says why.
    with pytest.raises(fd.ClusterError, match=r"mpiexec exited .*slots"):
        fd.addprocs(MPIManager(os.cpu_count() * 4, addr="127.0.0.1"))
    with pytest.raises(TypeError, match="tunnel"):
        fd.addprocs(MPIManager(2), tunnel=True)
    with pytest.raises(TypeError, match="sequence"):
        MPIManager(2, mpiexec_args="--oversubscribe")
    with pytest.raises(ValueError):
        MPIManager(-1)
    assert fd.workers() == [1]


def test_the_command_it_runs(mpi):
    manager = MPIManager(3, mpiexec_args=("--oversubscribe", "--bind-to", "none"))
    argv = manager.command({"exename": "/opt/py", "exeflags": "-Xdev"}, "10.0.0.1:7000")
    assert argv[:3] == ["mpiexec", "-n", "3"]
    assert argv[argv.index("--oversubscribe"):argv.index("/opt/py")] == \
        ["--oversubscribe", "--bind-to", "none"]
    assert argv[argv.index("/opt/py"):] == ["/opt/py", "-Xdev", "-m", "fastdist.worker",
                                            "--join", "10.0.0.1:7000", "--mpi"]
    assert "-x" in argv and "FASTDIST_COOKIE" in argv  # Open MPI: by name, to every host
