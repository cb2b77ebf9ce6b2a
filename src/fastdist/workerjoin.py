"""A worker that joins a cluster by itself: `python -m fastdist.worker --join HOST:PORT`.

After ClusterManagers.jl's `elastic_worker`. Anything may start such a worker
(a batch script, a container, mpiexec): it connects to the master's
ElasticManager (or MPIManager) instead of waiting for the master to connect to
it. The cookie comes from `FASTDIST_COOKIE` or the first line of stdin — never
from the command line, where other users of the machine could read it.

On the connection the worker opens, it proves it holds the cookie and checks
that the master does (the usual handshake, the worker as connector: the master's
port is open to anyone, so the master answers nothing before this), then says
where it listens for other workers in one line, `fastdist_worker:PORT#HOST`.
From there on the master treats it as any worker it launched: it connects (the
handshake again, the master as connector, as with every worker), then IDENTIFY
with its pid and the other workers' addresses, then calls.
"""

from __future__ import annotations

import io
import os
import socket
import sys
import threading
import time
from typing import Any, NoReturn, cast

from fastdist.exceptions import ClusterError, ProtocolError
from fastdist.node import Node, worker_timeout
from fastdist.protocol.handshake import accept_blocking, connect_blocking
from fastdist.transport import open_stream, tune_socket
from fastdist.workerproc import advertised_host, init_worker, parse_bind

COOKIE_VARIABLE = "FASTDIST_COOKIE"
WORKER_LINE_PREFIX = "fastdist_worker:"


def parse_join_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[IPv6]:PORT`) -> (host, port); a clear error for anything else."""
    host, port = parse_bind(address)
    if not host or port <= 0:
        raise ValueError(f"--join wants HOST:PORT (the master's ElasticManager), not {address!r}")
    return host, port


def join_cookie() -> str:
    """The cookie, from FASTDIST_COOKIE (then removed from this process's environment,
    so that user code and its children do not inherit it) or else stdin's first line."""
    cookie = os.environ.pop(COOKIE_VARIABLE, "").strip()
    if not cookie:
        cookie = sys.stdin.readline().strip()
    if not cookie:
        raise ClusterError(f"no cookie: set {COOKIE_VARIABLE} or write it on this worker's "
                           "stdin (see fastdist.cluster_cookie() on the master)")
    return cookie


def join_cluster(address: str, bind_to: str | None = None, mpi: bool = False) -> None:
    """Join the master at `address` and serve until it goes away; does not return.

    Exits with status 1 and a message on stderr when the master cannot be reached
    or the cookies differ.
    """
    try:
        host, port = parse_join_address(address)
        cookie = join_cookie()
    except (ValueError, ClusterError) as exc:
        _fail(str(exc), status=2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for stream in (sys.stdout, sys.stderr):
        cast(io.TextIOWrapper, stream).reconfigure(line_buffering=True)
    if mpi:
        _init_mpi()
    n = init_worker(cookie)
    timeout = worker_timeout()
    try:
        sock = open_stream(host, port, timeout)
    except OSError as exc:
        _fail(f"cannot reach the master at {host}:{port}: {exc}")
    try:
        tune_socket(sock)
        sock.settimeout(timeout)
        connect_blocking(sock.recv, sock.sendall, cookie.encode())
        bind_host, bind_port = parse_bind(bind_to) if bind_to else (_bind_host(sock, host), 0)
        n.start_listener(bind_host, bind_port, advertised=advertised_host(bind_host))
        sock.sendall(f"{WORKER_LINE_PREFIX}{n.port}#{n.host}\n".encode())
        # The master sets a worker up as addprocs does any (one at a time), starting
        # with the handshake it runs on every new connection.
        accept_blocking(sock.recv, sock.sendall, cookie.encode())
        sock.setblocking(False)
    except (OSError, EOFError, ClusterError, ProtocolError) as exc:
        sock.close()
        _fail(f"cannot join the master at {host}:{port}: {exc}")
    # The link is authenticated; the master names this worker with its first frame.
    conn = n.loop.add_connection(sock.detach(), n, None, None)
    n.callpool.install_sigint()
    threading.Thread(target=_exit_unless_joined, args=(n, conn, timeout),
                     name="fastdist-join-watch", daemon=True).start()
    n.start_loop_thread()
    n.callpool.serve_forever()


def _bind_host(sock: socket.socket, master_host: str) -> str:
    """Where to listen for other workers: the address this host reaches the master
    from (reachable by whoever reaches the master that way); over a Unix socket the
    master runs on this host, and its own address is one of this host's."""
    name = sock.getsockname()
    if isinstance(name, tuple):
        return str(name[0])
    return master_host


# A copy of COMM_WORLD, made by every rank as it starts, for leaving the job
# together: a barrier on it never mixes with the user's collectives on COMM_WORLD.
_leave_comm: Any = None


def _init_mpi() -> None:
    """Initialise MPI now, as every rank of the job must (MPI_Init waits for all of
    them): user code then finds `mpi4py.MPI.COMM_WORLD` ready."""
    global _leave_comm
    try:
        from mpi4py import MPI
    except ImportError as exc:
        _fail(f"MPIManager's workers need mpi4py ({exc}); install it where they run")
    _leave_comm = MPI.COMM_WORLD.Dup()


def leave_mpi_job(grace: float) -> None:
    """Exit, finalising MPI if every rank of the job leaves within `grace` seconds.

    MPI_Finalize waits for all ranks, and mpiexec counts a rank that exits without
    it as a failed job, which it ends. So the ranks first meet in a non-blocking
    barrier: when all are leaving (their workers removed together), each finalises
    and the job ends cleanly; when only some are, they exit without, and mpiexec
    ends the others (MPI cannot shrink COMM_WORLD).
    """
    from fastdist.node import exit_worker

    comm = _leave_comm
    if comm is not None:
        from mpi4py import MPI

        request = comm.Ibarrier()
        deadline = time.monotonic() + grace
        while not request.Test():
            if time.monotonic() > deadline:
                exit_worker()
            time.sleep(0.005)
        comm.Free()
        MPI.Finalize()
    exit_worker()


def _exit_unless_joined(n: Node, conn: Any, timeout: float) -> None:
    """Exit if the master closes the link, or does not finish the join in time."""
    deadline = time.monotonic() + timeout
    while n.myid == 0:
        if conn.is_closed:
            _fail("the master closed the connection before this worker joined")
        if time.monotonic() > deadline:
            _fail(f"the master did not complete the join within {timeout:g} s")
        time.sleep(0.05)


def _fail(message: str, status: int = 1) -> NoReturn:
    try:
        print(f"fastdist worker: {message}", file=sys.stderr, flush=True)
    finally:
        os._exit(status)
