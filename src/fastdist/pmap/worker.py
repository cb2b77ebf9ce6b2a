"""What runs on the worker: one element or a batch of them, timed, a failure kept in
its place (pmap's calls name these functions; engine.py sends them).

A batch may carry a budget: it then ends early once the time so far says the next
element would not fit, and returns the results of a prefix (`run_elements`).
A batch of plain numbers travels packed (_fastpath/_packed.pyx), and so do its
results when they are plain numbers: `_run_remote_batch` unpacks and packs,
`store_results` unpacks them on the caller.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fastdist._fastpath._packed import pack, unpack, unpack_into
from fastdist.exceptions import CapturedException, RemoteException
from fastdist.node import Node
from fastdist.protocol import serialize
from fastdist.protocol.values import decode_error, encode_error
from fastdist.workerpool import CachedFunction, cached_entry


class ElementFailure:
    """An element of a batch that raised: the failure as it travels (encoded once,
    on the worker) or as raised here, for a batch run on this process."""

    __slots__ = ("body", "exc")

    def __init__(self, body: bytes | None, exc: BaseException | None = None) -> None:
        self.body = body
        self.exc = exc

    def __reduce__(self) -> Any:
        body = self.body
        if body is None:
            body = encode_error(self.exc)[1]  # type: ignore[arg-type]
        return (ElementFailure, (body,))

    def exception(self) -> BaseException:
        if self.exc is None:
            self.exc = decode_error(self.body)
        return self.exc


def _run_one(token: Any, item: Any, star: bool) -> tuple[float, Any]:
    """On a worker: one element (a tuple of arguments when `star`). Returns how long
    it took too (it sets how many calls to keep in flight)."""
    return _timed(cached_entry(token).func, item, star)


def _run_one_keyed(owner: int, key: int, item: Any, star: bool) -> tuple[float, Any]:
    """`_run_one` for a function already on this worker, named by its cache key (a
    call of plain data: see calls.MapCalls.send)."""
    return _run_one(CachedFunction(owner, key, None), item, star)


def _run_one_named(fname: bytes, item: Any, star: bool) -> tuple[float, Any]:
    """`_run_one` for a function that travels by name, `fname` its pickle (see
    `MapCalls.fname`)."""
    return _timed(serialize.loads_function(fname), item, star)


def _timed(f: Callable[..., Any], item: Any, star: bool) -> tuple[float, Any]:
    start = time.perf_counter()
    value = f(*item) if star else f(item)
    return time.perf_counter() - start, value


Batch = Sequence[Any] | bytes
"""A batch as it travels: its elements, or the packed list of them (`pack`)."""


def _run_batch(token: Any, batch: Batch, star: bool, budget: float | None = None
               ) -> tuple[float, list[Any] | bytes, list[int]]:
    """On a worker: a batch, element by element; a failure is kept in its place.

    Returns how long it took (it sizes `batch_size="auto"` batches), the results
    (packed when they are plain numbers), and where the failures are, so that the
    caller need not look at every result. With a `budget` (seconds), the batch may
    end early: see `run_elements`."""
    return _run_remote_batch(cached_entry(token).func, batch, star, budget)


def _run_batch_keyed(owner: int, key: int, batch: Batch, star: bool,
                     budget: float | None = None) -> tuple[float, list[Any] | bytes, list[int]]:
    """`_run_batch` for a function already on this worker, named by its cache key."""
    return _run_batch(CachedFunction(owner, key, None), batch, star, budget)


def _run_batch_named(fname: bytes, batch: Batch, star: bool,
                     budget: float | None = None) -> tuple[float, list[Any] | bytes, list[int]]:
    """`_run_batch` for a function that travels by name, `fname` its pickle."""
    return _run_remote_batch(serialize.loads_function(fname), batch, star, budget)


def _run_remote_batch(f: Callable[..., Any], batch: Batch, star: bool,
                      budget: float | None) -> tuple[float, list[Any] | bytes, list[int]]:
    """`run_elements` on a worker, for a batch that may come packed; results that
    are all plain numbers go back packed (`store_results` reads them)."""
    if type(batch) is bytes:
        batch = unpack(batch)
    took, out, failed = run_elements(f, batch, star, None, budget)
    packed = None if failed else pack(out)
    return took, (out if packed is None else packed), failed


def store_results(results: list[Any], start: int, out: list[Any] | bytes) -> int:
    """On the caller: put the results of a batch, as `_run_remote_batch` sent them,
    at results[start:]; returns how many there were."""
    if isinstance(out, bytes):
        return unpack_into(results, start, out)
    results[start:start + len(out)] = out
    return len(out)


def run_elements(f: Callable[..., Any], batch: Sequence[Any], star: bool,
                  here: Any, budget: float | None = None
                  ) -> tuple[float, list[Any], list[int]]:
    """Run `batch` (on a worker: `here` None; else in this process's call pool).

    With a `budget` (seconds), a batch whose elements turn out slow ends when the
    time so far says the next element would not fit (after one element at least),
    and returns the results of a prefix: the caller sends the rest again. Elements
    run in steps sized to what fits, each at most seven times the elements before
    it, so a cheap batch pays a few clock reads and a batch whose elements slow
    down overshoots by a bounded amount."""
    out: list[Any] = []
    failed: list[int] = []
    start = time.perf_counter()
    if here is None:
        items = iter(batch)
        if budget is None:
            _map_into(f, items, star, out, failed)
            return time.perf_counter() - start, out, failed
        n, step = len(batch), 1
        while True:
            # (The last step takes the iterator itself: islice costs per element.)
            _map_into(f, items if step >= n - len(out) else itertools.islice(items, step),
                      star, out, failed)
            took = time.perf_counter() - start
            done = len(out)
            fits = int((budget - took) * done / took) if took > 0 else done
            if done >= n or fits < 1:
                return took, out, failed
            step = min(7 * done, fits)
    for i, item in enumerate(batch):
        try:
            out.append(here.callpool.run_user(f, *item) if star
                       else here.callpool.run_user(f, item))
        except Exception as exc:  # noqa: BLE001 - the caller decides per element
            failed.append(i)
            out.append(ElementFailure(None, captured(here, exc)))
    return time.perf_counter() - start, out, failed


def _map_into(f: Callable[..., Any], items: Iterator[Any], star: bool, out: list[Any],
              failed: list[int]) -> None:
    """Append `f` of each of `items` to `out`: map() in C, resumed past each failure
    (list.extend keeps what it appended before f raised, and the iterator has moved
    past the failing element), which is kept in its place and listed in `failed`."""
    while True:
        try:
            out.extend(itertools.starmap(f, items) if star else map(f, items))
            return
        except Exception as exc:  # noqa: BLE001 - the caller decides per element
            failed.append(len(out))
            out.append(ElementFailure(encode_error(exc)[1]))


def captured(n: Node, exc: BaseException) -> RemoteException:
    err = RemoteException(n.myid, CapturedException.capture(exc))
    err.__cause__ = exc
    return err
