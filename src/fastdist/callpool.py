"""The threads that run calls: as many as there are calls in progress, reused when idle.

A call that blocks (on a channel, a fetch, a lock) must not stop a process from
serving others, as a Julia task would not; so the pool grows a thread whenever
none is idle, and threads that stay idle for a while exit. User code runs only
here, never on the I/O thread. Running calls are tracked so that `interrupt`
can raise KeyboardInterrupt in exactly those threads.
"""

from __future__ import annotations

import ctypes
import os
import queue
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from fastdist._core import _calls

_get_ident = threading.get_ident

# An idle thread exits after this long; a burst of blocked calls leaves no crowd behind.
IDLE_EXIT_SECONDS = 30.0
# Threads started without waiting; beyond this a queued call waits this long for a
# thread to come free before another is started (threads beyond the cores only add
# GIL contention when calls are short, which they mostly are).
MIN_THREADS = max(2, os.cpu_count() or 2)
STALL_SECONDS = 0.005


class CallPool:
    def __init__(self, name: str = "fastdist-call") -> None:
        self._name = name
        self._tasks: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting in get()
        self._queued = 0  # tasks put and not yet taken
        self._taken = 0  # tasks taken so far: the watchdog's sign that the pool progresses
        self._nthreads = 0
        self._running_user: dict[int, int] = {}  # thread ident -> depth of user calls
        # Threads running user code that are dispatching frames they read for others
        # (see shield), and the interrupts held back from them meanwhile.
        self._shielded: set[int] = set()
        self._deferred: set[int] = set()
        self._closed = False
        self._stall = threading.Event()
        threading.Thread(target=self._watch_stalls, name=f"{name}-watchdog", daemon=True).start()
        # At most one idle thread reads the busiest connection itself (see _fast_read).
        self.fast_connection: Callable[[], Any] | None = None
        self._fast_reader_active = False
        # The calls that thread read, and those that arrive on the same connection
        # while it runs them: run by it, in order (see submit_in_order).
        self._lane: deque[Callable[[], object]] = deque()
        # (The lane's state is read by _calls.queue_reply too: whether a reply may wait.)
        self._lane_conn: Any = None  # the connection whose calls join the lane; None: closed
        self._lane_started = 0  # lane tasks begun so far: the watchdog's sign of progress
        self._lane_thread = 0  # ident of the thread running the lane
        # The lane's thread is reading calls or writing replies: slow I/O is no stall.
        self._lane_io = False
        # The connection the lane's thread is still the reader of while it runs the
        # lane (None once given back); changed only under _reader_lock, which the
        # lane's thread holds while it reads, so the watchdog never takes the role
        # away in the middle of a read.
        self._lane_reads: Any = None
        self._reader_lock = threading.Lock()

    def submit(self, task: Callable[[], object]) -> None:
        """Run `task()` on a pool thread; never blocks.

        A waiting thread takes it if there is one; below MIN_THREADS a thread is
        started for it; otherwise it waits for a thread to come free, and the
        stall watchdog starts another if none does within STALL_SECONDS (a call
        blocked on a channel must not hold up the calls queued behind it).
        """
        with self._lock:
            self._queued += 1
            short = self._queued > self._idle
            spawn = short and self._nthreads < MIN_THREADS
            if spawn:
                self._nthreads += 1
        self._tasks.put(task)
        if spawn:
            self._start_thread()
        elif short:
            self._stall.set()

    def submit_in_order(self, conn: Any, task: Callable[[], object]) -> None:
        """Run a call read from `conn`: behind the calls the fast reader is running
        if they came from the same connection (one thread, no hand-off, no GIL
        contention), else as `submit`. A lane task that does not start within
        STALL_SECONDS (the one before it blocks, or runs long) goes to the pool,
        so a call waiting for a later one cannot hold it up."""
        if self._lane_conn is conn:
            self._lane.append(task)
            if not self._stall.is_set():
                self._stall.set()
            if self._lane_conn is conn:
                return
            self._spill_lane()  # the lane closed meanwhile: nobody would run it
            return
        self.submit(task)

    def flush_lane(self, conn: Any) -> None:
        """On the lane's thread: write the replies queued on `conn`. A write that
        waits (the caller is slow to read) is no stall: calls handed to other
        threads could not answer sooner, so the watchdog leaves the lane alone."""
        self._lane_io = True
        try:
            conn.flush()
        finally:
            self._lane_io = False

    def _spill_lane(self) -> None:
        """Hand the lane's waiting tasks to the pool (each is taken exactly once)."""
        while self._lane:
            try:
                task = self._lane.popleft()
            except IndexError:  # another thread emptied it meanwhile
                return
            self.submit(task)

    def _run_lane(self, conn: Any, tasks: list[Callable[[], object]],
                  take_calls: Callable[[Any, float], list[Callable[[], object]]]) -> bool:
        """On the fast reader, still `conn`'s reader: run `tasks`, and the calls read
        meanwhile, in order. When the lane runs dry it reads what has come since
        (without waiting) and goes on, so a stream of calls costs one read and one
        write per batch and no hand-off. A call that gets stuck loses the reader
        role to the loop thread (see _watch_stalls), and a call about to wait for a
        reply gives it up (see lend_reader). True if this thread is `conn`'s reader
        afterwards."""
        self._lane.extend(tasks)
        self._lane_thread = _get_ident()
        self._lane_conn = conn
        self._lane_reads = conn
        if not self._stall.is_set():
            self._stall.set()  # the watchdog looks after the ones waiting
        lane = self._lane
        try:
            while True:
                try:
                    task = lane.popleft()
                except IndexError:  # dry (or the watchdog handed the rest to the pool)
                    more = self._read_more(conn, take_calls)
                    if not more:
                        break
                    lane.extend(more)
                    continue
                self._lane_started += 1
                try:
                    task()
                except BaseException:  # noqa: BLE001 - never kill the thread
                    traceback.print_exc()
        finally:
            with self._reader_lock:
                regained = self._lane_reads is conn
                self._lane_reads = None
            self._lane_conn = None
            self._lane_thread = 0
            if lane:
                self._spill_lane()  # what joined after our last look
            _flush_queued(conn)
        return regained

    def _read_more(self, conn: Any,
                   take_calls: Callable[[Any, float], list[Callable[[], object]]]
                   ) -> list[Callable[[], object]]:
        """The calls that reached `conn` since the lane's last read, if this thread
        is still its reader; none if nothing came or the role was taken back."""
        with self._reader_lock:
            if self._lane_reads is not conn:
                return []
            # (Reading a large batch takes a while: thousands of frames to route.)
            self._lane_io = True
            try:
                return take_calls(conn, 0.0)
            finally:
                self._lane_io = False

    def lend_reader(self, conn: Any) -> None:
        """A call on the lane's thread is about to wait for a reply on `conn`: give
        the reader role back, so that the wait can read the reply (or the loop
        thread can) rather than nobody until the watchdog steps in."""
        if self._lane_reads is not conn or self._lane_thread != _get_ident():
            return
        with self._reader_lock:
            if self._lane_reads is not conn:
                return
            self._lane_reads = None
        conn.end_direct()

    def _take_back_reader(self) -> None:
        """The watchdog's half of lend_reader: the lane is stuck in a call, so the
        loop thread reads its connection again."""
        with self._reader_lock:
            conn, self._lane_reads = self._lane_reads, None
        if conn is not None:
            conn.end_direct()

    def _start_thread(self) -> None:
        threading.Thread(target=self._serve, name=f"{self._name}-{self._nthreads}",
                         daemon=True).start()

    def _watch_stalls(self) -> None:
        while True:
            self._stall.wait()
            lane_mark, taken_mark = self._lane_started, self._taken
            time.sleep(STALL_SECONDS)
            if self._lane_started == lane_mark and not self._lane_io:
                # The fast reader is stuck in a call: the rest go on, and the replies
                # it queued meanwhile go out.
                lane_conn = self._lane_conn
                self._lane_conn = None  # calls that come now go to the pool, not behind it
                self._take_back_reader()
                if self._lane:
                    self._spill_lane()
                if lane_conn is not None:
                    _flush_queued(lane_conn)
            with self._lock:
                if self._queued <= self._idle:
                    if not self._lane:
                        self._stall.clear()
                    continue
                if self._taken != taken_mark:
                    # A backlog of calls that are being taken is not a stall: another
                    # thread would only fight the busy ones for the GIL.
                    continue
                self._nthreads += 1
            self._start_thread()

    def _fast_read(self) -> None:
        """Serve the connection to pid 1 from this idle thread, running the calls read
        on it here, in order: a call then costs no hand-off from the I/O thread.

        Returns when this thread is no longer needed as the fast reader (the
        connection is gone or being read by someone else).
        """
        from fastdist.handlers import take_calls

        with self._lock:
            if self._fast_reader_active or self.fast_connection is None:
                return
            self._fast_reader_active = True
        busy = 0
        held = None  # the connection this thread is the reader of, if any
        try:
            while True:
                conn = self.fast_connection() if self.fast_connection is not None else None
                if conn is None or getattr(conn, "is_closed", True):
                    return
                if held is not conn:
                    # The I/O thread holds the connection for a moment (nearly always,
                    # under a stream of calls), or a user thread reads it for its own
                    # reply: wait for it a little, a few times.
                    if not conn.begin_direct(0.002):
                        busy += 1
                        if busy > 20:
                            return
                        continue
                    held = conn
                busy = 0
                tasks = take_calls(conn, 5.0)
                if not tasks:
                    continue
                # The lane holds the connection now and may lose it (see _run_lane).
                # This thread stays the one fast reader meanwhile: a second one would
                # run a lane of its own, and the two would take each other's state.
                held = conn if self._run_lane(conn, tasks, take_calls) else None
        finally:
            if held is not None:
                held.end_direct()
            with self._lock:
                self._fast_reader_active = False

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                task = self._tasks.get(timeout=IDLE_EXIT_SECONDS)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    # Leave only when the other waiting threads cover what is queued.
                    if self._queued <= self._idle:
                        self._nthreads -= 1
                        return
                continue
            except KeyboardInterrupt:
                with self._lock:
                    self._idle -= 1
                continue  # an interrupt that arrived just after a call finished
            with self._lock:
                self._idle -= 1
                self._queued -= 1
                self._taken += 1
            try:
                task()
            except BaseException:  # noqa: BLE001 - a task must never kill its thread
                try:
                    print("fastdist: uncaught error in a call thread:", file=sys.stderr)
                    traceback.print_exc()
                except BaseException:  # noqa: BLE001
                    pass
            # Idle now: first offer to be the fast reader (not counted as idle meanwhile).
            if self.fast_connection is not None and not self._fast_reader_active:
                try:
                    self._fast_read()
                except KeyboardInterrupt:
                    pass

    # Call user code, marking this thread as interruptible while it runs: in C
    # (_core/_calls.pyx), for every call a worker runs.
    run_user = _calls.run_user

    def interrupt(self) -> int:
        """Raise KeyboardInterrupt in every thread running user code; return how many."""
        with self._lock:
            idents = list(self._running_user)
            for ident in idents:
                if ident in self._shielded:
                    self._deferred.add(ident)
                else:
                    _raise_in(ident)
        return len(idents)

    def is_running_user(self) -> bool:
        return threading.get_ident() in self._running_user

    def shield(self) -> None:
        """Hold interrupts of this thread back until `unshield`.

        A call that waits for a reply may read its connection itself and dispatch
        every frame it finds, most of them other calls' (remotecall.py). A
        KeyboardInterrupt landing in that dispatch would drop those frames and
        hang their callers, so it waits until the dispatch is over. Call it inside
        the `try` whose `finally` calls `unshield`.
        """
        with self._lock:
            self._shielded.add(threading.get_ident())

    def unshield(self) -> None:
        """Let interrupts through again, raising one that was held back."""
        ident = threading.get_ident()
        with self._lock:
            self._shielded.discard(ident)
            if ident in self._deferred:
                self._deferred.discard(ident)
                if ident in self._running_user:
                    _raise_in(ident)

    @property
    def nthreads(self) -> int:
        return self._nthreads


def _flush_queued(conn: Any) -> None:
    """Write the replies a lane queued on `conn` (see _calls.queue_reply)."""
    if getattr(conn, "has_pending", False):
        try:
            conn.flush()
        except ConnectionError:
            pass  # the caller is gone: nobody to answer


def _raise_in(ident: int) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(KeyboardInterrupt))
