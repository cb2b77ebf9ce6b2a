"""The store of values a process owns (Julia's `PGRP.refs`), and the one-shot Waiter.

A remote reference names a value by (whence, id): the pid that made it and a counter
there (`RRID`). Its owner keeps the value, or the channel, with the holds each client
process has on it (`RemoteValue`, `RefStore`); the reference objects users hold,
Future and RemoteChannel, are refs.py's. The runtime (node.py, handlers.py) needs
only this half.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastdist.channel import WAIT_SLICE_SECONDS, AbstractChannel, check_timeout
from fastdist.exceptions import FutureAlreadySetError

_allocate_lock = threading.Lock
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
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
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

    def nvalues(self) -> int:
        """How many values this process holds for references: Futures' values that
        were set, and RemoteChannels (not the records of holds on a Future still
        waiting for its value)."""
        return sum(1 for rv in list(self.values.values()) if rv.ready or rv.channel is not None)

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
