"""Remote references: Future, RemoteChannel, RRID, and the owner's store of their values.

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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastdist import node as _node
from fastdist._core import _calls
from fastdist.channel import WAIT_SLICE_SECONDS, AbstractChannel, Channel
from fastdist.exceptions import (
    ChannelClosedError,
    FutureAlreadySetError,
    ProcessExitedException,
)
from fastdist.output import _log_queues, handle_worker_logs
from fastdist.protocol.values import decode_result

_allocate_lock = threading.Lock
# One lock for the few assignments every Future guards (deliver, cache, share): the
# sections are a handful of bytecodes, and a lock per Future would be one more
# allocation and one more object for the garbage collector per remotecall.
_futures_lock = threading.Lock()
# Guards Waiter callback lists only; the set/wait fast path never takes it.
_callbacks_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class RRID:
    """A remote reference's identity: the pid that made it and a counter on that pid."""

    whence: int
    id: int


class Waiter:
    """A one-shot event carrying a value or an error; many threads may wait on it."""

    __slots__ = ("_lock", "_set", "value", "error", "peer", "_callbacks", "__weakref__")

    def __init__(self, peer: int = 0) -> None:
        self._lock = _allocate_lock()
        self._lock.acquire()
        self._set = False
        self.value: Any = None
        self.error: BaseException | None = None
        self.peer = peer  # the process whose death fails this waiter
        self._callbacks: list[Callable[[Waiter], object]] | None = None

    def set(self, value: Any) -> None:
        if not self._set:
            self._set = True
            self.value = value
            self._lock.release()
            if self._callbacks is not None:
                self._run_callbacks()

    def fail(self, error: BaseException) -> None:
        if not self._set:
            self._set = True
            self.error = error
            self._lock.release()
            if self._callbacks is not None:
                self._run_callbacks()

    def add_done_callback(self, fn: Callable[[Waiter], object]) -> None:
        """Call `fn(self)` once set or failed: at once if it is already, else on the
        setting thread (often the I/O thread: `fn` must be quick and never block).

        Lets `await` and the Executor follow a result without a thread per wait.
        """
        with _callbacks_lock:
            pending = not self._set
            if pending:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
        if not pending:
            fn(self)
        elif self._set:
            self._run_callbacks()  # set() ran between our check and our append

    def _run_callbacks(self) -> None:
        with _callbacks_lock:
            callbacks, self._callbacks = self._callbacks, None
        for fn in callbacks or ():
            try:
                fn(self)
            except Exception:  # noqa: BLE001 - a callback must not break the setter
                pass

    def done(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Block until set; False if `timeout` (seconds) ran out first."""
        if self._set:
            return True
        # Each woken waiter releases the lock again, waking the next: a broadcast.
        # Waits go in slices, so that an interrupt of this thread is raised in time
        # (see channel.WAIT_SLICE_SECONDS).
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while True:
            left = WAIT_SLICE_SECONDS if deadline is None else min(
                WAIT_SLICE_SECONDS, deadline - time.monotonic())
            if self._lock.acquire(timeout=max(left, 0.0)):
                self._lock.release()
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return self._set


class RemoteValue:
    """The owner's record of one reference: client counts and the value or channel."""

    __slots__ = ("counts", "ready", "obj", "raw", "is_error", "waiter", "fetchers", "channel")

    def __init__(self, whence: int) -> None:
        self.counts: dict[int, int] = {whence: 1}
        self.ready = False
        self.obj: Any = None  # the value, when it was made or unpickled here
        self.raw: Any = None  # (flags, body, buffers) when it arrived from elsewhere
        self.is_error = False
        self.waiter = Waiter()
        self.fetchers: list[tuple[int, int]] = []  # (pid, waiter id) waiting remotely
        self.channel: AbstractChannel | None = None


class RefStore:
    """The values this process owns, by RRID (Julia's `PGRP.refs`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: dict[RRID, RemoteValue] = {}

    def __len__(self) -> int:
        return len(self.values)

    def lookup(self, rrid: RRID) -> RemoteValue:
        """The record for `rrid`, created (with its creator holding one) if missing."""
        with self.lock:
            rv = self.values.get(rrid)
            if rv is None:
                rv = self.values[rrid] = RemoteValue(rrid.whence)
            return rv

    def get(self, rrid: RRID) -> RemoteValue | None:
        return self.values.get(rrid)

    def change(self, rrid: RRID, client: int, delta: int) -> None:
        with self.lock:
            rv = self.values.get(rrid)
            if rv is None:
                rv = self.values[rrid] = RemoteValue(rrid.whence)
            n = rv.counts.get(client, 0) + delta
            if n:
                rv.counts[client] = n
            else:
                rv.counts.pop(client, None)
                if not rv.counts:
                    del self.values[rrid]

    def drop_client(self, pid: int) -> None:
        """A process died: its holds are gone."""
        with self.lock:
            for rrid in [r for r, rv in self.values.items() if pid in rv.counts]:
                rv = self.values[rrid]
                del rv.counts[pid]
                if not rv.counts:
                    del self.values[rrid]

    def set_value(self, rv: RemoteValue, obj: Any = None, raw: Any = None,
                  is_error: bool = False) -> list[tuple[int, int]]:
        """Store a Future's value; return the remote fetchers to answer.

        Raises:
            FutureAlreadySetError: the Future already holds a value.
        """
        with self.lock:
            if rv.ready:
                raise FutureAlreadySetError("Future can be set only once")
            rv.obj, rv.raw, rv.is_error, rv.ready = obj, raw, is_error, True
            fetchers, rv.fetchers = rv.fetchers, []
        rv.waiter.set(True)
        return fetchers


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
        from fastdist.protocol.serialize import current_destination

        dest = current_destination()
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
    def _for_call(cls, n: Any, where: int) -> Future:
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
    # none was delivered (in C: _core/_calls.pyx).
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
                from fastdist.remotecall import fetch_future

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
        from fastdist.remotecall import future_isready

        return future_isready(self)

    def wait(self, timeout: float | None = None) -> Future:
        """Wait until the value exists; raises like `fetch` if it is an error."""
        self.fetch(timeout)
        return self

    def put(self, value: Any) -> Future:
        """Set the value (once). Raises FutureAlreadySetError on a second put."""
        from fastdist.remotecall import put_future

        put_future(self, value)
        return self

    def done(self) -> bool:
        return self.isready()

    def __await__(self) -> Any:
        from fastdist.remotecall import await_future

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
            from fastdist.remotecall import remotecall_fetch

            remotecall_fetch(_create_channel, where, self.rrid, factory)

    def _op(self, op: str, *args: Any) -> Any:
        n = _node.current()
        if self.where == n.myid:
            result = _channel_op(self.rrid, op, *args)
        else:
            from fastdist.remotecall import remotecall_fetch

            result = remotecall_fetch(_channel_op, self.where, self.rrid, op, *args)
        if type(result) is _ChannelSignal:
            raise result.error()
        return result

    def put(self, v: Any, timeout: float | None = None) -> RemoteChannel:
        """Put `v`, blocking while the channel is full; returns the channel."""
        self._op("put", v, timeout)
        return self

    def take(self, timeout: float | None = None) -> Any:
        """Remove and return a value, blocking while the channel is empty."""
        return self._op("take", timeout)

    def fetch(self, timeout: float | None = None) -> Any:
        """Return the first value without removing it."""
        return self._op("fetch", timeout)

    def isready(self) -> bool:
        return bool(self._op("isready"))

    def wait(self, timeout: float | None = None) -> None:
        self._op("wait", timeout)

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


def fail_pushed_futures(n: Any, pid: int) -> None:
    """A worker died: Futures waiting for its pushed results get ProcessExitedException."""
    for ref_id, fut in list(n.pushes.items()):
        if fut.where == pid and n.pushes.pop(ref_id, None) is not None:
            fut._holds = 0  # nothing left to give back to
            if fut._push is not None:
                fut._push_waiter().fail(ProcessExitedException(pid))


__all__ = ["RRID", "Future", "RemoteChannel", "channel_from_id", "remoteref_id"]
