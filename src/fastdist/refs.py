"""Remote references: Future and RemoteChannel (the owner's store of their values is
refstore.py's).

Port of Distributed.jl `remotecall.jl` (the reference half). A reference names a
value by (whence, id) and lives on its owner `where`. Distributed reference
counting as Julia does it: the owner keeps, per client process, how many holds
that process has; the creator holds one from the start, serialising a reference
to another process adds one for the receiver (sent to the owner *before* the
reference travels), and a reference garbage-collected — or a Future whose value
is cached locally — gives its holds back. Counts are per client so that a give-back
that overtakes an add from a third process cannot free a value still in use; the
value is freed when every client's count is zero.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

from fastdist import node as _node
from fastdist._fastpath import _calls
from fastdist.channel import AbstractChannel, Channel, check_timeout
from fastdist.exceptions import (
    ChannelClosedError,
    FutureAlreadySetError,
    ProcessExitedException,
    RemoteException,
)
from fastdist.handlers import send_value
from fastdist.node import Node
from fastdist.output import _log_queues, handle_worker_logs
from fastdist.protocol import serialize
from fastdist.protocol.messages import Kind
from fastdist.protocol.values import decode_result
from fastdist.refstore import RRID, Waiter
from fastdist.requests import call_and_wait, call_fetch, ref_header, send_fetch, wait_reading

# One lock for the few assignments every Future guards (deliver, cache, share): the
# sections are a handful of bytecodes, and a lock per Future would be one more
# allocation and one more object for the garbage collector per remotecall.
_futures_lock = threading.Lock()


_EMPTY = object()
_PUSHED: Any = object()  # Future._push of a remotecall Future nobody has waited on yet
# (Pushes are mostly delivered, and fetched values unpickled, in C.)
_calls.configure_refs(_PUSHED, _EMPTY, decode_result, handle_worker_logs, _log_queues)


class _RefBase(_calls.RefCore):
    """What Future and RemoteChannel share: identity, owner, and holds on the owner
    (their fields are C fields, `_calls.RefCore`)."""

    __slots__ = ()

    where: int
    whence: int
    id: int
    _holds: int

    def _init_ref(self, where: int, whence: int, ref_id: int, holds: int) -> None:
        self.where = where
        self.whence = whence
        self.id = ref_id
        self._holds = holds

    @property
    def rrid(self) -> RRID:
        return RRID(self.whence, self.id)

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self) and self.whence == other.whence
                and self.id == other.id)

    def __hash__(self) -> int:
        return hash((self.whence, self.id))

    def _release_holds(self) -> None:
        holds, self._holds = self._holds, 0
        if holds > 0:
            n = _node.peek()
            if n is not None:
                n.queue_ref_change(self.where, self.whence, self.id, n.myid, -holds)

    __del__ = _calls.release_on_del

    def _note_sent(self) -> None:
        """Register the destination of the stream being pickled as a client."""
        dest = serialize.current_destination()
        if dest is not None:
            _node.current().queue_ref_change(self.where, self.whence, self.id, dest, +1,
                                             urgent=True)


def _adopt(cls: Any, where: int, whence: int, ref_id: int, counted: bool) -> Any:
    """The live local object for a reference arriving here, one hold added if `counted`."""
    n = _node.current()
    rrid = RRID(whence, ref_id)
    obj: Any = n.live_refs.get(rrid)
    if obj is None or type(obj) is not cls:
        obj = cls.__new__(cls)
        obj._init_ref(where, whence, ref_id, 0)
        if cls is Future:
            obj._init_future()
        n.live_refs[rrid] = obj
    if counted:
        obj._holds += 1
    return obj


class Future(_calls.FutureCore, _RefBase):
    """A single value that will exist on process `where` (Julia's `Future`).

    `Future(pid)` makes an empty future owned by `pid` (default: this process);
    `remotecall` returns one that its call fills. `fetch` waits for the value and
    caches it (a second fetch sends nothing); `put` sets it, once.

    Example:
        >>> f = fd.Future()
        >>> fd.put(f, 42).fetch()
        42
    """

    # Its fields are C fields (`_calls.FutureCore`): the C code that makes, delivers
    # and fetches remotecall Futures reaches them without attribute look-ups.
    __slots__ = ()

    _lock = _futures_lock

    def __init__(self, pid: int | None = None) -> None:
        n = _node.current()
        where = n.myid if pid is None else int(pid)
        self._init_ref(where, n.myid, n.next_id(), 1)
        self._init_future()
        n.live_refs[self.rrid] = self
        if where == n.myid:
            n.store.lookup(self.rrid)

    def _init_future(self) -> None:
        self._value: Any = _EMPTY
        self._is_error = False
        self._raw: Any = None
        self._push: Any = None  # remotecall Futures: _PUSHED, or the Waiter of the push
        self._shared = False  # passed to another process while its pushed value was due

    @classmethod
    def _for_call(cls, n: Node, where: int) -> Future:
        """The Future of a remotecall: its result will be pushed to this process.

        Until it is, the node holds it (`Node.pushes`, by id): the push finds it
        there, and should it be released (see `_deliver`) the value can still be
        given back to its owner when others were handed the reference. It joins
        `live_refs` only if it travels (`__reduce__`): a weak mapping entry per
        call would cost more than the rest of the Future. (Made in C, as for
        remotecall's C path: _calls.call_future.)
        """
        return _calls.call_future(cls, n, where)  # type: ignore[no-any-return]

    def _push_waiter(self) -> Waiter:
        """The Waiter that the push of this remotecall Future's value sets; made on
        first need, already set if the value is here (most arrive before anyone
        waits, and a Waiter per call costs a lock and a tracked object)."""
        w = self._push
        if w is _PUSHED:
            with self._lock:
                w = self._push
                if w is _PUSHED:
                    w = self._push = Waiter(peer=self.where)
                    if self._raw is not None:
                        w.set(True)
        assert isinstance(w, Waiter)
        return w

    def _deliver(self, raw: Any, released: int = 0) -> None:
        """A pushed result arrived (I/O thread): keep the bytes, give back our hold.

        `released`: the owner kept no copy, so our creator's hold is used up; if we
        passed the reference on meanwhile, the value goes back to the owner for
        the processes we gave it to (their holds reach it first: same queue).
        """
        with self._lock:
            self._raw = raw
            shared = self._shared
            waiter = self._push
        if released:
            if self._holds > 0:
                self._holds -= 1
            if shared:
                n = _node.peek()
                if n is not None:
                    n.queue_restore(self.where, self.whence, self.id, raw)
        if self._holds > 0:
            self._release_holds()
        if waiter is not _PUSHED:
            waiter.set(True)

    def _cache(self, value: Any, is_error: bool) -> Any:
        with self._lock:
            if self._value is _EMPTY:
                self._value, self._is_error, self._raw = value, is_error, None
                _calls.track_with(self, value)  # a remotecall Future starts untracked
        if self._holds > 0:
            self._release_holds()
        return self._value

    # Unpickle a delivered raw value into the cache (on the caller's thread); False if
    # none was delivered (in C: _fastpath/_calls.pyx).
    _materialize = _calls.materialize

    def _return(self) -> Any:
        if self._is_error:
            raise self._value
        return self._value

    def fetch(self, timeout: float | None = None) -> Any:
        """Wait for the value and return it (cached after the first fetch).

        Raises:
            RemoteException: the call that was to produce the value raised.
            ProcessExitedException: the owner died before the value could be fetched.
            TimeoutError: `timeout` seconds passed (the call itself goes on).
        """
        value = self._value
        if value is _EMPTY:
            if not self._materialize():
                return fetch_future(self, timeout)
            value = self._value
        if self._is_error:
            raise value
        return value

    def isready(self) -> bool:
        """True when a fetch would not wait."""
        if self._value is not _EMPTY or self._raw is not None:
            return True
        if self._push is not None:
            return self._push is not _PUSHED and self._push_waiter().done()
        return future_isready(self)

    def wait(self, timeout: float | None = None) -> Future:
        """Wait until the value exists; raises like `fetch` if it is an error."""
        self.fetch(timeout)
        return self

    def put(self, value: Any) -> Future:
        """Set the value (once). Raises FutureAlreadySetError on a second put."""
        put_future(self, value)
        return self

    def done(self) -> bool:
        return self.isready()

    def __await__(self) -> Any:
        return await_future(self).__await__()

    def __reduce__(self) -> Any:
        if self._value is _EMPTY and not self._materialize():
            with self._lock:
                pending = self._raw is None
                if pending:
                    # The receiver's hold is queued before the value can arrive and
                    # be seen as released (see `_deliver`).
                    self._shared = True
                    self._note_sent()
            if pending:
                n = _node.current()
                if n.live_refs.get(self.rrid) is None:
                    n.live_refs[self.rrid] = self  # so that it comes back as itself
                return (_rebuild_future, (self.where, self.whence, self.id, False, False, None))
            self._materialize()  # it arrived meanwhile
        # A cached value travels with the reference; no hold is needed for it.
        return (_rebuild_future, (self.where, self.whence, self.id, True,
                                  self._is_error, self._value))

    def __repr__(self) -> str:
        state = "ready" if self._value is not _EMPTY else "pending"
        return f"Future(where={self.where}, whence={self.whence}, id={self.id}, {state})"


def _rebuild_future(where: int, whence: int, ref_id: int, has_value: bool,
                    is_error: bool, value: Any) -> Future:
    fut: Future = _adopt(Future, where, whence, ref_id, counted=not has_value)
    if has_value:
        fut._cache(value, is_error)
    elif fut._value is not _EMPTY:
        fut._release_holds()
    return fut


class RemoteChannel(_RefBase, AbstractChannel):
    """A channel living on process `where`, usable from any process (Julia's RemoteChannel).

    `RemoteChannel(pid)` is backed by `Channel(1)` on `pid`;
    `RemoteChannel(factory, pid)` by whatever `factory()` returns there.

    Example:
        >>> rc = fd.RemoteChannel(lambda: fd.Channel(10), 2)
        >>> fd.put(rc, "hello"); fd.take(rc)
        'hello'
    """

    __slots__ = ()

    def __init__(self, factory: Any = None, pid: int | None = None) -> None:
        if factory is not None and not callable(factory):
            factory, pid = None, factory
        n = _node.current()
        where = n.myid if pid is None else int(pid)
        self._init_ref(where, n.myid, n.next_id(), 1)
        n.live_refs[self.rrid] = self
        if where == n.myid:
            _create_channel(self.rrid, factory)
        else:
            call_fetch(_create_channel, where, (self.rrid, factory), {})

    def _op(self, op: str, *args: Any) -> Any:
        n = _node.current()
        if self.where == n.myid:
            result = _channel_op(self.rrid, op, *args)
        else:
            result = call_fetch(_channel_op, self.where, (self.rrid, op, *args), {})
        if type(result) is _ChannelSignal:
            raise result.error()
        return result

    def put(self, v: Any, timeout: float | None = None) -> RemoteChannel:
        """Put `v`, blocking while the channel is full; returns the channel."""
        self._op("put", v, check_timeout(timeout))
        return self

    def take(self, timeout: float | None = None) -> Any:
        """Remove and return a value, blocking while the channel is empty."""
        return self._op("take", check_timeout(timeout))

    def fetch(self, timeout: float | None = None) -> Any:
        """Return the first value without removing it."""
        return self._op("fetch", check_timeout(timeout))

    def isready(self) -> bool:
        return bool(self._op("isready"))

    def wait(self, timeout: float | None = None) -> None:
        self._op("wait", check_timeout(timeout))

    def close(self) -> None:
        self._op("close")

    def __reduce__(self) -> Any:
        self._note_sent()
        return (_rebuild_channel, (self.where, self.whence, self.id))

    def __repr__(self) -> str:
        return f"RemoteChannel(where={self.where}, whence={self.whence}, id={self.id})"


def _rebuild_channel(where: int, whence: int, ref_id: int) -> RemoteChannel:
    return _adopt(RemoteChannel, where, whence, ref_id, counted=True)  # type: ignore[no-any-return]


class _ChannelSignal:
    """An exception a channel raised on its owner, re-raised unwrapped on the caller."""

    __slots__ = ("kind", "message")

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        self.message = message

    def __reduce__(self) -> Any:
        return (_ChannelSignal, (self.kind, self.message))

    def error(self) -> BaseException:
        if self.kind == "closed":
            return ChannelClosedError(self.message)
        return TimeoutError(self.message)


def _create_channel(rrid: RRID, factory: Any) -> None:
    """On the owner: make the channel of reference `rrid` (creator holds one)."""
    n = _node.current()
    rv = n.store.lookup(rrid)
    if rv.channel is None:
        channel = factory() if factory is not None else Channel(1)
        if not isinstance(channel, AbstractChannel):
            raise TypeError(f"RemoteChannel factory returned {type(channel).__name__}, "
                            "not an AbstractChannel")
        rv.channel = channel


def channel_from_id(rrid: RRID) -> AbstractChannel:
    """The channel behind RemoteChannel `rrid`; only valid on its owner.

    Raises:
        KeyError: no channel with that id lives on this process.
    """
    rv = _node.current().store.get(rrid)
    if rv is None or rv.channel is None:
        raise KeyError(f"no RemoteChannel {rrid} lives on process {_node.current().myid} "
                       "(channel_from_id works only on the channel's owner)")
    return rv.channel


def _channel_op(rrid: RRID, op: str, *args: Any) -> Any:
    channel = channel_from_id(rrid)
    try:
        if op == "put":
            v, timeout = args
            channel.put(v, timeout) if timeout is not None else channel.put(v)
            return None
        if op in ("take", "fetch", "wait"):
            (timeout,) = args
            method = getattr(channel, op)
            return method(timeout) if timeout is not None else method()
        if op == "isready":
            return channel.isready()
        if op == "close":
            channel.close()
            return None
    except ChannelClosedError as exc:
        return _ChannelSignal("closed", str(exc))
    except TimeoutError as exc:
        return _ChannelSignal("timeout", str(exc) or f"RemoteChannel {op} timed out")
    raise ValueError(f"unknown channel operation {op!r}")


def remoteref_id(r: _RefBase) -> RRID:
    """The RRID of a Future or RemoteChannel."""
    return r.rrid


# -- a Future's value: fetched, waited for, put ----------------------------------------


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


def _fetch_remote(n: Node, fut: Future, timeout: float | None) -> tuple[Any, bool]:
    wid, w = send_fetch(n, fut)
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
    return bool(call_fetch(_isready_ref, fut.where, (fut.whence, fut.id), {}))


def _isready_ref(whence: int, ref_id: int) -> bool:
    rv = _node.current().store.get(RRID(whence, ref_id))
    return rv is not None and rv.ready


def put_future(fut: Future, value: Any) -> None:
    n = _node.current()
    if fut._value is not _EMPTY or fut._raw is not None:
        raise FutureAlreadySetError("Future can be set only once")
    if fut._push is not None:
        # Its call will set it: a put now would drop the call's own result (or
        # make the call's answer fail), whichever came second.
        raise FutureAlreadySetError(
            "a Future returned by remotecall is set by its call; put values into a "
            "Future() or a RemoteChannel instead")
    if fut.where == n.myid:
        rv = n.store.lookup(fut.rrid)
        for p, wid in n.store.set_value(rv, obj=value):
            send_value(n, p, wid, rv)
    else:
        body, buffers = serialize.dumps(value, dest=fut.where, what="value put into the Future")
        try:
            call_and_wait(n, fut.where, Kind.PUT_FUTURE, 0, ref_header(fut) + body, buffers)
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
    wid, w = send_fetch(n, fut)
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


@_node.on_peer_lost
def fail_pushed_futures(n: Node, pid: int, p: Any = None, exc: BaseException | None = None
                        ) -> None:
    """A worker died: Futures waiting for its pushed results get ProcessExitedException."""
    for ref_id, fut in list(n.pushes.items()):
        if fut.where == pid and n.pushes.pop(ref_id, None) is not None:
            fut._holds = 0  # nothing left to give back to
            if fut._push is not None:
                fut._push_waiter().fail(ProcessExitedException(pid))


__all__ = ["RRID", "Future", "RemoteChannel", "channel_from_id", "remoteref_id"]
