"""A warning, once, when calls send the same large data again and again.

Every call carries its arguments and the data its function captures: twenty
`remotecall_fetch(lambda i: table[i], p, i)` over an 80 MB `table` send 1.6 GB.
Nothing fails, it is only slow, so the user is told once (as dask does for large
task payloads) what sends it once instead. A large out-of-band buffer (an array,
large bytes) is known by its owner object; a large in-band pickle (a big list
captured by a closure), by its length. Calls below `LARGE_BYTES` cost one sum.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
import weakref
from collections import OrderedDict
from typing import Any

from fastdist.hostbuffers import HostStore

__all__ = ["LARGE_BYTES", "ResentDataWarning", "note_call"]

# A call at least this large is looked at; data this large sent twice is warned about.
LARGE_BYTES = 8 << 20
_REMEMBERED = 64  # large payloads remembered (the most recent)

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class ResentDataWarning(UserWarning):
    """The same large data went out with more than one call."""


_lock = threading.Lock()
_seen: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_warned = False


def note_call(body: Any, buffers: Any) -> None:
    """Look at a call about to be sent (its pickle and out-of-band buffers)."""
    if _warned:
        return
    nbytes = len(body)
    for b in buffers:
        nbytes += b.nbytes
    if nbytes < LARGE_BYTES:
        return
    repeated = 0
    with _lock:
        if len(body) >= LARGE_BYTES and _remember(("pickle", len(body)), None):
            repeated += len(body)
        for b in buffers:
            owner = b.obj
            while isinstance(owner, memoryview):  # a pickle inside the pickle (CachingPool)
                owner = owner.obj
            if HostStore.eligible(b, LARGE_BYTES):
                continue  # read-only: stored once per host, not sent again (hostbuffers.py)
            if b.nbytes >= LARGE_BYTES and _remember(("buffer", id(owner), b.nbytes), owner):
                repeated += b.nbytes
    if repeated:
        _warn(repeated)


def _remember(key: tuple[Any, ...], owner: Any) -> bool:
    """Record `key`; True if it was there already (and is still the same object)."""
    ref = None
    if owner is not None:
        try:
            ref = weakref.ref(owner)
        except TypeError:  # bytes: no weak references; the id and size must do
            ref = None
    before = _seen.pop(key, _MISSING)
    _seen[key] = ref
    while len(_seen) > _REMEMBERED:
        _seen.popitem(last=False)
    if before is _MISSING:
        return False
    # A weakly referenced owner that died left its id to another object.
    return before is None or before() is owner


_MISSING = object()


def _warn(nbytes: int) -> None:
    global _warned
    _warned = True
    message = (
        f"fastdist: a call sent {nbytes / 1e6:.1f} MB that an earlier call had sent "
        "already (an argument, or data its function captures): every call carries its "
        "own copy. Send it once instead: fd.pmap or a call on fd.CachingPool(...) sends a "
        "function, and what it captures, once per worker; fd.SharedArray(...) keeps an "
        "array in shared memory once per host, and passes as a handle. (Shown once.)")
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    warnings.warn_explicit(message, ResentDataWarning, frame.f_code.co_filename,
                           frame.f_lineno, module=frame.f_globals.get("__name__"),
                           registry=frame.f_globals.setdefault("__warningregistry__", {}))
