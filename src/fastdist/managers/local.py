"""LocalManager: workers as child processes of the master, on this machine.

Port of Distributed.jl `managers.jl` (`LocalManager`). Each worker runs the
master's interpreter with the master's environment and `sys.path`, gets the
cookie on its stdin (never on its command line), and keeps its stdout and
stderr apart so that relayed output lands on the matching stream of the master.
Workers of the default interpreter are forked by the fork server
(`fastdist.forkserver`): milliseconds each, instead of a fresh interpreter's 0.1-0.2 s.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from fastdist.managers.base import ClusterManager, WorkerConfig
from fastdist.managers.process import escalate_exit, send_cookie, worker_command, worker_environment

if TYPE_CHECKING:
    # Imported when first used: `python -m fastdist.forkserver` imports this module
    # (through the package) before it runs, and must not find itself imported already.
    from fastdist.forkserver import ForkedProcess, ForkServer

class LocalManager(ClusterManager):
    """Launch `np` workers on this machine (bound to 127.0.0.1 when `restrict`)."""

    keywords = frozenset()  # only the common ones
    keywords_hint = "restrict goes to LocalManager(np, restrict=...)"

    def __init__(self, np: int, restrict: bool = True) -> None:
        if int(np) < 0:
            raise ValueError("the number of workers must be non-negative")
        self.np = int(np)
        self.restrict = restrict

    def __repr__(self) -> str:
        return f"LocalManager(np={self.np}, restrict={self.restrict})"

    def launch(self, params: dict[str, Any], launched: list[WorkerConfig],
               launch_ntfy: threading.Condition) -> None:
        from fastdist.forkserver import ForkServerError

        bind = "127.0.0.1" if self.restrict else "0.0.0.0"
        threaded = bool(params.get("enable_threaded_blas", False))
        environ = worker_environment(params.get("env"), threaded)
        flags = params.get("exeflags")
        if not params.get("exename"):
            # The worker gets the master's whole sys.path in PYTHONPATH, so `site`
            # has nothing left to add; skipping it saves most of a worker's start-up.
            flags = ["-S", *([flags] if isinstance(flags, str) else list(flags or ()))]
        cmd = worker_command(params.get("exename") or sys.executable, flags,
                             bind, separate_stderr=True)
        cookie = (params["cookie"] + "\n").encode()
        forked: Generator[ForkedProcess, None, None] | None = None
        if not params.get("exename") and not params.get("exeflags"):
            server = _fork_server(environ)
            cwd = _worker_dir(params.get("dir")) if server is not None else None
            if server is not None and cwd is not None:
                forked = server.spawn_many(self.np, cookie, bind=bind, separate_stderr=True,
                                           env=environ, cwd=cwd, args=cmd)
        try:
            for _ in range(self.np):
                proc: subprocess.Popen[bytes] | ForkedProcess | None = None
                if forked is not None:
                    try:
                        proc = next(forked, None)
                    except ForkServerError as exc:
                        print(f"fastdist: fork server: {exc}; starting the remaining "
                              "workers as fresh processes.", file=sys.stderr, flush=True)
                        forked = None
                if proc is None:
                    proc = _popen_worker(cmd, params.get("dir"), environ, params["cookie"])
                config = WorkerConfig(io=proc.stdout, process=proc, ospid=proc.pid,
                                      environ=params.get("env"), enable_threaded_blas=threaded,
                                      exename=params.get("exename"),
                                      exeflags=params.get("exeflags"))
                with launch_ntfy:
                    launched.append(config)
                    launch_ntfy.notify_all()
        finally:
            if forked is not None:
                forked.close()  # a launch cut short leaves no forked worker unread

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        """Local workers need nothing beyond what the framework does."""

    def kill(self, pid: int, config: WorkerConfig) -> None:
        """Ask the worker to exit; SIGTERM, then SIGKILL, if it does not."""
        super().kill(pid, config)
        proc = config.process
        if proc is not None:
            threading.Thread(target=escalate_exit, args=(proc,), daemon=True,
                             name=f"fastdist-reap-{pid}").start()


def _fork_server(environ: dict[str, str]) -> ForkServer | None:
    """The fork server, if workers with environment `environ` can be forked from it."""
    from fastdist import forkserver

    if not forkserver.enabled():
        return None
    server = forkserver.get_server()
    if server is None or not server.can_fork_with(environ):
        return None
    return server


def _worker_dir(dir: Any) -> str | None:
    """The absolute directory a worker starts in, checked as Popen's `cwd` would be.

    None when the master's own directory is gone: only a fresh process can inherit it.
    """
    try:
        cwd = os.path.join(os.getcwd(), os.fspath(dir)) if dir else os.getcwd()
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(os.stat(cwd).st_mode):  # a missing one raises, as Popen would
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), cwd)
    return cwd


def _popen_worker(cmd: list[str], dir: Any, environ: dict[str, str],
                  cookie: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=dir, env=environ)
    send_cookie(proc, cookie)
    return proc
