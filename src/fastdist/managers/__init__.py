"""Cluster managers: how workers are started, connected, told things and stopped."""

from fastdist.managers.base import (
    ClusterManager,
    WorkerConfig,
    connect,
    kill,
    launch,
    manage,
)
from fastdist.managers.local import LocalManager

__all__ = ["ClusterManager", "LocalManager", "WorkerConfig", "connect", "kill", "launch", "manage"]
