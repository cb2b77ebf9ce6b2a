"""The process-local runtime: this process's pid, its peers and their connections,
the I/O loop thread, the call threads, the store of owned values, and the
housekeeping that runs on each loop tick (reference-count batches, heartbeats,
handshake deadlines).

Port of the process-group half of Distributed.jl `cluster.jl`. Every process —
master or worker — runs one Node; the master is pid 1.
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
import resource
import secrets
import socket
import string
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastdist._core._keepalive import set_keepalive_interval
from fastdist._core._msgloop import MessageLoop
from fastdist._fastpath._calls import NodeCore, route_frames
from fastdist.callpool import CallPool
from fastdist.dispatch import dispatch, reply_error
from fastdist.exceptions import ProcessExitedException, ProtocolError
from fastdist.output import drain_worker_pipes
from fastdist.protocol import serialize
from fastdist.protocol.handshake import AcceptorHandshake
from fastdist.protocol.messages import (
    FLAG_ERROR,
    FLAG_RESTORE,
    REF_HEADER,
    REF_RECORD,
    RESULT,
    Kind,
)
from fastdist.protocol.values import encode_error, set_local_pid
from fastdist.refstore import RRID, RefStore, Waiter
from fastdist.sharedmem import SharedMemory
from fastdist.signals import block_sigint
from fastdist.transport import (
    Connection,
    StreamConnection,
    accept_ready,
    connect_socket,
    listen,
    listen_unix,
)

# Unauthenticated connections a process keeps at once; past this the oldest goes.
MAX_PENDING_HANDSHAKES = 256


def worker_timeout() -> float:
    """FASTDIST_WORKER_TIMEOUT, read each time it is used (seconds, default 60)."""
    return float(os.environ.get("FASTDIST_WORKER_TIMEOUT", "60"))


def heartbeat_timeout() -> float:
    """FASTDIST_HEARTBEAT_TIMEOUT, read each time it is used (seconds, default 30)."""
    return float(os.environ.get("FASTDIST_HEARTBEAT_TIMEOUT", "30"))


@dataclass
class Peer:
    """What this process knows of another one."""

    pid: int
    host: str = ""
    port: int = 0
    ident: Any = None
    connect_idents: Any = None
    conn: Connection | None = None
    config: Any = None  # WorkerConfig, on the master
    manager: Any = None  # ClusterManager, on the master
    connect_lock: threading.Lock = field(default_factory=threading.Lock)
    connected: Waiter = field(default_factory=Waiter)
    gone: Waiter = field(default_factory=Waiter)
    last_rx: int = -1
    last_seen: float = field(default_factory=time.monotonic)
    last_tx: int = -1
    last_sent: float = field(default_factory=time.monotonic)
    last_ping: float = 0.0

    def facts(self) -> dict[str, Any]:
        return {"pid": self.pid, "host": self.host, "port": self.port, "ident": self.ident,
                "connect_idents": self.connect_idents}


class Node(NodeCore):
    """One process's share of the cluster."""

    # (C fields of NodeCore, _fastpath/_calls.pxd: their types, for the checker.)
    peers: dict[int, Peer]
    store: RefStore
    callpool: CallPool

    def __init__(self, myid: int, role: str, cookie: str) -> None:
        self.myid = myid
        self.role = role  # "master" or "worker"
        self.cookie = cookie
        self.topology = "all_to_all"
        self.lazy = True
        self.store = RefStore()
        self.live_refs: weakref.WeakValueDictionary[Any, Any] = weakref.WeakValueDictionary()
        # (peers, pushes, waiters, ids, store and callpool are C fields: NodeCore.)
        self.removed: set[int] = set()
        self.host = "127.0.0.1"
        self.port = 0
        self.listener: socket.socket | None = None
        self.unix_listener: socket.socket | None = None
        self.callpool = CallPool()
        self.shm = SharedMemory()
        self.ids = itertools.count(1)
        self._ref_queue: collections.deque[tuple[int, int, int, int, int]] = collections.deque()
        self._ref_backlog: dict[int, list[bytes]] = {}
        self._ref_connecting: set[int] = set()
        # Serialises sending reference changes: the loop thread's batches, and a value
        # restored to its owner (which must follow the holds queued before it).
        self._ref_send_lock = threading.Lock()
        self._last_tick = 0.0
        self._stream_conns: list[Any] = []
        _raise_fd_limit()
        self.loop = MessageLoop(on_tick=self._tick, tick_ms=1000)
        self.loop_thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------

    def start_loop_thread(self) -> None:
        self.loop_thread = threading.Thread(target=self._run_loop, name="fastdist-io",
                                            daemon=True)
        self.loop_thread.start()

    def _run_loop(self) -> None:
        block_sigint()
        self.loop.run()

    def start_listener(self, host: str, port: int = 0,
                       advertised: str | None = None) -> tuple[str, int]:
        """Listen on TCP host:port, and on the matching abstract Unix socket for peers
        on this host (named after the address this worker advertises)."""
        tcp = self.listener = listen(host, port)
        self.host, self.port = tcp.getsockname()[:2]
        if advertised is not None:
            self.host = advertised
        self.loop.add_reader(tcp.fileno(), lambda: self._accept(tcp))
        self.unix_listener = listen_unix(self.host, self.port)
        if self.unix_listener is not None:
            unix = self.unix_listener
            self.loop.add_reader(unix.fileno(), lambda: self._accept(unix))
        return self.host, self.port

    def next_id(self) -> int:
        return next(self.ids)

    # -- peers and connections -----------------------------------------------

    def worker_pids(self) -> list[int]:
        return sorted(p for p in self.peers if p != 1)

    def peer(self, pid: int) -> Peer:
        p = self.peers.get(pid)
        if p is None:
            if pid in self.removed:
                raise ProcessExitedException(pid)
            raise ValueError(f"no process with pid {pid} in this cluster")
        return p

    def connection_to(self, pid: int) -> Connection:
        """The connection to `pid`, opening a worker-to-worker link on first use."""
        p = self.peers.get(pid)
        if p is not None and p.conn is not None:
            return p.conn
        p = self.peer(pid)
        return self._establish(p)

    def _establish(self, p: Peer) -> Connection:
        if self.topology == "master_worker" and self.myid != 1 and p.pid != 1:
            raise RuntimeError(
                f"worker {self.myid} cannot call worker {p.pid}: the cluster's topology is "
                "'master_worker' (workers talk only to pid 1)")
        if self.topology == "custom" and self.myid != 1 and p.pid != 1:
            raise RuntimeError(
                f"worker {self.myid} has no connection to worker {p.pid} in this custom topology "
                "(see WorkerConfig.ident / connect_idents)")
        with p.connect_lock:
            if p.conn is not None:
                return p.conn
            if p.pid in self.removed:
                raise ProcessExitedException(p.pid)
            if self.myid > p.pid:
                # Like Julia: the higher pid opens a worker-to-worker link ...
                sock = connect_socket(p.host, p.port, self.cookie.encode(), worker_timeout())
                conn = self.loop.add_connection(sock.detach(), self, None, p.pid)
                body, _ = serialize.dumps({"pid": self.myid}, what="identity")
                conn.send_frame(Kind.IDENTIFY, 0, 0, self.myid, 0, body)
                self._attach(p, conn)
                return conn
        # ... and the lower one asks it to, through pid 1, then waits for it.
        self.connection_to(1).send_frame(Kind.CONNECT_BACK, 0, p.pid, self.myid, 0)
        if not p.connected.wait(worker_timeout()):
            raise ProcessExitedException(p.pid)
        if p.conn is None:
            raise ProcessExitedException(p.pid)
        return p.conn

    def _attach(self, p: Peer, conn: Connection) -> None:
        conn.peer = p.pid
        p.conn = conn
        p.last_seen = time.monotonic()
        # Both ends know each other now: pings may flow (they would be refused before).
        set_keepalive_interval(heartbeat_timeout() / 4)
        conn.start_keepalive()
        p.connected.set(True)

    def ask_to_exit(self, pid: int) -> None:
        """Ask worker `pid` to finish and exit (EXIT); nothing if it is gone already."""
        p = self.peers.get(pid)
        if p is None or p.conn is None:
            return
        try:
            p.conn.send_frame(Kind.EXIT, 0, 0, self.myid, 0)
        except ConnectionError:
            pass

    def send(self, pid: int, kind: int, flags: int, aux: int, whence: int, ref_id: int,
             body: Any = b"", buffers: Any = ()) -> None:
        """Send a frame to `pid`; a dead or unreachable peer is ProcessExitedException."""
        conn = self.connection_to(pid)
        if buffers:
            flags, buffers = self.shm.outgoing(conn, flags, buffers)
        try:
            conn.send_frame(kind, flags, aux, whence, ref_id, body, buffers)
        except ConnectionError as exc:
            raise ProcessExitedException(pid) from exc

    def send_deferred(self, pid: int, kind: int, flags: int, aux: int, whence: int,
                      ref_id: int, body: Any = b"") -> None:
        """Queue a small frame to `pid` for the loop thread to write with others (see
        SocketConnection.send_deferred; a stream connection sends it at once)."""
        conn = self.connection_to(pid)
        try:
            conn.send_deferred(kind, flags, aux, whence, ref_id, body)
        except ConnectionError as exc:
            raise ProcessExitedException(pid) from exc

    def send_queued(self, pid: int, kind: int, flags: int, aux: int, whence: int,
                    ref_id: int, body: Any = b"") -> Connection:
        """Queue a small frame to `pid` for the caller's own `flush()` of the returned
        connection, soon (see SocketConnection.queue_frame): a thread sending a burst
        writes it itself, without waking the loop thread. (A stream connection sends
        at once.)"""
        conn = self.connection_to(pid)
        try:
            conn.queue_frame(kind, flags, aux, whence, ref_id, body)
        except ConnectionError as exc:
            raise ProcessExitedException(pid) from exc
        return conn

    def add_stream_connection(self, instream: Any, outstream: Any,
                              pid: int | None) -> StreamConnection:
        conn = StreamConnection(self, instream, outstream, pid)
        self._stream_conns.append(conn)
        conn.start()
        return conn

    # -- handler protocol, called by the loop (or a stream reader) ------------

    def on_frames(self, conn: Connection, frames: list[Any]) -> None:
        for frame in frames:
            if frame.kind == RESULT:
                # What calls printed went on a pipe, their replies on this socket, the
                # pipe first: draining it once now prints the output of every call
                # answered in this batch before any of their results is handed on.
                drain_worker_pipes(conn.peer)
                break
        # Each frame to its handler, results in C. A KeyboardInterrupt (Ctrl-C in the
        # main thread) can land on a thread reading a connection for everyone: the
        # frames after it belong to other callers and are dispatched before it
        # propagates.
        route_frames(self, conn, frames, dispatch, self._map_shared, reply_error)

    def _map_shared(self, conn: Connection, frame: Any) -> bool:
        """Give a frame whose buffers are in shared memory those buffers. If they
        cannot be mapped, that frame fails and the connection lives: a result becomes
        the error for whoever waits for it (True: dispatch it), a request is answered
        with the error if it asked for an answer (False: nothing to dispatch)."""
        try:
            self.shm.incoming(conn.peer, frame)
            return True
        except Exception as exc:  # noqa: BLE001
            if frame.kind == Kind.RESULT:
                frame.flags, frame.body, _ = encode_error(exc, self.myid)
                frame.buffers = []
                return True
            reply_error(self, conn, frame, exc)
            return False

    def on_authenticated(self, conn: Connection) -> None:
        """The handshake passed; the peer names itself with its first frame (IDENTIFY)."""

    def on_close(self, conn: Connection, exc: BaseException | None) -> None:
        pid = conn.peer
        if pid is None:
            return
        p = self.peers.get(pid)
        if p is not None and p.conn is conn:
            self.peer_lost(pid, exc)
        elif p is None and self.role == "master":
            self._run_peer_lost_hooks(pid, None, exc)  # it died before it joined

    def peer_lost(self, pid: int, exc: BaseException | None = None) -> None:
        """A process is gone: fail what waits on it and forget it."""
        p = self.peers.pop(pid, None)
        self.removed.add(pid)
        if self.role == "worker" and pid == 1:
            exit_worker()
        if p is not None:
            p.connected.fail(ProcessExitedException(pid))
            p.gone.set(True)
            if p.conn is not None and not p.conn.is_closed:
                p.conn.close(exc)
        err = ProcessExitedException(pid)
        for wid, w in list(self.waiters.items()):
            # Popped first: whoever pops a waiter answers it, so a reply being
            # dispatched now and this failure cannot both reach it.
            if w.peer == pid and self.waiters.pop(wid, None) is not None:
                w.fail(err)
        self.shm.forget(pid)
        self.store.drop_client(pid)
        self._ref_backlog.pop(pid, None)
        self._run_peer_lost_hooks(pid, p, exc)

    def _run_peer_lost_hooks(self, pid: int, p: Peer | None,
                             exc: BaseException | None) -> None:
        for hook in list(_peer_lost_hooks):
            try:
                hook(self, pid, p, exc)
            except Exception:  # noqa: BLE001 - one layer's clean-up must not stop the others'
                pass

    def _accept(self, listener: socket.socket) -> None:
        for sock in accept_ready(listener):
            self._shed_pending_handshakes()
            self.loop.add_connection(sock.detach(), self, AcceptorHandshake(self.cookie.encode()))

    def _shed_pending_handshakes(self) -> None:
        pending = [c for c in self.loop.connections() if c.handshake is not None]
        if len(pending) >= MAX_PENDING_HANDSHAKES:
            oldest = min(pending, key=lambda c: c.handshake.deadline)
            oldest.close(ProtocolError("too many unauthenticated connections"))

    # -- reference counting ---------------------------------------------------

    def queue_ref_change(self, owner: int, whence: int, ref_id: int, client: int, delta: int,
                         urgent: bool = False) -> None:
        """Queue a hold change for the owner; the loop tick sends them in order, batched.

        Safe from __del__: an append and an eventfd write, no lock.
        """
        self._ref_queue.append((owner, whence, ref_id, client, delta))
        if len(self._ref_queue) == 1 or urgent:
            self.loop.wakeup()

    def queue_restore(self, owner: int, whence: int, ref_id: int, raw: Any) -> None:
        """Give a released pushed value back to its owner (see refs.Future._deliver),
        after every hold change queued so far, on a call thread (it may be large)."""
        self.callpool.submit(functools.partial(self._restore_value, owner, whence, ref_id, raw))

    def _restore_value(self, owner: int, whence: int, ref_id: int, raw: Any) -> None:
        flags, body, buffers = raw
        with self._ref_send_lock:
            self._flush_ref_changes_locked()
            try:
                self.send(owner, Kind.PUT_FUTURE, FLAG_RESTORE | (flags & FLAG_ERROR), 0,
                          self.myid, 0, REF_HEADER.pack(whence, ref_id) + bytes(body), buffers)
            except ProcessExitedException:
                pass  # the owner is gone, and with it whoever was to fetch the value
        self.loop.wakeup()  # changes queued meanwhile waited for the lock

    def _flush_ref_changes(self) -> None:
        """On the loop thread: apply local changes, send remote ones (FIFO per owner)."""
        if not self._ref_send_lock.acquire(blocking=False):
            return  # a value is being restored; it wakes the loop when done
        try:
            self._flush_ref_changes_locked()
        finally:
            self._ref_send_lock.release()

    def _flush_ref_changes_locked(self) -> None:
        q = self._ref_queue
        while q:
            owner, whence, ref_id, client, delta = q.popleft()
            if owner == self.myid:
                self.store.change(RRID(whence, ref_id), client, delta)
            elif owner not in self.removed:
                self._ref_backlog.setdefault(owner, []).append(
                    REF_RECORD.pack(whence, client, ref_id, delta))
        for owner in list(self._ref_backlog):
            records = self._ref_backlog[owner]
            p = self.peers.get(owner)
            if p is None:
                if owner in self.removed:
                    del self._ref_backlog[owner]
                continue
            if p.conn is None:
                if owner not in self._ref_connecting:
                    self._ref_connecting.add(owner)
                    self.callpool.submit(functools.partial(self._connect_for_refs, owner))
                continue
            del self._ref_backlog[owner]
            try:
                p.conn.send_nowait(Kind.REFS, 0, len(records), self.myid, 0, b"".join(records))
            except ConnectionError:
                pass

    def _connect_for_refs(self, owner: int) -> None:
        try:
            self.connection_to(owner)
        except Exception:  # noqa: BLE001 - the owner is gone; its records are dropped
            pass
        finally:
            self._ref_connecting.discard(owner)
            self.loop.wakeup()

    # -- housekeeping on the loop thread ------------------------------------------

    def _tick(self) -> None:
        self._flush_ref_changes()
        now = time.monotonic()
        if now - self._last_tick < 0.25:
            return
        self._last_tick = now
        self._expire_handshakes(now)
        self._heartbeat(now)
        self.shm.trim(self._conn_if_up)

    def _conn_if_up(self, pid: int) -> Connection | None:
        p = self.peers.get(pid)
        return p.conn if p is not None and p.conn is not None and not p.conn.is_closed else None

    def _expire_handshakes(self, now: float) -> None:
        for conn in self.loop.connections():
            hs = conn.handshake
            if hs is not None and now > hs.deadline:
                conn.close(ProtocolError("handshake timed out"))

    def _heartbeat(self, now: float) -> None:
        """Declare dead a peer that has sent nothing for FASTDIST_HEARTBEAT_TIMEOUT.

        Every connection carries something at least every quarter of the timeout:
        on sockets, the keepalive thread's pings, which need no GIL (_msgloop); on
        stream connections (custom transports), a PING from here. This process may
        itself have been unable to run (its user code held the GIL): bytes that wait
        unread in the socket then count as heard, not silence."""
        timeout = heartbeat_timeout()
        set_keepalive_interval(timeout / 4)
        for p in list(self.peers.values()):
            conn = p.conn
            if conn is None or conn.is_closed:
                continue
            rx = conn.bytes_received
            if rx != p.last_rx:
                p.last_rx = rx
                p.last_seen = now
            elif now - p.last_seen > timeout:
                if conn.unread_nbytes() > 0:
                    p.last_seen = now
                else:
                    conn.close(TimeoutError(f"no word from process {p.pid} for {timeout:g} s"))
                    continue
            if conn.keeps_alive:
                continue
            tx = conn.bytes_sent
            if tx != p.last_tx:
                p.last_tx = tx
                p.last_sent = now
            if now - p.last_sent > timeout / 4 and now - p.last_ping > timeout / 4:
                p.last_ping = now
                try:
                    conn.send_nowait(Kind.PING, 0, 0, self.myid, 0)
                except ConnectionError:
                    pass

    # -- observability --------------------------------------------------------

    def local_stats(self) -> dict[str, Any]:
        peers = {}
        for pid, p in list(self.peers.items()):
            if p.conn is not None:
                peers[pid] = {**p.conn.stats(), **self.shm.stats(pid)}
        return {"pid": self.myid, "peers": peers, "refs": self.store.nvalues()}


