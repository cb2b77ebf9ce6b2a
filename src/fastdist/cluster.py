"""The process group as users see it: addprocs, rmprocs, procs, workers, myid, interrupt,
the cookie — and how a new worker joins (pid, peers, topology).

Port of Distributed.jl `cluster.jl` (the membership half). Only pid 1 adds or
removes workers. A worker joins in three steps: the master connects and
authenticates (docs/PROTOCOL.md), sends IDENTIFY with the worker's pid, the
cluster's topology and the workers already up; the worker opens the
worker-to-worker links the topology asks for and answers IDENTIFY; then it is
registered and every other worker learns its address (PEERS).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from difflib import get_close_matches
from typing import Any, Literal, overload

from fastdist import node as _node
from fastdist._core._wire import Frame
from fastdist.channel import check_timeout
from fastdist.dispatch import register
from fastdist.exceptions import ClusterError, ProcessExitedException
from fastdist.managers.base import COMMON_KEYWORDS, ClusterManager, WorkerConfig
from fastdist.managers.local import LocalManager
from fastdist.managers.process import escalate_exit
from fastdist.managers.ssh import SSHManager
from fastdist.node import Node, Peer, on_peer_lost, worker_timeout
from fastdist.output import (
    install_log_forwarding,
    install_worker_record_field,
    relay_worker_output,
)
from fastdist.protocol import serialize
from fastdist.protocol.handshake import connect_blocking
from fastdist.protocol.messages import Kind
from fastdist.refstore import Waiter
from fastdist.remotecall import remotecall_fetch
from fastdist.tasks import run_async
from fastdist.transport import Connection, connect_socket, stream_handshake, tune_socket
from fastdist.workerpool import add_to_default_pool

TOPOLOGIES = ("all_to_all", "master_worker", "custom")
WORKER_LINE_PREFIX = "fastdist_worker:"

_next_pid = 2
_pid_lock = threading.Lock()
_addprocs_lock = threading.Lock()
_joining: dict[int, Waiter] = {}
_cluster_fixed: dict[str, Any] = {}


def myid() -> int:
    """This process's pid: 1 on the master, 2, 3, ... on workers."""
    n = _node.peek()
    return 1 if n is None else n.myid


def procs(pid: Any = None) -> list[int]:
    """All pids, master included; with `pid`, the pids on the same host as `pid`; with
    a SharedArray, the pids that share it (Julia's `procs(S)`)."""
    shared_by = getattr(pid, "procs", None)
    if callable(shared_by):
        return list(shared_by())
    n = _node.peek()
    if n is None:
        return [1]
    everyone = sorted({1, n.myid, *n.peers})
    if pid is None:
        return everyone
    key = _host_key(n, pid)
    return [p for p in everyone if _host_key(n, p) == key]


def _host_key(n: Node, pid: int) -> str:
    """Which machine a pid runs on: its address, with this machine's addresses as one."""
    if pid == n.myid:
        host = n.host if n.role == "worker" else "127.0.0.1"
    elif pid == 1 and n.role == "worker":
        host = n.peers[1].host if 1 in n.peers else ""
    else:
        p = n.peers.get(pid)
        if p is None:
            raise ValueError(f"no process with pid {pid} in this cluster")
        host = p.host
    return "localhost" if _is_this_machine(host) else host


def _is_this_machine(host: str) -> bool:
    if not host or host.startswith("127.") or host in ("::1", "localhost", "0.0.0.0"):
        return True
    return host in _local_addresses()


_local_addrs: set[str] | None = None


def _local_addresses() -> set[str]:
    global _local_addrs
    if _local_addrs is None:
        addrs = set()
        try:
            for info in socket.getaddrinfo(socket.gethostname(), None):
                addrs.add(str(info[4][0]))
        except OSError:
            pass
        _local_addrs = addrs
    return _local_addrs


def workers() -> list[int]:
    """The worker pids; `[1]` when there are none (the master works alone)."""
    n = _node.peek()
    if n is None:
        return [1]
    pids = sorted(p for p in ({n.myid} | set(n.peers)) if p != 1)
    return pids or [1]


