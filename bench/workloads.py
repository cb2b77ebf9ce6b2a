"""Functions the benchmark runs on workers.

They live in their own small module (no heavy imports at top level) so that
every system can ship them by reference: the runner puts this directory on
PYTHONPATH, which local workers of every peer inherit.
"""

import os
import socket

_ARRAYS = {}


def noop(*args):
    return None


def inc(x):
    return x + 1


def spin_for(seconds):
    """Compute (not sleep) for `seconds`: a call whose reply takes that long."""
    import time

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def getpid(*args):
    return os.getpid()


def nbytes_of(a):
    """W3 "to a worker": the worker receives the array and answers its size."""
    return int(a.nbytes)


def make_array(nbytes):
    """W3 "from a worker": answer an array of ``nbytes`` bytes (float64).

    The array is built once per worker process and size, then returned on
    every call: the figure measures moving it, not the worker's allocation
    and first touch of fresh memory (which would cost the same for every
    system and hide the transport). The master still receives a new array
    each time.
    """
    a = _ARRAYS.get(nbytes)
    if a is None:
        import numpy as np

        a = np.arange(nbytes // 8, dtype=np.float64)
        _ARRAYS[nbytes] = a
    return a


def norm(a):
    import numpy as np

    return float(np.linalg.norm(a))


def socket_barrier(path):
    """W6: report to the parent over a Unix socket, wait for its go-ahead.

    A worker blocked here cannot take another task, so n such tasks on a pool
    of n processes are answered by n distinct processes, and only once all n
    have started.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(300)
        s.connect(path)
        s.sendall(b"%d\n" % os.getpid())
        s.recv(1)
    finally:
        s.close()
    return os.getpid()


class Pinger:
    """W6 for ray: one actor per worker process."""

    def ping(self):
        return os.getpid()
