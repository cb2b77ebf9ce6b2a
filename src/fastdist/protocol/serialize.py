"""Pickle protocol 5 with out-of-band buffers, and cloudpickle for what plain pickle can't.

`dumps` returns the pickle stream and a list of raw buffers: the memory of numpy
arrays, bytearrays, large bytes and memoryviews, never copied into the stream;
the transport writes them with one gathered `sendmsg` and the receiver hands
its receive allocations back to `loads`, so an array arrives in the memory the
kernel wrote. Functions and classes pickle by reference when importable and by
value (cloudpickle) when defined in `__main__`, locally or as lambdas.
"""

from __future__ import annotations

import copyreg
import io
import pickle
import struct
import sys
import threading
import types
from collections.abc import Callable
from typing import Any, ClassVar

import cloudpickle

from fastdist._fastpath import _calls

# Below this a buffer travels inside the pickle stream: one more iovec and a
# separate receive allocation cost more than copying a few KiB.
OOB_THRESHOLD = 64 * 1024

_context = threading.local()
# Unpickling imports modules. Two threads importing the same package's submodules
# in different orders (one `import numpy`, one `numpy._core.numeric` for an
# array) trip CPython's import deadlock detection, which hands one of them a
# half-initialised module: the call fails with a circular-import error, and
# numpy cannot be imported again. So unpickles of user data run one at a time;
# they hold the GIL anyway, so this costs no parallelism. The runtime's own
# messages (plain dicts of builtins, decoded on the I/O thread) import nothing
# and never wait for it: a call thread importing a big package must not hold
# up the links between processes.
_loads_lock = threading.RLock()
_RUNTIME_MESSAGES = frozenset({"identity", "peer list", "log record"})


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


