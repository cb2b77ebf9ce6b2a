# cython: freethreading_compatible = False
"""The call pool's run queue: which runner runs which task, and who is woken for it.

callpool.CallPool owns the threads (the worker's main thread, helpers, the
monitor) and what they do while idle; this decides. Work is a task (any
callable) in the ready queue, or a task in a serial lane, whose turn enters the
ready queue only while no task of the lane runs. The rules:

- The idle primary (a worker's main thread) is woken first for new work, and
  helpers take work only while it has been on its current task for `stall_ns`
  (or there is no primary): calls then run on the main thread, where an
  interrupt reaches them in every blocking state, and short calls are not spread
  over threads that only fight over the GIL.
- Work left waiting while a runner takes a task arms the monitor, which starts
  or wakes a helper when nothing is taken for a round (`stalled`).

Each method runs start to end under the GIL and runs no Python code before its
state is consistent (a wake-up, which may, comes last): the GIL is the lock. A
task per call made this worth C: the Python version of `run_until_idle` cost a
worker ~0.5 us more per call than the runner loop it replaced.
"""

from collections import deque

from cpython.pythread cimport PyThread_get_thread_ident
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cdef inline long long _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1000000000LL + ts.tv_nsec


cdef class _Turn:
    """The ready queue's entry for a serial lane whose next task may start."""
    cdef readonly object key

    def __cinit__(self, key):
        self.key = key


cdef class Runner:
    """A thread that runs tasks."""

    def __cinit__(self, bint primary=False, wake=None):
        self.ident = PyThread_get_thread_ident()
        self.primary = primary
        self.wake = wake


