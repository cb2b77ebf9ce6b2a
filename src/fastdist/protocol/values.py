"""Results on the wire: a value, or a failure carried so that it always arrives.

A failure travels as plain data — pid, type name, message, traceback text — plus
the pickled exception when it pickles. The receiver rebuilds
`RemoteException(pid, CapturedException(ex, traceback))` with the original
exception where it unpickles and a stand-in carrying type name and message
where it does not, so an exception that cannot travel still reports itself.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import cloudpickle

from fastdist.exceptions import (
    CapturedException,
    RemoteException,
    RemoteExceptionStandIn,
    user_traceback,
)
from fastdist.protocol import serialize
from fastdist.protocol.messages import FLAG_ERROR


def _no_pid_yet() -> int:
    return 1


# This process's pid, for the errors made here (node.py registers where it is: the
# protocol knows no processes).
_local_pid: Callable[[], int] = _no_pid_yet


def set_local_pid(get: Callable[[], int]) -> None:
    """Have errors made in this process name `get()` as where they happened."""
    global _local_pid
    _local_pid = get


def encode_result(value: Any, dest: int | None) -> tuple[int, bytes, list[memoryview]]:
    """(flags, body, buffers) for a successful value; an unpicklable value becomes an error."""
    try:
        body, buffers = serialize.dumps(value, dest=dest, what="result")
        return 0, body, buffers
    except serialize.SerializationError as exc:
        return encode_error(exc)
    except BaseException as exc:  # noqa: BLE001 - e.g. SystemExit from a __reduce__
        # Every call gets one reply: a value, or the error that stood in its way.
        error = serialize.SerializationError(
            f"could not serialise the result: {type(exc).__name__}: {_safe_str(exc)}")
        error.__cause__ = exc
        return encode_error(error)


def encode_error(exc: BaseException, pid: int | None = None) -> tuple[int, bytes, list[memoryview]]:
    """(FLAG_ERROR, body, []) for an exception raised here (or a RemoteException relayed)."""
    if isinstance(exc, RemoteException):
        captured = exc.captured
        origin, ex, text = exc.pid, captured.ex, captured.traceback
    else:
        origin = pid if pid is not None else _local_pid()
        ex = exc
        try:
            text = user_traceback(exc)
        except BaseException:  # noqa: BLE001 - a __str__ that raises: the type still says
            text = f"{type(exc).__qualname__}: <no traceback: it could not be formatted>\n"
    # (BaseException: an exception whose pickling raises SystemExit still has its
    # stand-in reach the caller, who waits for exactly one reply.)
    try:
        ex_bytes: bytes | None = pickle.dumps(ex, protocol=5)
    except BaseException:  # noqa: BLE001 - try by value, then the stand-in below carries it
        try:
            # An exception class defined in the caller's script reached this process
            # by value; cloudpickle sends it back by value under the same class id,
            # so the caller gets its very own class (`except MyError` matches).
            ex_bytes = cloudpickle.dumps(ex, protocol=5)
        except BaseException:  # noqa: BLE001
            ex_bytes = None
    name = f"{type(ex).__module__}.{type(ex).__qualname__}"
    if type(ex).__module__ == "builtins":
        name = type(ex).__qualname__
    body = pickle.dumps((origin, name, _safe_str(ex), text, ex_bytes), protocol=5)
    return FLAG_ERROR, body, []


def _safe_str(ex: BaseException) -> str:
    try:
        return str(ex)
    except BaseException:  # noqa: BLE001
        return f"<unprintable {type(ex).__name__}>"


def decode_error(body: Any) -> RemoteException:
    origin, name, message, text, ex_bytes = pickle.loads(body)
    ex: BaseException | None = None
    if ex_bytes is not None:
        try:
            ex = pickle.loads(ex_bytes)
        except Exception:  # noqa: BLE001 - a class this process lacks
            ex = None
    if not isinstance(ex, BaseException):
        ex = RemoteExceptionStandIn(name, message)
    return RemoteException(origin, CapturedException(ex, text))


def decode_result(flags: int, body: Any, buffers: Any) -> tuple[Any, bool]:
    """(value, is_error) from a RESULT; a value that will not unpickle here is an error."""
    if flags & FLAG_ERROR:
        return decode_error(body), True
    try:
        return serialize.loads(body, buffers, what="result"), False
    except serialize.SerializationError as exc:
        return RemoteException(_local_pid(), CapturedException.capture(exc)), True
