"""Requests to other processes and waiting for their replies: a call's encoding,
a request sent and its RESULT waited for, a FETCH of a reference's value.

A thread that waits for a reply reads the peer's connection itself when it can
(`_become_reader`, `_wait_reply`): the reply then wakes that thread rather than
the I/O thread, which would have to wake it. What builds on this: refs.py (the
Future's fetch and put, RemoteChannel operations), remotecall.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastdist import node as _node
from fastdist._fastpath._calls import encode_plain_call
from fastdist.channel import WAIT_SLICE_SECONDS, check_timeout
from fastdist.exceptions import CapturedException, RemoteException
from fastdist.node import Node
from fastdist.output import handle_worker_logs
from fastdist.protocol import serialize
from fastdist.protocol.messages import REF_HEADER, Kind
from fastdist.protocol.resent import note_call
from fastdist.protocol.values import decode_result
from fastdist.refstore import Waiter
from fastdist.transport import Connection

# Calls with a body up to this size (and no out-of-band buffers) are deferred and
# written in bursts; larger ones go out at once from the caller's thread.
DEFER_MAX_NBYTES = 16 * 1024


def encode_call(f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 pid: int) -> tuple[int, bytes, list[memoryview]]:
    """(aux, body, buffers) of a call frame: a function that travels by name is
    pickled once and its pickle put before that of `(args, kwargs)`, its length
    in `aux`; any other call is one pickle of `(f, args, kwargs)` and `aux` 0."""
    plain = encode_plain_call(f, args, kwargs)  # most calls: in C
    if plain is not None:
        return plain
    return encode_general_call(f, args, kwargs, pid)


def encode_general_call(f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                        pid: int) -> tuple[int, bytes, list[memoryview]]:
    """`encode_call` for a call `encode_plain_call` declined."""
    fpickle = serialize.function_pickle(f)
    if fpickle is not None:
        body, buffers = serialize.dumps((args, kwargs), dest=pid, what="call's arguments")
        note_call(body, buffers)
        return len(fpickle), fpickle + body, buffers
    body, buffers = serialize.dumps((f, args, kwargs), dest=pid, what="call")
    note_call(body, buffers)
    return 0, body, buffers


def run_local(f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    n = _node.current()
    try:
        return n.callpool.run_user(f, *args, **kwargs)
    except BaseException as exc:
        raise RemoteException(n.myid, CapturedException.capture(exc)) from exc


def call_fetch(f: Callable[..., Any], pid: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
               flags: int = 0) -> Any:
    """`remotecall_fetch` to one process (`flags` as for `call_future`)."""
    n = _node.current()
    pid = int(pid)
    if pid == n.myid:
        return run_local(f, args, kwargs)
    aux, body, buffers = encode_call(f, args, kwargs, pid)
    return call_and_wait(n, pid, Kind.CALL_FETCH, flags, body, buffers, aux=aux)


def call_and_wait(n: Node, pid: int, kind: int, flags: int, body: Any, buffers: Any,
                  timeout: float | None = None, aux: int = 0) -> Any:
    """Send a request frame to `pid` and wait for its RESULT; return the value."""
    timeout = check_timeout(timeout)
    wid = n.next_id()
    w = Waiter(peer=pid)
    n.waiters[wid] = w
    # Reading while sending is fine for a small request; during a long send nobody
    # would read the peer's heartbeats, so a large one takes the role afterwards.
    reader = _become_reader(n, pid) if not buffers and len(body) <= DEFER_MAX_NBYTES else None
    try:
        try:
            n.send(pid, kind, flags, aux, n.myid, wid, body, buffers)
        except BaseException:
            n.waiters.pop(wid, None)
            raise
        if reader is not None:
            answered = _poll_reply(reader, w, timeout)
            if answered:
                handle_worker_logs(pid)
        else:
            answered = wait_reading(n, pid, w, timeout)
    finally:
        if reader is not None:
            reader.end_direct()
    if not answered:
        n.waiters.pop(wid, None)
        raise TimeoutError(f"no answer from process {pid} within {timeout} s")
    if w.error is not None:
        raise w.error
    value, is_error = decode_result(*w.value)
    if is_error:
        raise value
    return value


def _become_reader(n: Node, pid: int) -> Any:
    """The connection to `pid`, if this thread could become its reader before sending
    a request (so the reply wakes this thread alone); else None.

    Not inside an interruptible call: there, replies are read with the interrupt
    shield of `_wait_reply`.
    """
    if n.callpool.is_running_user():
        return None
    conn = n.connection_to(pid)
    return conn if conn.begin_direct() else None


def _poll_reply(conn: Connection, w: Waiter, timeout: float | None) -> bool:
    """As `conn`'s reader, read until `w` is set; False if `timeout` ran out."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not w.done():
        left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
        if left <= 0:
            return False
        conn.poll_direct(left)
    return True


def wait_reading(n: Node, pid: int, w: Waiter, timeout: float | None) -> bool:
    """Wait for a reply from `pid` (see `_wait_reply`); False if `timeout` ran out.

    Records that `pid` logged before replying are handled before the reply is used.
    """
    timeout = check_timeout(timeout)
    if not _wait_reply(n, pid, w, timeout):
        return False
    handle_worker_logs(pid)
    return True


def _wait_reply(n: Node, pid: int, w: Waiter, timeout: float | None) -> bool:
    """Wait for a reply from `pid`, reading its connection on this thread when free.

    The reply then wakes this thread directly rather than the I/O thread, which
    would have to wake this one: a thread hand-off less per round trip. When
    another thread is reading that connection, wait for the waiter as usual.
    """
    p = n.peers.get(pid)
    conn = p.conn if p is not None else None
    if conn is not None and conn.has_pending:
        try:
            conn.flush()
        except ConnectionError:
            pass
    if w.done():
        return True
    if conn is None:
        return w.wait(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    # An interruptible call must not take an interrupt while it dispatches others' frames.
    shield = n.callpool.is_running_user()
    # (In slices: an interrupt of a call's thread is raised between two of them.)
    wait_slice = WAIT_SLICE_SECONDS if shield else 1.0
    while not w.done():
        left = wait_slice if deadline is None else min(wait_slice, deadline - time.monotonic())
        if left <= 0:
            return False
        if shield:
            try:
                n.callpool.shield()
                r = conn.read_direct(left)
            finally:
                n.callpool.unshield()
        else:
            r = conn.read_direct(left)
        if r < 0:
            # Someone else reads this connection: its dispatch sets our waiter.
            w.wait(min(left, 0.05))
    return True


def ref_header(ref: Any) -> bytes:
    """The start of a FETCH or PUT_FUTURE body: the reference it is about."""
    return REF_HEADER.pack(ref.whence, ref.id)


def send_fetch(n: Node, fut: Any) -> tuple[int, Waiter]:
    """Ask the owner of `fut` (a Future) for its value; the answer will set the
    returned Waiter, which `n.waiters` holds under the returned id."""
    wid = n.next_id()
    w = Waiter(peer=fut.where)
    n.waiters[wid] = w
    try:
        n.send(fut.where, Kind.FETCH, 0, 0, n.myid, wid, ref_header(fut))
    except BaseException:
        n.waiters.pop(wid, None)
        raise
    return wid, w
