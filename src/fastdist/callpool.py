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
from collections.abc import Callable, Hashable
from types import FrameType
from typing import Any, NoReturn

from fastdist._fastpath import _calls
from fastdist._fastpath._calls import CallsCore
from fastdist._fastpath._runqueue import Runner, RunQueue
from fastdist.signals import CALL_INTERRUPT, block_sigint, watch_sigint_arrivals

Task = Callable[[], object]

# An idle helper exits after this long; a burst of blocked calls leaves no crowd behind.
IDLE_EXIT_SECONDS = 30.0
# Without a primary (the master; a custom-transport worker) this many helpers start
# at once for work that finds none idle; beyond them the monitor decides.
MIN_THREADS = max(2, os.cpu_count() or 2)
# Queued work that has not moved for this long gets a thread of its own (the monitor);
# a primary whose current task has run this long counts as busy for long.
STALL_SECONDS = 0.005
# How long an idle primary waits in one poll before looking around again.
IDLE_POLL_SECONDS = 1.0
# How long an idle primary waits for the I/O thread to hand it the reading role.
TAKE_READER_SECONDS = 0.002


class CallPool(CallsCore):
    def __init__(self, name: str = "fastdist-call") -> None:
        self._name = name
        # Which runner runs which task, and who is woken for it (_fastpath/_runqueue.pyx).
        self.runq = RunQueue(self._arm_monitor, self._start_helper, _report_uncaught,
                             MIN_THREADS, STALL_SECONDS)
        self.submit: Callable[[Task], None] = self.runq.submit
        self.submit_serial: Callable[[Hashable, Task], None] = self.runq.submit_serial
        self.submit_calls: Callable[[list[tuple[Hashable | None, Task]]], None] = (
            self.runq.submit_calls)
        self._monitor = threading.Event()
        self._monitor_lock = threading.Lock()
        self._monitor_started = False
        # Which threads run user code, and how interrupts reach them: C fields
        # (_fastpath/_calls.pxd), kept by _calls.run_user and interrupt_calls.
        self.main_ident = threading.main_thread().ident or 0
        self.main_signal = 0  # the signal that interrupts the main thread's call
        self.main_pending = False  # an interrupt signalled to the main thread applies
        self.sigint_unhandled = False  # a SIGINT came; its handler has not run yet
        # The connection the idle primary reads (to pid 1), once there is one.
        self.fast_connection: Callable[[], Any] | None = None

    # submit(task): run `task()` on a runner thread, beside whatever else runs.
    # submit_serial(key, task): run it after the tasks submitted before it under
    # `key`, never beside one of them. submit_calls([(key or None, task), ...]): the
    # calls a thread read in one batch. None of them blocks (see RunQueue).

    def _flush_replies(self) -> None:
        """Write the replies queued on connections (before this runner idles)."""
        replies = self.runq.replies
        while replies:
            try:
                conn, _ = replies.popitem()
            except KeyError:
                return
            try:
                conn.flush()
            except ConnectionError:
                pass  # the caller is gone: nobody to answer

    # -- helpers ----------------------------------------------------------------------

    def _start_helper(self) -> None:
        threading.Thread(target=self._serve, name=f"{self._name}-{self.runq.nthreads}",
                         daemon=True).start()

    def _serve(self) -> None:
        block_sigint()
        wake = threading.Lock()
        wake.acquire()
        me = Runner(False, wake.release)
        runq = self.runq
        while True:
            runq.run_until_idle(me)  # returns with this thread on the idle list
            self._flush_replies()
            if wake.acquire(timeout=IDLE_EXIT_SECONDS):
                continue
            if runq.leave(me):
                return
            wake.acquire()  # woken just as the wait ended: take the wake-up

    # -- the primary: a worker's main thread --------------------------------------------

    def serve_forever(self) -> NoReturn:
        """Run calls on this thread (a worker's main thread) until the process ends.

        Idle, it reads the connection to pid 1 itself (spin, then block), so that a
        call costs no hand-off from the I/O thread; it gives the reading role back
        before it runs anything it read, so the I/O thread reads on while user
        code runs."""
        wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        me = Runner(True, lambda: os.eventfd_write(wakefd, 1))
        runq = self.runq
        runq.serve_as_primary(me)
        poller = select.poll()
        poller.register(wakefd, select.POLLIN)
        while True:
            runq.run_until_idle(me)  # returns with this thread marked idle
            self._flush_replies()
            try:
                self._idle_wait(wakefd, poller)
            except KeyboardInterrupt:
                pass  # an interrupt for a call that had ended (the handlers let it through)
            runq.awake(me)
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
                if not self.runq.nwaiting:
                    conn.poll_direct(IDLE_POLL_SECONDS, wakefd)
            finally:
                conn.end_direct()
            return
        if not self.runq.nwaiting:
            poller.poll(IDLE_POLL_SECONDS * 1000)

    # -- the monitor ------------------------------------------------------------------

    def _arm_monitor(self) -> None:
        """Wake the monitor (RunQueue set its armed flag): it watches the queue and
        the queued replies (see _watch); started on first use."""
        if not self._monitor_started:
            with self._monitor_lock:
                if not self._monitor_started:
                    self._monitor_started = True
                    threading.Thread(target=self._watch, name=f"{self._name}-monitor",
                                     daemon=True).start()
        self._monitor.set()

    def _watch(self) -> None:
        """Every STALL_SECONDS while armed: replies queued a whole round ago go out,
        a pending interrupt of the main thread is signalled again, and queued work
        that nobody took meanwhile gets a helper. It disarms only when none of these
        wait; `_calls.queue_reply` records a reply before it looks at the armed flag,
        and this clears its event before it looks for the last time, so nothing is
        left without a watcher."""
        block_sigint()
        runq = self.runq
        while True:
            self._monitor.wait()
            taken = runq.ntaken
            replies = list(runq.replies)
            time.sleep(STALL_SECONDS)
            for conn in replies:
                if runq.replies.pop(conn, None) is not None:
                    try:
                        conn.flush()
                    except ConnectionError:
                        pass
            if self.sigint_unhandled or (self.main_pending
                                         and self.main_ident in self.running_user):
                self._signal_main_again()
            runq.stalled(taken)
            self._monitor.clear()
            if not runq.try_disarm(self.main_pending or self.sigint_unhandled):
                self._monitor.set()

    # -- user code and interrupts -----------------------------------------------------

    # Call user code, marking this thread as interruptible while it runs: in C
    # (_fastpath/_calls.pyx), for every call a worker runs.
    run_user = _calls.run_user

    def interrupt(self) -> int:
        """Raise KeyboardInterrupt in every thread running user code; return how many."""
        n = _calls.interrupt_calls(self)
        if self.main_pending:
            self._keep_signalling_main()
        return n

    def _keep_signalling_main(self) -> None:
        """The monitor signals the main thread again until the handler has run (see
        _watch)."""
        self.runq.monitor_armed = True
        self._arm_monitor()

    def _signal_main_again(self) -> None:
        """A signal sent to the main thread has not reached its handler yet. It may
        have come just before the call entered a blocking system call (a sleep),
        which it then did not end: the monitor sends CALL_INTERRUPT every round until
        a handler runs (all that are pending run together) or the call ends."""
        signal.pthread_kill(self.main_ident, CALL_INTERRUPT)

    def install_sigint(self) -> None:
        """On a worker's main thread: `interrupt`'s CALL_INTERRUPT raises
        KeyboardInterrupt in the call running there, wherever it blocks; a SIGINT from
        outside (`kill -INT`) does so in every running call. The worker lives."""
        signal.signal(CALL_INTERRUPT, self.on_call_interrupt)
        signal.signal(signal.SIGINT, self.on_sigint)
        watch_sigint_arrivals(self._sigint_arrived)
        self.main_signal = CALL_INTERRUPT

    def _sigint_arrived(self) -> None:
        """(The SIGINT watcher's thread.) Make sure its handler runs, see
        watch_sigint_arrivals; a flag left set by a handler that ran first costs one
        spare CALL_INTERRUPT, whose handler clears it."""
        self.sigint_unhandled = True
        self._keep_signalling_main()

    def on_sigint(self, signum: int, frame: FrameType | None) -> None:
        """The SIGINT handler (main thread, between two bytecodes of whatever runs):
        from outside, it interrupts every running call."""
        self.sigint_unhandled = False
        self.main_pending = False
        _calls.interrupt_calls(self, True)  # the other threads' calls
        self._raise_in_main_call()

    def on_call_interrupt(self, signum: int, frame: FrameType | None) -> None:
        """The CALL_INTERRUPT handler: `interrupt` aimed at the main thread's call,
        unless that call has ended since (run_user then cleared main_pending)."""
        self.sigint_unhandled = False
        applies = self.main_pending
        self.main_pending = False
        if applies:
            self._raise_in_main_call()

    def _raise_in_main_call(self) -> None:
        main = self.main_ident
        if main not in self.running_user:
            return  # the call it was meant for has ended; nothing else is hit
        if main in self.shielded:
            self.deferred.add(main)  # dispatching others' frames: raised by unshield
            return
        raise KeyboardInterrupt

    def is_running_user(self) -> bool:
        return threading.get_ident() in self.running_user

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
        return self.runq.nthreads

    @property
    def nidle(self) -> int:
        """Helper threads waiting for work."""
        return self.runq.nidle


def _report_uncaught(exc: BaseException) -> None:
    try:
        print("fastdist: uncaught error in a call thread:", file=sys.stderr)
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    except BaseException:  # noqa: BLE001 - stderr gone: nothing more to do
        pass
