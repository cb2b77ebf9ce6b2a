"""`asyncmap`: map a function over collections with concurrent local threads (Julia's asyncmap)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

from fastdist.channel import Channel
from fastdist.exceptions import ChannelClosedError
from fastdist.tasks import Task

__all__ = ["DEFAULT_NTASKS", "asyncmap"]

DEFAULT_NTASKS = 100
"""Threads used when ``ntasks=0``, as Julia uses 100 tasks."""

# A unit of work: (first index, argument tuples). Unbatched work has one tuple.
_Work = tuple[int, list[tuple[Any, ...]]]


def asyncmap(
    f: Callable[..., Any],
    *iterables: Iterable[Any],
    ntasks: int | Callable[[], int] = 0,
    batch_size: int | None = None,
) -> list[Any]:
    """Apply `f` to the zipped elements of `iterables` on up to `ntasks` threads.

    Elements are read lazily in the calling thread, so generators work and are
    never touched by two threads; iteration stops at the shortest iterable. A new
    thread is started for each element until `ntasks` threads run, so a short
    input never gets more threads than elements.

    Args:
        f: called as ``f(*args)`` for each tuple of zipped elements, or, with
            `batch_size`, as ``f(batch)`` where ``batch`` is a list of up to
            `batch_size` argument tuples (Julia's batch mode) and must return a
            sequence with one result per tuple.
        *iterables: one or more iterables (at least one).
        ntasks: how many threads at most; 0 means `DEFAULT_NTASKS` (100). It can be
            a callable returning that number, which is asked again before each
            element (Julia's ``ntasks_func``), so the pool can grow while running.
        batch_size: if given, process elements in batches of that size.

    Returns:
        The results, in input order.

    Raises:
        ValueError: no iterables, ``ntasks < 0``, ``batch_size < 1``, or a batch
            result of the wrong length.
        Exception: the first exception `f` (or an iterable) raised. No new call of
            `f` starts after it; calls already running are waited for.

    Example:
        >>> asyncmap(pow, [2, 3, 4], [2, 2, 2])
        [4, 9, 16]
        >>> asyncmap(lambda batch: [a + b for a, b in batch], "ab", "xy", batch_size=2)
        ['ax', 'by']
    """
    if not iterables:
        raise ValueError("asyncmap needs at least one iterable")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    ntasks_now = _ntasks_func(ntasks)

    results: list[Any] = []
    results_lock = threading.Lock()
    first_error: list[BaseException] = []
    # Unbuffered, so the feeder reads at most one element ahead of the threads, and
    # a failure (which closes the channel) stops it from reading any further.
    work: Channel = Channel(0)

    def run(item: _Work) -> None:
        start, arg_tuples = item
        if batch_size is None:
            out: Sequence[Any] = [f(*arg_tuples[0])]
        else:
            out = f(arg_tuples)
            if len(out) != len(arg_tuples):
                raise ValueError(
                    f"batch function returned {len(out)} results for {len(arg_tuples)} inputs"
                )
        with results_lock:
            results[start : start + len(out)] = out

    def worker() -> None:
        for item in work:
            try:
                run(item)
            except BaseException as e:  # noqa: BLE001 - re-raised by the caller
                with results_lock:
                    first_error.append(e)
                work.close()
                return

    threads: list[Task] = []
    try:
        for item in _chunks(zip(*iterables), batch_size or 1):
            with results_lock:
                results.extend([None] * len(item[1]))
            if len(threads) < ntasks_now():
                threads.append(Task(worker).start())
            try:
                work.put(item)
            except ChannelClosedError:
                break
    finally:
        work.close()
        for t in threads:
            t.wait()
    if first_error:
        raise first_error[0]
    return results


def _ntasks_func(ntasks: int | Callable[[], int]) -> Callable[[], int]:
    if callable(ntasks):
        return lambda: max(1, ntasks())
    if ntasks < 0:
        raise ValueError(f"ntasks must be >= 0, not {ntasks}")
    n = ntasks or DEFAULT_NTASKS
    return lambda: n


def _chunks(args: Iterator[tuple[Any, ...]], size: int) -> Iterator[_Work]:
    start = 0
    while batch := list(islice(args, size)):
        yield start, batch
        start += len(batch)