def nprocs() -> int:
    """How many processes: the master and its workers."""
    return len(procs())


def nworkers() -> int:
    """How many workers (1 when the master works alone, as in Julia)."""
    n = nprocs()
    return 1 if n == 1 else n - 1


# -- adding workers -----------------------------------------------------------------------


_Topology = Literal["all_to_all", "master_worker", "custom"]
_Flags = str | Sequence[str]
_Path = str | os.PathLike[str]
_Machine = str | tuple[str, int | Literal["auto"]]


@overload
def addprocs(np: int | None = None, /, *, restrict: bool = True, dir: _Path | None = None,
             exename: _Path | None = None, exeflags: _Flags = (),
             topology: _Topology = "all_to_all", lazy: bool = True,
             enable_threaded_blas: bool = False,
             env: Mapping[str, str] | None = None) -> list[int]: ...


@overload
def addprocs(machines: _Machine | Sequence[_Machine], /, *, tunnel: bool = False,
             multiplex: bool = False, one_session: bool = False, sshflags: _Flags = (),
             max_parallel: int = 10, ssh: str = "ssh", dir: _Path | None = None,
             exename: _Path | None = None,
             exeflags: _Flags = (), topology: _Topology = "all_to_all", lazy: bool = True,
             enable_threaded_blas: bool = False,
             env: Mapping[str, str] | None = None) -> list[int]: ...


@overload
def addprocs(manager: ClusterManager, /, **kwargs: Any) -> list[int]: ...


def addprocs(np_or_machines: Any = None, /, **kwargs: Any) -> list[int]:
    """Start workers and add them to the cluster; returns their pids.

    `addprocs(n)` starts n local workers, `addprocs()` one per CPU,
    `addprocs(["host", ("host", 4)], ...)` workers over SSH, and
    `addprocs(manager, **kw)` whatever a ClusterManager launches.

    Keyword arguments (Julia's): restrict (local workers), dir, exename, exeflags,
    topology ("all_to_all", "master_worker", "custom"), lazy, enable_threaded_blas,
    env; for SSH also tunnel, multiplex, sshflags, max_parallel, ssh. A keyword the
    manager does not read is refused: fastdist's managers declare theirs
    (`ClusterManager.keywords`); a manager of your own gets whatever it is given.

    Raises:
        TypeError: a keyword this manager does not take (misspelt, or for another
            kind of worker, like `tunnel` for local workers).
        RuntimeError: called on a worker (only pid 1 adds workers).
        ClusterError: a worker failed to start or connect; the cluster is left as it was.

    Example:
        >>> pids = fd.addprocs(2)
        >>> fd.workers()
        [2, 3]
    """
    manager: ClusterManager
    if isinstance(np_or_machines, ClusterManager):
        manager = np_or_machines
    elif np_or_machines is None:
        manager = LocalManager(os.cpu_count() or 1, kwargs.pop("restrict", True))
    elif isinstance(np_or_machines, int) and not isinstance(np_or_machines, bool):
        manager = LocalManager(np_or_machines, kwargs.pop("restrict", True))
    elif isinstance(np_or_machines, (list, tuple, str)):
        machines = [np_or_machines] if isinstance(np_or_machines, str) else np_or_machines
        manager = SSHManager(machines)
    else:
        raise TypeError(f"addprocs takes a count, a list of machines or a ClusterManager, "
                        f"not {type(np_or_machines).__name__}")
    check_keywords(manager, kwargs)
    return _addprocs(manager, **kwargs)


