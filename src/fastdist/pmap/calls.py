"""How a map's calls reach its workers and their replies come back: the runtime
service the map's scheduling (engine.py) uses.

A call runs a unit (a batch, or one element) with the map's function, which goes
in every call as its pickle when it travels by name (a few dozen bytes, as
remotecall sends it), or once per worker through a cache (a CachingPool's, or one
for this map) and is named by its key afterwards. Either way each call is plain
data, so both sides take the small-call path. The calls of one refill go out in
one write per worker, by the calling thread; replies are read by that thread
itself while it waits (`next_done`), and each call in flight is its own entry in
the node's waiters (`Call`): no Waiter or callback per element. The calls carry
FLAG_SERIAL: a worker runs a map's calls one at a time, in the order sent.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from fastdist._core._msgloop import POLL_DIRECT_MANY_MAX, poll_direct_many
from fastdist._fastpath._calls import encode_plain_call, result_value
from fastdist._fastpath._packed import pack
from fastdist.exceptions import ProcessExitedException
from fastdist.node import Node
from fastdist.pmap.scheduling import Unit
from fastdist.pmap.worker import (
    _run_batch,
    _run_batch_keyed,
    _run_batch_named,
    _run_one,
    _run_one_keyed,
    _run_one_named,
    captured,
    run_elements,
)
from fastdist.protocol import serialize
from fastdist.protocol.messages import CALL_FETCH, FLAG_SERIAL
from fastdist.protocol.values import decode_result
from fastdist.refs import _EMPTY
from fastdist.requests import DEFER_MAX_NBYTES, encode_general_call
from fastdist.workerpool import AbstractWorkerPool, CachedFunction, CachingPool, FunctionCache

# After an interrupted pmap, how long its calls get to arrive before the workers
# are told to forget its function.
CLEAR_AFTER_ABORT_SECONDS = 30.0


class Call:
    """A call in flight: what it carries, where it went, and how it ended.

    It is also what `node.waiters` holds for the call: the thread that reads the
    reply calls `set` (or `fail`), which hands the call to the map's queue — no
    Waiter, lock or callback per element. Whoever pops it from `node.waiters`
    answers it, so it is answered once.
    """

    __slots__ = ("done", "error", "local", "lost", "peer", "raw", "unit", "wid")

    def __init__(self, unit: Unit, worker: int, done: queue.SimpleQueue[Call]) -> None:
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

    def outcome(self) -> tuple[Any, bool]:
        """(value, is_error): what the call produced, or why it failed."""
        if self.local is not None:
            return self.local
        if self.error is not None:
            return self.error, True
        value = result_value(self.raw)  # in C, most results
        if value is _EMPTY:
            return decode_result(*self.raw)
        return value, False

    def reply_nbytes(self) -> int:
        """The size of the reply (body and out-of-band buffers); 0 for a local run."""
        raw = self.raw
        return 0 if raw is None else frame_nbytes(raw[1], raw[2])


def _travelling(unit: Unit) -> Any:
    """A batch's elements as its call carries them: packed when they are plain
    numbers (a few ns an element each way, against ~27 for pickle)."""
    packed = pack(unit.args)
    return unit.args if packed is None else packed


def frame_nbytes(body: bytes, buffers: Any) -> int:
    """The size of a frame's body and its out-of-band buffers."""
    return len(body) + sum(memoryview(b).nbytes for b in buffers)


