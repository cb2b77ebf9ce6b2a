"""`pmap`: apply a function to collections on worker processes, results in input order,
with batching, per-element error handling and retries.

The package: this module is the API and its argument checks; scheduling.py sizes
batches and decides about failures, engine.py drives a map from the calling
thread, calls.py carries its calls to the workers and their replies back,
worker.py is what runs there.

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
  batches per worker (fewer past 4 workers, 16 at most in all) sent at once, but
  each ends early on its worker once it has run a few milliseconds; later
  batches are sized from how long elements took and how big they are. (Julia's
  first batches are of at most 100 elements, and stay so.)

`on_error` and `retry_check` run on the calling process and see the original
exception (the `RemoteException`'s cause, or `ProcessExitedException` when the
worker died); `pmap` itself raises what the caller saw (`RemoteException`).
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fastdist import node as _node
from fastdist.asyncmap import asyncmap
from fastdist.cluster import workers
from fastdist.pmap.engine import Engine
from fastdist.pmap.scheduling import (
    AUTO_FIRST_ROUND,
    AUTO_MAX_BATCH,
    AUTO_MAX_FIRST_BATCH,
    PIPELINE_DEPTH,
    AutoSize,
    Policy,
    Progress,
    Tries,
    auto_batch_size,
    first_batch_size,
)
from fastdist.signals import sigint_absorbed
from fastdist.workerpool import AbstractWorkerPool

__all__ = ["AUTO_FIRST_ROUND", "AUTO_MAX_BATCH", "AUTO_MAX_FIRST_BATCH", "PIPELINE_DEPTH",
           "auto_batch_size", "pmap"]


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
    this call, and workers that join while it runs (an ElasticManager's) take
    elements too; with a pool, its free workers are taken and given back.

    Args:
        f: called as ``f(*args)`` for each tuple of zipped elements.
        *iterables: one or more iterables (a pool may come first).
        pool: the workers to use (a `WorkerPool`, `CachingPool`, or any
            `AbstractWorkerPool`; a proxy of one made elsewhere works too).
        distributed: False runs `f` in local threads (`asyncmap`), one per worker.
        batch_size: elements per call (1: each element is a call of its own), or
            ``"auto"``: at first four batches per worker (fewer past 8 workers:
            `AUTO_FIRST_ROUND_BATCHES` in all), sent at once, each ending early on
            its worker once it has run `AUTO_BATCH_SECONDS` (see
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
    policy = Policy(on_error, retry_delays, retry_check)

    n = _node.current()
    if pool is None:
        # A worker of a master_worker cluster reaches no other worker: it works alone.
        pids = [n.myid] if n.myid != 1 and n.topology == "master_worker" else workers()
    else:
        pids = pool.workers()
    # Like Julia: no remote calls when the pool is empty or is this process alone.
    if not pids or pids == [n.myid]:
        distributed = False

    total = _known_length(iterables)
    bar = Progress(total) if progress else None
    try:
        if not distributed:
            return _map_locally(f, iterables, policy, bar, max(1, len(pids)))
        # One iterable: its elements travel as they are, not as 1-tuples.
        star = len(iterables) > 1
        args: Iterator[Any] = zip(*iterables) if star else iter(iterables[0])
        sizing: AutoSize | None = None
        if batch_size == "auto":
            first, total, args = first_batch_size(args, total, len(pids))
            sizing = AutoSize(first, total, len(pids))
            args = sizing.guess_nbytes(args, star)
            batch_size = first
        engine = Engine(n, f, pool, pids, int(batch_size), policy, bar, sizing, star)
        seq = iterables[0] if not star and type(iterables[0]) in (list, tuple) else None
        return engine.run(args, seq)
    except KeyboardInterrupt:
        # Ctrl-C: one short traceback, ending at the user's pmap line (the frames of
        # the wait it broke off say nothing to them).
        raise KeyboardInterrupt from None
    finally:
        if bar is not None:
            with sigint_absorbed():
                bar.close()


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


def _map_locally(f: Callable[..., Any], iterables: tuple[Any, ...], policy: Policy,
                 bar: Progress | None, ntasks: int) -> list[Any]:
    def run(*args: Any) -> Any:
        tries = Tries()
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
