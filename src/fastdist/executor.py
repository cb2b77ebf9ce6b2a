"""A `concurrent.futures.Executor` that runs its submissions on the cluster's workers.

Submissions wait in a queue; one dispatcher thread takes a free worker from the
pool and starts the oldest submission on it, one call per worker at a time, as
`remotecall` on a pool does. A result is followed through a done-callback on the
remote Future (no thread waits for it), and the worker goes back to the pool the
moment the call ends. The dispatcher exits when it has been idle a while and
comes back with the next submission, so an executor that is dropped without
`shutdown` leaves no thread behind.

At interpreter exit, as with the standard library's executors, the program waits
for every submission made (also after `shutdown(wait=False)`), and a submission
made from then on raises RuntimeError. The wait runs as a `threading` exit hook:
before the atexit handlers that remove the workers the submissions run on.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar

from fastdist import node as _node
from fastdist.protocol.messages import FLAG_SERIAL
from fastdist.refs import when_ready
from fastdist.remotecall import call_future
from fastdist.workerpool import AbstractWorkerPool, CachingPool, default_worker_pool

__all__ = ["Executor"]

_T = TypeVar("_T")
_P = ParamSpec("_P")

# How long the dispatcher waits for a free worker before it looks at its queue
# again (a cancelled or shut-down queue lets it leave without a worker freeing up).
_TAKE_POLL_SECONDS = 0.1
# An idle dispatcher thread exits after this long; the next submit starts another.
_IDLE_EXIT_SECONDS = 5.0

# Remote Futures of calls in progress. Nothing else holds them strongly (a Future,
# its waiter and our callback form a cycle the collector could take, and with it
# the result), whether or not the Executor itself is still referenced.
_in_flight: set[Any] = set()

# Executors with submissions, for the exit hook; and whether the interpreter is exiting.
_live: weakref.WeakSet[Executor] = weakref.WeakSet()
_exiting = False


def _finish_at_exit() -> None:
    """Wait for every executor's submissions, and refuse new ones (stdlib contract)."""
    global _exiting
    _exiting = True
    for ex in list(_live):
        ex._wait_all()


threading._register_atexit(_finish_at_exit)  # type: ignore[attr-defined]


