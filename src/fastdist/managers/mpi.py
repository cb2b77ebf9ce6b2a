"""MPIManager: workers started as the ranks of one MPI job, by mpiexec.

After MPIClusterManagers.jl's `MPIManager` ("MPI on workers"): `addprocs(MPIManager(4))`
runs `mpiexec -n 4 python -m fastdist.worker --join HOST:PORT --mpi`; each rank
initialises MPI (mpi4py) and joins the master as an elastic worker does
(managers/joining.py), its cookie in FASTDIST_COOKIE (mpiexec hands its
environment to the ranks; never the command line). User code on the workers uses
`mpi4py.MPI.COMM_WORLD` for collectives among them while the master drives them
with remote calls; `manager.ranks` maps each worker's pid to its rank.

An MPI job is one unit: MPI_Init and MPI_Finalize wait for every rank. Removing
all of its workers finalises MPI on each and mpiexec ends; removing some of them
ends the job, and with it the others (MPI cannot shrink COMM_WORLD).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

from fastdist import node as _node
from fastdist.exceptions import ClusterError
from fastdist.managers.base import ClusterManager, WorkerConfig
from fastdist.managers.joining import JoinedConnect, JoinListener
from fastdist.managers.labelled import ERROR_TAIL_LINES
from fastdist.managers.process import (
    EXIT_GRACE_SECONDS,
    escalate_exit,
    print_err,
    worker_environment,
)
from fastdist.node import worker_timeout
from fastdist.remotecall import remote_do, remotecall_fetch
from fastdist.workerjoin import leave_mpi_job

# How long the ranks being removed wait for the others to leave too (rmprocs of all
# the job's workers sends them within milliseconds of each other).
LEAVE_GRACE_SECONDS = 2.0
# Open MPI's --tag-output prefix: "[jobid,rank]<stdout>:" (or <stderr>:).
_OMPI_TAG = re.compile(rb"^\[\d+,(\d+)\]<(stdout|stderr)>:\s?")


class MPIManager(JoinedConnect, ClusterManager):
    """Start `np` workers as one MPI job (MPIClusterManagers.jl's MPIManager).

    Args:
        np: how many workers (MPI ranks).
        mpiexec: the launcher to run.
        mpiexec_args: its flags, before the program: e.g. `("--oversubscribe",)` for
            more ranks than cores, `("--hostfile", "hosts")` for other machines.
        addr: where the master listens for the ranks to join (the default reaches it
            from other machines; "127.0.0.1" when every rank runs here).

    Raises:
        ValueError: `np` is negative.

    Example:
        >>> mgr = fd.MPIManager(4, mpiexec_args=("--oversubscribe",))
        >>> fd.addprocs(mgr)
        [2, 3, 4, 5]
        >>> sorted(mgr.ranks.values())
        [0, 1, 2, 3]
    """

    keywords = frozenset()
    keywords_hint = "mpiexec's flags go to MPIManager(np, mpiexec_args=(...))"

    def __init__(self, np: int, mpiexec: str = "mpiexec", mpiexec_args: Sequence[str] = (),
                 addr: str = "0.0.0.0") -> None:
        if int(np) < 0:
            raise ValueError("the number of workers must be non-negative")
        if isinstance(mpiexec_args, str):
            raise TypeError("mpiexec_args is a sequence of flags, e.g. ('--oversubscribe',)")
        self.np = int(np)
        self.mpiexec = str(mpiexec)
        self.mpiexec_args = [str(a) for a in mpiexec_args]
        self.addr = addr
        self.ranks: dict[int, int] = {}  # pid -> rank in MPI.COMM_WORLD
        self.process: subprocess.Popen[bytes] | None = None  # mpiexec
        self._lock = threading.Lock()
        self._said: list[str] = []  # mpiexec's lines (and ranks' before they joined)
        self._live = 0

    def __repr__(self) -> str:
        return f"MPIManager(np={self.np}, mpiexec={self.mpiexec!r}, {self.mpiexec_args!r})"

    def command(self, params: dict[str, Any], join_at: str) -> list[str]:
        """The mpiexec command line that launch runs."""
        flags = params.get("exeflags")
        flags = [flags] if isinstance(flags, str) else [str(f) for f in flags or ()]
        extra = []
        if _is_open_mpi(self.mpiexec):
            # Open MPI: the cookie and import path to ranks on other machines too (by
            # name: the values stay in the environment), and each line tagged with
            # its rank, for relaying it as its worker's.
            extra = ["-x", "FASTDIST_COOKIE", "-x", "PYTHONPATH", "--tag-output"]
        return [self.mpiexec, "-n", str(self.np), *extra, *self.mpiexec_args,
                str(params.get("exename") or sys.executable), *flags,
                "-m", "fastdist.worker", "--join", join_at, "--mpi"]

    def launch(self, params: dict[str, Any], launched: list[WorkerConfig],
               launch_ntfy: threading.Condition) -> None:
        """Run mpiexec; hand `addprocs` each rank as it joins; return when all have.

        Raises:
            ClusterError: mpiexec is missing or exited, or its ranks did not all join
                within FASTDIST_WORKER_TIMEOUT; the message quotes what it said.
        """
        if self.np == 0:
            return
        joined: list[WorkerConfig] = []
        over = [False]  # launch returned: a rank joining now is too late

        def on_join(config: WorkerConfig) -> None:
            with launch_ntfy:
                if not over[0]:
                    joined.append(config)
                    launched.append(config)
                    launch_ntfy.notify_all()
                    return
            config.userdata["socket"].close()

        listener = JoinListener(self.addr, 0, on_join, name="fastdist-mpi")
        try:
            host, port = listener.address
            argv = self.command(params, f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            environ = worker_environment(params.get("env"),
                                         bool(params.get("enable_threaded_blas", False)))
            environ["FASTDIST_COOKIE"] = params["cookie"]
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=environ,
                                        cwd=params.get("dir"), start_new_session=True)
            except FileNotFoundError:
                raise ClusterError(f"cannot launch MPI workers: {self.mpiexec} is not on "
                                   "PATH") from None
            self.process = proc
            for stream, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
                threading.Thread(target=self._relay, args=(stream, name),
                                 name=f"fastdist-mpiexec-{name}", daemon=True).start()
            deadline = time.monotonic() + worker_timeout()
            with launch_ntfy:
                while (len(joined) < self.np and proc.poll() is None
                       and time.monotonic() < deadline):
                    launch_ntfy.wait(0.05)
                nsetup = len(joined)
            if nsetup == self.np:
                with self._lock:
                    self._live = self.np
                return
            if proc.poll() is None:
                why = (f"{self.np - nsetup} of {self.np} ranks did not join within "
                       f"{worker_timeout():g} s (FASTDIST_WORKER_TIMEOUT)")
                threading.Thread(target=escalate_exit, args=(proc, 0.0), daemon=True).start()
            else:
                time.sleep(0.1)  # the relay threads read mpiexec's last words
                why = f"mpiexec exited with code {proc.returncode} before all ranks joined"
            raise ClusterError(f"cannot launch MPI workers ({' '.join(argv[:3])} ...): "
                               f"{why}{self._tail()}")
        finally:
            with launch_ntfy:
                over[0] = True
            listener.close()

    def _tail(self) -> str:
        with self._lock:
            lines = self._said[-ERROR_TAIL_LINES:]
        return ("; it said: " + " | ".join(lines)) if lines else ""

    def _relay(self, stream: IO[bytes], name: str) -> None:
        """mpiexec's output: a rank's tagged line as its worker's, the rest as it is."""
        by_rank = {rank: pid for pid, rank in self.ranks.items()}
        try:
            for raw in stream:
                tagged = _OMPI_TAG.match(raw)
                text = raw[tagged.end():] if tagged else raw
                line = text.decode(errors="replace").rstrip("\n")
                to = name
                if tagged:
                    to = tagged.group(2).decode()
                    rank = int(tagged.group(1))
                    if rank not in by_rank:
                        by_rank = {r: p for p, r in self.ranks.items()}
                    who = f"worker {by_rank[rank]}" if rank in by_rank else f"MPI rank {rank}"
                    line = f"From {who}:\t{line}"
                with self._lock:
                    self._said.append(line)
                    del self._said[:-ERROR_TAIL_LINES]
                if to == "stderr":
                    print_err(line)
                else:
                    print(line, flush=True)
        finally:
            stream.close()  # (also when printing failed: the pipe is not left to the GC)
        if name == "stderr" and self.process is not None:
            self.process.wait()  # reap mpiexec whenever the job ends, however it ends

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        """`register`: learn the worker's rank; `deregister`: once every worker is
        gone, make sure mpiexec ends too."""
        if op == "register":
            try:
                self.ranks[pid] = remotecall_fetch(comm_world_rank, pid)
            except Exception as exc:  # noqa: BLE001 - it died meanwhile; the framework says so
                print_err(f"fastdist: MPIManager: no rank for worker {pid}: {exc}")
        elif op == "deregister":
            self.ranks.pop(pid, None)
            with self._lock:
                self._live -= 1
                last = self._live <= 0
            if last and self.process is not None:
                threading.Thread(target=escalate_exit, args=(self.process,), daemon=True,
                                 name="fastdist-mpiexec-reap").start()

    def kill(self, pid: int, config: WorkerConfig) -> None:
        """Have the worker leave the MPI job (finalising MPI when all its ranks leave
        together: `workerjoin.leave_mpi_job`) and exit; one still there after that
        (a call holding it) is asked to exit at once."""
        try:
            remote_do(leave_mpi_job, pid, LEAVE_GRACE_SECONDS)
        except Exception:  # noqa: BLE001 - gone already
            return
        n = _node.current()

        def insist() -> None:
            p = n.peers.get(pid)
            if p is not None and not p.gone.wait(LEAVE_GRACE_SECONDS + EXIT_GRACE_SECONDS):
                n.ask_to_exit(pid)

        threading.Thread(target=insist, name=f"fastdist-mpi-exit-{pid}", daemon=True).start()


def comm_world_rank() -> int:
    """On a worker: its rank in MPI.COMM_WORLD."""
    from mpi4py import MPI

    return int(MPI.COMM_WORLD.Get_rank())


_open_mpi: dict[str, bool] = {}


def _is_open_mpi(mpiexec: str) -> bool:
    """Whether `mpiexec` is Open MPI's (asked once per launcher)."""
    if mpiexec not in _open_mpi:
        try:
            out = subprocess.run([mpiexec, "--version"], capture_output=True, timeout=10,
                                 check=False, env=dict(os.environ)).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = b""
        _open_mpi[mpiexec] = b"Open MPI" in out or b"OpenRTE" in out
    return _open_mpi[mpiexec]