def check_keywords(manager: ClusterManager, kwargs: Mapping[str, Any]) -> None:
    """Refuse a keyword `manager` would not read, naming it (and what was meant)."""
    own = type(manager).keywords
    if own is None:
        return
    known = COMMON_KEYWORDS | own
    for name in kwargs:
        if name in known:
            continue
        kind = type(manager).__name__
        others = [k for k in ("restrict", "tunnel", "multiplex", "sshflags", "max_parallel",
                              "ssh") if k not in known]
        if name in others:
            why = f"it does not apply to {kind}'s workers"
        else:
            close = get_close_matches(name, sorted(known), n=1)
            why = f"did you mean {close[0]!r}?" if close else "it is not an addprocs keyword"
        hint = f"; {manager.keywords_hint}" if manager.keywords_hint else ""
        raise TypeError(f"addprocs() got an unexpected keyword argument {name!r} for "
                        f"{kind}: {why} ({kind} takes {', '.join(sorted(known))}{hint})")


def _check_params(n: Node, params: dict[str, Any]) -> None:
    topology = params["topology"]
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {TOPOLOGIES}, not {topology!r}")
    if n.worker_pids():
        if topology != n.topology:
            raise ValueError(f"this cluster's topology is {n.topology!r}; workers cannot be "
                             f"added with topology {topology!r}")
        if params["lazy"] and not n.lazy:
            raise ValueError("this cluster was formed with lazy=False; workers cannot be "
                             "added with lazy=True")


def _addprocs(manager: ClusterManager, **kwargs: Any) -> list[int]:
    n = _node.current()
    if n.myid != 1:
        raise RuntimeError("Only process 1 can add or remove workers")
    params: dict[str, Any] = {
        "dir": None, "exename": None, "exeflags": (), "topology": "all_to_all", "lazy": True,
        "enable_threaded_blas": False, "env": None,
    }
    params.update(kwargs)
    _check_params(n, params)
    params["cookie"] = n.cookie  # what the manager hands each worker on its stdin
    with _addprocs_lock:
        n.topology = params["topology"]
        n.lazy = bool(params["lazy"])
        _install_worker_log_field()
        launched: list[WorkerConfig] = []
        ntfy = threading.Condition()
        launch_state: dict[str, Any] = {"done": False, "error": None}

        def run_launch() -> None:
            try:
                manager.launch(params, launched, ntfy)
            except BaseException as exc:  # noqa: BLE001 - reported below
                launch_state["error"] = exc
            finally:
                with ntfy:
                    launch_state["done"] = True
                    ntfy.notify_all()

        threading.Thread(target=run_launch, name="fastdist-launch", daemon=True).start()
        results: list[Any] = []
        setups: list[threading.Thread] = []
        seen = 0
        while True:
            with ntfy:
                while seen == len(launched) and not launch_state["done"]:
                    ntfy.wait()
                fresh = launched[seen:]
                seen = len(launched)
                finished = launch_state["done"]
            for config in fresh:
                slot: list[Any] = [None]
                results.append(slot)
                t = threading.Thread(target=_setup_into, args=(n, manager, config, slot),
                                     name="fastdist-setup", daemon=True)
                t.start()
                setups.append(t)
            if finished and seen == len(launched):
                break
        for t in setups:
            t.join()
        outcomes = [slot[0] for slot in results]
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if launch_state["error"] is not None:
            failures.insert(0, launch_state["error"])
        pids = sorted(o for o in outcomes if isinstance(o, int))
        if failures:
            for pid in pids:
                _remove_now(n, pid)
            for o, config in zip(outcomes, launched):
                if isinstance(o, BaseException):
                    _kill_unjoined(config)
            first = failures[0]
            if isinstance(first, ClusterError):
                # Count failed workers, not the launch error that may head the list.
                n_failed = sum(isinstance(o, BaseException) for o in outcomes)
                counted = f"{n_failed} of {len(launched)} workers failed; " if launched else ""
                raise ClusterError(f"{first} ({counted}none were added)") from first
            raise ClusterError(f"launching workers failed: {type(first).__name__}: {first}; "
                               "none were added") from first
        _announce(n, pids)
        if n.topology == "custom" or not n.lazy:
            for pid in pids:
                remotecall_fetch(_link_peers, pid)
        add_to_default_pool(pids)
        return pids