class _WorkItem:
    """One submission: the future handed to the caller, and the call to make."""

    __slots__ = ("future", "fn", "args", "kwargs")

    def __init__(self, future: concurrent.futures.Future[Any], fn: Callable[..., Any],
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs


class Executor(concurrent.futures.Executor):
    """Runs calls on the workers of a pool, as a `concurrent.futures.Executor`.

    `submit` never blocks: while every worker is busy, submissions queue and are
    started, oldest first, as workers free up; a queued submission can still be
    cancelled. Each worker runs one submission at a time. Anything that takes an
    executor works with it: `asyncio`'s `loop.run_in_executor`,
    `concurrent.futures.wait` and `as_completed`, libraries with an `executor=`
    argument.

    Args:
        pool: the workers to run on; default `default_worker_pool()` (looked up
            at each dispatch, so workers added later are used). A `CachingPool`
            sends each function to each worker once.

    Example:
        >>> import concurrent.futures, math
        >>> with fd.Executor() as ex:
        ...     futs = [ex.submit(math.factorial, n) for n in range(5)]
        ...     [f.result() for f in concurrent.futures.as_completed(futs)]
        [1, 1, 2, 6, 24]  # in some order
        >>> list(fd.Executor().map(pow, [2, 3], [5, 2]))
        [32, 9]
    """

    def __init__(self, pool: AbstractWorkerPool | None = None) -> None:
        self._pool = pool
        self._cond = threading.Condition()
        self._pending: deque[_WorkItem] = deque()
        self._running = 0  # dispatched submissions whose future is not yet set
        self._shutdown = False
        self._dispatcher: threading.Thread | None = None

    @property
    def pool(self) -> AbstractWorkerPool | None:
        """The pool given at construction (None: the default worker pool)."""
        return self._pool

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args,
               **kwargs: _P.kwargs) -> concurrent.futures.Future[_T]:
        """Schedule `fn(*args, **kwargs)` on a free worker; return at once.

        Args:
            fn: the function; it travels like a `remotecall` function (importable
                ones by name, lambdas and closures by value).
            *args: its positional arguments.
            **kwargs: its keyword arguments.

        Returns:
            A `concurrent.futures.Future` that gets the call's result, or its
            exception: a `RemoteException` when `fn` raised (the original is its
            `__cause__`), `ProcessExitedException` when the worker died.

        Raises:
            RuntimeError: the executor was shut down, or the interpreter is exiting.

        Example:
            >>> fd.Executor().submit(sum, [1, 2, 3]).result()
            6
        """
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if _exiting:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            _live.add(self)
            self._pending.append(_WorkItem(future, fn, args, kwargs))
            if self._dispatcher is None:
                self._dispatcher = threading.Thread(
                    target=self._dispatch_loop, name="fastdist-executor", daemon=True)
                self._dispatcher.start()
            else:
                self._cond.notify()
        return future

    def map(self, fn: Callable[..., _T], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1) -> Iterator[_T]:
        """`fn` over the zipped iterables, like the built-in `map`, on the workers.

        Everything is submitted at once; results come back in order.

        Args:
            fn: the function, called as `fn(*elements)`.
            *iterables: consumed at once, up to the shortest.
            timeout: seconds, counted from this call, after which fetching a
                result that is not ready raises `TimeoutError`.
            chunksize: how many elements go to a worker in one remote call.

        Returns:
            An iterator over the results; leaving it early cancels what has not
            started.

        Raises:
            TimeoutError: from the iterator, when `timeout` ran out.
            RemoteException: from the iterator, when a call raised.
            ValueError: `chunksize` is less than 1.

        Example:
            >>> list(fd.Executor().map(abs, range(-3, 3), chunksize=2))
            [3, 2, 1, 0, 1, 2]
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        chunks = _chunks(zip(*iterables), chunksize)
        results = super().map(functools.partial(_run_chunk, fn), chunks, timeout=timeout)
        return _flatten(results)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more submissions, and release the dispatcher.

        Args:
            wait: block until every submission started or queued has finished.
            cancel_futures: cancel the submissions that have not started.

        Example:
            >>> ex = fd.Executor()
            >>> ex.shutdown()
        """
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                while self._pending:
                    self._pending.popleft().future.cancel()
            self._cond.notify_all()
        if wait:
            with self._cond:
                while self._dispatcher is not None or self._running:
                    self._cond.wait()

    def _wait_all(self) -> None:
        """Until every submission has finished (an idle dispatcher may linger: it is a
        daemon thread, and holds nothing)."""
        with self._cond:
            while self._pending or self._running:
                self._cond.wait()

    # -- the dispatcher ------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._shutdown:
                    if not self._cond.wait(_IDLE_EXIT_SECONDS):
                        break
                if not self._pending:
                    self._dispatcher = None
                    self._cond.notify_all()
                    return
            pool = self._pool if self._pool is not None else default_worker_pool()
            try:
                w = pool.take(_TAKE_POLL_SECONDS)
            except TimeoutError:
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. a pool left with no workers
                self._fail_pending(exc)
                continue
            item = self._next_item()
            if item is None:
                pool.put(w)
                continue
            self._start(item, pool, w)
            # Nothing of a submission stays here while the loop waits for the next:
            # its result belongs to its future alone (stdlib: no stale references).
            del item

    def _next_item(self) -> _WorkItem | None:
        """The oldest submission not cancelled, now marked running."""
        with self._cond:
            while self._pending:
                item = self._pending.popleft()
                if item.future.set_running_or_notify_cancel():
                    self._running += 1
                    return item
        return None

    def _fail_pending(self, exc: BaseException) -> None:
        while (item := self._next_item()) is not None:
            item.future.set_exception(exc)
            self._done()

    def _start(self, item: _WorkItem, pool: AbstractWorkerPool, w: int) -> None:
        n = _node.current()
        fn: Callable[..., Any] = item.fn
        try:
            if isinstance(pool, CachingPool) and w != n.myid:
                fn = pool._token_for(fn, w)
            fut = call_future(fn, w, item.args, item.kwargs, FLAG_SERIAL)
        except BaseException as exc:  # noqa: BLE001 - the caller sees it on the future
            pool.put(w)
            item.future.set_exception(exc)
            self._done()
            return
        _in_flight.add(fut)
        # What `_finish` needs, in a list it empties: the callback that carries it may
        # be kept a while by whoever ran it, and must not keep the result alive.
        finish = functools.partial(self._finish, [item, fut, pool, w])
        # The callback may run on the I/O thread: hand the result to a call thread.
        if not when_ready(fut, functools.partial(n.callpool.submit, finish)):
            n.callpool.submit(finish)

    def _finish(self, parts: list[Any]) -> None:
        item, fut, pool, w = parts
        parts.clear()
        _in_flight.discard(fut)
        pool.put(w)
        try:
            value = fut.fetch()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's future
            item.future.set_exception(exc)
        else:
            item.future.set_result(value)
        finally:
            item.fn = item.args = item.kwargs = None
            self._done()

    def _done(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()


def _chunks(items: Iterator[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _run_chunk(fn: Callable[..., _T], chunk: list[tuple[Any, ...]]) -> list[_T]:
    """On a worker: one remote call for several elements of `Executor.map`."""
    return [fn(*args) for args in chunk]


def _flatten(results: Iterator[list[_T]]) -> Iterator[_T]:
    for chunk in results:
        chunk.reverse()
        while chunk:
            yield chunk.pop()
