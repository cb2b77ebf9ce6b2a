"""Which thread takes SIGINT: the main thread, always.

Python runs signal handlers on the main thread only. A SIGINT the kernel hands to
another thread sets Python's flag but ends no sleep or wait of the main thread,
so Ctrl-C on the master, or `interrupt` of a worker's call, would wait for the main
thread's next bytecode. Every thread fastdist starts leaves it to the main thread.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# The signal by which fastdist interrupts a call on a worker's main thread (`interrupt`).
# Not SIGINT: a SIGINT is then always from outside (`kill -INT`, a terminal), which
# interrupts every running call, and no guess by timing tells the two apart.
CALL_INTERRUPT = signal.SIGRTMIN + 2


@contextmanager
def sigint_absorbed() -> Iterator[None]:
    """On the main thread: a Ctrl-C during the block does nothing.

    For the clean-up after a first Ctrl-C: a second one (impatience, or a terminal
    that signals twice) would break it off and stack a second traceback on the first;
    the interrupt being handled already stands for both. Elsewhere a no-op (signal
    handlers run on the main thread only).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def block_sigint() -> None:
    """On a thread other than the main one: leave SIGINT to the main thread."""
    if threading.current_thread() is not threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def watch_sigint_arrivals(on_arrival: Callable[[], None]) -> None:
    """On the main thread: call `on_arrival()` (on a thread of its own) for every
    SIGINT the process receives, as the kernel delivers it.

    A SIGINT that comes just before the main thread enters a blocking system call (a
    sleep, a wait on a socket) trips Python's flag but ends nothing: its handler would
    run only when that call returns, maybe never. Python writes each signal's number
    to the wake-up fd from its C handler, so this learns of the SIGINT even then, and
    `on_arrival` can make sure the handler runs (by signalling the main thread again).
    """
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def watch() -> None:
        block_sigint()
        poller = select.poll()
        poller.register(read_end, select.POLLIN)
        while True:
            poller.poll()
            try:
                numbers = os.read(read_end, 512)
            except BlockingIOError:
                continue
            if signal.SIGINT in numbers:
                on_arrival()

    threading.Thread(target=watch, name="fastdist-sigint-watch", daemon=True).start()
