"""The local thread-safe Channel (Julia's `Channel{Any}(sz)`) and the AbstractChannel interface."""

from __future__ import annotations

import abc
import math
import numbers
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, SupportsIndex

from fastdist.exceptions import ChannelClosedError

__all__ = ["AbstractChannel", "Channel", "check_timeout", "refuse_pickle"]

_NOT_PICKLABLE = "a Channel lives in one process; use RemoteChannel to share it"

# `interrupt` reaches a call on a thread other than a worker's main one as an
# asynchronous exception, which Python raises only between bytecodes: a wait
# without end would never let it through. Waits go in slices of this length.
WAIT_SLICE_SECONDS = 0.25


def check_timeout(timeout: object, what: str = "timeout") -> float | None:
    """`timeout` in float seconds, None for no limit (math.inf too).

    Raises:
        TypeError: it is not a number (a string, say).
        ValueError: it is NaN or negative.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"{what} must be a number of seconds or None, "
                        f"not {type(timeout).__name__} {timeout!r}")
    seconds = float(timeout)
    if math.isnan(seconds):
        raise ValueError(f"{what} must be a number of seconds or None, not nan")
    if seconds < 0:
        raise ValueError(f"{what} must be >= 0 seconds, not {seconds:g}")
    return None if seconds == math.inf else seconds


def wait_for(cond: threading.Condition, predicate: Callable[[], object],
             timeout: float | None) -> bool:
    """`cond.wait_for(predicate, timeout)` (lock held), waking every
    WAIT_SLICE_SECONDS so that an interrupt of this thread is raised in time."""
    timeout = check_timeout(timeout)
    if timeout is not None:
        deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if timeout is None:
            cond.wait(WAIT_SLICE_SECONDS)
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            return bool(predicate())
        cond.wait(min(left, WAIT_SLICE_SECONDS))


def refuse_pickle(obj: object, protocol: int | None = None) -> NoReturn:
    """Refuse to serialise a process-local channel.

    Used as ``__reduce_ex__`` by `Channel`; other process-local channel types can
    reuse it so that sending one to another process fails loudly instead of
    silently duplicating its contents.

    Args:
        obj: the object being pickled.
        protocol: the pickle protocol asked for (ignored).

    Raises:
        TypeError: always.

    Example:
        >>> class MyChannel(AbstractChannel):
        ...     __reduce_ex__ = refuse_pickle  # doctest: +SKIP
    """
    raise TypeError(f"cannot pickle {type(obj).__name__!r}: {_NOT_PICKLABLE}")


class AbstractChannel(abc.ABC):
    """What a `RemoteChannel` needs from the channel it is backed by.

    Subclasses implement `put`, `take`, `fetch`, `isready`, `wait` and `close`
    with `Channel`'s semantics; iteration comes for free. The blocking methods
    take an optional ``timeout`` in seconds and raise `TimeoutError` when it runs
    out; a channel without timeouts may leave the argument out, and is then
    called without it (a `RemoteChannel` passes it only when its caller gave one).

    Example:
        >>> ch = Channel(3)
        >>> isinstance(ch, AbstractChannel)
        True
    """

    @abc.abstractmethod
    def put(self, v: Any, timeout: float | None = None) -> AbstractChannel:
        """Append `v`, blocking while the channel is full; return the channel."""

    @abc.abstractmethod
    def take(self, timeout: float | None = None) -> Any:
        """Remove and return the first value, blocking while there is none."""

    @abc.abstractmethod
    def fetch(self, timeout: float | None = None) -> Any:
        """Return the first value without removing it, blocking while there is none."""

    @abc.abstractmethod
    def isready(self) -> bool:
        """Whether a value can be taken right now."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> None:
        """Block until a value can be taken."""

    @abc.abstractmethod
    def close(self) -> None:
        """Refuse further puts; takers drain what is left, then see `ChannelClosedError`."""

    def __iter__(self) -> Iterator[Any]:
        """Take values until the channel is closed and drained.

        Example:
            >>> ch = Channel(2).put(1).put(2)
            >>> ch.close()
            >>> list(ch)
            [1, 2]
        """
        while True:
            try:
                v = self.take()
            except ChannelClosedError:
                return
            yield v


