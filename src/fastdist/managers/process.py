"""How a worker process is started and ended, for every manager that starts processes:
its command line, its environment, its cookie on stdin, what it said before it
joined, and escalating its exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastdist.forkserver import ForkedProcess

# How long a worker asked to exit gets before SIGTERM, and SIGTERM before SIGKILL.
EXIT_GRACE_SECONDS = 3.0
TERM_GRACE_SECONDS = 2.0

BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def worker_environment(env: dict[str, str] | None, enable_threaded_blas: bool) -> dict[str, str]:
    """The master's environment and import path, one BLAS thread each unless asked, plus `env`."""
    environ = dict(os.environ)
    path = [p if p else os.getcwd() for p in sys.path]
    environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    if not enable_threaded_blas:
        for var in BLAS_THREAD_VARS:
            environ[var] = "1"
    if env:
        environ.update({str(k): str(v) for k, v in env.items()})
    return environ


def worker_command(exename: str, exeflags: Any, bind: str, separate_stderr: bool) -> list[str]:
    flags = [exeflags] if isinstance(exeflags, str) else list(exeflags or ())
    cmd = [str(exename), *flags, "-m", "fastdist.worker", "--bind-to", bind]
    if separate_stderr:
        cmd.append("--separate-stderr")
    return cmd


def print_err(line: str) -> None:
    """Write a launcher's line (what a worker said before it joined) to this process's
    stderr; a closed or missing stderr drops it."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def send_cookie(proc: Any, cookie: str) -> None:
    """Give a launched worker (or its launcher: ssh, srun) the cluster `cookie` on its
    stdin — never on a command line, where other users could read it — then close it.

    A launcher that died at once is not an error here: the framework reports it
    when no address line comes.
    """
    assert proc.stdin is not None
    try:
        proc.stdin.write((cookie + "\n").encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass


def escalate_exit(proc: subprocess.Popen[bytes] | ForkedProcess,
                  exit_grace: float = EXIT_GRACE_SECONDS,
                  term_grace: float = TERM_GRACE_SECONDS) -> None:
    """Wait for a child to exit, escalating to SIGTERM and SIGKILL; reap it."""
    for sig, grace in ((None, exit_grace), (signal.SIGTERM, term_grace), (signal.SIGKILL, None)):
        if sig is not None:
            try:
                proc.send_signal(sig)
            except (ProcessLookupError, OSError):
                pass
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