def _setup_into(n: Node, manager: ClusterManager, config: WorkerConfig, slot: list[Any]) -> None:
    try:
        slot[0] = _setup_worker(n, manager, config)
    except BaseException as exc:  # noqa: BLE001
        slot[0] = exc


def _take_pid() -> int:
    global _next_pid
    with _pid_lock:
        pid = _next_pid
        _next_pid += 1
        return pid


def _setup_worker(n: Node, manager: ClusterManager, config: WorkerConfig) -> int:
    pid = _take_pid()
    if config.io is not None:
        try:
            host, port = read_worker_address(config, pid)
        except BaseException:
            _close_output(config)
            raise
        if config.host is None:
            config.host = host
        if config.bind_addr is None:
            config.bind_addr = host
        config.port = port
    elif config.port is None and type(manager).connect is ClusterManager.connect:
        # A manager with its own connect (a custom transport) needs neither.
        raise ClusterError(f"worker {pid}: its manager gave neither an io stream nor a port")
    # From here on the relay owns the worker's output pipes: it prints what the worker
    # says while it joins, and closes them when the worker exits, joined or not.
    relay_worker_output(n, pid, config)
    join = Waiter(peer=pid)
    _joining[pid] = join
    try:
        conn = _connect_worker(n, manager, pid, config)
        body, _ = serialize.dumps(_identity_for(n, pid, config), what="identity")
        conn.send_frame(Kind.IDENTIFY, 0, 0, 1, 0, body)
        if not join.wait(worker_timeout()):
            conn.close(TimeoutError("join timed out"))
            raise ClusterError(f"worker {pid} did not finish joining within "
                               f"{worker_timeout():g} s (FASTDIST_WORKER_TIMEOUT)")
        if join.error is not None:
            raise ClusterError(f"worker {pid} exited while joining the cluster") from join.error
    finally:
        _joining.pop(pid, None)
    reply = join.value
    peer = Peer(pid, host=str(config.bind_addr or config.host), port=int(config.port or 0),
                ident=config.ident, connect_idents=config.connect_idents, config=config,
                manager=manager)
    if config.ospid is None:
        config.ospid = reply.get("ospid")
    n.peers[pid] = peer
    n._attach(peer, conn)
    if conn.is_closed:
        n.peer_lost(pid, ConnectionResetError("worker exited while joining"))
        raise ClusterError(f"worker {pid} exited while joining the cluster")
    manager.manage(pid, config, "register")
    return pid


def _connect_worker(n: Node, manager: ClusterManager, pid: int, config: WorkerConfig) -> Any:
    """Connect to a launched worker and authenticate; a failure says where the worker is."""
    try:
        instream, outstream = manager.connect(pid, config)
        return _open(n, pid, instream, outstream)
    except (OSError, ClusterError) as exc:
        raise ClusterError(f"cannot connect to worker {pid}{_placed(config)}: {exc}") from exc


def _placed(config: WorkerConfig) -> str:
    """` on 'host' at addr:port`: the host as its manager names it, the address tried."""
    where = f" on {config.host!r}" if config.host else ""
    addr = config.bind_addr or config.host
    if config.tunnel:
        where += " (through an ssh tunnel)"
    elif addr and config.port is not None:
        where += f" at {f'[{addr}]' if ':' in str(addr) else addr}:{config.port}"
    return where


def _open(n: Node, pid: int, instream: Any, outstream: Any) -> Any:
    """Authenticate and start serving the connection to a new worker."""
    cookie = n.cookie.encode()
    if instream is outstream and isinstance(instream, socket.socket):
        sock = instream
        try:
            sock.settimeout(worker_timeout())
            tune_socket(sock)
            connect_blocking(sock.recv, sock.sendall, cookie)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return n.loop.add_connection(sock.detach(), n, None, pid)
    stream_handshake(instream, outstream, cookie, incoming=False)
    return n.add_stream_connection(instream, outstream, pid)


