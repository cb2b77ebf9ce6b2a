"""What a process does with the frames of the runtime's own kinds: calls and their
replies, results, fetches and puts of references, reference counts, liveness,
interrupts, exit, shared-memory set-up (each registered with dispatch.py).

Handlers run on whichever thread reads the connection — the I/O thread, or a
thread waiting for its own reply — and never run user code there: they only
route. Calls, and anything that unpickles user data (fetch replies), go to the
call threads (callpool.py).
"""

from __future__ import annotations

import functools
import sys
import traceback
from typing import Any

from fastdist._core._wire import Frame
from fastdist._fastpath._calls import (
    configure_replies,
    handle_call,
    handle_result,
    queue_reply,
)
from fastdist.dispatch import register
from fastdist.exceptions import FutureAlreadySetError, ProtocolError
from fastdist.node import Node, exit_worker
from fastdist.protocol import serialize
from fastdist.protocol.messages import (
    FLAG_ERROR,
    FLAG_RELEASED,
    FLAG_RESTORE,
    REF_HEADER,
    REF_RECORD,
    RESULT,
    Kind,
)
from fastdist.protocol.values import encode_error, encode_result
from fastdist.refstore import RRID, RemoteValue
from fastdist.transport import Connection

# -- calls ----------------------------------------------------------------------------


def _decode_call(node: Node, frame: Frame) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    k = frame.aux  # the length of the function's own pickle, if it has one
    if not k:
        f, args, kwargs = serialize.loads(frame.body, frame.buffers, what="call")
        return f, args, kwargs
    body = frame.body
    if type(body) is not bytes:
        body = memoryview(body)  # a large body's receive buffer: sliced without a copy
    if k > len(body):
        raise ProtocolError(f"a call's function pickle is longer ({k}) than its body")
    f = serialize.loads_function(bytes(body[:k]))
    args, kwargs = serialize.loads(body[k:], frame.buffers, what="call's arguments")
    return f, args, kwargs


def run_general_call(node: Node, conn: Connection, frame: Frame) -> None:
    """On a call thread: run a call that is not a small one (see _calls.run_call,
    which runs most calls in C) and deliver what it produced."""
    try:
        f, args, kwargs = _decode_call(node, frame)
        value = node.callpool.run_user(f, *args, **kwargs)
        failed = False
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt from interrupt() too
        value, failed = exc, True
    reply_to_call(node, conn, frame, value, failed)


def reply_to_call(node: Node, conn: Connection, frame: Frame, value: Any, failed: bool) -> None:
    """Deliver what a call produced: its value, or (`failed`) the exception it raised.

    Every CALL and CALL_FETCH gets exactly one reply: a value that cannot be made
    into one (it fails to pickle, even with a BaseException) is answered with the
    error instead."""
    caller = frame.whence
    kind = frame.kind
    if kind == Kind.REMOTE_DO:
        if failed:
            try:
                print(f"fastdist: error in remote_do on worker {node.myid}:", file=sys.stderr)
                traceback.print_exception(type(value), value, value.__traceback__)
            except BaseException:  # noqa: BLE001 - a __str__ that raises: nothing to print
                pass
        return
    released = 0
    if kind == Kind.CALL:
        # (Most workers hold no values at all: then not even the key is made.)
        rv = node.store.get(RRID(caller, frame.id)) if len(node.store) else None
        if rv is None:
            # Nobody but the caller holds the reference (no other process was handed
            # it, or its hold has not arrived): push the value and keep nothing. The
            # caller restores it here should it have passed the reference on.
            released = FLAG_RELEASED
        else:
            # Keep the value as owner (others fetch it here) and push it to the caller.
            for pid, wid in node.store.set_value(rv, obj=value, is_error=failed):
                send_value(node, pid, wid, rv)
    flags, body, buffers = encode_error(value) if failed else encode_result(value, caller)
    send_reply(node, conn, frame, flags | released, body, buffers)


def send_reply(node: Node, conn: Connection, frame: Frame, flags: int, body: bytes,
               buffers: Any) -> None:
    """Send a call's RESULT frame, or queue it behind the next ones' if more calls
    from the same caller are being run here (see _calls.queue_reply)."""
    caller = frame.whence
    if not buffers and queue_reply(node.callpool, conn, frame, flags, body):
        return
    if buffers:
        flags, buffers = node.shm.outgoing(conn, flags, buffers)
    try:
        conn.send_frame(RESULT, flags, 0, caller, frame.id, body, buffers)
    except ConnectionError:
        pass


def send_value(node: Node, pid: int, waiter_id: int, rv: RemoteValue) -> None:
    """Answer a remote fetch of a stored value (on a call thread: pickling runs user code)."""
    if rv.raw is not None:
        flags, body, buffers = rv.raw
    elif rv.is_error:
        flags, body, buffers = encode_error(rv.obj)
    else:
        flags, body, buffers = encode_result(rv.obj, pid)  # (an error if it won't pickle)
    try:
        node.send(pid, Kind.RESULT, flags, 0, pid, waiter_id, body, buffers)
    except Exception:  # noqa: BLE001 - the fetcher died; nothing to tell
        pass


# Replies up to this size (and without out-of-band buffers) may wait in a lane's
# queue; a larger one goes out at once.
SMALL_REPLY_NBYTES = 16 * 1024
# Replies queued on a connection before they are written together (see queue_reply):
# one write per this many pipelined calls, not per call.
MAX_QUEUED_REPLIES = 32

