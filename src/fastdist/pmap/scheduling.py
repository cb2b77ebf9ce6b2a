"""How a map is cut into calls and what becomes of failed elements: batch sizes
(fixed, or 'auto' from what batches measured), pipeline depth, retries and
on_error, progress. Nothing here sends or receives (engine.py drives, calls.py
carries).
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from fastdist.exceptions import RemoteException

PIPELINE_DEPTH = 2
"""The fewest calls in flight per worker: one running, one waiting behind it, so
a worker never idles for a round trip."""

PIPELINE_COMMIT_SECONDS = 0.005
"""Once calls have been timed on the workers, each worker gets as many calls in
flight as make about this much work (at most `MAX_PIPELINE_DEPTH`): short calls
then go many per write and per wake-up, and what waits behind a running element
when the last ones are handed out is only a few milliseconds of work."""

MAX_PIPELINE_DEPTH = 256

END = object()  # what next() returns at the end of the input

# Calls at most this long (on average) keep the deepest pipeline.
DEEPEST_WORK = PIPELINE_COMMIT_SECONDS / MAX_PIPELINE_DEPTH

AUTO_FIRST_ROUND = 4
"""`batch_size="auto"` starts by sending this many batches to each worker at once,
each holding 1/AUTO_FIRST_ROUND of the worker's share of the input (the chunks of
`multiprocessing.Pool.map`), at most `AUTO_MAX_FIRST_BATCH` elements; each of them
ends early once it has run `AUTO_BATCH_SECONDS` on its worker, so a slow function
is found out after an element or a few rather than after a whole share."""

AUTO_FIRST_ROUND_BATCHES = 16
"""... and at most this many batches in all: with many workers, the first round
sends fewer batches to each, then one to each of the first 16. A batch's fixed
cost — a round trip, a wake-up of its worker (whose caches another process may
have taken meanwhile), the master's share of both — is paid per batch: on the
2-core machine of bench/RESULTS.md, 100,000 quick elements over 32 workers ran
about 1.2x faster in 16 batches than in 32 (W7b), and over 8 workers 1.1x faster
than in 32. The price, with more workers than this: the others start when the
first batches come back, which for a slow function is after its first element
(each batch still ends on its time budget, so a slow function is found out as
early)."""


def first_round(nworkers: int) -> int:
    """How many batches `batch_size="auto"` sends each of `nworkers` workers at first."""
    return max(1, min(AUTO_FIRST_ROUND, AUTO_FIRST_ROUND_BATCHES // max(1, nworkers)))


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
POOL_POLL_SECONDS = 0.05
REMOTE_POOL_POLL_SECONDS = 0.25



def auto_batch_size(nelements: int, nworkers: int) -> int:
    """The first batch size `batch_size="auto"` picks for `nelements` over `nworkers`.

    `first_round(nworkers)` batches per worker (4, as `multiprocessing.Pool.map`
    chunks, for up to 4 workers), `AUTO_FIRST_ROUND_BATCHES` at most in all, of at
    most `AUTO_MAX_FIRST_BATCH` elements each.

    Example:
        >>> auto_batch_size(10_000, 2), auto_batch_size(100, 4), auto_batch_size(5, 4)
        (1250, 6, 1)
        >>> auto_batch_size(96_000, 8), auto_batch_size(96_000, 32)
        (6000, 6000)
    """
    nbatches = min(max(1, nworkers) * first_round(nworkers), AUTO_FIRST_ROUND_BATCHES)
    per = nelements // nbatches
    return max(1, min(AUTO_MAX_FIRST_BATCH, per))


def first_batch_size(args: Iterator[Any], total: int | None, nworkers: int
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


class AutoSize:
    """Batch sizes for `batch_size="auto"`, from what the batches so far measured."""

    # With the length unknown, no batch grows past this.
    MAX_UNKNOWN_TOTAL = 10_000

    def __init__(self, first: int, total: int | None, nworkers: int) -> None:
        self.first = first
        # Never fewer batches per worker than the first round sent (multiprocessing.Pool's
        # rule of 4, for up to 8 workers).
        self.largest = (max(first, total // (first_round(nworkers) * max(1, nworkers)))
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
        head: Any = next(args, END)
        if head is END:
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


class Tries:
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


class Policy:
    """on_error, retry_delays and retry_check: what becomes of a failed element."""

    def __init__(self, on_error: Any, retry_delays: Any, retry_check: Any) -> None:
        if on_error is not None and not callable(on_error):
            raise TypeError("on_error must be callable")
        if retry_check is not None and not callable(retry_check):
            raise TypeError("retry_check must be callable")
        self.on_error = on_error
        self.delays = _Delays(retry_delays)
        self.retry_check = retry_check

    def after_failure(self, tries: Tries, raised: BaseException) -> tuple[bool, Any]:
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


class Unit:
    """Elements sent in one call: a batch from the input, or one element to retry."""

    __slots__ = ("args", "batched", "start")

    def __init__(self, start: int, args: Sequence[Any], batched: bool) -> None:
        self.start = start
        self.args = args
        self.batched = batched


# -- progress --------------------------------------------------------------------------


class Progress:
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
