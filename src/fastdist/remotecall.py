"""Remote calls and the generic functions on references (Julia's remotecall family,
fetch, put, take, isready, wait, close).

Port of the call half of Distributed.jl `remotecall.jl`. A call to this very
process runs here without serialising, as in Julia: arguments and results are
the same objects.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from typing import Any

from fastdist import node as _node
from fastdist._fastpath._calls import (
    configure_remotecall,
    fetch_value,
    remotecall_plain,
)
from fastdist.channel import AbstractChannel
from fastdist.exceptions import (
    CapturedException,
    RemoteException,
)
from fastdist.handlers import send_value
from fastdist.node import Node
from fastdist.protocol.messages import CALL, Kind
from fastdist.refs import _EMPTY, Future
from fastdist.requests import DEFER_MAX_NBYTES, call_fetch, encode_call
from fastdist.tasks import Task, register_sync
from fastdist.tasks import _current_block as _sync_block

__all__ = [
    "close",
    "fetch",
    "isready",
    "put",
    "remote_do",
    "remotecall",
    "remotecall_fetch",
    "remotecall_wait",
    "take",
    "wait",
]


configure_remotecall(Future, _sync_block, DEFER_MAX_NBYTES)


@functools.singledispatch
def on_target(target: Any, form: Callable[..., Any], f: Callable[..., Any], args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
    """`form(f, target, args, kwargs)` — `form` one of call_future, call_fetch,
    call_wait, call_do — for a call whose target is a pid. Worker pools register
    themselves here (workerpool.py, as Julia's workerpool.jl defines these
    methods): a free worker is taken for the call and given back."""
    return form(f, target, args, kwargs)


def remotecall(f: Callable[..., Any], pid_or_pool: Any, /, *args: Any,
               **kwargs: Any) -> Future:
    """Call `f(*args, **kwargs)` on a process and return at once with a Future.

    Args:
        f: the function; importable functions travel by name, lambdas, closures
            and `__main__` functions by value.
        pid_or_pool: a pid, or a worker pool (a free worker is taken from it and
            given back when the call is done).

    Returns:
        A Future; `fetch` it for the result.

    Raises:
        ProcessExitedException: the process is dead or was removed.
        SerializationError: the function or an argument cannot be pickled.

    Example:
        >>> fut = fd.remotecall(pow, 2, 2, 10)
        >>> fd.fetch(fut)
        1024
    """
    n = _node.current()
    fut = remotecall_plain(n, f, pid_or_pool, args, kwargs)  # most calls, in C
    if fut is not None:
        return fut  # type: ignore[no-any-return]
    if type(pid_or_pool) is int:
        return _call_future(n, f, pid_or_pool, args, kwargs, 0)
    return on_target(pid_or_pool, call_future, f, args, kwargs)  # type: ignore[no-any-return]


def call_future(f: Callable[..., Any], pid: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                flags: int = 0) -> Future:
    """`remotecall` to one process; `flags` go on the call frame (FLAG_SERIAL: a
    pool's call, which the worker runs after the pool's earlier ones)."""
    n = _node.current()
    fut = remotecall_plain(n, f, pid, args, kwargs, flags)  # most calls, in C
    if fut is not None:
        return fut  # type: ignore[no-any-return]
    return _call_future(n, f, int(pid), args, kwargs, flags)


def _call_future(n: Node, f: Callable[..., Any], pid: int, args: tuple[Any, ...],
                 kwargs: dict[str, Any], flags: int) -> Future:
    """`call_future` for a call that `remotecall_plain` declined."""
    if pid == n.myid:
        fut = Future()
        rv = n.store.lookup(fut.rrid)

        def run() -> None:
            try:
                value, failed = n.callpool.run_user(f, *args, **kwargs), False
            except BaseException as exc:  # noqa: BLE001
                value = RemoteException(n.myid, CapturedException.capture(exc))
                value.__cause__, failed = exc, True
            for p, wid in n.store.set_value(rv, obj=value, is_error=failed):
                send_value(n, p, wid, rv)

        n.callpool.submit(run)
    else:
        aux, body, buffers = encode_call(f, args, kwargs, pid)
        fut = Future._for_call(n, pid)
        try:
            if buffers or len(body) > DEFER_MAX_NBYTES:
                n.send(pid, CALL, flags, aux, n.myid, fut.id, body, buffers)
            else:
                # Written with the next burst; whoever waits for it flushes first.
                n.send_deferred(pid, CALL, flags, aux, n.myid, fut.id, body)
        except BaseException:
            n.pushes.pop(fut.id, None)  # no value will come for it
            fut._holds = 0
            raise
    if _sync_block.get() is not None:
        register_sync(fut)
    return fut


def remotecall_fetch(f: Callable[..., Any], pid_or_pool: Any, /, *args: Any,
                     **kwargs: Any) -> Any:
    """Call `f(*args, **kwargs)` on a process and return its result (one round trip).

    Raises:
        RemoteException: `f` raised; the original exception is its `__cause__`.
        ProcessExitedException: the process died or was removed before answering.

    Example:
        >>> fd.remotecall_fetch(sum, 2, [1, 2, 3])
        6
    """
    if type(pid_or_pool) is int:
        return call_fetch(f, pid_or_pool, args, kwargs)
    return on_target(pid_or_pool, call_fetch, f, args, kwargs)


def remotecall_wait(f: Callable[..., Any], pid_or_pool: Any, /, *args: Any,
                    **kwargs: Any) -> Future:
    """`remotecall` and wait until the call is done; returns the Future.

    Raises:
        RemoteException: `f` raised.
    """
    return on_target(pid_or_pool, call_wait, f, args, kwargs)  # type: ignore[no-any-return]


def call_wait(f: Callable[..., Any], pid: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
              flags: int = 0) -> Future:
    """`remotecall_wait` to one process (`flags` as for `call_future`)."""
    fut = call_future(f, pid, args, kwargs, flags)
    fut.wait()
    return fut


def remote_do(f: Callable[..., Any], pid_or_pool: Any, /, *args: Any,
              **kwargs: Any) -> None:
    """Run `f(*args, **kwargs)` on a process; no result, errors go to that process's stderr."""
    on_target(pid_or_pool, call_do, f, args, kwargs)


