"""Message kind -> handler: the table every received frame is routed by.

Each kind's handler is registered by the module that owns the kind, at its import:
handlers.py the runtime's (calls, results, references, liveness, interrupts,
shared memory), cluster.py membership (IDENTIFY, PEERS), output.py LOG,
workerpool.py FORGET_FUNCS. So the runtime below never imports the layers that
define what their messages mean (dask's `Server(handlers=...)` does the same).
A handler runs on whichever thread reads the connection and must only route:
user code runs on call threads (callpool.py). Frames from a connection that has
not named itself are refused.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from fastdist.exceptions import ProtocolError
from fastdist.protocol.messages import KNOWN_KINDS, Kind
from fastdist.protocol.values import encode_error

Handler = Callable[[Any, Any, Any], None]

HANDLERS: dict[int, Handler] = {}


def register(kind: int, handler: Handler) -> None:
    """Route frames of `kind` to `handler(node, conn, frame)` (once per kind)."""
    if kind in HANDLERS and HANDLERS[kind] is not handler:
        raise ValueError(f"message kind {kind} has a handler already: {HANDLERS[kind]!r}")
    HANDLERS[kind] = handler


def unhandled_kinds() -> set[int]:
    """Known message kinds no module has registered a handler for (none, once the
    package is imported)."""
    return set(KNOWN_KINDS) - set(HANDLERS)


def dispatch(node: Any, conn: Any, frame: Any) -> None:
    if conn.peer is None and frame.kind != Kind.IDENTIFY:
        conn.close(ProtocolError("a connection must identify itself before anything else"))
        return
    handler = HANDLERS.get(frame.kind)
    if handler is None:
        reply_error(node, conn, frame, ProtocolError(f"unknown message kind {frame.kind}"))
        return
    try:
        handler(node, conn, frame)
    except Exception as exc:  # noqa: BLE001 - one bad frame fails that frame only
        reply_error(node, conn, frame, exc)


def reply_error(node: Any, conn: Any, frame: Any, exc: BaseException) -> None:
    """Fail the waiter a broken frame was addressed to, if it named one."""
    if frame.id and frame.kind in (Kind.CALL, Kind.CALL_FETCH, Kind.FETCH, Kind.PUT_FUTURE):
        flags, body, _ = encode_error(exc)
        try:
            conn.send_nowait(Kind.RESULT, flags, 0, frame.whence, frame.id, body)
        except ConnectionError:
            pass
    else:
        print(f"fastdist: dropped a bad frame (kind {frame.kind}) from process {conn.peer}: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
