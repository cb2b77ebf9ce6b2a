"""Cluster managers: how workers are started, connected, told things and stopped."""

from fastdist.managers.base import (
    ClusterManager,
    WorkerConfig,
    connect,
    kill,
    launch,
    manage,
)
from fastdist.managers.elastic import ElasticManager
from fastdist.managers.local import LocalManager
from fastdist.managers.mpi import MPIManager
from fastdist.managers.slurm import SlurmManager
from fastdist.managers.ssh import SSHManager

__all__ = [
    "ClusterManager",
    "ElasticManager",
    "LocalManager",
    "MPIManager",
    "SSHManager",
    "SlurmManager",
    "WorkerConfig",
    "connect",
    "kill",
    "launch",
    "manage",
]
