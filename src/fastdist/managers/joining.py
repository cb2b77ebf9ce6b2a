"""The master's side of workers that join by themselves (`fastdist.workerjoin`): a
listener that authenticates each one and learns where it listens.

Used by ElasticManager (workers that anything starts, at any time) and MPIManager
(workers that mpiexec starts). A joining worker connects and runs the handshake
as connector, the master as acceptor: anyone may connect to this port, so the
worker proves the cookie before the master answers anything. It then sends one
line, `fastdist_worker:PORT#HOST`, and is handed on as a WorkerConfig whose
`userdata["socket"]` is the connection, for `addprocs` to set up as any launched
worker — which starts, as always, with the handshake, the master as connector.
A connection that fails the first handshake, or stays silent past
FASTDIST_HANDSHAKE_TIMEOUT, is closed there: nothing it sent is unpickled, and it
never holds up the master's membership lock.
"""

from __future__ import annotations

import logging
import select
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from fastdist import node as _node
from fastdist.exceptions import ClusterError, ProtocolError
from fastdist.managers.base import ClusterManager, WorkerConfig
from fastdist.protocol.handshake import accept_blocking, handshake_timeout
from fastdist.transport import listen, listen_unix, tune_socket
from fastdist.workerproc import advertised_host

log = logging.getLogger("fastdist")

WORKER_LINE_PREFIX = "fastdist_worker:"
# The address line's longest form: the prefix, a port, an IPv6 address or a host name.
MAX_LINE_NBYTES = 300
# Joining connections authenticated at once; past this a newcomer waits in the
# kernel's backlog (each one costs a thread for at most the handshake timeout).
MAX_PENDING_JOINS = 64


class JoinListener:
    """Listens on TCP `addr:port`, and on the matching abstract Unix socket for workers
    of this host; calls `on_join(config)` on a thread of its own for each worker
    that authenticated and said where it listens."""

    def __init__(self, addr: str, port: int, on_join: Callable[[WorkerConfig], None],
                 name: str = "fastdist-join") -> None:
        self._tcp = listen(addr, port)
        bound = self._tcp.getsockname()
        self.host = advertised_host(addr)
        self.port = int(bound[1])
        # Named after the advertised address: a worker on this host given exactly
        # that address (connect_command's) reaches the master through it.
        self._unix = listen_unix(self.host, self.port)
        self._on_join = on_join
        self._name = name
        self._slots = threading.BoundedSemaphore(MAX_PENDING_JOINS)
        self._wake_r, self._wake_w = socket.socketpair()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name=name, daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def close(self) -> None:
        """Stop listening (workers that joined stay)."""
        if self._closed:
            return
        self._closed = True
        self._wake_w.send(b"x")
        self._thread.join(5)
        for sock in (self._tcp, self._unix, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    def _accept_loop(self) -> None:
        listeners = [s for s in (self._tcp, self._unix) if s is not None]
        while not self._closed:
            ready, _, _ = select.select([*listeners, self._wake_r], [], [])
            for s in ready:
                if s is self._wake_r:
                    return
                self._accept_from(s)

    def _accept_from(self, listener: socket.socket) -> None:
        while self._slots.acquire(timeout=handshake_timeout()):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                self._slots.release()
                return
            except OSError as exc:  # EMFILE and friends: try again on the next wake-up
                self._slots.release()
                log.warning("fastdist: %s: accept failed: %s", self._name, exc)
                return
            threading.Thread(target=self._admit, args=(sock,), name=f"{self._name}-auth",
                             daemon=True).start()

    def _admit(self, sock: socket.socket) -> None:
        try:
            try:
                config = authenticate_joiner(sock, _node.current().cookie.encode())
            except (OSError, EOFError, ProtocolError, ClusterError) as exc:
                sock.close()
                log.warning("fastdist: %s: refused a worker: %s", self._name, exc)
                return
        finally:
            self._slots.release()
        try:
            self._on_join(config)
        except Exception as exc:  # noqa: BLE001 - one worker's failure is not the listener's
            print(f"fastdist: a worker that joined could not be added: {exc}",
                  file=sys.stderr, flush=True)


def authenticate_joiner(sock: socket.socket, cookie: bytes) -> WorkerConfig:
    """Run the acceptor's handshake on a joining worker's connection and read its
    address line; the connection, blocking, goes into the config's userdata.

    Raises:
        ProtocolError, ClusterError, OSError, EOFError: it failed to authenticate or
            to say where it listens, within FASTDIST_HANDSHAKE_TIMEOUT.
    """
    sock.setblocking(True)
    sock.settimeout(handshake_timeout())
    tune_socket(sock)
    accept_blocking(sock.recv, sock.sendall, cookie)
    host, port = _read_address_line(sock)
    return WorkerConfig(host=host, port=port, bind_addr=host, userdata={"socket": sock})


def _read_address_line(sock: socket.socket) -> tuple[str, int]:
    """The `fastdist_worker:PORT#HOST` line, read without taking a byte past it (the
    frames that follow belong to the connection)."""
    line = b""
    while not line.endswith(b"\n"):
        peek = sock.recv(MAX_LINE_NBYTES, socket.MSG_PEEK)
        if not peek:
            raise EOFError("the worker closed the connection before saying where it listens")
        end = peek.find(b"\n")
        line += sock.recv(len(peek) if end < 0 else end + 1)
        if len(line) > MAX_LINE_NBYTES:
            raise ProtocolError("a joining worker's address line is too long")
    text = line.decode(errors="replace").strip()
    port_s, _, host = text[len(WORKER_LINE_PREFIX):].partition("#")
    if not text.startswith(WORKER_LINE_PREFIX) or not port_s.isdigit() or not host:
        raise ProtocolError(f"a joining worker sent {text[:80]!r}, not its address line")
    return host, int(port_s)


class JoinedConnect:
    """`connect` for a manager whose workers joined by themselves: the connection they
    opened (addprocs then runs its handshake over it, as over any new connection)."""

    def connect(self, pid: int, config: WorkerConfig) -> tuple[Any, Any]:
        data = config.userdata if isinstance(config.userdata, dict) else {}
        sock = data.pop("socket", None)
        if sock is None:
            raise ClusterError(f"worker {pid} has no connection: it did not join by itself")
        return sock, sock


def ensure_master(kind: type[ClusterManager]) -> None:
    if _node.current().myid != 1:
        raise RuntimeError(f"only process 1 can run a {kind.__name__}")
