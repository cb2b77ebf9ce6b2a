"""Remote calls and the generic functions on references (Julia's remotecall family,
fetch, put, take, isready, wait, close).

Port of the call half of Distributed.jl `remotecall.jl`. A call to this very
process runs here without serialising, as in Julia: arguments and results are
the same objects.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

from fastdist import node as _node
from fastdist._core._calls import (
    configure_remotecall,
    encode_plain_call,
    fetch_value,
    remotecall_plain,
)
from fastdist.channel import WAIT_SLICE_SECONDS, AbstractChannel
from fastdist.exceptions import (
    CapturedException,
    FutureAlreadySetError,
    RemoteException,
)
from fastdist.output import handle_worker_logs
from fastdist.protocol import serialize
from fastdist.protocol.messages import CALL, Kind
from fastdist.protocol.values import decode_result
from fastdist.refs import _EMPTY, Future, Waiter
from fastdist.tasks import _current_block as _sync_block
from fastdist.tasks import register_sync

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


# Calls with a body up to this size (and no out-of-band buffers) are deferred and
# written in bursts; larger ones go out at once from the caller's thread.
DEFER_MAX_NBYTES = 16 * 1024

configure_remotecall(Future, _sync_block, DEFER_MAX_NBYTES)


def _is_pool(target: Any) -> bool:
    if type(target) is int:  # the common case, without an ABC isinstance check
        return False
    from fastdist.workerpool import AbstractWorkerPool

    return isinstance(target, AbstractWorkerPool)



def encode_call(f: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                 pid: int) -> tuple[int, bytes, list[memoryview]]:
    """(aux, body, buffers) of a call frame: a function that travels by name is
    pickled once and its pickle put before that of `(args, kwargs)`, its length
    in `aux`; any other call is one pickle of `(f, args, kwargs)` and `aux` 0."""
    plain = encode_plain_call(f, args, kwargs)  # most calls: in C
    if plain is not None:
        return plain
    return encode_general_call(f, args, kwargs, pid)


def encode_general_call(f: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                        pid: int) -> tuple[int, bytes, list[memoryview]]:
    """`encode_call` for a call `encode_plain_call` declined."""
    fpickle = serialize.function_pickle(f)
    if fpickle is not None:
        body, buffers = serialize.dumps((args, kwargs), dest=pid, what="call's arguments")
        return len(fpickle), fpickle + body, buffers
    body, buffers = serialize.dumps((f, args, kwargs), dest=pid, what="call")
    return 0, body, buffers


def _run_local(f: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    n = _node.current()
    try:
        return n.callpool.run_user(f, *args, **kwargs)
    except BaseException as exc:
        raise RemoteException(n.myid, CapturedException.capture(exc)) from exc


def remotecall(f: Any, pid_or_pool: Any, *args: Any, **kwargs: Any) -> Future:
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
    if _is_pool(pid_or_pool):
        from fastdist.workerpool import pool_remotecall

        fut = pool_remotecall(pid_or_pool, f, args, kwargs)
        return fut  # type: ignore[no-any-return]
    return _call_future(n, f, int(pid_or_pool), args, kwargs, 0)


def call_future(f: Any, pid: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                flags: int = 0) -> Future:
    """`remotecall` to one process; `flags` go on the call frame (FLAG_SERIAL: a
    pool's call, which the worker runs after the pool's earlier ones)."""
    n = _node.current()
    fut = remotecall_plain(n, f, pid, args, kwargs, flags)  # most calls, in C
    if fut is not None:
        return fut  # type: ignore[no-any-return]
    return _call_future(n, f, int(pid), args, kwargs, flags)


def _call_future(n: Any, f: Any, pid: int, args: tuple[Any, ...], kwargs: dict[str, Any],
                 flags: int) -> Future:
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
            from fastdist.handlers import send_value

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


def remotecall_fetch(f: Any, pid_or_pool: Any, *args: Any, **kwargs: Any) -> Any:
    """Call `f(*args, **kwargs)` on a process and return its result (one round trip).

    Raises:
        RemoteException: `f` raised; the original exception is its `__cause__`.
        ProcessExitedException: the process died or was removed before answering.

    Example:
        >>> fd.remotecall_fetch(sum, 2, [1, 2, 3])
        6
    """
    if _is_pool(pid_or_pool):
        from fastdist.workerpool import pool_call

        return pool_call(pid_or_pool, call_fetch, f, args, kwargs)
    return call_fetch(f, pid_or_pool, args, kwargs)


def call_fetch(f: Any, pid: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
               flags: int = 0) -> Any:
    """`remotecall_fetch` to one process (`flags` as for `call_future`)."""
    n = _node.current()
    pid = int(pid)
    if pid == n.myid:
        return _run_local(f, args, kwargs)
    aux, body, buffers = encode_call(f, args, kwargs, pid)
    return call_and_wait(n, pid, Kind.CALL_FETCH, flags, body, buffers, aux=aux)


def call_and_wait(n: Any, pid: int, kind: int, flags: int, body: Any, buffers: Any,
                  timeout: float | None = None, aux: int = 0) -> Any:
    """Send a request frame to `pid` and wait for its RESULT; return the value."""
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


def _become_reader(n: Any, pid: int) -> Any:
    """The connection to `pid`, if this thread could become its reader before sending
    a request (so the reply wakes this thread alone); else None.

    Not inside an interruptible call: there, replies are read with the interrupt
    shield of `_wait_reply`.
    """
    if n.callpool.is_running_user():
        return None
    conn = n.connection_to(pid)
    begin = getattr(conn, "begin_direct", None)
    if begin is None or not begin():
        return None
    return conn


def _poll_reply(conn: Any, w: Waiter, timeout: float | None) -> bool:
    """As `conn`'s reader, read until `w` is set; False if `timeout` ran out."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not w.done():
        left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
        if left <= 0:
            return False
        conn.poll_direct(left)
    return True


