"""The threads that run calls, and the rules that keep a process live whatever its calls do.

Threads of a process and what each may do (docs/ARCHITECTURE.md, "Threading model"):

- The I/O thread reads every connection nobody else is reading and routes frames;
  it never runs user code, so calls, results, puts, heartbeats and interrupts are
  served whatever the calls do.
- Runners run calls and other tasks: on a worker, its main thread (the *primary*:
  `serve_forever`), and *helpers*, started when work waits and no runner is free,
  ended after `IDLE_EXIT_SECONDS` idle. An idle primary may read the connection to
  pid 1 itself (no hand-off from the I/O thread for a call), but gives the
  reading role back before it runs what it read.
- The monitor starts (or wakes) a helper when queued work has not moved for
  `STALL_SECONDS` — a call blocked on a later one, or running long, never holds up
  the calls behind it — and writes replies a stuck runner had queued.

Plain calls run concurrently, each a task of its own. A pool's calls
(FLAG_SERIAL) go to the caller's serial lane: one at a time, in order, as
Julia's pool gives a worker one call at a time. Running calls are tracked so
that `interrupt` raises KeyboardInterrupt in exactly those threads (see
_calls.interrupt_calls).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from types import FrameType
from typing import Any, NoReturn

from fastdist._core import _calls

Task = Callable[[], object]

# An idle helper exits after this long; a burst of blocked calls leaves no crowd behind.
IDLE_EXIT_SECONDS = 30.0
# Without a primary (the master; a custom-transport worker) this many helpers start
# at once for work that finds none idle; beyond them the monitor decides.
MIN_THREADS = max(2, os.cpu_count() or 2)
# Queued work that has not moved for this long gets a thread of its own (the monitor);
# a runner whose current task has run this long counts as busy for long (submit).
STALL_SECONDS = 0.005
# How long an idle primary waits in one poll before looking around again.
IDLE_POLL_SECONDS = 1.0
# How long an idle primary waits for the I/O thread to hand it the reading role.
TAKE_READER_SECONDS = 0.002


class _Turn:
    """The ready queue's entry for a serial lane whose next task may start."""

    __slots__ = ("key",)

    def __init__(self, key: Hashable) -> None:
        self.key = key


class _Runner:
    """What the pool knows of one runner thread."""

    __slots__ = ("ident", "idle", "since", "wake", "woken")

    def __init__(self) -> None:
        self.ident = threading.get_ident()
        self.idle = False
        self.woken = False  # told to look at the queue since it went idle
        self.since = 0.0  # when its current task started
        # A helper sleeps on this lock (held = asleep); the primary polls an eventfd.
        self.wake: Any = None


