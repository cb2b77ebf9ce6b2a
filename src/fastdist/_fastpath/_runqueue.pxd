# The C-level state of the call pool's run queue (see _runqueue.pyx and callpool.py).
#
# Every field is read and written only inside RunQueue's methods, each of which runs
# start to end under the GIL without running Python code in between (the wake-up it
# may call comes last): the GIL is the lock. "Owner" says which threads call in.


cdef class Runner:
    cdef readonly unsigned long ident  # the thread (threading.get_ident())
    cdef public bint idle           # waiting for work (the primary: polling; a helper: asleep)
    cdef public bint woken          # told to look at the queue since it went idle
    cdef long long since_ns         # when its current task started (monotonic ns)
    cdef public object wake         # callable that wakes it (eventfd write, lock release)
    cdef bint primary               # the worker's main thread


cdef class RunQueue:
    cdef object ready               # deque of tasks and _Turn entries that may start now (any thread)
    cdef dict lanes                 # serial lane key -> deque of its waiting tasks (any thread)
    cdef set lanes_running          # lanes with a task running (runners)
    cdef readonly Py_ssize_t nwaiting  # tasks queued, in ready or in a lane (read by _calls)
    cdef readonly Py_ssize_t ntaken # tasks started so far: the monitor's sign that work moves
    cdef list idle                  # idle helpers, the most recent last (runners, submitters)
    cdef readonly Runner primary    # the worker's main thread once it serves, else None
    cdef public dict replies        # connections with replies queued behind waiting calls (_calls)
    cdef public bint monitor_armed  # the monitor watches (cleared only by the monitor)
    cdef object arm                 # callable: start or wake the monitor (set by CallPool)
    cdef object start_helper        # callable: start one more helper thread (set by CallPool)
    cdef object report              # callable(exc): print a task's uncaught exception
    cdef readonly int nthreads      # helpers alive or starting
    cdef int min_threads            # without a primary, helpers started at once up to this
    cdef long long stall_ns         # STALL_SECONDS

    cdef _add_serial(self, key, task)
    cdef object _dispatch(self)
    cdef bint _busy_long(self, long long now)
    cdef object _take(self, Runner runner)
    cdef object _lane_next(self, Runner runner, key)