class _Offer:
    """A value a putter holds out on an unbuffered channel until one taker accepts it."""

    __slots__ = ("cond", "taken", "value")

    def __init__(self, value: Any, lock: threading.Lock) -> None:
        self.value = value
        self.taken = False
        # One condition per offer, so a take wakes exactly the putter it served.
        self.cond = threading.Condition(lock)


class Channel(AbstractChannel):
    """A FIFO channel between threads of one process (Julia's `Channel(sz)`).

    ``size=0`` is an unbuffered rendezvous: `put` returns only once a taker has
    received that very value. ``size=n`` buffers up to ``n`` values and
    ``size=math.inf`` never blocks a putter. Values are handed over as the same
    objects, never copied. Every method is thread-safe; blocking calls accept a
    ``timeout`` in seconds and raise the builtin `TimeoutError` when it runs out,
    leaving the channel as it was.

    Unlike Julia, which raises on `fetch` from an unbuffered channel, `fetch`
    here waits for a putter and returns the value it offers, without completing
    the hand-over; this matches `isready`/`wait`, which in both Julia and here
    look at waiting putters on an unbuffered channel.

    ``len(ch)`` is Julia's ``n_avail``: buffered values, or waiting putters on an
    unbuffered channel. A channel is always truthy, even when empty.

    Args:
        size: 0, a positive int, or ``math.inf``.

    Raises:
        ValueError: `size` is negative, or neither an int nor ``math.inf``.

    Example:
        >>> ch = Channel(2)
        >>> ch.put("a").put("b")
        Channel(size=2, n_avail=2, open)
        >>> ch.take(), ch.fetch(), len(ch)
        ('a', 'b', 1)
    """

    def __init__(self, size: float = 0) -> None:
        if isinstance(size, bool) or not (
            isinstance(size, int) or (isinstance(size, float) and size == math.inf)
        ):
            raise ValueError(f"Channel size must be an int >= 0 or math.inf, not {size!r}")
        if size < 0:
            raise ValueError(f"Channel size must be >= 0, not {size}")
        self._size = size
        self._lock = threading.Lock()
        # Takers and watchers (wait/fetch) sleep apart: a value wakes one taker, since
        # only one can have it, but every watcher, since none of them consumes it.
        self._takers = threading.Condition(self._lock)
        self._watchers = threading.Condition(self._lock)
        self._writable = threading.Condition(self._lock)
        self._buffer: deque[Any] = deque()
        self._offers: deque[_Offer] = deque()
        self._closed = False

    @property
    def size(self) -> float:
        """The capacity: 0 (unbuffered), a positive int, or ``math.inf``."""
        return self._size

    @property
    def closed(self) -> bool:
        """Whether `close` has been called."""
        return self._closed

    def isopen(self) -> bool:
        """Whether the channel still accepts puts (Julia's ``isopen``).

        Returns:
            ``not self.closed``.

        Example:
            >>> ch = Channel(); ch.close(); ch.isopen()
            False
        """
        return not self._closed

    def put(self, v: Any, timeout: float | None = None) -> Channel:
        """Append `v`; on an unbuffered channel, hand it to a taker.

        Blocks while the buffer is full; on an unbuffered channel, until a taker
        has received `v` itself.

        Args:
            v: the value (passed on as the same object).
            timeout: seconds to wait at most; ``None`` waits forever.

        Returns:
            The channel, so puts can be chained.

        Raises:
            ChannelClosedError: the channel is closed, or was closed while waiting.
            TimeoutError: the time ran out; `v` was not enqueued.

        Example:
            >>> Channel(math.inf).put(1).put(2).take()
            1
        """
        with self._lock:
            self._check_open()
            if self._size == 0:
                self._put_unbuffered(v, timeout)
                return self
            if not wait_for(self._writable,
                            lambda: self._closed or len(self._buffer) < self._size, timeout):
                raise TimeoutError(f"put timed out after {timeout} s")
            self._check_open()
            self._buffer.append(v)
            self._announce_value()
        return self

    def _put_unbuffered(self, v: Any, timeout: float | None) -> None:
        offer = _Offer(v, self._lock)
        self._offers.append(offer)
        self._announce_value()
        try:
            wait_for(offer.cond, lambda: offer.taken or self._closed, timeout)
        except BaseException:  # interrupted: the value must not reach a taker later
            if not offer.taken and offer in self._offers:
                self._offers.remove(offer)
            raise
        if offer.taken:
            return
        self._check_open()  # close() has already withdrawn the offer
        self._offers.remove(offer)
        raise TimeoutError(f"put timed out after {timeout} s")

    def take(self, timeout: float | None = None) -> Any:
        """Remove and return the first value, blocking while there is none.

        On a closed channel, the values still buffered are returned first.

        Args:
            timeout: seconds to wait at most; ``None`` waits forever.

        Returns:
            The value, as the same object that was put.

        Raises:
            ChannelClosedError: the channel is closed and drained.
            TimeoutError: the time ran out; nothing was removed.

        Example:
            >>> Channel(1).put("x").take()
            'x'
        """
        with self._lock:
            self._await_value(self._takers, timeout, "take")
            if self._size == 0:
                offer = self._offers.popleft()
                offer.taken = True
                offer.cond.notify()
                return offer.value
            v = self._buffer.popleft()
            self._writable.notify()
            return v

    def fetch(self, timeout: float | None = None) -> Any:
        """Return the first value without removing it, blocking while there is none.

        On an unbuffered channel this is the value of the longest-waiting putter,
        which stays blocked until someone takes it.

        Args:
            timeout: seconds to wait at most; ``None`` waits forever.

        Returns:
            The value the next `take` would return if no other thread takes first.

        Raises:
            ChannelClosedError: the channel is closed and drained.
            TimeoutError: the time ran out.

        Example:
            >>> ch = Channel(1).put(7)
            >>> ch.fetch(), len(ch)
            (7, 1)
        """
        with self._lock:
            self._await_value(self._watchers, timeout, "fetch")
            return self._offers[0].value if self._size == 0 else self._buffer[0]

    def isready(self) -> bool:
        """Whether a value can be taken right now (a putter is waiting, if unbuffered).

        Returns:
            ``True`` if `take` would not block.

        Example:
            >>> Channel(1).isready()
            False
        """
        with self._lock:
            return self._has_value()

    def wait(self, timeout: float | None = None) -> None:
        """Block until a value can be taken, without taking it.

        As in Julia, a value that another thread takes before this one wakes does
        not count: the wait goes on until a value is there when it looks.

        Args:
            timeout: seconds to wait at most; ``None`` waits forever.

        Raises:
            ChannelClosedError: the channel is closed and drained.
            TimeoutError: the time ran out.

        Example:
            >>> Channel(1).put(0).wait()
        """
        with self._lock:
            self._await_value(self._watchers, timeout, "wait")

    def close(self) -> None:
        """Close the channel; closing twice is harmless.

        Blocked putters raise `ChannelClosedError` (their values are not enqueued),
        and so does every later `put`. Takers drain the buffer, then raise it.

        Example:
            >>> ch = Channel(1).put(1); ch.close()
            >>> ch.take()
            1
        """
        with self._lock:
            self._closed = True
            self._takers.notify_all()
            self._watchers.notify_all()
            self._writable.notify_all()
            # Withdraw pending offers at once, so a taker arriving before their putters
            # wake cannot complete a put that is about to fail.
            for offer in self._offers:
                offer.cond.notify()
            self._offers.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._offers) if self._size == 0 else len(self._buffer)

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"Channel(size={self._size}, n_avail={len(self)}, {state})"

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        refuse_pickle(self)

    def _has_value(self) -> bool:
        return bool(self._offers) if self._size == 0 else bool(self._buffer)

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosedError("put on a closed Channel")

    def _announce_value(self) -> None:
        self._takers.notify()
        self._watchers.notify_all()

    def _await_value(self, cond: threading.Condition, timeout: float | None, what: str) -> None:
        """With the lock held: wait for a value, or raise if closed and drained."""
        if not wait_for(cond, lambda: self._closed or self._has_value(), timeout):
            raise TimeoutError(f"{what} timed out after {timeout} s")
        if not self._has_value():
            raise ChannelClosedError(f"{what} on a closed and empty Channel")
