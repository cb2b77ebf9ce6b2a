"""ElasticManager: workers that join by themselves, at any time, from anywhere.

After ClusterManagers.jl's `ElasticManager`. The master listens; a worker started
by anything that can run a command — a batch script, a container, a scheduler
fastdist knows nothing of — joins with `python -m fastdist.worker --join HOST:PORT`
(`connect_command()`), its cookie from FASTDIST_COOKIE or stdin. Each worker
that authenticated (managers/joining.py) is added by `addprocs(manager)` on a
thread of the manager's, one worker per call, as Julia's manager does: pid,
IDENTIFY, the other workers told, the topology's links, the default pool — so
`workers()`, `default_worker_pool()` and a `pmap` already running see it at once,
and one that dies is dropped as any worker is.
"""

from __future__ import annotations

import shlex
import sys
import threading
import time
from collections import deque
from typing import Any

from fastdist import node as _node
from fastdist.channel import check_timeout
from fastdist.exceptions import ClusterError
from fastdist.managers.base import ClusterManager, WorkerConfig
from fastdist.managers.joining import JoinedConnect, JoinListener, ensure_master


class ElasticManager(JoinedConnect, ClusterManager):
    """Listen on `addr:port` for workers that join by themselves (Julia's ElasticManager).

    Args:
        addr: the address to listen on; "0.0.0.0" for workers on other machines
            (`connect_command()` then names this machine's address).
        port: the port; 0 picks a free one (see `address`).
        cookie: the cluster's cookie to use from now on; None keeps the current one
            (`fastdist.cluster_cookie()`), which joining workers must be given.

    Raises:
        RuntimeError: not on the master (pid 1).
        OSError: the address cannot be listened on.

    Example:
        >>> em = fd.ElasticManager()
        >>> em.connect_command()
        '/usr/bin/python3 -m fastdist.worker --join 127.0.0.1:41023'
        >>> # run that anywhere with FASTDIST_COOKIE set, then:
        >>> em.wait_for(2, timeout=60)
        [2, 3]
    """

    keywords = frozenset()
    keywords_hint = "ElasticManager's workers join by themselves (connect_command, wait_for)"

    def __init__(self, addr: str = "127.0.0.1", port: int = 0, cookie: str | None = None) -> None:
        ensure_master(ElasticManager)
        if cookie is not None and cookie != _node.cluster_cookie():
            if _node.current().worker_pids():
                raise ValueError("this cluster has workers already, which hold its current "
                                 "cookie: ElasticManager(cookie=...) can only set it before")
            _node.cluster_cookie(cookie)
        self._pending: deque[WorkerConfig] = deque()
        # Guards the pending workers, the pids and `_closed`; notified when any changes.
        self._changed = threading.Condition()
        self._pids: list[int] = []
        self._closed = False
        self._listener = JoinListener(addr, int(port), self._joined, name="fastdist-elastic")
        threading.Thread(target=self._add_joined, name="fastdist-elastic-add",
                         daemon=True).start()

    def __repr__(self) -> str:
        host, port = self.address
        return f"ElasticManager(addr={host!r}, port={port}, workers={self.pids()})"

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) that workers join at."""
        return self._listener.address

    def connect_command(self, exename: str | None = None) -> str:
        """The shell command that starts a worker joining this cluster (Julia's
        `get_connect_cmd`); give it the cookie in FASTDIST_COOKIE or on its stdin.

        Args:
            exename: the Python to run; default this process's interpreter.
        """
        host, port = self.address
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return f"{shlex.quote(exename or sys.executable)} -m fastdist.worker --join {where}"

    def pids(self) -> list[int]:
        """The workers that joined through this manager and are still in the cluster."""
        with self._changed:
            return self._present()

    def _present(self) -> list[int]:
        # (Its manager hears of a worker's loss a moment after the cluster does.)
        peers = _node.current().peers
        return sorted(p for p in self._pids if p in peers)

    def wait_for(self, n: int, timeout: float | None = None) -> list[int]:
        """Block until `n` workers that joined through this manager are in the cluster.

        Returns:
            Their pids.

        Raises:
            TimeoutError: fewer than `n` within `timeout` seconds (None: no limit).
        """
        timeout = check_timeout(timeout, "timeout")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while len(present := self._present()) < n:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{len(present)} of {n} workers joined within "
                                       f"{timeout:g} s (start them with connect_command())")
                self._changed.wait(left)
            return present

    def close(self) -> None:
        """Stop listening; workers that joined stay in the cluster."""
        self._listener.close()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    # -- ClusterManager -------------------------------------------------------------------

    def launch(self, params: dict[str, Any], launched: list[WorkerConfig],
               launch_ntfy: threading.Condition) -> None:
        """Hand `addprocs` one worker that joined and waits to be added, if any. (The
        manager calls `addprocs` itself as each worker joins: users need not.)"""
        with self._changed:
            if not self._pending:
                return
            config = self._pending.popleft()
        with launch_ntfy:
            launched.append(config)
            launch_ntfy.notify_all()

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        if op == "deregister":
            with self._changed:
                if pid in self._pids:
                    self._pids.remove(pid)
                self._changed.notify_all()

    def _joined(self, config: WorkerConfig) -> None:
        """A worker authenticated (on the listener's thread): queue it for adding."""
        with self._changed:
            if not self._closed:
                self._pending.append(config)
                self._changed.notify_all()
                return
        config.userdata["socket"].close()  # it made it in just as the manager closed

    def _add_joined(self) -> None:
        """Add each worker that joined, one `addprocs` each: a worker that fails to join
        then never takes another down with it."""
        from fastdist.cluster import addprocs  # (cluster imports the managers package)

        while True:
            with self._changed:
                while not self._pending and not self._closed:
                    self._changed.wait()
                if not self._pending:
                    return
            n = _node.current()
            try:
                pids = addprocs(self, topology=n.topology, lazy=n.lazy)
            except (ClusterError, ValueError, RuntimeError) as exc:
                print(f"fastdist: ElasticManager: a worker that joined could not be added: "
                      f"{exc}", file=sys.stderr, flush=True)
                continue
            # Counted once addprocs is done: announced to the others, in the default pool.
            with self._changed:
                self._pids.extend(pids)
                self._changed.notify_all()
