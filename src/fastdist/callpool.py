"""The threads that run calls: as many as there are calls in progress, reused when idle.

A call that blocks (on a channel, a fetch, a lock) must not stop a process from
serving others, as a Julia task would not; so the pool grows a thread whenever
none is idle, and threads that stay idle for a while exit. User code runs only
here, never on the I/O thread. Running calls are tracked so that `interrupt`
can raise KeyboardInterrupt in exactly those threads.
"""

from __future__ import annotations

import ctypes
import queue
import sys
import threading
import traceback
from collections.abc import Callable

# An idle thread exits after this long; a burst of blocked calls leaves no crowd behind.
IDLE_EXIT_SECONDS = 30.0


class CallPool:
    def __init__(self, name: str = "fastdist-call") -> None:
        self._name = name
        self._tasks: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._nthreads = 0
        self._running_user: dict[int, int] = {}  # thread ident -> depth of user calls
        self._closed = False

    def submit(self, task: Callable[[], object]) -> None:
        """Run `task()` on a pool thread; never blocks."""
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                spawn = False
            else:
                spawn = True
                self._nthreads += 1
        self._tasks.put(task)
        if spawn:
            threading.Thread(target=self._serve, name=f"{self._name}-{self._nthreads}",
                             daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                task = self._tasks.get(timeout=IDLE_EXIT_SECONDS)
            except queue.Empty:
                with self._lock:
                    # Exit only if an idle credit is left for us; else a submitter
                    # has claimed this thread and its task is on the queue.
                    if self._idle > 0:
                        self._idle -= 1
                        self._nthreads -= 1
                        return
                continue
            except KeyboardInterrupt:
                continue  # an interrupt that arrived just after a call finished
            if task is None:
                with self._lock:
                    self._nthreads -= 1
                return
            try:
                task()
            except BaseException:  # noqa: BLE001 - a task must never kill its thread
                try:
                    print("fastdist: uncaught error in a call thread:", file=sys.stderr)
                    traceback.print_exc()
                except BaseException:  # noqa: BLE001
                    pass
            with self._lock:
                self._idle += 1

    def run_user(self, fn: Callable[..., object], *args: object, **kwargs: object) -> object:
        """Call user code, marking this thread as interruptible while it runs."""
        ident = threading.get_ident()
        with self._lock:
            self._running_user[ident] = self._running_user.get(ident, 0) + 1
        try:
            return fn(*args, **kwargs)
        finally:
            with self._lock:
                depth = self._running_user.pop(ident) - 1
                if depth:
                    self._running_user[ident] = depth

    def interrupt(self) -> int:
        """Raise KeyboardInterrupt in every thread running user code; return how many."""
        with self._lock:
            idents = list(self._running_user)
            for ident in idents:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(ident), ctypes.py_object(KeyboardInterrupt))
        return len(idents)

    @property
    def nthreads(self) -> int:
        return self._nthreads