def _raise_fd_limit() -> None:
    """Many workers and idle connections need more than the default 1024 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                        else 65536, hard))
        except (ValueError, OSError):
            pass


def exit_worker() -> None:
    """The master is gone: a worker never outlives it."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(0)


# -- what other layers do when a peer is gone ---------------------------------------

# (node, pid, its Peer — None for a worker whose connection closed before it joined —
# and why): registered at import by the layers above, each for what it keeps of
# peers (refs: Futures awaiting a push; pools: their members; cluster: membership).
PeerLostHook = Callable[["Node", int, "Peer | None", "BaseException | None"], None]
_peer_lost_hooks: list[PeerLostHook] = []


def on_peer_lost(hook: PeerLostHook) -> PeerLostHook:
    """Have `hook(node, pid, peer, exc)` run whenever a peer is lost (any thread)."""
    _peer_lost_hooks.append(hook)
    return hook


# -- the cluster's cookie ------------------------------------------------------------

# Characters of a cookie made here (letters and digits: it travels on stdin lines).
COOKIE_NBYTES = 32
_cookie: str | None = None
_cookie_lock = threading.Lock()


def cluster_cookie(cookie: str | None = None) -> str:
    """This cluster's cookie (made on first use); with an argument, set it.

    The cookie never crosses the wire: connections prove they know it (HMAC).
    """
    global _cookie
    with _cookie_lock:
        if cookie is not None:
            if not isinstance(cookie, str) or not cookie or any(c.isspace() for c in cookie):
                raise ValueError("a cookie is a non-empty string without whitespace")
            _cookie = cookie
            n = _current
            if n is not None:
                n.cookie = cookie
        elif _cookie is None:
            alphabet = string.ascii_letters + string.digits
            _cookie = "".join(secrets.choice(alphabet) for _ in range(COOKIE_NBYTES))
        return _cookie


# -- the process's node -----------------------------------------------------------

_current: Node | None = None
_current_lock = threading.Lock()


def peek() -> Node | None:
    return _current


def _myid() -> int:
    n = _current
    return n.myid if n is not None else 1


set_local_pid(_myid)


def current() -> Node:
    """This process's Node; a process that has none yet becomes the master, pid 1."""
    global _current
    n = _current
    if n is not None:
        return n
    with _current_lock:
        if _current is None:
            node = Node(1, "master", cluster_cookie())
            node.start_loop_thread()
            _current = node
        return _current


def install(node: Node) -> None:
    global _current
    with _current_lock:
        _current = node