def _shaped_memoryview_from(buf: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    flat: Any = memoryview(buf).cast("B")  # typeshed knows casts to literal formats only
    return flat.cast(fmt, shape)  # type: ignore[no-any-return]


def _reduce_memoryview(view: memoryview) -> tuple[Any, tuple[Any, ...]]:
    """A memoryview travels as its bytes in C order, and arrives with its format and
    shape (an int64 (2, 3) view is not 48 unsigned bytes at the other end).

    Raises:
        TypeError: a format memoryview cannot be rebuilt with (a struct format, an
            explicit byte order): it is refused rather than changed.
    """
    data = pickle.PickleBuffer(view) if view.c_contiguous else view.tobytes()
    if view.format == "B" and view.ndim == 1:
        return _memoryview_from, (data,)
    try:
        _shaped_memoryview_from(data, view.format, view.shape or ())
    except (TypeError, ValueError):
        raise TypeError(
            f"a memoryview of format {view.format!r} and shape {view.shape} cannot be "
            f"rebuilt on the receiving side; send np.asarray(view) (keeps both) or "
            f"bytes(view)") from None
    return _shaped_memoryview_from, (data, view.format, view.shape)


# Functions and classes already found importable by name: cloudpickle's check walks
# modules on every call, which is most of the cost of pickling a small call.
_BY_REFERENCE: dict[int, Any] = {}
_BY_REFERENCE_MAX = 4096
_NAMED = (types.FunctionType, types.BuiltinFunctionType, type)
# Types whose instances cloudpickle leaves to the default reduction: it decides by
# type alone (classes and Python functions are its business, nothing else is), so
# after one look per type its hook can be skipped (a numpy array meets it for the
# array, its dtype and the dtype's class, every time).
_DEFAULT_REDUCE: set[type] = {tuple, list, dict, set, frozenset}
_DEFAULT_REDUCE_MAX = 4096


class _Pickler(cloudpickle.CloudPickler):  # type: ignore[misc]  # untyped base
    """cloudpickle's Pickler, with large bytes and memoryviews sent out of band too."""

    # cloudpickle's reducers and copyreg's, merged into one plain dict: the C pickler
    # looks every non-atomic object's type up in it, and cloudpickle's ChainMap
    # answers those look-ups in Python. `_refresh_dispatch` keeps it current.
    dispatch_table: ClassVar[dict[type, Any]] = {}

    def reducer_override(self, obj: Any) -> Any:
        t = type(obj)
        if t in _DEFAULT_REDUCE:
            return NotImplemented
        if t is memoryview:
            return _reduce_memoryview(obj)
        if _BY_REFERENCE.get(id(obj)) is obj:
            return NotImplemented
        reduced = super().reducer_override(obj)
        if reduced is NotImplemented:
            if isinstance(obj, _NAMED):  # a function, or a class of any metaclass
                if len(_BY_REFERENCE) < _BY_REFERENCE_MAX:
                    _BY_REFERENCE[id(obj)] = obj  # holding it keeps its id from being reused
            elif not issubclass(t, type) and len(_DEFAULT_REDUCE) < _DEFAULT_REDUCE_MAX:
                _DEFAULT_REDUCE.add(t)
        return reduced


_copyreg_size = -1


def _refresh_dispatch() -> None:
    """Rebuild `_Pickler.dispatch_table` when a reducer was registered with copyreg
    since the last build (libraries do, when they are imported)."""
    global _copyreg_size
    if len(copyreg.dispatch_table) != _copyreg_size:
        _copyreg_size = len(copyreg.dispatch_table)
        _Pickler.dispatch_table = dict(cloudpickle.CloudPickler.dispatch_table)


class _BytesOutOfBandPickler(_Pickler):
    """Also sends large bytes and bytearrays out of band (the C pickler writes those
    in-band before any hook but persistent_id sees them)."""

    def __init__(self, *args: Any, oob: list[memoryview], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._oob = oob

    def persistent_id(self, obj: Any) -> Any:
        t = type(obj)
        if (t is bytes or t is bytearray) and len(obj) >= OOB_THRESHOLD:
            self._oob.append(memoryview(obj).cast("B"))
            return (t is bytearray, len(self._oob) - 1)
        return None


class _BytesOutOfBandUnpickler(pickle.Unpickler):
    """Pickle-5 buffers come first in the list, the persistent bytes after them."""

    def __init__(self, body: Any, buffers: list[Any], npickle: int) -> None:
        super().__init__(io.BytesIO(body), buffers=buffers[:npickle])
        self._bytes = buffers[npickle:]

    def persistent_load(self, pid: Any) -> Any:
        is_bytearray, index = pid
        buf = self._bytes[index]
        return bytearray(buf) if is_bytearray else bytes(buf)


# A body that starts with 0 used persistent ids for bytes (a pickle stream of
# protocol 5 starts with 0x80); a u32 after it counts the pickle-5 buffers.
_PERSISTENT_HEADER = struct.Struct("<BI")


def _has_large_bytes(obj: Any, depth: int = 3) -> bool:
    """A shallow look for large bytes/bytearray (arguments are rarely nested deeper)."""
    t = type(obj)
    if t is bytes or t is bytearray:
        return len(obj) >= OOB_THRESHOLD
    if depth == 0:
        return False
    if t is tuple or t is list:
        return len(obj) <= 64 and any(_has_large_bytes(x, depth - 1) for x in obj)
    if t is dict:
        return len(obj) <= 64 and any(_has_large_bytes(x, depth - 1) for x in obj.values())
    return False


# Values the C pickler writes exactly as cloudpickle would, with nothing out of band:
# `is_plain` (in C, with the small-call path that needs it most).
is_plain = _calls.is_plain


# The pickles of functions found importable by name (see `function_pickle`).
_FUNCTION_PICKLES: dict[int, bytes] = {}


def function_pickle(f: Callable[..., Any]) -> bytes | None:
    """The pickle of `f` if it travels by name (an importable function or class,
    already seen by `dumps`), else None. Cached: a call's function is then one
    bytes concatenation instead of a module look-up per call."""
    if _BY_REFERENCE.get(id(f)) is not f:
        return None
    b = _FUNCTION_PICKLES.get(id(f))
    if b is None:
        b = _FUNCTION_PICKLES[id(f)] = pickle.dumps(f, 5)
    return b


def travels_by_name(f: Callable[..., Any]) -> bool:
    """Whether `f` is pickled by its module and name rather than by value, as
    cloudpickle decides (an importable function or class; lambdas, closures and
    `__main__` functions travel by value). Once True, calls naming `f` are plain
    data (`is_plain`): a function `dumps` has not seen yet is looked at here, and
    remembered as `dumps` would remember it."""
    if _BY_REFERENCE.get(id(f)) is f:
        return True
    if not isinstance(f, _NAMED):
        return False
    try:
        _Pickler(io.BytesIO(), protocol=5).reducer_override(f)  # records it if by name
    except Exception:  # noqa: BLE001 - not picklable by name; dumps will say why
        return False
    return _BY_REFERENCE.get(id(f)) is f


# The functions the pickles above name, on the receiving side; each checked against
# its module on use, so a function rebound there (a reload) is looked up afresh.
_FUNCTIONS: dict[bytes, tuple[Any, dict[str, Any], str]] = {}


def loads_function(data: bytes) -> Any:
    """Unpickle a `function_pickle`, from a cache while its module still binds it."""
    hit = _FUNCTIONS.get(data)
    if hit is not None:
        f, namespace, name = hit
        if namespace.get(name) is f:
            return f
    f = loads(data, (), what="call's function")
    module = sys.modules.get(getattr(f, "__module__", None) or "")
    name = getattr(f, "__qualname__", "")
    if module is not None and "." not in name and len(_FUNCTIONS) < _BY_REFERENCE_MAX:
        _FUNCTIONS[data] = (f, vars(module), name)
    return f


def dumps(obj: Any, dest: int | None = None, what: str = "value") -> tuple[bytes, list[memoryview]]:
    """Pickle `obj` for process `dest`; return (stream, out-of-band buffers).

    Raises:
        SerializationError: `obj` (described as `what` in the message) cannot be pickled.
    """
    if is_plain(obj):
        return pickle.dumps(obj, 5), []
    _refresh_dispatch()
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
        if _has_large_bytes(obj):
            large_bytes: list[memoryview] = []
            stream.write(_PERSISTENT_HEADER.pack(0, 0))
            _BytesOutOfBandPickler(stream, protocol=5, buffer_callback=keep_out_of_band,
                                   oob=large_bytes).dump(obj)
            stream.getbuffer()[:_PERSISTENT_HEADER.size] = _PERSISTENT_HEADER.pack(0, len(buffers))
            buffers.extend(large_bytes)
        else:
            _Pickler(stream, protocol=5, buffer_callback=keep_out_of_band).dump(obj)
    except Exception as exc:
        raise SerializationError(
            f"could not serialise the {what}: {type(exc).__name__}: {exc}") from exc
    finally:
        _context.dest = previous
    return stream.getvalue(), buffers


def _loads(body: Any, buffers: Any) -> Any:
    if type(body) is not bytes:
        body = memoryview(body)  # a receive buffer: indexable as a view
    if body[0] == 0:  # (an empty body raises IndexError: a corrupt stream)
        view = memoryview(body).cast("B")
        _, npickle = _PERSISTENT_HEADER.unpack_from(view)
        return _BytesOutOfBandUnpickler(view[_PERSISTENT_HEADER.size:], list(buffers),
                                        npickle).load()
    return pickle.loads(body, buffers=buffers)


def loads(body: Any, buffers: Any = (), what: str = "value") -> Any:
    """Unpickle a stream and its out-of-band buffers (zero copy for arrays).

    Raises:
        SerializationError: the stream cannot be unpickled here (a missing module,
            a class this process does not have, a corrupt stream).
    """
    try:
        if what in _RUNTIME_MESSAGES:
            return _loads(body, buffers)
        return _calls.loads_locked(body, buffers, _loads)
    except Exception as exc:
        raise SerializationError(
            f"could not deserialise the {what}: {type(exc).__name__}: {exc}") from exc


_calls.configure(_BY_REFERENCE, _FUNCTION_PICKLES, _FUNCTIONS, _loads_lock, OOB_THRESHOLD,
                 types.FunctionType, types.BuiltinFunctionType)