class MapCalls:
    """One map's calls to its workers (and to this process, when it is one of them)."""

    def __init__(self, n: Node, f: Callable[..., Any], pool: AbstractWorkerPool | None,
                 star: bool) -> None:
        self.n = n
        self.f = f
        self.star = star  # elements are tuples of arguments
        # A function that travels by name goes in every call as its pickle; any other
        # goes once per worker, through a cache: a CachingPool's, or one for this map.
        self.fname: bytes | None = None
        self.cache: FunctionCache | None = None
        self.own_cache = True
        if isinstance(pool, CachingPool) and not pool._remote():
            self.cache, self.own_cache = pool._cache, False
        elif serialize.travels_by_name(f):
            self.fname = serialize.function_pickle(f)
        if self.fname is None and self.cache is None:
            self.cache = FunctionCache()
        self.done: queue.SimpleQueue[Call] = queue.SimpleQueue()
        self._unflushed: dict[int, Any] = {}  # worker -> its connection, calls queued
        self._conns: dict[int, Any] = {}  # worker -> its connection, once queued on
        self._tokens: dict[int, CachedFunction] = {}  # worker -> the function's key there
        self._myid = n.myid
        self._ids = n.ids  # (Node.next_id, without its frame)
        # The elements this process runs itself go one at a time, as on a worker.
        self._lane = object()

    # -- sending ----------------------------------------------------------------------

    def send(self, w: int, unit: Unit, budget: float | None, at_once: bool) -> int:
        """Start a call of `unit` on worker `w`; its end comes through `done`.
        `at_once`: write it now (the worker has little to do) rather than with the
        refill (`flush`). Returns the bytes the call carries (0 if it never left)."""
        call = Call(unit, w, self.done)
        if w == self._myid:
            self.n.callpool.submit_serial(self._lane, lambda: self._run_here(call))
            return 0
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
                aux, body, buffers = self._encode_first(unit, first, w, budget)
            else:
                # A call of plain data (the function named by its pickle or its key):
                # plain elements make it encoded in C and run by the worker's
                # small-call path (_fastpath/_calls.pyx). (The first calls make the
                # runners known by name, as for remotecall.)
                runner, args = self._call_of(unit, token, budget)
                aux, body, buffers = (encode_plain_call(runner, args, {})
                                      or encode_general_call(runner, args, {}, w))
        except Exception as exc:  # noqa: BLE001 - a failure of these elements
            if first is not None:
                self._unsend(w)
            call.local = (exc, True)
            self.done.put(call)
            return 0
        call.wid = wid = next(self._ids)
        self.n.waiters[wid] = call
        try:
            if buffers or len(body) > DEFER_MAX_NBYTES:
                self.n.send(w, CALL_FETCH, FLAG_SERIAL, aux, self._myid, wid, body, buffers)
            else:
                self._queue(w, aux, wid, body, at_once)
        except Exception as exc:  # noqa: BLE001 - unreachable (gone, or the topology)
            if first is not None:
                self._unsend(w)
            call.lost = True
            if self.n.waiters.pop(wid, None) is not None:  # else failed by peer_lost
                call.fail(exc)
        return frame_nbytes(body, buffers)

    def _queue(self, w: int, aux: int, wid: int, body: bytes, at_once: bool) -> None:
        """Send a small call: the calls of one refill go out in one write per worker,
        by this thread at its end (`flush`) — but at once to a worker with little to
        do, which would otherwise wait for the whole refill to be encoded."""
        conn = self._conns.get(w)
        if conn is None:
            conn = self.n.send_queued(w, CALL_FETCH, FLAG_SERIAL, aux, self._myid, wid, body)
            self._conns[w] = conn
        else:
            try:
                conn.queue_frame(CALL_FETCH, FLAG_SERIAL, aux, self._myid, wid, body)
            except ConnectionError as exc:
                raise ProcessExitedException(w) from exc
        if at_once:
            self._unflushed.pop(w, None)
            try:
                conn.flush()
            except ConnectionError as exc:
                raise ProcessExitedException(w) from exc
        else:
            self._unflushed[w] = conn

    def flush(self) -> None:
        """Write the calls `send` queued."""
        while self._unflushed:
            _, conn = self._unflushed.popitem()
            try:
                conn.flush()
            except ConnectionError:
                pass  # closed: the node fails its calls (node.peer_lost)

    def _unsend(self, w: int) -> None:
        """The call bringing the function to `w` never left: the next one brings it."""
        if self.cache is not None:
            self.cache.unsend(self.f, w)

    def _call_of(self, unit: Unit, token: CachedFunction | None, budget: float | None
                 ) -> tuple[Any, tuple[Any, ...]]:
        """(runner, arguments) of the call that runs `unit` with a function the
        worker has: named by its pickle (no `token`) or by its cache key."""
        if not unit.batched:
            if token is None:
                return _run_one_named, (self.fname, unit.args[0], self.star)
            return _run_one_keyed, (token.owner, token.key, unit.args[0], self.star)
        batch = _travelling(unit)
        if token is None:
            return _run_batch_named, (self.fname, batch, self.star, budget)
        return _run_batch_keyed, (token.owner, token.key, batch, self.star, budget)

    def _encode_first(self, unit: Unit, token: CachedFunction, w: int, budget: float | None
                      ) -> tuple[int, bytes, Any]:
        """(aux, body, buffers) of the call that brings the function to worker `w`
        (inside `token`) and runs `unit`."""
        call: tuple[Any, tuple[Any, ...], dict[str, Any]] = (
            (_run_batch, (token, _travelling(unit), self.star, budget), {})
            if unit.batched else (_run_one, (token, unit.args[0], self.star), {}))
        body, buffers = serialize.dumps(call, dest=w, what="pmap call")
        return 0, body, buffers

    def _run_here(self, call: Call) -> None:
        """On a call thread of this process: a unit for the worker that is us."""
        unit, n = call.unit, self.n
        try:
            if unit.batched:
                call.local = (run_elements(self.f, unit.args, self.star, n), False)
            else:
                item = unit.args[0]
                start = time.perf_counter()
                value = (n.callpool.run_user(self.f, *item) if self.star
                         else n.callpool.run_user(self.f, item))
                call.local = ((time.perf_counter() - start, value), False)
        except BaseException as exc:  # noqa: BLE001 - handed to the engine
            call.local = (captured(n, exc), True)
        self.done.put(call)

    # -- receiving --------------------------------------------------------------------

    def next_done(self, timeout: float | None, inflight: dict[int, int]) -> Call | None:
        """The next call to end, waiting up to `timeout` s (None: no limit) for one;
        None if none ended meanwhile. `inflight`: worker -> calls in flight there."""
        try:
            return self.done.get_nowait()
        except queue.Empty:
            pass
        conns = self._read_directly(inflight)
        if conns is None:
            try:
                return self.done.get(timeout=timeout)
            except queue.Empty:
                return None
        try:
            # What the loop thread read before it let go is in the queue already.
            if self.done.empty():
                poll_direct_many(conns, -1.0 if timeout is None else timeout)
        finally:
            for conn in conns:
                conn.end_direct()
        try:
            return self.done.get_nowait()
        except queue.Empty:
            return None  # frames for others, or the timeout: the caller looks again

    def ended(self) -> Call | None:
        """A call that has ended, without waiting; None if there is none."""
        try:
            return self.done.get_nowait()
        except queue.Empty:
            return None

    def _read_directly(self, inflight: dict[int, int]) -> list[Any] | None:
        """Become the reader of the connections to the workers with calls in flight,
        so that their replies wake this thread rather than the loop thread, which
        would then have to wake it (two wake-ups and a hand-off per reply, most of
        the loop thread's time in a map of short batches). None, having taken
        nothing, when that cannot be: a call runs here, there are more of them than
        one poll takes (POLL_DIRECT_MANY_MAX), or one is not a socket, is gone, or
        is being read by another thread just now (its frames then come through the
        queue)."""
        if inflight.get(self._myid, 0):
            return None
        conns: list[Any] = []
        peers = self.n.peers
        for w, k in inflight.items():
            if not k:
                continue
            peer = peers.get(w)
            conn = peer.conn if peer is not None else None
            if (conn is None or len(conns) == POLL_DIRECT_MANY_MAX
                    or not conn.begin_direct(0.0)):
                for taken in conns:
                    taken.end_direct()
                return None
            conns.append(conn)
        return conns or None

    # -- the end ----------------------------------------------------------------------

    def release(self, drained: bool) -> None:
        """The map is over: workers forget a function sent for it alone (once its
        calls have had time to arrive, if it ended before they all came back)."""
        if not self.own_cache or self.cache is None:
            return
        if drained:
            self.cache.clear()
        else:
            timer = threading.Timer(CLEAR_AFTER_ABORT_SECONDS, self.cache.clear)
            timer.daemon = True
            timer.start()
