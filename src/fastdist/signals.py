"""Which thread takes SIGINT: the main thread, always.

Python runs signal handlers on the main thread only. A SIGINT the kernel hands to
another thread sets Python's flag but ends no sleep or wait of the main thread,
so Ctrl-C on the master, or `interrupt` of a worker's call, would wait for the main
thread's next bytecode. Every thread fastdist starts leaves it to the main thread.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


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
