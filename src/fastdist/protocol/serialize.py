"""Pickle protocol 5 with out-of-band buffers, and cloudpickle for what plain pickle can't.

`dumps` returns the pickle stream and a list of raw buffers: the memory of numpy
arrays, bytearrays, large bytes and memoryviews, never copied into the stream;
the transport writes them with one gathered `sendmsg` and the receiver hands
its receive allocations back to `loads`, so an array arrives in the memory the
kernel wrote. Functions and classes pickle by reference when importable and by
value (cloudpickle) when defined in `__main__`, locally or as lambdas.
"""

from __future__ import annotations

import io
import pickle
import threading
from typing import Any

import cloudpickle

# Below this a buffer travels inside the pickle stream: one more iovec and a
# separate receive allocation cost more than copying a few KiB.
OOB_THRESHOLD = 64 * 1024

_context = threading.local()


class SerializationError(TypeError):
    """A value could not be pickled (sending) or unpickled (receiving)."""


def current_destination() -> int | None:
    """The pid the object being pickled on this thread is going to (None if unknown).

    References (Futures, RemoteChannels) consult it to register the receiver as a
    client with their owner before they travel.
    """
    return getattr(_context, "dest", None)


def _memoryview_from(buf: Any) -> memoryview:
    return memoryview(buf)


class _Pickler(cloudpickle.CloudPickler):
    """cloudpickle's Pickler, with large bytes and memoryviews sent out of band too."""

    def reducer_override(self, obj: Any) -> Any:
        t = type(obj)
        if t is bytes and len(obj) >= OOB_THRESHOLD:
            return bytes, (pickle.PickleBuffer(obj),)
        if t is memoryview:
            if obj.contiguous:
                return _memoryview_from, (pickle.PickleBuffer(obj),)
            return _memoryview_from, (obj.tobytes(),)
        return super().reducer_override(obj)


def dumps(obj: Any, dest: int | None = None, what: str = "value") -> tuple[bytes, list[memoryview]]:
    """Pickle `obj` for process `dest`; return (stream, out-of-band buffers).

    Raises:
        SerializationError: `obj` (described as `what` in the message) cannot be pickled.
    """
    buffers: list[memoryview] = []

    def keep_out_of_band(pb: pickle.PickleBuffer) -> bool:
        raw = pb.raw()
        if raw.nbytes < OOB_THRESHOLD:
            return True
        buffers.append(raw)
        return False

    stream = io.BytesIO()
    previous = getattr(_context, "dest", None)
    _context.dest = dest
    try:
        _Pickler(stream, protocol=5, buffer_callback=keep_out_of_band).dump(obj)
    except Exception as exc:
        raise SerializationError(f"could not serialise the {what}: {type(exc).__name__}: {exc}") from exc
    finally:
        _context.dest = previous
    return stream.getvalue(), buffers


def loads(body: Any, buffers: Any = (), what: str = "value") -> Any:
    """Unpickle a stream and its out-of-band buffers (zero copy for arrays).

    Raises:
        SerializationError: the stream cannot be unpickled here (a missing module,
            a class this process does not have, a corrupt stream).
    """
    try:
        return pickle.loads(body, buffers=buffers)
    except Exception as exc:
        raise SerializationError(f"could not deserialise the {what}: {type(exc).__name__}: {exc}") from exc