class CallPool:
    def __init__(self, name: str = "fastdist-call") -> None:
        self._name = name
        self._lock = threading.Lock()
        # Work that may start now: tasks, and the turns of serial lanes, in arrival order.
        self._ready: deque[Task | _Turn] = deque()
        self._lanes: dict[Hashable, deque[Task]] = {}  # key -> tasks waiting in it
        self._lanes_running: set[Hashable] = set()  # lanes with a task running
        self._nwaiting = 0  # tasks queued, in _ready or in a lane (read by _calls)
        self._ntaken = 0  # tasks taken so far: the monitor's sign that work moves
        self._idle: list[_Runner] = []  # idle helpers, the most recent last
        self._nthreads = 0  # helpers
        self._primary: _Runner | None = None
        # Connections with replies queued behind the calls that waited (_calls.queue_reply).
        self._replies: dict[Any, bool] = {}
        self._monitor_armed = False
        self._monitor = threading.Event()
        self._monitor_started = False
        # Threads running user code (ident -> depth), and interrupts held back from
        # those dispatching frames for others: see _calls.run_user / interrupt_calls.
        self._running_user: dict[int, int] = {}
        self._shielded: set[int] = set()
        self._deferred: set[int] = set()
        self._main_ident = threading.main_thread().ident or 0
        self._signal_main = False  # on_sigint is the main thread's SIGINT handler
        self._main_pending = False  # an interrupt signalled to the main thread applies
        self._signals_sent = 0  # SIGINTs sent to the main thread, not yet handled
        self._last_signal = 0.0  # when the last of them was sent (monotonic)
        # The connection the idle primary reads (to pid 1), once there is one.
        self.fast_connection: Callable[[], Any] | None = None

    # -- handing work over ------------------------------------------------------------

    def submit(self, task: Task) -> None:
        """Run `task()` on a runner thread, beside whatever else runs; never blocks."""
        with self._lock:
            self._ready.append(task)
            self._nwaiting += 1
            wake = self._dispatch_locked()
        if wake is not None:
            wake()

    def submit_serial(self, key: Hashable, task: Task) -> None:
        """Run `task()` after the tasks submitted before it under `key`, never beside
        one of them; never blocks."""
        with self._lock:
            self._add_serial(key, task)
            wake = self._dispatch_locked()
        if wake is not None:
            wake()

    def submit_calls(self, calls: Iterable[tuple[Hashable | None, Task]]) -> None:
        """The calls a thread read in one batch: (serial lane key or None, task)."""
        with self._lock:
            for key, task in calls:
                if key is None:
                    self._ready.append(task)
                    self._nwaiting += 1
                else:
                    self._add_serial(key, task)
            wake = self._dispatch_locked()
        if wake is not None:
            wake()

    def _add_serial(self, key: Hashable, task: Task) -> None:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = deque()
        lane.append(task)
        self._nwaiting += 1
        # Its turn is queued once: when the lane has work and nothing of it runs.
        if len(lane) == 1 and key not in self._lanes_running:
            self._ready.append(_Turn(key))

    def _dispatch_locked(self) -> Callable[[], None] | None:
        """After work was queued: who looks at it (returned: the wake-up to do once the
        lock is let go). The idle primary first (it runs calls where an interrupt
        reaches every blocking state); else an idle helper if the runners are busy
        for long, or there is no primary; else the monitor watches the queue."""
        if not self._ready:
            return None
        p = self._primary
        me = threading.get_ident()
        if p is not None and p.idle:
            if p.woken or p.ident == me:
                return None  # it looks at the queue before it waits again
            p.woken = True
            return p.wake  # type: ignore[no-any-return]
        busy_long = self._busy_long()
        if busy_long and self._idle:
            helper = self._idle.pop()
            helper.idle = False
            return helper.wake.release  # type: ignore[no-any-return]
        if p is None and self._nthreads < MIN_THREADS:
            self._nthreads += 1
            return self._start_helper
        self._arm_monitor_locked()
        return None

    # -- running work -----------------------------------------------------------------

    def _busy_long(self) -> bool:
        """Whether helpers may run work: there is no primary, or it has been on its
        current task for STALL_SECONDS. While the primary is idle or has just
        started, work is left to it: calls then run on the main thread, where an
        interrupt reaches them in every blocking state, and short calls do not
        spread over threads that would only fight over the GIL."""
        p = self._primary
        return p is None or (not p.idle and time.monotonic() - p.since > STALL_SECONDS)

    def _take_locked(self, runner: _Runner) -> tuple[Task | None, Hashable | None]:
        if self._ready and (runner is self._primary or self._busy_long()):
            entry = self._ready.popleft()
            self._ntaken += 1
            self._nwaiting -= 1
            if self._ready and not self._monitor_armed:
                # What is left waits for this runner, which may block in what it took.
                self._arm_monitor_locked()
            if type(entry) is _Turn:
                key = entry.key
                self._lanes_running.add(key)
                return self._lanes[key].popleft(), key
            return entry, None  # type: ignore[return-value]
        return None, None

    def _run(self, runner: _Runner, task: Task, key: Hashable | None) -> None:
        """Run `task`, and after it its serial lane's next tasks, on this thread (a
        helper hands the lane back to the queue once the primary is free)."""
        while True:
            try:
                task()
            except BaseException:  # noqa: BLE001 - a task must never kill its runner
                try:
                    print("fastdist: uncaught error in a call thread:", file=sys.stderr)
                    traceback.print_exc()
                except BaseException:  # noqa: BLE001
                    pass
            # Nothing of the task stays alive while this thread idles (its arguments
            # and result may be large).
            task = None  # type: ignore[assignment]
            if key is None:
                return
            wake = None
            with self._lock:
                lane = self._lanes[key]
                if not lane:
                    del self._lanes[key]
                    self._lanes_running.discard(key)
                    return
                if runner is not self._primary and not self._busy_long():
                    # The primary is free: the lane goes on there (see _busy_long).
                    self._lanes_running.discard(key)
                    self._ready.appendleft(_Turn(key))
                    wake = self._dispatch_locked()
                else:
                    task = lane.popleft()
                    self._nwaiting -= 1
                    self._ntaken += 1
                    runner.since = time.monotonic()
            if task is None:
                if wake is not None:
                    wake()
                return

    def _flush_replies(self) -> None:
        """Write the replies queued on connections (before this runner idles)."""
        while self._replies:
            try:
                conn, _ = self._replies.popitem()
            except KeyError:
                return
            try:
                conn.flush()
            except ConnectionError:
                pass  # the caller is gone: nobody to answer

    # -- helpers ----------------------------------------------------------------------

    def _start_helper(self) -> None:
        threading.Thread(target=self._serve, name=f"{self._name}-{self._nthreads}",
                         daemon=True).start()

    def _serve(self) -> None:
        _block_sigint()
        me = _Runner()
        me.wake = threading.Lock()
        me.wake.acquire()
        while True:
            with self._lock:
                task, key = self._take_locked(me)
                if task is None:
                    me.idle = True
                    self._idle.append(me)
                else:
                    me.since = time.monotonic()
            if task is not None:
                self._run(me, task, key)
                continue
            self._flush_replies()
            if me.wake.acquire(timeout=IDLE_EXIT_SECONDS):
                continue
            with self._lock:
                if me in self._idle:
                    # Leave only when nothing was handed to us meanwhile.
                    self._idle.remove(me)
                    self._nthreads -= 1
                    return
            me.wake.acquire()  # woken just as the wait ended: take the wake-up

    # -- the primary: a worker's main thread --------------------------------------------

    def serve_forever(self) -> NoReturn:
        """Run calls on this thread (a worker's main thread) until the process ends.

        Idle, it reads the connection to pid 1 itself (spin, then block), so that a
        call costs no hand-off from the I/O thread; it gives the reading role back
        before it runs anything it read, so the I/O thread reads on while user
        code runs."""
        me = _Runner()
        wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        me.wake = lambda: os.eventfd_write(wakefd, 1)
        self._primary = me
        poller = select.poll()
        poller.register(wakefd, select.POLLIN)
        while True:
            with self._lock:
                task, key = self._take_locked(me)
                if task is None:
                    me.idle, me.woken = True, False
                else:
                    me.since = time.monotonic()
            if task is not None:
                self._run(me, task, key)
                continue
            self._flush_replies()
            try:
                self._idle_wait(wakefd, poller)
            except KeyboardInterrupt:
                pass  # a SIGINT for a call that had ended (on_sigint lets it through)
            with self._lock:
                me.idle = False
            try:
                os.eventfd_read(wakefd)
            except BlockingIOError:
                pass

    def _idle_wait(self, wakefd: int, poller: select.poll) -> None:
        """Wait for work: reading the connection to pid 1 if this thread can become
        its reader, else on the wake-up fd alone."""
        get = self.fast_connection
        conn = get() if get is not None else None
        if conn is not None and not conn.is_closed and conn.begin_direct(TAKE_READER_SECONDS):
            try:
                if not self._ready:
                    conn.poll_direct(IDLE_POLL_SECONDS, wakefd)
            finally:
                conn.end_direct()
            return
        if not self._ready:
            poller.poll(IDLE_POLL_SECONDS * 1000)

    # -- the monitor ------------------------------------------------------------------

    def _arm_monitor(self) -> None:
        """Have the monitor watch the queue and the queued replies (see _watch)."""
        with self._lock:
            self._arm_monitor_locked()

    def _arm_monitor_locked(self) -> None:
        if not self._monitor_started:
            self._monitor_started = True
            threading.Thread(target=self._watch, name=f"{self._name}-monitor",
                             daemon=True).start()
        if not self._monitor_armed:
            self._monitor_armed = True
            self._monitor.set()

    def _watch(self) -> None:
        """Every STALL_SECONDS while armed: replies queued a whole round ago go out,
        and queued work that nobody took meanwhile gets a helper. Disarms only when
        there is neither; `_calls.queue_reply` records a reply before it looks at
        the armed flag, and this clears the flag before it looks for the last time,
        so no reply is left without a watcher."""
        _block_sigint()
        while True:
            self._monitor.wait()
            taken = self._ntaken
            replies = list(self._replies)
            time.sleep(STALL_SECONDS)
            for conn in replies:
                if self._replies.pop(conn, None) is not None:
                    try:
                        conn.flush()
                    except ConnectionError:
                        pass
            if self._main_pending and self._main_ident in self._running_user:
                self._signal_main_again()
            wake = None
            with self._lock:
                if self._ready and self._ntaken == taken and self._busy_long():
                    if self._idle:
                        helper = self._idle.pop()
                        helper.idle = False
                        wake = helper.wake.release
                    else:
                        self._nthreads += 1
                        wake = self._start_helper
                if not self._ready and not self._replies and not self._main_pending:
                    self._monitor_armed = False
                    self._monitor.clear()
                    if self._replies:
                        self._monitor_armed = True
                        self._monitor.set()
            if wake is not None:
                wake()

    # -- user code and interrupts -----------------------------------------------------

    # Call user code, marking this thread as interruptible while it runs: in C
    # (_core/_calls.pyx), for every call a worker runs.
    run_user = _calls.run_user

    def interrupt(self) -> int:
        """Raise KeyboardInterrupt in every thread running user code; return how many."""
        n = _calls.interrupt_calls(self)
        if self._main_pending:
            self._last_signal = time.monotonic()
            self._arm_monitor()  # it signals again until the call takes it (see _watch)
        return n

    def _signal_main_again(self) -> None:
        """The SIGINT sent to the main thread has not reached its call yet. It may have
        come just before the call entered a blocking system call (a sleep), which it
        then did not end: the monitor sends another every round until the handler
        runs or the call ends."""
        self._signals_sent += 1
        self._last_signal = time.monotonic()
        signal.pthread_kill(self._main_ident, signal.SIGINT)

    def install_sigint(self) -> None:
        """On a worker's main thread: SIGINT (`interrupt`'s own, or `kill -INT`)
        raises KeyboardInterrupt in the call running there, wherever it blocks, and
        an outside one interrupts the other running calls too. The worker lives."""
        signal.signal(signal.SIGINT, self.on_sigint)
        self._signal_main = True

    def on_sigint(self, signum: int, frame: FrameType | None) -> None:
        """The SIGINT handler (main thread, between two bytecodes of whatever runs)."""
        # (Signals coalesce: one handled now may stand for several sent, and one sent
        # again by the monitor may come just after; neither is from outside.)
        ours = self._signals_sent > 0 or time.monotonic() - self._last_signal < 0.5
        self._signals_sent = 0
        applies = self._main_pending
        self._main_pending = False
        if not ours:
            _calls.interrupt_calls(self, True)  # from outside: every running call
            applies = True
        main = self._main_ident
        if not applies or main not in self._running_user:
            return  # the call it was meant for has ended; nothing else is hit
        if main in self._shielded:
            self._deferred.add(main)  # dispatching others' frames: raised by unshield
            return
        raise KeyboardInterrupt

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
        _calls.shield(self)

    def unshield(self) -> None:
        """Let interrupts through again, raising one that was held back."""
        _calls.unshield(self)

    @property
    def nthreads(self) -> int:
        """Helper threads (the primary not counted)."""
        return self._nthreads

    @property
    def nidle(self) -> int:
        """Helper threads waiting for work."""
        return len(self._idle)


def _block_sigint() -> None:
    """SIGINT is for the main thread: one taken by another would wake nobody there."""
    if threading.current_thread() is not threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