def call_do(f: Callable[..., Any], pid: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
            flags: int = 0) -> None:
    """`remote_do` to one process (`flags` as for `call_future`)."""
    n = _node.current()
    pid = int(pid)
    if pid == n.myid:
        def run() -> None:
            try:
                n.callpool.run_user(f, *args, **kwargs)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()

        n.callpool.submit(run)
        return
    aux, body, buffers = encode_call(f, args, kwargs, pid)
    n.send(pid, Kind.REMOTE_DO, flags, aux, n.myid, 0, body, buffers)


# -- the generic functions ------------------------------------------------------------


def fetch(x: Any, timeout: float | None = None) -> Any:
    """The value of a Future, the first value of a channel; anything else as it is.

    Raises:
        TimeoutError: `timeout` seconds passed first (the call itself goes on).
    """
    if type(x) is Future:
        value = fetch_value(x)  # in C: a value here, or delivered and not an error
        if value is not _EMPTY:
            return value
    if type(x) is Future or isinstance(x, (Future, AbstractChannel)):
        return x.fetch(timeout) if timeout is not None else x.fetch()
    if isinstance(x, Task):
        return x.result(timeout)
    return x


def put(x: Any, v: Any, timeout: float | None = None) -> Any:
    """Put `v` into a Future (once), a channel (blocks while full) or a worker pool."""
    if timeout is not None:
        return x.put(v, timeout)
    return x.put(v)


def take(x: Any, timeout: float | None = None) -> Any:
    """Remove and return a value from a channel, or a worker from a pool."""
    return x.take(timeout) if timeout is not None else x.take()


def isready(x: Any) -> bool:
    """True when a fetch (or take) would not wait."""
    return bool(x.isready())


def wait(x: Any, timeout: float | None = None) -> Any:
    """Wait for a Future's value, a channel's next value, or a Task to finish.

    Raises:
        TimeoutError: `timeout` seconds passed first.
    """
    if timeout is not None:
        r = x.wait(timeout)
    else:
        r = x.wait()
    return x if r is None else r


def close(x: Any) -> None:
    """Close a channel (local or remote)."""
    x.close()
