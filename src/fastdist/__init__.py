"""fastdist: Julia's Distributed standard library for Python.

Workers that talk over TCP (or a custom transport), remote calls, futures,
remote channels, worker pools, pmap, `distributed`, `everywhere` and pluggable
cluster managers, on a compiled core. See docs/ and the Julia-to-Python name map.

Example:
    >>> import fastdist as fd
    >>> fd.addprocs(2)
    [2, 3]
    >>> fd.pmap(lambda x: x * x, range(5))
    [0, 1, 4, 9, 16]
"""

from typing import TYPE_CHECKING, Any

from fastdist import _core, _fastpath  # noqa: F401 - each fails with a build hint when not built
from fastdist import farewell as _farewell  # noqa: F401 - at exit, workers' last words are printed
from fastdist.asyncmap import asyncmap
from fastdist.channel import AbstractChannel, Channel
from fastdist.cluster import (
    addprocs,
    interrupt,
    myid,
    nprocs,
    nworkers,
    procs,
    rmprocs,
    worker_id_from_socket,
    workers,
)
from fastdist.exceptions import (
    CapturedException,
    ChannelClosedError,
    ClusterError,
    CompositeException,
    FutureAlreadySetError,
    ProcessExitedException,
    RemoteException,
)
from fastdist.executor import Executor
from fastdist.managers import (
    ClusterManager,
    ElasticManager,
    LocalManager,
    MPIManager,
    SlurmManager,
    SSHManager,
    WorkerConfig,
    connect,
    kill,
    launch,
    manage,
)
from fastdist.node import cluster_cookie
from fastdist.pmap import pmap
from fastdist.refs import RRID, Future, RemoteChannel, channel_from_id, remoteref_id
from fastdist.remotecall import (
    close,
    fetch,
    isready,
    put,
    remote_do,
    remotecall,
    remotecall_fetch,
    remotecall_wait,
    take,
    wait,
)
from fastdist.spawn import clear, distributed, everywhere, fetch_any, fetchfrom, spawnat
from fastdist.stats import stats
from fastdist.tasks import Task, run_async, sync
from fastdist.workerpool import (
    AbstractWorkerPool,
    CachingPool,
    WorkerPool,
    default_worker_pool,
    remote,
)
from fastdist.workerproc import init_worker, process_messages, start_worker

if TYPE_CHECKING:
    from fastdist.sharedarray import (
        SharedArray,
        SharedMatrix,
        SharedVector,
        indexpids,
        localindices,
        sdata,
    )

__version__ = "0.1.0"

# Imported on first use: they need numpy, which a worker that never meets a shared
# array should not pay for at start-up.
_SHARED_ARRAY_NAMES = frozenset(
    {"SharedArray", "SharedMatrix", "SharedVector", "indexpids", "localindices", "sdata"})


def __getattr__(name: str) -> Any:
    if name in _SHARED_ARRAY_NAMES:
        from fastdist import sharedarray

        return getattr(sharedarray, name)
    raise AttributeError(f"module 'fastdist' has no attribute {name!r}")


__all__ = [
    "RRID",
    "AbstractChannel",
    "AbstractWorkerPool",
    "CachingPool",
    "CapturedException",
    "Channel",
    "ChannelClosedError",
    "ClusterError",
    "ClusterManager",
    "CompositeException",
    "ElasticManager",
    "Executor",
    "Future",
    "FutureAlreadySetError",
    "LocalManager",
    "MPIManager",
    "ProcessExitedException",
    "RemoteChannel",
    "RemoteException",
    "SSHManager",
    "SharedArray",
    "SharedMatrix",
    "SharedVector",
    "SlurmManager",
    "Task",
    "WorkerConfig",
    "WorkerPool",
    "addprocs",
    "asyncmap",
    "channel_from_id",
    "clear",
    "close",
    "cluster_cookie",
    "connect",
    "default_worker_pool",
    "distributed",
    "everywhere",
    "fetch",
    "fetch_any",
    "fetchfrom",
    "indexpids",
    "init_worker",
    "interrupt",
    "isready",
    "kill",
    "launch",
    "localindices",
    "manage",
    "myid",
    "nprocs",
    "nworkers",
    "pmap",
    "process_messages",
    "procs",
    "put",
    "remote",
    "remote_do",
    "remotecall",
    "remotecall_fetch",
    "remotecall_wait",
    "remoteref_id",
    "rmprocs",
    "run_async",
    "sdata",
    "spawnat",
    "start_worker",
    "stats",
    "sync",
    "take",
    "wait",
    "worker_id_from_socket",
    "workers",
]
