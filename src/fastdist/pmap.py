"""`pmap`: apply a function to collections on worker processes, results in input order,
with batching, per-element error handling and retries.

Port of Distributed.jl `pmap.jl`. Three things differ in how, not in what:

* Pipelining. Julia runs one `remotecall_fetch` per worker at a time, so each
  worker idles for a round trip between elements. Here the calling thread keeps
  at least `PIPELINE_DEPTH` calls in flight per worker (more for short calls:
  `PIPELINE_COMMIT_SECONDS`) and reacts to results as they arrive (no thread per call);
  small calls are written in bursts. A worker still runs one element at a time, in
  the order sent, as Julia's does: the calls go in the map's serial lane there
  (FLAG_SERIAL, see callpool.py), so per-worker state (a file, a connection, a
  scratch buffer) is never shared by two elements at once. An element that blocks
  holds up the ones sent behind it to the same worker, as with Julia's one task
  per worker.
* A function that is not importable on its own (a lambda, a closure, one of
  `__main__`) travels once per worker per `pmap` (once for the life of the pool
  with a CachingPool); each call names it by a small key. An importable one goes
  by name in every call, as remotecall sends it.
* `batch_size="auto"` starts as `multiprocessing.Pool.map` chunks the input, four
  batches per worker sent at once, but each ends early on its worker once it has
  run a few milliseconds; later batches are sized from how long elements took
  and how big they are. (Julia's first batches are of at most 100 elements, and
  stay so.)

`on_error` and `retry_check` run on the calling process and see the original
exception (the `RemoteException`'s cause, or `ProcessExitedException` when the
worker died); `pmap` itself raises what the caller saw (`RemoteException`).
"""

from __future__ import annotations

import heapq
import itertools
import operator
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from fastdist import node as _node
from fastdist._core._calls import encode_plain_call, result_value
from fastdist._core._msgloop import POLL_DIRECT_MANY_MAX, poll_direct_many
from fastdist.exceptions import CapturedException, ProcessExitedException, RemoteException
from fastdist.protocol import serialize
from fastdist.protocol.messages import CALL_FETCH, FLAG_SERIAL
from fastdist.protocol.values import decode_error, decode_result, encode_error
from fastdist.refs import _EMPTY
from fastdist.requests import DEFER_MAX_NBYTES, encode_general_call
from fastdist.workerpool import (
    AbstractWorkerPool,
    CachedFunction,
    CachingPool,
    FunctionCache,
    WorkerPool,
    cached_entry,
)

__all__ = ["AUTO_FIRST_ROUND", "AUTO_MAX_BATCH", "PIPELINE_DEPTH", "auto_batch_size", "pmap"]

PIPELINE_DEPTH = 2
"""The fewest calls in flight per worker: one running, one waiting behind it, so
a worker never idles for a round trip."""

PIPELINE_COMMIT_SECONDS = 0.005
"""Once calls have been timed on the workers, each worker gets as many calls in
flight as make about this much work (at most `MAX_PIPELINE_DEPTH`): short calls
then go many per write and per wake-up, and what waits behind a running element
when the last ones are handed out is only a few milliseconds of work."""

MAX_PIPELINE_DEPTH = 256

_END = object()  # what next() returns at the end of the input

# Calls at most this long (on average) keep the deepest pipeline.
_DEEPEST_WORK = PIPELINE_COMMIT_SECONDS / MAX_PIPELINE_DEPTH

AUTO_FIRST_ROUND = 4
"""`batch_size="auto"` starts by sending this many batches to each worker at once,
each holding 1/AUTO_FIRST_ROUND of the worker's share of the input (the chunks of
`multiprocessing.Pool.map`), at most `AUTO_MAX_FIRST_BATCH` elements; each of them
ends early once it has run `AUTO_BATCH_SECONDS` on its worker, so a slow function
is found out after an element or a few rather than after a whole share."""

AUTO_MAX_FIRST_BATCH = 10_000
"""... (so that a long input is not pulled into memory all at once before anything
is timed)."""

AUTO_MAX_BATCH = 100
"""The first batch size `batch_size="auto"` picks for an input of unknown length
(Julia's `max_batch_size`); later batches follow what the first ones measured."""

AUTO_BATCHES_PER_WORKER = 3
"""... and how far it looks ahead to tell whether the input is longer than that:
enough for this many such batches per worker (Julia's `min_batch_count`)."""

AUTO_BATCH_SECONDS = 0.005
"""Once elements have been timed, `batch_size="auto"` sizes batches to take about
this long on a worker: long enough that a call's fixed cost (a round trip, two
pickles) is a few percent, short enough that the last batches end together.
Before that, it is how long a batch of the first round may run."""

AUTO_BATCH_NBYTES = 4 << 20
"""... and to carry at most about this much (arguments or results) per call."""

# While holding some workers of a pool, how often to look for more of them free.
_POOL_POLL_SECONDS = 0.05
_REMOTE_POOL_POLL_SECONDS = 0.25


