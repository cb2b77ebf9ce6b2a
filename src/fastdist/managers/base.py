"""The cluster manager interface (Julia's `ClusterManager`, `WorkerConfig`).

Port of Distributed.jl `managers.jl` (the interface half). A manager `launch`es
workers and describes each in a `WorkerConfig` — either `io`, a stream on which
the worker prints `fastdist_worker:PORT#HOST`, or `host` and `port` directly —
and `connect` returns the pair of streams to talk to a worker over (a TCP socket
by default; anything with `read`/`write` for custom transports).
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

from fastdist import node as _node
from fastdist.node import worker_timeout
from fastdist.transport import open_stream

# What `addprocs` puts in `params` for every manager (Julia's `default_addprocs_params`).
COMMON_KEYWORDS = frozenset({"dir", "exename", "exeflags", "topology", "lazy",
                             "enable_threaded_blas", "env"})


@dataclass
class WorkerConfig:
    """What a manager knows about one worker (every field optional, as in Julia)."""

    io: Any = None
    host: Any = None
    port: Any = None
    count: Any = None
    exename: Any = None
    exeflags: Any = None
    userdata: Any = None
    tunnel: Any = None
    multiplex: Any = None
    forward: Any = None
    bind_addr: Any = None
    sshflags: Any = None
    max_parallel: Any = None
    connect_at: Any = None
    process: Any = None
    ospid: Any = None
    environ: Any = None
    ident: Any = None
    connect_idents: Any = None
    enable_threaded_blas: Any = None


class ClusterManager(abc.ABC):
    """Starts and manages workers; subclass it to run workers anywhere.

    Subclasses implement `launch` and `manage`; `kill` and `connect` have
    defaults (ask the worker to exit; open a TCP connection to it).
    """

    # The `addprocs` keywords this manager reads from `params`, beyond the ones
    # every manager gets (`COMMON_KEYWORDS`): any other is refused with a TypeError
    # naming it, so that a misspelt or inapplicable one is not silently ignored.
    # None (the default, for managers written by users): anything passes into
    # `params`, as Julia's addprocs passes every keyword to its manager.
    keywords: ClassVar[frozenset[str] | None] = None
    # Said after a refused keyword: where this manager's other settings go.
    keywords_hint: ClassVar[str] = ""

    @abc.abstractmethod
    def launch(self, params: dict[str, Any], launched: list[WorkerConfig],
               launch_ntfy: threading.Condition) -> None:
        """Start workers; append a WorkerConfig per worker to `launched` and
        `notify_all()` on `launch_ntfy` (holding it) as each one is started."""

    @abc.abstractmethod
    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        """Told of events: `op` is "register", "deregister", "interrupt" or "finalize"."""

    def kill(self, pid: int, config: WorkerConfig) -> None:
        """Stop worker `pid`; by default, ask it to exit."""
        _node.current().ask_to_exit(pid)

    def connect(self, pid: int, config: WorkerConfig) -> tuple[Any, Any]:
        """The (instream, outstream) to talk to worker `pid` over; by default one socket
        to `config.bind_addr` (or `config.host`) and `config.port`, used for both —
        the worker's Unix socket when it runs on this host, TCP otherwise."""
        host = config.bind_addr or config.host
        sock = open_stream(str(host), int(config.port), worker_timeout())
        return sock, sock


def launch(manager: ClusterManager, params: dict[str, Any], launched: list[WorkerConfig],
           launch_ntfy: threading.Condition) -> None:
    """Julia's `launch(manager, params, launched, c)`."""
    manager.launch(params, launched, launch_ntfy)


def manage(manager: ClusterManager, pid: int, config: WorkerConfig, op: str) -> None:
    """Julia's `manage(manager, id, config, op)`."""
    manager.manage(pid, config, op)


def kill(manager: ClusterManager, pid: int, config: WorkerConfig) -> None:
    """Julia's `kill(manager, pid, config)`."""
    manager.kill(pid, config)


def connect(manager: ClusterManager, pid: int, config: WorkerConfig) -> tuple[Any, Any]:
    """Julia's `connect(manager, pid, config)`."""
    return manager.connect(pid, config)