def wait_reading(n: Any, pid: int, w: Waiter, timeout: float | None) -> bool:
    """Wait for a reply from `pid` (see `_wait_reply`); False if `timeout` ran out.

    Records that `pid` logged before replying are handled before the reply is used.
    """
    if not _wait_reply(n, pid, w, timeout):
        return False
    handle_worker_logs(pid)
    return True


def _wait_reply(n: Any, pid: int, w: Waiter, timeout: float | None) -> bool:
    """Wait for a reply from `pid`, reading its connection on this thread when free.

    The reply then wakes this thread directly rather than the I/O thread, which
    would have to wake this one: a thread hand-off less per round trip. When
    another thread is reading that connection, wait for the waiter as usual.
    """
    p = n.peers.get(pid)
    conn = p.conn if p is not None else None
    if getattr(conn, "has_pending", False):
        try:
            conn.flush()  # type: ignore[union-attr]
        except ConnectionError:
            pass
    if w.done():
        return True
    read_direct = getattr(conn, "read_direct", None)
    if read_direct is None:
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
                r = read_direct(left)
            finally:
                n.callpool.unshield()
        else:
            r = read_direct(left)
        if r < 0:
            # Someone else reads this connection: its dispatch sets our waiter.
            w.wait(min(left, 0.05))
    return True


def remotecall_wait(f: Any, pid_or_pool: Any, *args: Any, **kwargs: Any) -> Future:
    """`remotecall` and wait until the call is done; returns the Future.

    Raises:
        RemoteException: `f` raised.
    """
    if _is_pool(pid_or_pool):
        from fastdist.workerpool import pool_call

        return pool_call(pid_or_pool, call_wait, f, args, kwargs)  # type: ignore[no-any-return]
    return call_wait(f, pid_or_pool, args, kwargs)


def call_wait(f: Any, pid: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
              flags: int = 0) -> Future:
    """`remotecall_wait` to one process (`flags` as for `call_future`)."""
    fut = call_future(f, pid, args, kwargs, flags)
    fut.wait()
    return fut


def remote_do(f: Any, pid_or_pool: Any, *args: Any, **kwargs: Any) -> None:
    """Run `f(*args, **kwargs)` on a process; no result, errors go to that process's stderr."""
    if _is_pool(pid_or_pool):
        from fastdist.workerpool import pool_call

        pool_call(pid_or_pool, call_do, f, args, kwargs)
        return
    call_do(f, pid_or_pool, args, kwargs)


def call_do(f: Any, pid: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
            flags: int = 0) -> None:
    """`remote_do` to one process (`flags` as for `call_future`)."""
    n = _node.current()
    pid = int(pid)
    if pid == n.myid:
        def run() -> None:
            try:
                n.callpool.run_user(f, *args, **kwargs)
            except BaseException:  # noqa: BLE001
                import traceback

                traceback.print_exc()

        n.callpool.submit(run)
        return
    aux, body, buffers = encode_call(f, args, kwargs, pid)
    n.send(pid, Kind.REMOTE_DO, flags, aux, n.myid, 0, body, buffers)


# -- Future internals used by refs.Future ------------------------------------------------


def _ref_header(fut: Any) -> bytes:
    from fastdist.handlers import REF_HEADER

    return REF_HEADER.pack(fut.whence, fut.id)