def _identity_for(n: Node, pid: int, config: WorkerConfig) -> dict[str, Any]:
    return {
        "pid": 1,
        "your_pid": pid,
        "topology": n.topology,
        "lazy": n.lazy,
        "peers": [p.facts() for p in n.peers.values() if p.pid != 1],
        "ident": config.ident,
        "connect_idents": config.connect_idents,
        "log_level": logging.getLogger().getEffectiveLevel(),
    }


def read_worker_address(config: WorkerConfig, pid: int) -> tuple[str, int]:
    """Read `fastdist_worker:PORT#HOST` from a launched worker's stream (bounded wait).

    Lines before it are relayed as the worker's output.

    Raises:
        ClusterError: the launcher exited, printed no address, or stayed silent past
            FASTDIST_WORKER_TIMEOUT; the message says which.
    """
    stream = config.io
    fd = stream.fileno()
    timeout = worker_timeout()
    deadline = time.monotonic() + timeout
    buf = b""
    seen: list[str] = []
    while True:
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            line = raw.decode(errors="replace").strip()
            if line.startswith(WORKER_LINE_PREFIX):
                config.userdata = _merge_userdata(config.userdata, buf)
                port_s, _, host = line[len(WORKER_LINE_PREFIX):].partition("#")
                try:
                    return host, int(port_s)
                except ValueError:
                    stream.close()
                    raise ClusterError(
                        f"worker {pid} printed a malformed address line {line!r}") from None
            if line:
                seen.append(line)
                print(f"From worker {pid}:\t{line}", flush=True)
        left = deadline - time.monotonic()
        if left <= 0:
            stream.close()  # a failed worker's output is never relayed: do not leak its pipe
            raise ClusterError(
                f"worker {pid} did not report its address within {timeout:g} s "
                f"(FASTDIST_WORKER_TIMEOUT); it printed: {seen[-5:]!r}")
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            code = None
            if config.process is not None:
                try:
                    code = config.process.wait(timeout=1)
                except Exception:  # noqa: BLE001
                    code = None
            stream.close()
            raise ClusterError(
                f"worker {pid}'s launcher exited (exit code {code}) before printing its "
                f"address line {WORKER_LINE_PREFIX}PORT#HOST; it printed: {seen[-5:]!r}")
        buf += chunk


def _merge_userdata(userdata: Any, leftover: bytes) -> Any:
    """Keep output read past the address line so that the relay prints it."""
    if not leftover:
        return userdata
    data = dict(userdata) if isinstance(userdata, dict) else {"user": userdata} if userdata else {}
    data["_output_leftover"] = leftover
    return data


def _announce(n: Node, new_pids: list[int]) -> None:
    """Tell every worker about the new ones (addresses for lazy worker-to-worker links)."""
    if not new_pids:
        return
    facts = [n.peers[p].facts() for p in new_pids if p in n.peers]
    body, _ = serialize.dumps({"add": facts}, what="peer list")
    for pid in n.worker_pids():
        try:
            n.send(pid, Kind.PEERS, 0, 0, 1, 0, body)
        except Exception:  # noqa: BLE001 - a worker that died is being removed anyway
            pass


def _close_output(config: WorkerConfig) -> None:
    """Close the pipes of a worker that failed before its output was relayed."""
    for stream in (config.io, getattr(config.process, "stderr", None)):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def _kill_unjoined(config: WorkerConfig) -> None:
    proc = config.process
    if proc is not None and proc.poll() is None:
        threading.Thread(target=escalate_exit, args=(proc, 0.0), daemon=True).start()


# -- joining, on the worker ---------------------------------------------------------------


def handle_identify(n: Node, conn: Connection, frame: Frame) -> None:
    """An IDENTIFY frame arrived (on the thread that reads `conn`)."""
    on_identify(n, conn, serialize.loads(frame.body, what="identity"))


def on_identify(n: Node, conn: Connection, d: dict[str, Any]) -> None:
    if n.role == "master":
        w = _joining.get(conn.peer) if conn.peer is not None else None
        if w is not None:
            w.set(d)
        return
    pid = int(d["pid"])
    if "your_pid" in d and n.myid == 0:
        _join(n, conn, d)
        return
    p = n.peers.get(pid)
    if p is None:
        p = n.peers[pid] = Peer(pid)
    n._attach(p, conn)


