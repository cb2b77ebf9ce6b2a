"""Running as a worker: start_worker, init_worker, process_messages (`fastdist.worker` is the CLI).

Port of Distributed.jl's `start_worker` / `init_worker`. The worker listens,
prints `fastdist_worker:PORT#HOST`, reads the cookie from stdin when it is not
given, and serves until its master goes away — it never outlives the master.
"""

from __future__ import annotations

import io
import os
import select
import socket
import sys
import threading
import time
from typing import Any, cast

from fastdist import node as _node
from fastdist.node import Node, cluster_cookie, worker_timeout


def init_worker(cookie: str, manager: Any = None) -> Node:
    """Make this process a worker with the cluster's cookie (no listener yet).

    Custom transports call this, then `process_messages` for each connection.
    """
    cluster_cookie(cookie)
    n = Node(0, "worker", cookie)
    n.manager = manager  # type: ignore[attr-defined]
    _node.install(n)
    return n


def process_messages(r_stream: Any, w_stream: Any, incoming: bool = True) -> Any:
    """Serve a connection over any pair of binary streams (custom transports).

    Runs the handshake (as acceptor when `incoming`), then reads frames on a
    thread of its own; returns the connection at once.
    """
    from fastdist.transport import stream_handshake

    n = _node.current()
    if n.loop_thread is None and not n.loop.in_loop_thread():
        n.start_loop_thread()
    joining: dict[str, Any] = {"conn": None}
    if incoming and n.role == "worker" and n.myid == 0:
        # Until the master's IDENTIFY names this link, its loss would go unnoticed
        # (the connection has no peer yet): bound the wait, as start_worker does.
        threading.Thread(target=_exit_unless_joined, args=(n, joining),
                         name="fastdist-join-watch", daemon=True).start()
    stream_handshake(r_stream, w_stream, n.cookie.encode(), incoming=incoming)
    joining["conn"] = n.add_stream_connection(r_stream, w_stream, None)
    return joining["conn"]


def _exit_unless_joined(n: Node, joining: dict[str, Any]) -> None:
    """Exit a worker whose stream to the master closes, or stays silent, before it joins."""
    timeout = worker_timeout()
    deadline = time.monotonic() + timeout
    while n.myid == 0:
        conn = joining["conn"]
        if conn is not None and conn.is_closed:
            why = "closed the connection before this worker joined"
        elif time.monotonic() > deadline:
            why = f"did not complete joining within {timeout:g} seconds"
        else:
            time.sleep(0.05)
            continue
        print(f"Master process (id 1) {why}.\nexiting.", file=sys.stderr, flush=True)
        os._exit(1)


def advertised_host(bind_host: str) -> str:
    """The address other processes should use to reach a worker bound to `bind_host`.

    For a worker listening on all interfaces: what the host name resolves to,
    unless that is a loopback address (Debian maps its own name to 127.0.1.1),
    then the first address of a non-loopback interface.
    """
    if bind_host not in ("0.0.0.0", "", "::"):
        return bind_host
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        addr = "127.0.0.1"
    if addr.startswith("127."):
        addr = _first_interface_address() or addr
    return addr


def _first_interface_address() -> str | None:
    import fcntl
    import struct

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            if name == "lo":
                continue
            try:
                request = struct.pack("256s", name.encode()[:15])
                packed = fcntl.ioctl(s.fileno(), siocgifaddr, request)
            except OSError:
                continue  # no IPv4 address on this interface
            return socket.inet_ntoa(packed[20:24])
    return None


def parse_bind(bind_to: str | None) -> tuple[str, int]:
    if not bind_to:
        return "0.0.0.0", 0
    if bind_to.startswith("["):
        host, _, rest = bind_to[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 0
    if bind_to.count(":") == 1:
        host, port = bind_to.split(":")
        return host, int(port)
    return bind_to, 0


def _define_site_builtins() -> None:
    """`exit` and `quit` as `site` would define them (workers start with -S)."""
    import builtins

    for name in ("exit", "quit"):
        if not hasattr(builtins, name):
            setattr(builtins, name, sys.exit)


def start_worker(out: Any = None, cookie: str | None = None, close_stdin: bool = True,
                 stderr_to_stdout: bool = True, *, bind_to: str | None = None) -> None:
    """Run this process as a worker until its master goes away; does not return."""
    out = sys.stdout if out is None else out
    if cookie is None:
        cookie = sys.stdin.readline().strip()
    if close_stdin:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
    if stderr_to_stdout:
        os.dup2(1, 2)
    for stream in (sys.stdout, sys.stderr):
        cast(io.TextIOWrapper, stream).reconfigure(line_buffering=True)
    if sys.flags.no_site:
        _define_site_builtins()
    n = init_worker(cookie)
    host, port = parse_bind(bind_to)
    n.start_listener(host, port, advertised=advertised_host(host))
    print(f"fastdist_worker:{n.port}#{n.host}", file=out, flush=True)
    # Ctrl-C (or `kill -INT`) interrupts the running calls; the worker lives on.
    n.callpool.install_sigint()
    _exit_if_nobody_connects(n)
    # The I/O thread reads; this, the main thread, runs calls (where an interrupt's
    # SIGINT ends a sleep or a blocking wait) and never returns.
    n.start_loop_thread()
    n.callpool.serve_forever()


def _exit_if_nobody_connects(n: Node) -> None:
    timeout = worker_timeout()

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if n.myid != 0:
                return
            if _output_closed():
                os._exit(1)  # whoever launched us and read our stdout is gone
            time.sleep(0.1)
        if n.myid == 0:
            try:
                print(f"Master process (id 1) could not connect within {timeout:g} seconds.\n"
                      "exiting.", file=sys.stderr, flush=True)
            finally:
                # Exit even when the print fails: stderr's reader may be gone too
                # (BrokenPipeError), and this thread is the worker's only way out.
                os._exit(1)

    threading.Thread(target=watch, name="fastdist-connect-watch", daemon=True).start()


def _output_closed() -> bool:
    """True when nothing reads this worker's stdout any more: the launcher that reads
    the address line (the master, or the ssh session it started) has died, so no
    master will ever connect. (A pipe or socket whose reader is gone polls POLLERR
    or POLLHUP; a file or terminal never does.)"""
    p = select.poll()
    p.register(1, 0)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))