def fetch_future(fut: Future, timeout: float | None) -> Any:
    n = _node.current()
    if fut._push is not None:
        push = fut._push_waiter()
        if not wait_reading(n, fut.where, push, timeout):
            raise TimeoutError(f"the value of {fut!r} did not arrive within {timeout} s")
        if push.error is not None and not fut._materialize():
            raise push.error
        fut._materialize()
        return fut._return()
    if fut.where == n.myid:
        rv = n.store.lookup(fut.rrid)
        if not rv.waiter.wait(timeout):
            raise TimeoutError(f"the value of {fut!r} was not set within {timeout} s")
        if rv.raw is not None:
            value, is_error = decode_result(*rv.raw)
        else:
            value, is_error = rv.obj, rv.is_error
        fut._cache(value, is_error)
        return fut._return()
    value, is_error = _fetch_remote(n, fut, timeout)
    fut._cache(value, is_error)
    return fut._return()


def _send_fetch(n: Any, fut: Future) -> tuple[int, Waiter]:
    """Ask the owner of `fut` for its value; the answer will set the returned Waiter."""
    wid = n.next_id()
    w = Waiter(peer=fut.where)
    n.waiters[wid] = w
    try:
        n.send(fut.where, Kind.FETCH, 0, 0, n.myid, wid, _ref_header(fut))
    except BaseException:
        n.waiters.pop(wid, None)
        raise
    return wid, w


def _fetch_remote(n: Any, fut: Future, timeout: float | None) -> tuple[Any, bool]:
    wid, w = _send_fetch(n, fut)
    if not wait_reading(n, fut.where, w, timeout):
        n.waiters.pop(wid, None)
        raise TimeoutError(f"the value of {fut!r} did not arrive within {timeout} s")
    if w.error is not None:
        raise w.error
    return decode_result(*w.value)


def future_isready(fut: Future) -> bool:
    n = _node.current()
    if fut.where == n.myid:
        rv = n.store.get(fut.rrid)
        return rv is not None and rv.ready
    return bool(remotecall_fetch(_isready_ref, fut.where, fut.whence, fut.id))


def _isready_ref(whence: int, ref_id: int) -> bool:
    from fastdist.refs import RRID

    rv = _node.current().store.get(RRID(whence, ref_id))
    return rv is not None and rv.ready


def put_future(fut: Future, value: Any) -> None:
    n = _node.current()
    if fut._value is not _EMPTY or fut._raw is not None:
        raise FutureAlreadySetError("Future can be set only once")
    if fut.where == n.myid:
        from fastdist.handlers import send_value

        rv = n.store.lookup(fut.rrid)
        for p, wid in n.store.set_value(rv, obj=value):
            send_value(n, p, wid, rv)
    else:
        body, buffers = serialize.dumps(value, dest=fut.where, what="value put into the Future")
        try:
            call_and_wait(n, fut.where, Kind.PUT_FUTURE, 0, _ref_header(fut) + body, buffers)
        except RemoteException as exc:
            if isinstance(exc.captured.ex, FutureAlreadySetError):
                raise FutureAlreadySetError("Future can be set only once") from exc
            raise
        n.pushes.pop(fut.id, None)  # a remotecall's own result can no longer set it
    fut._cache(value, False)


def when_ready(fut: Future, callback: Callable[[], object]) -> bool:
    """Run `callback()` once `fut.fetch()` would not wait (value or failure is here).

    It runs at once, or on the thread that delivers the value (often the I/O
    thread: it must be quick). Returns False, arranging nothing, for a Future
    owned by another process whose value is not pushed here.
    """
    if fut._value is not _EMPTY or fut._raw is not None:
        callback()
        return True
    if fut._push is not None:
        fut._push_waiter().add_done_callback(lambda _w: callback())
        return True
    n = _node.current()
    if fut.where == n.myid:
        n.store.lookup(fut.rrid).waiter.add_done_callback(lambda _w: callback())
        return True
    return False


async def await_future(fut: Future) -> Any:
    """Wait for a Future inside an event loop: the loop never blocks, no thread waits.

    The value's arrival wakes the loop through `call_soon_threadsafe`; the value
    is unpickled on the loop's thread.
    """
    if fut._value is not _EMPTY or fut._materialize():
        return fut._return()
    import asyncio  # here, not at import: workers start faster without it

    loop = asyncio.get_running_loop()
    arrived = loop.create_future()

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(_resolve, arrived)
        except RuntimeError:  # the loop was closed while we waited
            pass

    if when_ready(fut, wake):
        await arrived
        handle_worker_logs(fut.where)
        return fut.fetch()
    n = _node.current()
    wid, w = _send_fetch(n, fut)
    w.add_done_callback(lambda _w: wake())
    try:
        await arrived
    finally:
        n.waiters.pop(wid, None)
    if w.error is not None:
        raise w.error
    fut._cache(*decode_result(*w.value))
    return fut._return()


def _resolve(arrived: asyncio.Future[None]) -> None:
    if not arrived.done():
        arrived.set_result(None)


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
    from fastdist.tasks import Task

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