def _join(n: Node, conn: Connection, d: dict[str, Any]) -> None:
    n.myid = int(d["your_pid"])
    n.topology = d["topology"]
    n.lazy = bool(d["lazy"])
    master = Peer(1, host=conn_peer_host(conn))
    n.peers[1] = master
    n._attach(master, conn)
    for facts in d["peers"]:
        if facts["pid"] != n.myid:
            n.peers[facts["pid"]] = Peer(**facts)
    install_log_forwarding(n, d.get("log_level", logging.WARNING))

    n.connect_idents = d.get("connect_idents")  # type: ignore[attr-defined]
    n.callpool.fast_connection = lambda: n.peers[1].conn if 1 in n.peers else None

    def finish() -> None:
        try:
            body, _ = serialize.dumps({"pid": n.myid, "ospid": os.getpid(), "host": n.host,
                                       "port": n.port}, what="identity")
            conn.send_frame(Kind.IDENTIFY, 0, 0, n.myid, 0, body)
        except Exception as exc:  # noqa: BLE001
            import sys

            print(f"fastdist: worker {n.myid} failed to join: {exc}", file=sys.stderr)
            conn.close(exc)

    n.callpool.submit(finish)


def _link_peers() -> None:
    """On a new worker, once its whole batch has joined: open the links the topology asks
    for (eager all_to_all: to every lower pid; custom: to the idents in connect_idents)."""
    n = _node.current()
    idents = getattr(n, "connect_idents", None) or ()
    for p in list(n.peers.values()):
        if p.pid == 1:
            continue
        if n.topology == "all_to_all" and not n.lazy and p.pid < n.myid:
            _connect_now(n, p)
        elif n.topology == "custom" and p.ident is not None and p.ident in idents:
            _connect_now(n, p)


def _connect_now(n: Node, p: Peer) -> None:
    """Open a link to `p` at join time (the newer worker always opens it)."""
    with p.connect_lock:
        if p.conn is not None:
            return
        sock = connect_socket(p.host, p.port, n.cookie.encode(), worker_timeout())
        conn = n.loop.add_connection(sock.detach(), n, None, p.pid)
        body, _ = serialize.dumps({"pid": n.myid}, what="identity")
        conn.send_frame(Kind.IDENTIFY, 0, 0, n.myid, 0, body)
        n._attach(p, conn)


def conn_peer_host(conn: Connection) -> str:
    """The peer's address on a socket connection ("" for Unix sockets and streams: this host)."""
    fd = conn.fd
    if fd is None or fd < 0:
        return ""
    try:
        s = socket.socket(fileno=os.dup(fd))
        try:
            name = s.getpeername()
        finally:
            s.close()
    except OSError:
        return ""
    return str(name[0]) if isinstance(name, tuple) else ""


def handle_peers(n: Node, conn: Connection, frame: Frame) -> None:
    on_peers(n, serialize.loads(frame.body, what="peer list"))


def on_peers(n: Node, d: dict[str, Any]) -> None:
    for facts in d.get("add", ()):
        pid = facts["pid"]
        if pid != n.myid and pid not in n.peers and pid not in n.removed:
            n.peers[pid] = Peer(**facts)
    for pid in d.get("remove", ()):
        if pid in n.peers:
            n.peer_lost(pid, ProcessExitedException(pid))
        n.removed.add(pid)


# -- removing workers -----------------------------------------------------------------------