cdef class RunQueue:
    """See the module's docstring; `arm`, `start_helper` and `report` are CallPool's."""

    def __cinit__(self, arm, start_helper, report, int min_threads, double stall_seconds):
        self.ready = deque()
        self.lanes = {}
        self.lanes_running = set()
        self.idle = []
        self.replies = {}
        self.primary = None
        self.arm = arm
        self.start_helper = start_helper
        self.report = report
        self.min_threads = min_threads
        self.stall_ns = <long long>(stall_seconds * 1e9)

    # -- handing work over ----------------------------------------------------------

    def submit(self, task):
        """Queue `task` to run beside whatever else runs."""
        self.ready.append(task)
        self.nwaiting += 1
        wake = self._dispatch()
        if wake is not None:
            wake()

    def submit_serial(self, key, task):
        """Queue `task` after the tasks submitted before it under `key`."""
        self._add_serial(key, task)
        wake = self._dispatch()
        if wake is not None:
            wake()

    def submit_calls(self, list calls):
        """The calls one thread read in a batch: (serial lane key or None, task)."""
        for key, task in calls:
            if key is None:
                self.ready.append(task)
                self.nwaiting += 1
            else:
                self._add_serial(key, task)
        wake = self._dispatch()
        if wake is not None:
            wake()

    cdef _add_serial(self, key, task):
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = deque()
        lane.append(task)
        self.nwaiting += 1
        # Its turn is queued once: when the lane has work and nothing of it runs.
        if len(lane) == 1 and key not in self.lanes_running:
            self.ready.append(_Turn(key))

    cdef object _dispatch(self):
        """Who looks at the work just queued: the wake-up to call, or None."""
        if not self.ready:
            return None
        cdef Runner p = self.primary
        cdef Runner helper
        if p is not None and p.idle:
            if p.woken or p.ident == PyThread_get_thread_ident():
                return None  # it looks at the queue before it waits again
            p.woken = True
            return p.wake
        if self._busy_long(_now_ns()) and self.idle:
            helper = self.idle.pop()
            helper.idle = False
            return helper.wake
        if p is None and self.nthreads < self.min_threads:
            self.nthreads += 1
            return self.start_helper
        if not self.monitor_armed:
            self.monitor_armed = True
            return self.arm
        return None

    cdef bint _busy_long(self, long long now):
        cdef Runner p = self.primary
        return p is None or (not p.idle and now - p.since_ns > self.stall_ns)

    # -- running work ---------------------------------------------------------------

    cdef object _take(self, Runner runner):
        """(task, lane key or None) for `runner`, or None having marked it idle."""
        cdef long long now = _now_ns()
        cdef _Turn turn
        if self.ready and (runner.primary or self._busy_long(now)):
            entry = self.ready.popleft()
            self.ntaken += 1
            self.nwaiting -= 1
            runner.since_ns = now
            if type(entry) is _Turn:
                turn = <_Turn>entry
                self.lanes_running.add(turn.key)
                item = ((<object>self.lanes[turn.key]).popleft(), turn.key)
            else:
                item = (entry, None)
            if self.ready and not self.monitor_armed:
                # What is left waits for this runner, which may block in what it took.
                self.monitor_armed = True
                self.arm()
            return item
        runner.idle = True
        if runner.primary:
            runner.woken = False
        else:
            self.idle.append(runner)
        return None

    cdef object _lane_next(self, Runner runner, key):
        """After a task of lane `key` ran on `runner`: the lane's next task for it, or
        None (the lane is empty, or goes on on the primary, which is free)."""
        lane = self.lanes[key]
        if not lane:
            del self.lanes[key]
            self.lanes_running.discard(key)
            return None
        cdef long long now = _now_ns()
        if not runner.primary and not self._busy_long(now):
            self.lanes_running.discard(key)
            self.ready.appendleft(_Turn(key))
            wake = self._dispatch()
            if wake is not None:
                wake()
            return None
        self.nwaiting -= 1
        self.ntaken += 1
        runner.since_ns = now
        return lane.popleft()

    def run_until_idle(self, Runner runner):
        """Run what `runner` may take until there is nothing; it is then marked idle
        (a helper on the idle list). A task's uncaught exception goes to `report`."""
        cdef object item, task, key
        while True:
            item = self._take(runner)
            if item is None:
                return
            task, key = item
            item = None
            while True:
                try:
                    task()
                except BaseException as exc:  # a task must never kill its runner
                    self.report(exc)
                # Nothing of the task stays alive while this thread idles.
                task = None
                if key is None:
                    break
                task = self._lane_next(runner, key)
                if task is None:
                    break

    # -- runners going and coming ----------------------------------------------------

    def serve_as_primary(self, Runner runner):
        """`runner` (a worker's main thread) is the primary from now on."""
        self.primary = runner

    def awake(self, Runner runner):
        """The primary is back from its idle wait."""
        runner.idle = False

    def leave(self, Runner helper):
        """A helper idle for IDLE_EXIT_SECONDS asks to end: True if it may (nothing was
        handed to it meanwhile), and it is no longer counted."""
        if helper in self.idle:
            self.idle.remove(helper)
            self.nthreads -= 1
            return True
        return False

    # -- the monitor -----------------------------------------------------------------

    def stalled(self, Py_ssize_t taken_mark):
        """The monitor's round: work is queued, nothing was taken since `taken_mark`,
        and helpers may take it: wake one, or start another."""
        cdef Runner helper
        if not self.ready or self.ntaken != taken_mark or not self._busy_long(_now_ns()):
            return
        if self.idle:
            helper = self.idle.pop()
            helper.idle = False
            helper.wake()
        else:
            self.nthreads += 1
            self.start_helper()

    def try_disarm(self, bint keep):
        """Disarm the monitor unless work or replies wait, or `keep`; True if disarmed.
        The monitor clears its event first: who arms after this sees the flag clear."""
        if self.ready or self.replies or keep:
            return False
        self.monitor_armed = False
        return True

    # -- observability ---------------------------------------------------------------

    @property
    def nidle(self):
        """Helpers waiting for work."""
        return len(self.idle)

    def busy_long(self):
        """Whether helpers may take work now (see the module's docstring)."""
        return self._busy_long(_now_ns())