def pmap(
    f: Callable[..., Any],
    *iterables: Any,
    pool: AbstractWorkerPool | None = None,
    distributed: bool = True,
    batch_size: int | str = 1,
    on_error: Callable[[BaseException], Any] | None = None,
    retry_delays: Iterable[float] | None = (),
    retry_check: Callable[[Any, BaseException], Any] | None = None,
    progress: bool = False,
) -> list[Any]:
    """Apply `f` to the zipped elements of `iterables` on workers; results in input order.

    `pmap(f, pool, c)` (Julia's order) is the same as `pmap(f, c, pool=pool)`.
    Elements are read lazily (generators work; reading stops at the shortest
    iterable and after the first failure). Without a pool, all workers are used
    (the master alone when there are none), as through a CachingPool made for
    this call; with a pool, its free workers are taken and given back.

    Args:
        f: called as ``f(*args)`` for each tuple of zipped elements.
        *iterables: one or more iterables (a pool may come first).
        pool: the workers to use (a `WorkerPool`, `CachingPool`, or any
            `AbstractWorkerPool`; a proxy of one made elsewhere works too).
        distributed: False runs `f` in local threads (`asyncmap`), one per worker.
        batch_size: elements per call (1: each element is a call of its own), or
            ``"auto"``: at first four batches per worker, sent at once, each
            ending early on its worker once it has run `AUTO_BATCH_SECONDS` (see
            `AUTO_FIRST_ROUND`); then batches sized from how long elements took
            and how big they are.
            A batch runs its elements one after the other on one worker.
        on_error: called with the exception of a failed element (the original
            one, not the `RemoteException` around it); what it returns is put in
            place of the result. Re-raising (a bare ``raise`` works) fails the
            element, which is then retried if retries are asked for.
        retry_delays: seconds to wait before each retry of a failed element, any
            iterable (a list, ``[0.1] * 3``, a generator of growing delays ...); its
            length is the number of retries. A worker that dies is a failure like
            another: with retries, its elements run again on the others.
        retry_check: ``retry_check(state, exc) -> (state, retry)`` decides whether
            a failed element is retried; `state` is None at an element's first
            failure, then what the check returned for it. A bare bool is accepted.
        progress: show a progress bar on stderr (tqdm when installed).

    Returns:
        A list with one result per element, in input order.

    Raises:
        RemoteException: `f` raised on a worker and the failure was not handled
            (the first such failure; no new element starts after it).
        ProcessExitedException: a worker died and no retries were asked for.
        RuntimeError: every worker of the pool is gone with elements left.
        ValueError, TypeError: bad arguments.

    Example:
        >>> fd.pmap(lambda x: x * x, range(5))
        [0, 1, 4, 9, 16]
        >>> fd.pmap(pow, [2, 3], [10, 2], batch_size="auto")
        [1024, 9]
        >>> fd.pmap(lambda x: 1 // x, [1, 0, 2], on_error=lambda e: None)
        [1, None, 0]
    """
    if iterables and isinstance(iterables[0], AbstractWorkerPool):
        if pool is not None:
            raise TypeError("pmap got a pool both as an argument and as pool=")
        pool, iterables = iterables[0], iterables[1:]
    if not iterables:
        raise TypeError("pmap needs at least one iterable")
    if pool is not None and not isinstance(pool, AbstractWorkerPool):
        raise TypeError(f"pool must be an AbstractWorkerPool, not {type(pool).__name__}")
    if not (isinstance(batch_size, str) and batch_size == "auto"):
        batch_size = _positive_int(batch_size)
    policy = _Policy(on_error, retry_delays, retry_check)

    n = _node.current()
    if pool is None:
        from fastdist.cluster import workers

        # A worker of a master_worker cluster reaches no other worker: it works alone.
        pids = [n.myid] if n.myid != 1 and n.topology == "master_worker" else workers()
    else:
        pids = pool.workers()
    # Like Julia: no remote calls when the pool is empty or is this process alone.
    if not pids or pids == [n.myid]:
        distributed = False

    total = _known_length(iterables)
    bar = _Progress(total) if progress else None
    try:
        if not distributed:
            return _map_locally(f, iterables, policy, bar, max(1, len(pids)))
        # One iterable: its elements travel as they are, not as 1-tuples.
        star = len(iterables) > 1
        args: Iterator[Any] = zip(*iterables) if star else iter(iterables[0])
        sizing: _AutoSize | None = None
        if batch_size == "auto":
            first, total, args = _auto_batch_size(args, total, len(pids))
            sizing = _AutoSize(first, total, len(pids))
            args = sizing.guess_nbytes(args, star)
            batch_size = first
        engine = _Engine(n, f, pool, pids, int(batch_size), policy, bar, sizing, star)
        seq = iterables[0] if not star and type(iterables[0]) in (list, tuple) else None
        return engine.run(args, seq)
    finally:
        if bar is not None:
            bar.close()


# -- sizes ----------------------------------------------------------------------------


def _positive_int(batch_size: Any) -> int:
    try:
        size = operator.index(batch_size)
    except TypeError:
        size = 0
    if size < 1:
        raise ValueError(f"batch_size must be an int >= 1 or 'auto', not {batch_size!r}")
    return size


def _known_length(iterables: tuple[Any, ...]) -> int | None:
    try:
        return min(len(c) for c in iterables)
    except TypeError:
        return None


def auto_batch_size(nelements: int, nworkers: int) -> int:
    """The first batch size `batch_size="auto"` picks for `nelements` over `nworkers`.

    `AUTO_FIRST_ROUND` batches per worker (as `multiprocessing.Pool.map` chunks),
    at most `AUTO_MAX_FIRST_BATCH` elements each.

    Example:
        >>> auto_batch_size(10_000, 2), auto_batch_size(100, 4), auto_batch_size(5, 4)
        (1250, 6, 1)
    """
    per = nelements // (max(1, nworkers) * AUTO_FIRST_ROUND)
    return max(1, min(AUTO_MAX_FIRST_BATCH, per))


