"""Many workers on one host from one launch: `python -m fastdist.worker --count N`.

An ssh session per worker costs its login, a shell and a fresh interpreter —
about a quarter of a CPU second for each; 32 workers on a small machine take
seconds before the first call. With SSHManager's `one_session=True` the master
opens one session per host, which runs this launcher: it reads the cookie once,
imports the worker's code once, and forks the host's N workers from itself (a
few milliseconds each, as the local fork server does).

The workers' stdout and stderr come back through the one session, every line
labelled with the worker's index as `srun --label` does (b"3: text"); the master
splits them again (`managers.labelled`). A line is passed on when it is complete,
or when its worker's stream ends. The launcher never starts a thread, so forking
is safe; it stays to relay, reaps its workers, and exits when all have ended. A
session that goes away (its reader gone) loses only the output: the workers end
with their connections to the master, as every worker does.
"""

from __future__ import annotations

import os
import selectors
import signal
import sys
from collections.abc import Callable

from fastdist.forkserver import run_child

__all__ = ["spawn_workers"]


def spawn_workers(count: int, *, bind_to: str | None, separate_stderr: bool) -> None:
    """Fork `count` workers that share this process's cookie (one line on stdin),
    relay their labelled output, and exit when all have ended."""
    cookie = sys.stdin.buffer.readline().decode().strip()
    # Paid once here rather than by each worker.
    from fastdist.workerproc import start_worker

    # Ctrl-C at a terminal that holds the session is for the workers' calls.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    pipes: dict[int, tuple[int, int]] = {}  # read end -> (worker index, 1 or 2)
    children: list[int] = []
    for index in range(count):
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe() if separate_stderr else (-1, -1)
        pid = os.fork()
        if pid == 0:
            for fd in pipes:
                os.close(fd)
            os.close(out_r)
            if err_r >= 0:
                os.close(err_r)
            _become_worker(start_worker, cookie, bind_to, separate_stderr, out_w, err_w)
        children.append(pid)
        os.close(out_w)
        pipes[out_r] = (index, 1)
        if err_r >= 0:
            os.close(err_w)
            pipes[err_r] = (index, 2)
    _relay(pipes)
    for pid in children:
        os.waitpid(pid, 0)


def _become_worker(start_worker: Callable[..., None], cookie: str, bind_to: str | None,
                   separate_stderr: bool, out_w: int, err_w: int) -> None:
    """In a forked child: run as one worker on these pipes; never returns."""

    def body() -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(out_w, 1)
        os.dup2(err_w if err_w >= 0 else out_w, 2)
        os.close(out_w)
        if err_w >= 0:
            os.close(err_w)
        start_worker(cookie=cookie, close_stdin=False, bind_to=bind_to,
                     stderr_to_stdout=not separate_stderr)

    run_child(body)


def _relay(pipes: dict[int, tuple[int, int]]) -> None:
    """Copy every worker's lines, labelled, to this process's stdout or stderr
    until all the workers' streams have ended, or the session has: then close
    them, as a worker's own session would be closed (a worker that has not joined
    yet sees it and exits)."""
    partial: dict[int, bytes] = dict.fromkeys(pipes, b"")
    with selectors.DefaultSelector() as selector:
        for fd in pipes:
            selector.register(fd, selectors.EVENT_READ)
        while partial:
            for key, _ in selector.select():
                fd = key.fd
                index, target = pipes[fd]
                try:
                    data = os.read(fd, 1 << 16)
                except InterruptedError:
                    continue
                buffered = partial[fd] + data
                if data:
                    *lines, partial[fd] = buffered.split(b"\n")
                else:  # the worker's stream ended: pass on its last partial line too
                    lines = [buffered] if buffered else []
                    selector.unregister(fd)
                    os.close(fd)
                    del partial[fd]
                label = f"{index}: ".encode()
                if lines and not _write_all(target, b"".join(label + line + b"\n"
                                                              for line in lines)):
                    for other in partial:
                        os.close(other)
                    return


def _write_all(fd: int, data: bytes) -> bool:
    """Write all of `data`; False once the reader has gone (the session ended)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:
            continue
        except OSError:
            return False
    return True