configure_replies(send_reply, reply_to_call, run_general_call, SMALL_REPLY_NBYTES,
                  MAX_QUEUED_REPLIES)


def handle_fetch(node: Node, conn: Connection, frame: Frame) -> None:
    whence, ref_id = REF_HEADER.unpack_from(frame.body)
    rv = node.store.lookup(RRID(whence, ref_id))
    with node.store.lock:
        ready = rv.ready
        if not ready:
            rv.fetchers.append((frame.whence, frame.id))
    if ready:
        node.callpool.submit(lambda: send_value(node, frame.whence, frame.id, rv))


def handle_put_future(node: Node, conn: Connection, frame: Frame) -> None:
    whence, ref_id = REF_HEADER.unpack_from(frame.body)
    rrid = RRID(whence, ref_id)
    rv = node.store.lookup(rrid)
    value_body = memoryview(frame.body)[REF_HEADER.size:]
    if frame.flags & FLAG_RESTORE:
        _restore(node, rrid, rv, (frame.flags & FLAG_ERROR, value_body, frame.buffers))
        return
    try:
        fetchers = node.store.set_value(rv, raw=(0, value_body, frame.buffers))
    except FutureAlreadySetError as exc:
        flags, body, _ = encode_error(exc)
        conn.send_nowait(Kind.RESULT, flags, 0, frame.whence, frame.id, body)
        return
    _send_values(node, fetchers, rv)
    flags, body, _ = encode_result(None, None)
    conn.send_nowait(Kind.RESULT, flags, 0, frame.whence, frame.id, body)


def _restore(node: Node, rrid: RRID, rv: RemoteValue, raw: Any) -> None:
    """A value this process pushed and released comes back, because its caller passed
    the reference on before the value reached it: store it for the holders, whose
    holds arrived before it, and drop the creator's hold, which the push used up."""
    if not rv.ready:
        try:
            fetchers = node.store.set_value(rv, raw=raw, is_error=bool(raw[0] & FLAG_ERROR))
        except FutureAlreadySetError:
            fetchers = []
        _send_values(node, fetchers, rv)
    node.store.change(rrid, rrid.whence, -1)


def _send_values(node: Node, fetchers: list[tuple[int, int]], rv: RemoteValue) -> None:
    """Answer the processes that fetched a value before it was set (on call threads:
    pickling the value runs user code)."""
    for pid, wid in fetchers:
        node.callpool.submit(functools.partial(send_value, node, pid, wid, rv))


# -- references, liveness, cluster membership ---------------------------------------------


def handle_refs(node: Node, conn: Connection, frame: Frame) -> None:
    for whence, client, ref_id, delta in REF_RECORD.iter_unpack(frame.body):
        node.store.change(RRID(whence, ref_id), client, delta)


def handle_shm_offer(node: Node, conn: Connection, frame: Frame) -> None:
    node.shm.on_offer(conn, frame.body)


def handle_shm_accept(node: Node, conn: Connection, frame: Frame) -> None:
    node.shm.on_accept(conn.peer)


def handle_shm_forget(node: Node, conn: Connection, frame: Frame) -> None:
    node.shm.on_forget(conn.peer, frame.body)


def handle_ping(node: Node, conn: Connection, frame: Frame) -> None:
    """Arrival alone is the point: the heartbeat counts received bytes. Each side
    pings on its own whenever it has been quiet (the keepalive thread, see
    _msgloop), so nothing is answered."""


def handle_pong(node: Node, conn: Connection, frame: Frame) -> None:
    """As PING (older peers answered a PING with a PONG)."""


def handle_connect_back(node: Node, conn: Connection, frame: Frame) -> None:
    target = frame.aux
    if node.role == "master":
        # Forward: ask the higher pid to open the link to the one that asked.
        node.send(target, Kind.CONNECT_BACK, 0, conn.peer, node.myid, 0)
        return

    def connect() -> None:
        try:
            node.connection_to(target)
        except Exception as exc:  # noqa: BLE001
            print(f"fastdist: worker {node.myid} could not connect to worker {target}: {exc}",
                  file=sys.stderr)

    node.callpool.submit(connect)


def handle_interrupt(node: Node, conn: Connection, frame: Frame) -> None:
    node.callpool.interrupt()


def handle_exit(node: Node, conn: Connection, frame: Frame) -> None:
    if node.role == "worker" and conn.peer == 1:
        exit_worker()


for _kind, _handler in {
    Kind.CALL: handle_call,
    Kind.CALL_FETCH: handle_call,
    Kind.REMOTE_DO: handle_call,
    # (In C, _fastpath/_calls.pyx. The worker's output printed before a reply was
    # drained by Node.on_frames.)
    Kind.RESULT: handle_result,
    Kind.FETCH: handle_fetch,
    Kind.PUT_FUTURE: handle_put_future,
    Kind.REFS: handle_refs,
    Kind.PING: handle_ping,
    Kind.PONG: handle_pong,
    Kind.CONNECT_BACK: handle_connect_back,
    Kind.INTERRUPT: handle_interrupt,
    Kind.EXIT: handle_exit,
    Kind.SHM_OFFER: handle_shm_offer,
    Kind.SHM_ACCEPT: handle_shm_accept,
    Kind.SHM_FORGET: handle_shm_forget,
}.items():
    register(_kind, _handler)