def _auto_batch_size(args: Iterator[Any], total: int | None, nworkers: int
                     ) -> tuple[int, int | None, Iterator[Any]]:
    """The first batch size, the number of elements if known now, and the elements."""
    if total is not None:
        return auto_batch_size(total, nworkers), total, args
    # Unknown length: look ahead just far enough to know whether batches are full.
    enough = nworkers * AUTO_BATCHES_PER_WORKER * AUTO_MAX_BATCH
    head = list(itertools.islice(args, enough))
    if len(head) < enough:
        return auto_batch_size(len(head), nworkers), len(head), iter(head)
    return AUTO_MAX_BATCH, None, itertools.chain(head, args)


class _AutoSize:
    """Batch sizes for `batch_size="auto"`, from what the batches so far measured."""

    # With the length unknown, no batch grows past this.
    MAX_UNKNOWN_TOTAL = 10_000

    def __init__(self, first: int, total: int | None, nworkers: int) -> None:
        self.first = first
        # Never fewer than 4 batches per worker (multiprocessing.Pool's rule).
        self.largest = (max(first, total // (AUTO_FIRST_ROUND * max(1, nworkers)))
                        if total is not None
                        else self.MAX_UNKNOWN_TOTAL)
        self.seconds: float | None = None  # per element, on a worker
        # Bytes per element of the arguments sent and of the results, apart: small
        # results must not wear down what big arguments taught (a batch of 8 MB
        # arrays returning floats), nor the other way round.
        self.arg_nbytes = 0.0
        self.result_nbytes = 0.0

    def observe(self, nelements: int, seconds: float, nbytes: int) -> None:
        """A batch of `nelements` ran in `seconds`; its reply took `nbytes`."""
        if nelements <= 0:
            return
        per_s = seconds / nelements
        self.seconds = per_s if self.seconds is None else 0.7 * self.seconds + 0.3 * per_s
        self.result_nbytes = _follow(self.result_nbytes, nbytes / nelements)

    def observe_nbytes(self, nelements: int, nbytes: int) -> None:
        """A batch of `nelements` was sent in `nbytes`."""
        if nelements > 0:
            self.arg_nbytes = _follow(self.arg_nbytes, nbytes / nelements)

    def guess_nbytes(self, args: Iterator[Any], star: bool) -> Iterator[Any]:
        """Size up the first element (`sys.getsizeof`): a big one (an array, a long
        string) makes even the first batch small, before any batch is encoded —
        a first batch ended early on its budget travels again in part."""
        head: Any = next(args, _END)
        if head is _END:
            return args
        try:
            self.observe_nbytes(1, sum(map(sys.getsizeof, head)) if star
                                else sys.getsizeof(head))
        except Exception:  # noqa: BLE001 - a hint only
            pass
        return itertools.chain((head,), args)

    def size(self) -> int:
        by_bytes = AUTO_BATCH_NBYTES / max(self.arg_nbytes, self.result_nbytes, 1.0)
        if self.seconds is None:  # big elements shrink the first batches already
            return int(max(1, min(by_bytes, self.first)))
        by_time = AUTO_BATCH_SECONDS / max(self.seconds, 1e-7)
        return int(max(1, min(by_time, by_bytes, self.largest)))


def _nbytes(body: bytes, buffers: Any) -> int:
    """The size of a frame's body and its out-of-band buffers."""
    return len(body) + sum(memoryview(b).nbytes for b in buffers)


def _follow(average: float, sample: float) -> float:
    """A running average of bytes per element that rises at once and falls slowly:
    one big element is enough to make the next batches small."""
    return max(0.7 * average + 0.3 * sample, sample)


# -- failures, on_error and retries -------------------------------------------------------


class _Delays:
    """The retry delays, read lazily and kept, so that every element can walk
    them from the start even when they come from a one-shot (or endless) iterator."""

    def __init__(self, delays: Iterable[float] | None) -> None:
        if delays is None:
            delays = ()
        if isinstance(delays, (int, float, str)):
            raise TypeError("retry_delays must be an iterable of seconds, e.g. [0.1] * 3")
        self._seen: list[float] = []
        self._source: Iterator[Any] | None = iter(delays)
        self._lock = threading.Lock()

    def get(self, k: int) -> float | None:
        """The delay before retry number `k` (from 0), or None when there are no more."""
        with self._lock:
            while len(self._seen) <= k and self._source is not None:
                try:
                    d = float(next(self._source))
                except StopIteration:
                    self._source = None
                    break
                if d < 0:
                    raise ValueError(f"retry delays must be >= 0, not {d}")
                self._seen.append(d)
            return self._seen[k] if k < len(self._seen) else None


class _Tries:
    """One element's history of failures."""

    __slots__ = ("retries", "state")

    def __init__(self) -> None:
        self.retries = 0
        self.state: Any = None


def _original(exc: BaseException) -> BaseException:
    """What `on_error` and `retry_check` see: the exception `f` raised, where it raised it."""
    if isinstance(exc, RemoteException):
        return exc.captured.ex
    return exc


class _Policy:
    """on_error, retry_delays and retry_check: what becomes of a failed element."""

    def __init__(self, on_error: Any, retry_delays: Any, retry_check: Any) -> None:
        if on_error is not None and not callable(on_error):
            raise TypeError("on_error must be callable")
        if retry_check is not None and not callable(retry_check):
            raise TypeError("retry_check must be callable")
        self.on_error = on_error
        self.delays = _Delays(retry_delays)
        self.retry_check = retry_check

    def after_failure(self, tries: _Tries, raised: BaseException) -> tuple[bool, Any]:
        """After a failed attempt: ``(True, value)`` to use `value` as the result,
        ``(False, delay)`` to retry after `delay` seconds. Raises to fail the element."""
        orig = _original(raised)
        if self.on_error is not None:
            try:
                return True, _call_in_handler(self.on_error, orig)
            except Exception as exc:  # noqa: BLE001 - on_error failed the element
                if exc is not orig:
                    raised = orig = exc
        delay = self.delays.get(tries.retries)
        if delay is None:
            raise raised
        if self.retry_check is not None:
            verdict = self.retry_check(tries.state, orig)
            if isinstance(verdict, tuple) and len(verdict) == 2:
                tries.state, verdict = verdict
            if not verdict:
                raise raised
        tries.retries += 1
        return False, delay


def _call_in_handler(handler: Callable[[BaseException], Any], exc: BaseException) -> Any:
    """Call `handler(exc)` while `exc` is the exception being handled, so that a
    bare ``raise`` inside it re-raises `exc`."""
    try:
        raise exc
    except BaseException:  # noqa: BLE001 - only to make `exc` the current exception
        return handler(exc)


# -- local (distributed=False) --------------------------------------------------------------


def _map_locally(f: Callable[..., Any], iterables: tuple[Any, ...], policy: _Policy,
                 bar: _Progress | None, ntasks: int) -> list[Any]:
    from fastdist.asyncmap import asyncmap

    def run(*args: Any) -> Any:
        tries = _Tries()
        while True:
            try:
                value = f(*args)
                break
            except Exception as exc:  # noqa: BLE001 - handed to the policy
                use_value, value_or_delay = policy.after_failure(tries, exc)
            if use_value:
                value = value_or_delay
                break
            time.sleep(value_or_delay)
        if bar is not None:
            bar.update(1)
        return value

    return asyncmap(run, *iterables, ntasks=ntasks)


# -- what runs on the worker --------------------------------------------------------------


class _ElementFailure:
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
        return (_ElementFailure, (body,))

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
    call of plain data: see `_Engine._send`)."""
    return _run_one(CachedFunction(owner, key, None), item, star)


def _run_one_named(fname: bytes, item: Any, star: bool) -> tuple[float, Any]:
    """`_run_one` for a function that travels by name, `fname` its pickle (see
    `_Engine.fname`)."""
    return _timed(serialize.loads_function(fname), item, star)


def _timed(f: Callable[..., Any], item: Any, star: bool) -> tuple[float, Any]:
    start = time.perf_counter()
    value = f(*item) if star else f(item)
    return time.perf_counter() - start, value


def _run_batch(token: Any, batch: Sequence[Any], star: bool, budget: float | None = None
               ) -> tuple[float, list[Any], list[int]]:
    """On a worker: a batch, element by element; a failure is kept in its place.

    Returns how long it took (it sizes `batch_size="auto"` batches), the results,
    and where the failures are, so that the caller need not look at every result.
    With a `budget` (seconds), the batch may end early: see `_run_elements`."""
    return _run_elements(cached_entry(token).func, batch, star, None, budget)


def _run_batch_keyed(owner: int, key: int, batch: Sequence[Any], star: bool,
                     budget: float | None = None) -> tuple[float, list[Any], list[int]]:
    """`_run_batch` for a function already on this worker, named by its cache key."""
    return _run_batch(CachedFunction(owner, key, None), batch, star, budget)


def _run_batch_named(fname: bytes, batch: Sequence[Any], star: bool,
                     budget: float | None = None) -> tuple[float, list[Any], list[int]]:
    """`_run_batch` for a function that travels by name, `fname` its pickle."""
    return _run_elements(serialize.loads_function(fname), batch, star, None, budget)


def _run_elements(f: Callable[..., Any], batch: Sequence[Any], star: bool,
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
            out.append(_ElementFailure(None, _captured(here, exc)))
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
            out.append(_ElementFailure(encode_error(exc)[1]))


# -- the distributed engine ----------------------------------------------------------------


class _Unit:
    """Elements sent in one call: a batch from the input, or one element to retry."""

    __slots__ = ("args", "batched", "start")

    def __init__(self, start: int, args: Sequence[Any], batched: bool) -> None:
        self.start = start
        self.args = args
        self.batched = batched


class _Call:
    """A call in flight: what it carries, where it went, and how it ended.

    It is also what `node.waiters` holds for the call: the thread that reads the
    reply calls `set` (or `fail`), which hands the call to the engine's queue —
    no Waiter, lock or callback per element. Whoever pops it from `node.waiters`
    answers it, so it is answered once.
    """

    __slots__ = ("done", "error", "local", "lost", "peer", "raw", "unit", "wid")

    def __init__(self, unit: _Unit, worker: int, done: queue.SimpleQueue[_Call]) -> None:
        self.unit = unit
        self.peer = worker  # the worker (node.waiters' entries name their peer so)
        self.done = done
        self.lost = False  # the worker could not be reached: use it no more
        self.wid = 0
        self.raw: Any = None  # (flags, body, buffers) of the reply
        self.error: BaseException | None = None  # the call failed before a reply
        self.local: tuple[Any, bool] | None = None  # (value, is_error) of a local run

    def set(self, raw: Any) -> None:
        self.raw = raw
        self.done.put(self)

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.put(self)


class _Engine:
    """One distributed pmap, driven by the calling thread.

    Free call slots (`_depth` per worker) queue in `_slots`; each result
    arrives in `_done` (see `_Call`), frees its slot and lets the
    next unit go. Failed elements wait in `_retries` for their delay.
    """

    def __init__(self, n: Any, f: Callable[..., Any], pool: AbstractWorkerPool | None,
                 pids: list[int], batch_size: int, policy: _Policy,
                 bar: _Progress | None, sizing: _AutoSize | None = None,
                 star: bool = True) -> None:
        self.n = n
        self.f = f
        self.star = star  # elements are tuples of arguments
        self.pool = pool
        self.batch_size = batch_size
        self.sizing = sizing
        self.batched = batch_size > 1 or sizing is not None
        self.policy = policy
        self.bar = bar
        # A function that travels by name goes in every call as its pickle, a few
        # dozen bytes (serialize.function_pickle), as remotecall sends it: nothing
        # to leave on each worker first and to forget at the end. Other functions
        # go once per worker, through a cache: a CachingPool's, or one for this map.
        self.fname: bytes | None = None
        self.cache: FunctionCache | None = None
        self.own_cache = True
        if isinstance(pool, CachingPool) and not pool._remote():
            self.cache, self.own_cache = pool._cache, False
        elif serialize.travels_by_name(f):
            self.fname = serialize.function_pickle(f)
        if self.fname is None and self.cache is None:
            self.cache = FunctionCache()
        self.results: list[Any] = []
        self.failure: BaseException | None = None
        self._done: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._inflight: dict[int, int] = {}  # held worker -> calls in flight
        self._unreachable: set[int] = set()  # held, but calls to them cannot be sent
        self._ncalls = 0
        self._slots: deque[int] = deque()
        self._unflushed: dict[int, Any] = {}  # worker -> its connection, calls queued
        self._conns: dict[int, Any] = {}  # worker -> its connection, once queued on
        self._tokens: dict[int, CachedFunction] = {}  # worker -> the function's key there
        self._myid = n.myid
        self._ids = n._ids  # (Node.next_id, without its frame)
        # (due, seq, index, args, worker it failed on), a heap on (due, seq)
        self._retries: list[tuple[float, int, int, Any, int]] = []
        # What batches cut short on their budget left undone, to be sent again.
        self._rests: deque[_Unit] = deque()
        self._retry_seq = itertools.count()
        self._tries: dict[int, _Tries] = {}
        self._source: Iterator[Any] | None = None
        self._seq: list[Any] | tuple[Any, ...] | None = None
        self._next_poll = 0.0
        # The elements this process runs itself go one at a time, as on a worker.
        self._lane = object()
        # Before anything is timed, 'auto' batches end early on their budget
        # (`_budget`), so the whole first round can go at once, as multiprocessing's
        # chunks do: no worker waits for the round trip that times the first ones.
        self._depth = AUTO_FIRST_ROUND if sizing is not None else PIPELINE_DEPTH
        self._work: float | None = None  # seconds a call takes on its worker, on average
        if pool is None:
            self._hold(pids)
        self._poll_interval = _POOL_POLL_SECONDS
        if isinstance(pool, WorkerPool) and pool._remote():
            self._poll_interval = _REMOTE_POOL_POLL_SECONDS

    # -- the loop -------------------------------------------------------------------------

    def run(self, args: Iterator[Any], seq: list[Any] | tuple[Any, ...] | None = None
            ) -> list[Any]:
        """Map over `args`; or, given `seq` (the list or tuple `args` iterates),
        take its elements in slices."""
        self._source = args
        self._seq = seq
        try:
            while True:
                if self.failure is None:
                    self._acquire()
                    self._dispatch()
                if self._ncalls == 0 and (self.failure is not None or not self._work_left()):
                    break
                self._wait()
        except BaseException:
            self._release(drained=False)
            raise
        self._release(drained=True)
        if self.failure is not None:
            raise self.failure
        return self.results

    def _work_left(self) -> bool:
        return self._source is not None or bool(self._retries) or bool(self._rests)

    def _size(self) -> int:
        """How many elements the next batch takes."""
        return self.sizing.size() if self.sizing is not None else self.batch_size

    def _pull(self, source: Iterator[Any]) -> _Unit | None:
        size = self._size()
        start = len(self.results)
        if size == 1 and self._seq is None:
            item = next(source, _END)
            if item is _END:
                return None
            self.results.append(None)
            return _Unit(start, [item], self.batched)
        # A list or tuple is sliced: a fifth of what pulling its elements costs.
        chunk = (self._seq[start:start + size] if self._seq is not None
                 else list(itertools.islice(source, size)))
        if not chunk:
            return None
        self.results.extend([None] * len(chunk))
        return _Unit(start, chunk, self.batched)

    def _next_unit(self, w: int) -> _Unit | None:
        """What worker `w` should run next: a retry due now (preferably one that did
        not fail on `w`), else the next unit of the input."""
        if self._retries:
            unit = self._take_retry(w)
            if unit is not None:
                return unit
        if self._rests:
            return self._take_rest()
        if self._source is None:
            return None
        try:
            unit = self._pull(self._source)
            if unit is not None:
                return unit
            self._source = None
        except Exception as exc:  # noqa: BLE001 - the input itself failed: stop there
            self._source = None
            self._fail(exc)
        return None

    def _take_rest(self) -> _Unit:
        """The next batch of what a batch cut short left, sized as batches are now."""
        rest = self._rests[0]
        size = self._size()
        if len(rest.args) <= size:
            return self._rests.popleft()
        self._rests[0] = _Unit(rest.start + size, rest.args[size:], True)
        return _Unit(rest.start, rest.args[:size], True)

    def _take_retry(self, w: int) -> _Unit | None:
        now = time.monotonic()
        # A worker that fails fast frees its slots first: without this it would
        # take every retry back and fail it again while the others are busy.
        others = len(self._inflight) > 1
        ready = [(due, seq, i) for i, (due, seq, _, _, failed_on) in enumerate(self._retries)
                 if due <= now and not (others and failed_on == w)]
        if not ready:
            return None
        best = min(ready)[2]
        _, _, idx, args, _ = self._retries[best]
        self._retries[best] = self._retries[-1]
        self._retries.pop()
        heapq.heapify(self._retries)
        return _Unit(idx, [args], False)

    def _dispatch(self) -> None:
        kept: list[int] = []
        while self.failure is None and self._slots:
            w = self._slots.popleft()
            if self._inflight.get(w, self._depth) >= self._depth:
                continue  # a slot of a worker given back or gone
            unit = self._next_unit(w)
            if unit is None:
                kept.append(w)  # nothing for this worker now; maybe for the next one
                if self._source is None and not self._retries:
                    break
                continue
            self._send(w, unit)
        self._slots.extendleft(reversed(kept))
        self._flush()

    def _flush(self) -> None:
        """Write the calls `_send` queued."""
        while self._unflushed:
            _, conn = self._unflushed.popitem()
            try:
                conn.flush()
            except ConnectionError:
                pass  # closed: the node fails its calls (node.peer_lost)

    def _wait(self) -> None:
        timeout: float | None = None
        now = time.monotonic()
        if self._retries and self.failure is None:
            # A retry due now that no free worker took waits for a call to end,
            # not in a spin; one due later sets the timeout.
            later = [due for due, *_ in self._retries if due > now]
            if later:
                timeout = min(later) - now
        if self.pool is not None and self._work_left() and self.failure is None:
            poll = max(0.0, self._next_poll - now)
            timeout = poll if timeout is None else min(timeout, poll)
        if self._ncalls == 0:
            if timeout:
                time.sleep(timeout)
            return
        call = self._next_done(timeout)
        if call is None:
            return
        self._finish(call)
        while True:
            try:
                call = self._done.get_nowait()
            except queue.Empty:
                return
            self._finish(call)

    def _next_done(self, timeout: float | None) -> _Call | None:
        """The next call to end, waiting up to `timeout` s (None: no limit) for one;
        None if none ended meanwhile."""
        try:
            return self._done.get_nowait()
        except queue.Empty:
            pass
        conns = self._read_directly()
        if conns is None:
            try:
                return self._done.get(timeout=timeout)
            except queue.Empty:
                return None
        try:
            # What the loop thread read before it let go is in the queue already.
            if self._done.empty():
                poll_direct_many(conns, -1.0 if timeout is None else timeout)
        finally:
            for conn in conns:
                conn.end_direct()
        try:
            return self._done.get_nowait()
        except queue.Empty:
            return None  # frames for others, or the timeout: the caller looks again

    def _read_directly(self) -> list[Any] | None:
        """Become the reader of the connections to the workers with calls in flight,
        so that their replies wake this thread rather than the loop thread, which
        would then have to wake it (two wake-ups and a hand-off per reply, most of
        the loop thread's time in a map of short batches). None, having taken
        nothing, when that cannot be: a call runs here, there are more of them than
        one poll takes (POLL_DIRECT_MANY_MAX), or one is not a socket, is gone, or
        is being read by another thread just now (its frames then come through the
        queue)."""
        if self._inflight.get(self._myid, 0):
            return None
        conns: list[Any] = []
        peers = self.n.peers
        for w, k in self._inflight.items():
            if not k:
                continue
            peer = peers.get(w)
            conn = peer.conn if peer is not None else None
            begin = getattr(conn, "begin_direct", None)
            if begin is None or len(conns) == POLL_DIRECT_MANY_MAX or not begin(0.0):
                for taken in conns:
                    taken.end_direct()
                return None
            conns.append(conn)
        return conns or None

    # -- workers ------------------------------------------------------------------------

    def _hold(self, ws: list[int]) -> None:
        """Start using workers `ws`: their slots queue round by round, so that the
        first elements go one to each worker."""
        for w in ws:
            self._inflight[w] = 0
        for _ in range(self._depth):
            self._slots.extend(ws)

    def _drop(self, w: int) -> None:
        """Stop using `w`; give it back to the pool if it came from one."""
        if self._inflight.pop(w, None) is not None and self.pool is not None:
            self.pool.put(w)

    def _acquire(self) -> None:
        """Take free workers from the pool while there is work for them."""
        if not self._work_left():
            return
        if self.pool is None:
            if not self._inflight:
                self._fail(RuntimeError("No active worker available in pool"))
            return
        now = time.monotonic()
        if self._inflight and now < self._next_poll:
            return
        self._next_poll = now + self._poll_interval
        try:
            taken: list[int] = []
            while (w := _try_take(self.pool)) is not None:
                taken.append(w)
            if not taken and not self._inflight:
                taken.append(self.pool.take())  # waits for one; raises if the pool is empty
            self._hold(taken)
        except (RuntimeError, ProcessExitedException) as exc:
            self._fail(exc)

    def _release(self, drained: bool) -> None:
        for w in list(self._inflight):
            self._drop(w)
        if self.pool is not None:
            for w in self._unreachable:
                self.pool.put(w)
        if self.own_cache and self.cache is not None:
            if drained:
                self.cache.clear()
            else:
                # Calls may still be on their way: let them finish before forgetting.
                timer = threading.Timer(CLEAR_AFTER_ABORT_SECONDS, self.cache.clear)
                timer.daemon = True
                timer.start()

    # -- calls --------------------------------------------------------------------------

    def _send(self, w: int, unit: _Unit) -> None:
        call = _Call(unit, w, self._done)
        self._inflight[w] += 1
        self._ncalls += 1
        if w == self._myid:
            self.n.callpool.submit_serial(self._lane, lambda: self._run_here(call))
            return
        token = None
        if self.cache is not None:
            # Once the function is on `w`, its token is the same for every call.
            token = self._tokens.get(w)
            if token is None:
                token = self.cache.token(self.f, w)
                if token.func is None:
                    self._tokens[w] = token
        # The token of the call that brings the function to `w`, if this is it.
        first = token if token is not None and token.func is not None else None
        try:
            if first is not None:
                aux, body, buffers = self._encode_first(unit, first, w)
            else:
                # A call of plain data (the function named by its pickle or its key):
                # plain elements make it encoded in C and run by the worker's
                # small-call path (_core/_calls.pyx). (The first calls make the
                # runners known by name, as for remotecall.)
                runner, args = self._call_of(unit, token)
                aux, body, buffers = (encode_plain_call(runner, args, {})
                                      or encode_general_call(runner, args, {}, w))
        except Exception as exc:  # noqa: BLE001 - a failure of these elements
            if first is not None:
                self._unsend(w)
            self._complete_with_error(call, exc)
            return
        if self.sizing is not None:
            self.sizing.observe_nbytes(len(unit.args), _nbytes(body, buffers))
        call.wid = wid = next(self._ids)
        self.n.waiters[wid] = call
        try:
            if buffers or len(body) > DEFER_MAX_NBYTES:
                self.n.send(w, CALL_FETCH, FLAG_SERIAL, aux, self._myid, wid, body, buffers)
            else:
                self._queue(w, aux, wid, body)
        except Exception as exc:  # noqa: BLE001 - unreachable (gone, or the topology)
            if first is not None:
                self._unsend(w)
            call.lost = True
            if self.n.waiters.pop(wid, None) is not None:  # else failed by peer_lost
                call.fail(exc)

    def _queue(self, w: int, aux: int, wid: int, body: bytes) -> None:
        """Send a small call: the calls of one refill go out in one write per worker,
        by this thread at the end of `_dispatch` — but at once to a worker with
        little to do, which would otherwise wait for the whole refill to be encoded."""
        conn = self._conns.get(w)
        if conn is None:
            conn = self.n.send_queued(w, CALL_FETCH, FLAG_SERIAL, aux, self._myid, wid, body)
            if conn is None:
                return  # a stream connection: sent
            self._conns[w] = conn
        else:
            try:
                conn.queue_frame(CALL_FETCH, FLAG_SERIAL, aux, self._myid, wid, body)
            except ConnectionError as exc:
                raise ProcessExitedException(w) from exc
        if self._inflight[w] <= PIPELINE_DEPTH:
            self._unflushed.pop(w, None)
            try:
                conn.flush()
            except ConnectionError as exc:
                raise ProcessExitedException(w) from exc
        else:
            self._unflushed[w] = conn

    def _unsend(self, w: int) -> None:
        """The call bringing the function to `w` never left: the next one brings it."""
        if self.cache is not None:
            self.cache.unsend(self.f, w)

    def _call_of(self, unit: _Unit, token: CachedFunction | None) -> tuple[Any, tuple[Any, ...]]:
        """(runner, arguments) of the call that runs `unit` with a function the
        worker has: named by its pickle (no `token`) or by its cache key."""
        if not unit.batched:
            if token is None:
                return _run_one_named, (self.fname, unit.args[0], self.star)
            return _run_one_keyed, (token.owner, token.key, unit.args[0], self.star)
        budget = self._budget()
        if token is None:
            return _run_batch_named, (self.fname, unit.args, self.star, budget)
        return _run_batch_keyed, (token.owner, token.key, unit.args, self.star, budget)

    def _budget(self) -> float | None:
        """How long a batch may run on its worker before it ends early: until elements
        have been timed, `batch_size="auto"` batches carry `AUTO_BATCH_SECONDS`."""
        if self.sizing is not None and self.sizing.seconds is None:
            return AUTO_BATCH_SECONDS
        return None

    def _encode_first(self, unit: _Unit, token: CachedFunction, w: int
                      ) -> tuple[int, bytes, Any]:
        """(aux, body, buffers) of the call that brings the function to worker `w`
        (inside `token`) and runs `unit`."""
        call: tuple[Any, tuple[Any, ...], dict[str, Any]] = (
            (_run_batch, (token, unit.args, self.star, self._budget()), {})
            if unit.batched else (_run_one, (token, unit.args[0], self.star), {}))
        body, buffers = serialize.dumps(call, dest=w, what="pmap call")
        return 0, body, buffers

    def _complete_with_error(self, call: _Call, exc: BaseException) -> None:
        call.local = (exc, True)
        self._done.put(call)

    def _run_here(self, call: _Call) -> None:
        """On a call thread of this process: a unit for the worker that is us."""
        unit, n = call.unit, self.n
        try:
            if unit.batched:
                call.local = (_run_elements(self.f, unit.args, self.star, n), False)
            else:
                item = unit.args[0]
                start = time.perf_counter()
                value = (n.callpool.run_user(self.f, *item) if self.star
                         else n.callpool.run_user(self.f, item))
                call.local = ((time.perf_counter() - start, value), False)
        except BaseException as exc:  # noqa: BLE001 - handed to the engine
            call.local = (_captured(n, exc), True)
        self._done.put(call)

    def _finish(self, call: _Call) -> None:
        w, unit = call.peer, call.unit
        self._ncalls -= 1
        if w in self._inflight:
            self._inflight[w] -= 1
        if call.local is not None:
            value, is_error = call.local
        elif call.error is not None:
            value, is_error = call.error, True
        else:
            value, is_error = result_value(call.raw), False  # in C, most results
            if value is _EMPTY:
                value, is_error = decode_result(*call.raw)
        if call.lost:
            if self._inflight.pop(w, None) is not None:
                self._unreachable.add(w)  # alive: back to its pool only at the end
        elif is_error and isinstance(value, ProcessExitedException) and value.worker_id == w:
            self._inflight.pop(w, None)  # dead: it leaves every pool by itself
        elif w in self._inflight:
            if self.pool is not None and self._inflight[w] == 0 and not self._work_left():
                self._drop(w)  # nothing more for it: back to the pool early
            else:
                self._slots.append(w)
        if self.failure is not None:
            return  # draining after a failure: what arrives now no longer counts
        if is_error:
            for i, args in enumerate(unit.args):
                self._element_failed(unit.start + i, args, value, w)
        elif unit.batched:
            seconds, value, failed = value
            if self.sizing is not None:
                raw = call.raw
                nbytes = _nbytes(raw[1], raw[2]) if raw is not None else 0
                self.sizing.observe(len(value), seconds, nbytes)
            self._adapt_depth(seconds)
            self.results[unit.start:unit.start + len(value)] = value
            if len(value) < len(unit.args):  # cut short on its budget
                self._rests.append(_Unit(unit.start + len(value), unit.args[len(value):],
                                         True))
            for i in failed:
                self._element_failed(unit.start + i, unit.args[i], value[i].exception(), w)
            self._tick(len(value) - len(failed))
        else:
            seconds, value = value
            self._adapt_depth(seconds)
            self.results[unit.start] = value
            if self._tries:
                self._tries.pop(unit.start, None)
            if self.bar is not None:
                self.bar.update(1)

    def _adapt_depth(self, seconds: float) -> None:
        """As many calls in flight per worker as make `PIPELINE_COMMIT_SECONDS` of work."""
        work = self._work
        self._work = work = seconds if work is None else 0.8 * work + 0.2 * seconds
        if work <= _DEEPEST_WORK and self._depth == MAX_PIPELINE_DEPTH:
            return  # short calls, as deep as it goes: the common case, cheap
        depth = int(PIPELINE_COMMIT_SECONDS / max(work, 1e-6))
        depth = max(PIPELINE_DEPTH, min(MAX_PIPELINE_DEPTH, depth))
        if depth > self._depth:
            self._slots.extend(list(self._inflight) * (depth - self._depth))
        self._depth = depth  # a smaller depth drops surplus slots as they come up

    def _element_failed(self, idx: int, args: Any, raised: BaseException,
                        worker: int) -> None:
        if self.failure is not None:
            return
        tries = self._tries.setdefault(idx, _Tries())
        try:
            use_value, value_or_delay = self.policy.after_failure(tries, raised)
        except Exception as exc:  # noqa: BLE001 - the element failed for good
            self._fail(exc)
            return
        if use_value:
            self.results[idx] = value_or_delay
            self._tries.pop(idx, None)
            self._tick(1)
        else:
            heapq.heappush(self._retries, (time.monotonic() + value_or_delay,
                                           next(self._retry_seq), idx, args, worker))

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
            self._retries.clear()
            self._rests.clear()
            self._source = None

    def _tick(self, k: int) -> None:
        if self.bar is not None:
            self.bar.update(k)


# After an interrupted pmap, how long its calls get to arrive before the workers
# are told to forget its function.
CLEAR_AFTER_ABORT_SECONDS = 30.0


def _captured(n: Any, exc: BaseException) -> RemoteException:
    err = RemoteException(n.myid, CapturedException.capture(exc))
    err.__cause__ = exc
    return err


def _try_take(pool: AbstractWorkerPool) -> int | None:
    """A free worker of `pool` now, or None."""
    if isinstance(pool, WorkerPool):
        return pool._try_take()
    if pool.isready():
        return pool.take()
    return None


# -- progress --------------------------------------------------------------------------


class _Progress:
    """A progress bar on stderr: tqdm when it is installed, else a plain one."""

    WIDTH = 30
    MIN_INTERVAL = 0.1

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.count = 0
        self._lock = threading.Lock()
        self._last = 0.0
        try:
            from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]
        except ImportError:
            self._tqdm = None
        else:
            self._tqdm = tqdm(total=total, file=sys.stderr, desc="pmap", unit="el")

    def update(self, k: int) -> None:
        with self._lock:
            self.count += k
            if self._tqdm is not None:
                self._tqdm.update(k)
                return
            now = time.monotonic()
            if now - self._last >= self.MIN_INTERVAL or self.count == self.total:
                self._last = now
                self._draw()

    def _draw(self) -> None:
        if self.total:
            done = int(self.WIDTH * self.count / self.total)
            bar = "#" * done + "." * (self.WIDTH - done)
            text = f"\rpmap [{bar}] {self.count}/{self.total} {100 * self.count // self.total}%"
        else:
            text = f"\rpmap {self.count} done"
        sys.stderr.write(text)
        sys.stderr.flush()

    def close(self) -> None:
        with self._lock:
            if self._tqdm is not None:
                self._tqdm.close()
                return
            self._draw()
            sys.stderr.write("\n")
            sys.stderr.flush()
