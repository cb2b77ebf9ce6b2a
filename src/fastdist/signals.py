"""Which thread takes SIGINT: the main thread, always.

Python runs signal handlers on the main thread only. A SIGINT the kernel hands to
another thread sets Python's flag but ends no sleep or wait of the main thread,
so Ctrl-C on the master, or `interrupt` of a worker's call, would wait for the main
thread's next bytecode. Every thread fastdist starts leaves it to the main thread.
"""

from __future__ import annotations

import signal
import threading


def block_sigint() -> None:
    """On a thread other than the main one: leave SIGINT to the main thread."""
    if threading.current_thread() is not threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