@on_peer_lost
def _worker_lost(n: Node, pid: int, p: Peer | None, exc: BaseException | None) -> None:
    """On the master, after a worker's connection is gone (any thread): its addprocs
    is told at once if it was still joining (rather than waiting out
    FASTDIST_WORKER_TIMEOUT), the other workers forget it, its manager is told."""
    if n.role != "master":
        return
    w = _joining.get(pid)
    if w is not None:
        w.fail(ProcessExitedException(pid))
    if p is None:
        return

    def after() -> None:
        body, _ = serialize.dumps({"remove": [p.pid]}, what="peer list")
        for other in n.worker_pids():
            try:
                n.send(other, Kind.PEERS, 0, 0, 1, 0, body)
            except Exception:  # noqa: BLE001
                pass
        if p.manager is not None:
            try:
                p.manager.manage(p.pid, p.config, "deregister")
            except Exception:  # noqa: BLE001
                pass
        proc = getattr(p.config, "process", None)
        if proc is not None:
            escalate_exit(proc)

    n.callpool.submit(after)


def _remove_now(n: Node, pid: int) -> None:
    p = n.peers.get(pid)
    if p is None:
        return
    try:
        (p.manager.kill if p.manager is not None else (lambda *_: n.ask_to_exit(pid)))(
            pid, p.config)
    except Exception:  # noqa: BLE001
        pass
    if p.conn is not None:
        p.conn.close(ProcessExitedException(pid))


def rmprocs(*pids: Any, waitfor: float | None = None) -> Any:
    """Remove workers: ask them to exit, escalating to SIGTERM/SIGKILL if they do not.

    Args:
        pids: pids, or lists of pids.
        waitfor: seconds to wait for them to be gone (None: until they are);
            0 returns at once with a Task to `wait` on.

    Returns:
        The Task doing the removal (already finished unless `waitfor=0`).

    Raises:
        RuntimeError: called on a worker.
        TimeoutError: `waitfor` seconds passed before every worker was gone.
    """
    n = _node.current()
    if n.myid != 1:
        raise RuntimeError("Only process 1 can add or remove workers")
    waitfor = check_timeout(waitfor, "waitfor")
    flat: list[int] = []
    for p in pids:
        flat.extend(int(x) for x in (p if isinstance(p, (list, tuple, set, range)) else [p]))
    if 1 in flat:
        warnings.warn("rmprocs: process 1 not removed", stacklevel=2)
        flat = [p for p in flat if p != 1]

    def remove() -> None:
        for pid in flat:
            p = n.peers.get(pid)
            if p is not None and p.manager is not None:
                p.manager.kill(pid, p.config)
            elif p is not None:
                n.ask_to_exit(pid)
        for pid in flat:
            p = n.peers.get(pid)
            if p is not None:
                p.gone.wait()

    task = run_async(remove)
    if waitfor == 0:
        return task
    try:
        task.wait(waitfor)
    except TimeoutError:
        raise TimeoutError(f"rmprocs: workers {flat} were not removed within {waitfor} s; "
                           "their removal goes on") from None
    return task


def interrupt(*pids: Any) -> None:
    """Raise KeyboardInterrupt in the calls running on workers (default: all of them).

    The caller of an interrupted call gets a RemoteException wrapping
    KeyboardInterrupt; the worker keeps serving.
    """
    n = _node.current()
    flat: list[int] = []
    for p in pids:
        flat.extend(int(x) for x in (p if isinstance(p, (list, tuple, set, range)) else [p]))
    if not pids:
        flat = n.worker_pids()
    for pid in flat:
        p = n.peers.get(pid)
        if p is None:
            continue
        try:
            n.send(pid, Kind.INTERRUPT, 0, 0, n.myid, 0)
        except ProcessExitedException:
            continue
        if p.manager is not None:
            p.manager.manage(pid, p.config, "interrupt")


def worker_id_from_socket(s: Any) -> int:
    """The pid at the other end of a connection (a socket or a fastdist connection); -1 if none."""
    n = _node.peek()
    if n is None:
        return -1
    peer = getattr(s, "peer", None)
    if isinstance(peer, int):
        return peer
    try:
        fd = s.fileno()
    except Exception:  # noqa: BLE001
        return -1
    for p in n.peers.values():
        if p.conn is not None and p.conn.fd == fd:
            return p.pid
    return -1


def _install_worker_log_field() -> None:
    install_worker_record_field(myid)


register(Kind.IDENTIFY, handle_identify)
register(Kind.PEERS, handle_peers)
