"""The map itself, driven by the calling thread: which unit goes to which worker
next, how deep each worker's pipeline runs, what comes back, what is retried.

Julia's pmap runs one remotecall_fetch per worker at a time, so each worker idles
for a round trip between elements. Here the calling thread keeps at least
`PIPELINE_DEPTH` calls in flight per worker (more for short calls:
`PIPELINE_COMMIT_SECONDS`) and reacts to results as they arrive (no thread per
call); calls.py carries them, scheduling.py sizes them.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from fastdist.exceptions import ProcessExitedException
from fastdist.node import Node
from fastdist.pmap.calls import Call, MapCalls
from fastdist.pmap.scheduling import (
    AUTO_BATCH_SECONDS,
    AUTO_FIRST_ROUND,
    DEEPEST_WORK,
    END,
    MAX_PIPELINE_DEPTH,
    PIPELINE_COMMIT_SECONDS,
    PIPELINE_DEPTH,
    POOL_POLL_SECONDS,
    REMOTE_POOL_POLL_SECONDS,
    AutoSize,
    Policy,
    Progress,
    Tries,
    Unit,
)
from fastdist.pmap.worker import store_results
from fastdist.signals import sigint_absorbed
from fastdist.workerpool import AbstractWorkerPool, WorkerPool


class Engine:
    """One distributed pmap, driven by the calling thread.

    Free call slots (`_depth` per worker) queue in `_slots`; each result
    arrives in `_done` (see `Call`), frees its slot and lets the
    next unit go. Failed elements wait in `_retries` for their delay.
    """

    def __init__(self, n: Node, f: Callable[..., Any], pool: AbstractWorkerPool | None,
                 pids: list[int], batch_size: int, policy: Policy,
                 bar: Progress | None, sizing: AutoSize | None = None,
                 star: bool = True) -> None:
        self.pool = pool
        self.batch_size = batch_size
        self.sizing = sizing
        self.batched = batch_size > 1 or sizing is not None
        self.policy = policy
        self.bar = bar
        self.calls = MapCalls(n, f, pool, star)
        self.results: list[Any] = []
        self.failure: BaseException | None = None
        self._inflight: dict[int, int] = {}  # held worker -> calls in flight
        self._unreachable: set[int] = set()  # held, but calls to them cannot be sent
        self._ncalls = 0
        self._slots: deque[int] = deque()
        # (due, seq, index, args, worker it failed on), a heap on (due, seq)
        self._retries: list[tuple[float, int, int, Any, int]] = []
        # What batches cut short on their budget left undone, to be sent again.
        self._rests: deque[Unit] = deque()
        self._retry_seq = itertools.count()
        self._tries: dict[int, Tries] = {}
        self._source: Iterator[Any] | None = None
        self._seq: list[Any] | tuple[Any, ...] | None = None
        self._next_poll = 0.0
        # Before anything is timed, 'auto' batches end early on their budget
        # (`_budget`), so the whole first round can go at once, as multiprocessing's
        # chunks do: no worker waits for the round trip that times the first ones.
        self._depth = AUTO_FIRST_ROUND if sizing is not None else PIPELINE_DEPTH
        self._work: float | None = None  # seconds a call takes on its worker, on average
        if pool is None:
            self._hold(pids)
        # Without a pool the map uses every worker, those that join while it runs too
        # (an ElasticManager's), polled for as a pool is; on the master, which adds them.
        self._node = n
        self._seen: set[int] | None = set(pids) if pool is None and n.myid == 1 else None
        self._poll_interval = POOL_POLL_SECONDS
        if isinstance(pool, WorkerPool) and pool._remote():
            self._poll_interval = REMOTE_POOL_POLL_SECONDS

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
            with sigint_absorbed():
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

    def _pull(self, source: Iterator[Any]) -> Unit | None:
        size = self._size()
        start = len(self.results)
        if size == 1 and self._seq is None:
            item = next(source, END)
            if item is END:
                return None
            self.results.append(None)
            return Unit(start, [item], self.batched)
        # A list or tuple is sliced: a fifth of what pulling its elements costs.
        chunk = (self._seq[start:start + size] if self._seq is not None
                 else list(itertools.islice(source, size)))
        if not chunk:
            return None
        self.results.extend([None] * len(chunk))
        return Unit(start, chunk, self.batched)

    def _next_unit(self, w: int) -> Unit | None:
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

    def _take_rest(self) -> Unit:
        """The next batch of what a batch cut short left, sized as batches are now."""
        rest = self._rests[0]
        size = self._size()
        if len(rest.args) <= size:
            return self._rests.popleft()
        self._rests[0] = Unit(rest.start + size, rest.args[size:], True)
        return Unit(rest.start, rest.args[:size], True)

    def _take_retry(self, w: int) -> Unit | None:
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
        return Unit(idx, [args], False)

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
        self.calls.flush()

    def _send(self, w: int, unit: Unit) -> None:
        self._inflight[w] += 1
        self._ncalls += 1
        nbytes = self.calls.send(w, unit, self._budget(),
                                 at_once=self._inflight[w] <= PIPELINE_DEPTH)
        if self.sizing is not None and nbytes:
            self.sizing.observe_nbytes(len(unit.args), nbytes)

    def _wait(self) -> None:
        timeout: float | None = None
        now = time.monotonic()
        if self._retries and self.failure is None:
            # A retry due now that no free worker took waits for a call to end,
            # not in a spin; one due later sets the timeout.
            later = [due for due, *_ in self._retries if due > now]
            if later:
                timeout = min(later) - now
        polls = self.pool is not None or self._seen is not None
        if polls and self._work_left() and self.failure is None:
            poll = max(0.0, self._next_poll - now)
            timeout = poll if timeout is None else min(timeout, poll)
        if self._ncalls == 0:
            if timeout:
                time.sleep(timeout)
            return
        call = self.calls.next_done(timeout, self._inflight)
        while call is not None:
            self._finish(call)
            call = self.calls.ended()

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
            elif self._seen is not None:
                self._take_joined()
            return
        now = time.monotonic()
        if self._inflight and now < self._next_poll:
            return
        self._next_poll = now + self._poll_interval
        try:
            taken: list[int] = []
            while (w := try_take(self.pool)) is not None:
                taken.append(w)
            if not taken and not self._inflight:
                taken.append(self.pool.take())  # waits for one; raises if the pool is empty
            self._hold(taken)
        except (RuntimeError, ProcessExitedException) as exc:
            self._fail(exc)

    def _take_joined(self) -> None:
        """Hold the workers that joined the cluster since the map began."""
        now = time.monotonic()
        if now < self._next_poll or self._seen is None:
            return
        self._next_poll = now + self._poll_interval
        fresh = [w for w in self._node.worker_pids() if w not in self._seen]
        if fresh:
            self._seen.update(fresh)
            self._hold(fresh)

    def _release(self, drained: bool) -> None:
        for w in list(self._inflight):
            self._drop(w)
        if self.pool is not None:
            for w in self._unreachable:
                self.pool.put(w)
        self.calls.release(drained)

    # -- calls --------------------------------------------------------------------------

    def _budget(self) -> float | None:
        """How long a batch may run on its worker before it ends early: until elements
        have been timed, `batch_size="auto"` batches carry `AUTO_BATCH_SECONDS`."""
        if self.sizing is not None and self.sizing.seconds is None:
            return AUTO_BATCH_SECONDS
        return None

    def _finish(self, call: Call) -> None:
        w, unit = call.peer, call.unit
        self._ncalls -= 1
        if w in self._inflight:
            self._inflight[w] -= 1
        value, is_error = call.outcome()
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
            # The results go to their slots: unpacked straight there when they came
            # packed (plain numbers, none failed), without a list of their own.
            ran = store_results(self.results, unit.start, value)
            if self.sizing is not None:
                self.sizing.observe(ran, seconds, call.reply_nbytes())
            self._adapt_depth(seconds)
            if ran < len(unit.args):  # cut short on its budget
                self._rests.append(Unit(unit.start + ran, unit.args[ran:], True))
            for i in failed:
                self._element_failed(unit.start + i, unit.args[i], value[i].exception(), w)
            self._tick(ran - len(failed))
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
        if work <= DEEPEST_WORK and self._depth == MAX_PIPELINE_DEPTH:
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
        tries = self._tries.setdefault(idx, Tries())
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


def try_take(pool: AbstractWorkerPool) -> int | None:
    """A free worker of `pool` now, or None."""
    if isinstance(pool, WorkerPool):
        return pool._try_take()
    if pool.isready():
        return pool.take()
    return None
