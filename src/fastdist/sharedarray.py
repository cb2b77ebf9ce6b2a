"""Shared arrays: numpy arrays whose memory every process of one host maps, so that a
big array exists once per host rather than once per process (Julia's SharedArrays).

Port of SharedArrays.jl. `SharedArray(shape, dtype)` makes the memory — an anonymous
memory file (`memfd_create`) held open by the process that made it, or a file
(`filename=`) — and is a numpy array there. Pickled for a process of the same host,
it is a small handle: the receiver opens that memory file through
`/proc/<maker>/fd/<n>` (a file: by its name) and maps it, so a write anywhere is
seen everywhere. Its lifetime is Julia's distributed reference counting (refs.py):
the maker keeps the memory file open while any process holds a reference, and each
process's mapping goes with the last array on it. Nothing is named in /dev/shm, so
processes that die, even every one of them by SIGKILL, leave nothing behind: the
kernel frees the memory with the last mapping.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np

from fastdist import cluster
from fastdist import node as _node
from fastdist.exceptions import CompositeException, RemoteException
from fastdist.hostbuffers import copy_into
from fastdist.protocol import serialize
from fastdist.refs import _adopt, _RefBase
from fastdist.refstore import RRID
from fastdist.remotecall import remotecall

__all__ = ["SharedArray", "SharedMatrix", "SharedVector", "indexpids", "localindices", "sdata"]

# A memory file starts with one page holding a random token (a receiver checks it:
# the right file, not an unrelated fd of that number on another host); the data
# follows, page-aligned.
HEADER_NBYTES = 4096
TOKEN_NBYTES = 16
# A process that received a shared array keeps its mapping this long after its last
# array on it is freed: calls that pass the same array again and again map it once.
KEEP_SECONDS = 2.0
MODES = ("r", "r+", "w+")


class _Handle(NamedTuple):
    """What travels in place of a shared array's memory."""

    owner: int  # the pid that made it, which keeps its memory file open
    ref_id: int  # its reference id there (RRID(owner, ref_id))
    ospid: int  # the owner's OS pid, for /proc/<ospid>/fd/<fd>
    fd: int  # the memory file's fd in the owner (-1: file-backed)
    token: bytes  # the memory file's first bytes
    filename: str | None  # file-backed: the file's absolute path ...
    offset: int  # ... where the array starts in it ...
    file_id: tuple[int, int] | None  # ... and its (st_dev, st_ino)
    readonly: bool
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    pids: tuple[int, ...]

    @property
    def rrid(self) -> RRID:
        return RRID(self.owner, self.ref_id)

    @property
    def memory_name(self) -> str:
        """The memory file's name (as /proc/<pid>/maps and /proc/<pid>/fd show it)."""
        return f"fastdist-shared-array-{self.ospid}-{self.ref_id}"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class _SharedRef(_RefBase):
    """A process's holds on a shared array (the owner keeps its memory file open for
    as long as any process has one)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"SharedArrayRef(where={self.where}, id={self.id})"


class _MemoryFile:
    """The owner's open memory file; closed when the owner's record of the array goes
    (refstore: when no process holds a reference any more)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


def _address(a: np.ndarray[Any, Any]) -> int:
    return int(a.__array_interface__["data"][0])


class _Shared:
    """This process's mapping of one shared array, and its holds on it."""

    __slots__ = ("__weakref__", "buffer", "data_offset", "handle", "hi", "lo", "ref")

    def __init__(self, handle: _Handle, ref: _SharedRef, buffer: Any, data_offset: int) -> None:
        self.handle = handle
        self.ref = ref
        self.buffer = buffer  # the mmap (or an empty bytearray for a 0-byte file array)
        self.data_offset = data_offset  # where element 0 is in it
        whole = np.ndarray((handle.nbytes,), np.uint8, buffer=buffer, offset=data_offset)
        self.lo = _address(whole)
        self.hi = self.lo + handle.nbytes

    def whole(self) -> SharedArray:
        a: SharedArray = np.ndarray.__new__(SharedArray, self.handle.shape, self.handle.dtype,
                                            buffer=self.buffer, offset=self.data_offset)
        a._sa = self
        return a

    def holds(self, a: np.ndarray[Any, Any]) -> bool:
        """Whether `a`'s memory is this mapping (a view), not a copy."""
        p = _address(a)
        return self.lo <= p <= self.hi and (p < self.hi or a.size == 0)

    def reduce_view(self, a: SharedArray) -> tuple[Any, ...]:
        """How a view of this array travels: the handle, where the view starts, its
        shape, strides and dtype. A hold for the receiver is queued to the owner
        before the handle leaves (as for Futures)."""
        dest = serialize.current_destination()
        if dest is not None:
            n = _node.current()
            if dest != n.myid and dest not in cluster.procs(n.myid):
                raise ValueError(
                    f"a SharedArray cannot go to process {dest}: it is on another host "
                    f"(the array lives in the memory of processes {list(self.handle.pids)})")
            self.ref._note_sent()
        # Pickled outside a fastdist send (`pickle.dumps`), it carries no hold: the
        # receiver must then keep the array from being freed by other means.
        return (_attach, (self.handle, _address(a) - self.lo, a.shape, a.strides, a.dtype,
                          dest is not None))


_lock = threading.Lock()
# This process's mapping of each shared array it holds, by reference id.
_mapped: weakref.WeakValueDictionary[RRID, _Shared] = weakref.WeakValueDictionary()
# Received arrays kept mapped for KEEP_SECONDS after their last use (rrid -> (mapping, last use)).
_recent: dict[RRID, tuple[_Shared, float]] = {}
_recent_timer: threading.Timer | None = None


def _keep(shared: _Shared) -> None:
    with _lock:
        _recent[shared.handle.rrid] = (shared, time.monotonic())
        if _recent_timer is None:
            _arm(KEEP_SECONDS)


def _arm(delay: float) -> None:
    global _recent_timer
    _recent_timer = threading.Timer(delay, _expire)
    _recent_timer.daemon = True
    _recent_timer.start()


def _expire() -> None:
    """Let go of the received arrays not used for KEEP_SECONDS (a timer thread)."""
    global _recent_timer
    now = time.monotonic()
    with _lock:
        for rrid in [r for r, (_, used) in _recent.items() if now - used >= KEEP_SECONDS]:
            del _recent[rrid]
        _recent_timer = None
        if _recent:
            _arm(max(0.05, KEEP_SECONDS - (now - min(used for _, used in _recent.values()))))


def _attach(handle: _Handle, start: int, shape: tuple[int, ...], strides: tuple[int, ...],
            dtype: np.dtype[Any], counted: bool = True) -> SharedArray:
    """A handle arrived: this process's view of the array (mapped on first need)."""
    ref = _adopt(_SharedRef, handle.owner, handle.owner, handle.ref_id, counted=counted)
    with _lock:
        shared = _mapped.get(handle.rrid)
    if shared is None:
        shared = _map(handle, ref)
        with _lock:
            shared = _mapped.setdefault(handle.rrid, shared)
    if handle.owner != _node.current().myid:
        _keep(shared)
    a: SharedArray = np.ndarray.__new__(SharedArray, shape, dtype, buffer=shared.buffer,
                                        offset=shared.data_offset + start, strides=strides)
    a._sa = shared
    return a


def _map(handle: _Handle, ref: _SharedRef) -> _Shared:
    """Map a shared array's memory into this process."""
    if handle.filename is not None:
        return _map_file(handle, ref)
    path = f"/proc/{handle.ospid}/fd/{handle.fd}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open the memory of SharedArray {handle.ref_id} of "
                      f"process {handle.owner} ({path}: {exc.strerror}); is that process "
                      "on this host and alive?") from None
    try:
        if os.fstat(fd).st_size != HEADER_NBYTES + handle.nbytes:
            raise ValueError(f"{path} is not the memory of SharedArray {handle.ref_id} of "
                             f"process {handle.owner} (its size differs)")
        mm = mmap.mmap(fd, HEADER_NBYTES + handle.nbytes)
    finally:
        os.close(fd)
    if mm[:TOKEN_NBYTES] != handle.token:
        raise ValueError(f"{path} is not the memory of SharedArray {handle.ref_id} of process "
                         f"{handle.owner}: is it on another host?")
    return _Shared(handle, ref, mm, HEADER_NBYTES)


def _map_file(handle: _Handle, ref: _SharedRef) -> _Shared:
    assert handle.filename is not None
    flags = os.O_RDONLY if handle.readonly else os.O_RDWR
    fd = os.open(handle.filename, flags | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != handle.file_id:
            raise ValueError(f"{handle.filename} here is not the file of the SharedArray made "
                             f"by process {handle.owner}: is it on another host?")
        return _Shared(handle, ref, *_map_range(fd, handle.offset, handle.nbytes,
                                                handle.readonly))
    finally:
        os.close(fd)


def _map_range(fd: int, offset: int, nbytes: int, readonly: bool) -> tuple[Any, int]:
    """(buffer, where `offset` is in it) for bytes [offset, offset + nbytes) of a file."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    length = offset - start + nbytes
    if length == 0:
        return bytearray(0), 0
    prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
    return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=prot, offset=start), offset - start


# -- making one ---------------------------------------------------------------------------


def _check_pids(pids: Iterable[int] | None) -> tuple[int, ...]:
    """The processes to share with: all of this host's by default; every one must be
    a process of the cluster on this host."""
    n = _node.current()
    here = cluster.procs(n.myid)
    if pids is None:
        return tuple(here)
    chosen = tuple(int(p) for p in pids)
    if not chosen:
        return tuple(here)
    everyone = cluster.procs()
    for p in chosen:
        if p not in everyone:
            raise ValueError(f"SharedArray: no process with pid {p} in this cluster")
        if p not in here:
            raise ValueError(f"SharedArray: process {p} is on another host; every process "
                             f"sharing an array must be on this host (processes {here})")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"SharedArray: pids {list(chosen)} name a process twice")
    return chosen


def _check_shape(shape: Any) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if not all(isinstance(d, (int, np.integer)) for d in dims):
        raise TypeError(f"SharedArray: shape {shape!r} is not a tuple of integers")
    if any(d < 0 for d in dims):
        raise ValueError(f"SharedArray: negative dimension in shape {shape!r}")
    return tuple(int(d) for d in dims)


def _check_dtype(dtype: Any) -> np.dtype[Any]:
    dt: np.dtype[Any] = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError(f"SharedArray: dtype {dt} holds Python objects, which cannot live in "
                        "shared memory (use numbers, bools, fixed-size strings or records)")
    return dt


def _new_reference() -> _SharedRef:
    n = _node.current()
    ref: _SharedRef = _SharedRef.__new__(_SharedRef)
    ref._init_ref(n.myid, n.myid, n.next_id(), 1)
    n.live_refs[ref.rrid] = ref
    return ref


def _make_memory(shape: tuple[int, ...], dtype: np.dtype[Any], pids: tuple[int, ...]) -> _Shared:
    n = _node.current()
    ref = _new_reference()
    token = os.urandom(TOKEN_NBYTES)
    handle = _Handle(n.myid, ref.id, os.getpid(), -1, token, None, 0, None, False, shape,
                     dtype, pids)
    fd = os.memfd_create(handle.memory_name, os.MFD_CLOEXEC)
    memory = _MemoryFile(fd)
    os.ftruncate(fd, HEADER_NBYTES + handle.nbytes)
    mm = mmap.mmap(fd, HEADER_NBYTES + handle.nbytes)
    mm[:TOKEN_NBYTES] = token
    handle = handle._replace(fd=fd)
    # The owner's record of the reference keeps the memory file open until no process
    # holds one (it is freed with the record: refstore.RefStore.change).
    n.store.lookup(ref.rrid).obj = memory
    return _Shared(handle, ref, mm, HEADER_NBYTES)


def _open_file(filename: str, shape: tuple[int, ...], dtype: np.dtype[Any], offset: int,
               mode: str | None, pids: tuple[int, ...]) -> _Shared:
    path = os.path.abspath(os.fspath(filename))
    if mode is None:
        mode = "r+" if os.path.exists(path) else "w+"
    if mode not in MODES:
        raise ValueError(f"SharedArray: mode must be one of {MODES}, not {mode!r}")
    offset = int(offset)
    if offset < 0:
        raise ValueError(f"SharedArray: negative offset {offset}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    flags = {"r": os.O_RDONLY, "r+": os.O_RDWR, "w+": os.O_RDWR | os.O_CREAT | os.O_TRUNC}[mode]
    fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size < offset + nbytes:
            if mode == "r":
                raise ValueError(f"SharedArray: {path} has {size} bytes, fewer than the "
                                 f"{offset + nbytes} that offset {offset} and shape {shape} need")
            os.ftruncate(fd, offset + nbytes)
        st = os.fstat(fd)
        n = _node.current()
        ref = _new_reference()
        n.store.lookup(ref.rrid)  # counted like the others; no memory file to keep open
        handle = _Handle(n.myid, ref.id, os.getpid(), -1, b"", path, offset,
                         (st.st_dev, st.st_ino), mode == "r", shape, dtype, pids)
        return _Shared(handle, ref, *_map_range(fd, offset, nbytes, mode == "r"))
    finally:
        os.close(fd)


def _copy_in(shared: _Shared, arr: SharedArray, source: np.ndarray[Any, Any]) -> None:
    """Fill a new shared array with a copy of `source`: bytes straight into fresh
    pages made at once, in parallel when it is large (hostbuffers.copy_into)."""
    if (isinstance(shared.buffer, mmap.mmap) and not shared.handle.readonly
            and source.dtype == arr.dtype and source.flags.c_contiguous and arr.size):
        copy_into(shared.buffer, shared.data_offset, source.reshape(-1).view(np.uint8))
    else:
        np.copyto(arr, source, casting="unsafe")


def _run_init(init: Callable[[SharedArray], Any], arr: SharedArray) -> None:
    """Julia's `init`: called with the array on every participating worker, at once."""
    targets = _workers_of(arr._shared().handle.pids)
    futures = [remotecall(_call_init, p, init, arr) for p in targets]
    errors: list[Exception] = []
    for fut in futures:
        try:
            fut.fetch()
        except RemoteException as exc:
            errors.append(exc)
    if errors:
        raise CompositeException(f"SharedArray init failed on {len(errors)} of {len(targets)} "
                                 "processes", errors)


def _call_init(init: Callable[[SharedArray], Any], arr: SharedArray) -> None:
    init(arr)


def _workers_of(pids: tuple[int, ...]) -> list[int]:
    """The processes that share the work (`indexpids`, `localindices`, `init`): the
    workers among `pids`, or pid 1 when it is the only one."""
    return [p for p in pids if p != 1] or list(pids)


# -- the array ----------------------------------------------------------------------------


class SharedArray(np.ndarray):
    """A numpy array in shared memory, mapped by every process of this host that uses
    it (Julia's `SharedArray{T}(dims; init, pids)`).

    It is an `ndarray` on every process: index it, slice it, pass it to numpy and
    scipy. Passed to a remote call on a process of this host it travels as a small
    handle and the receiver maps the same memory, so writes made anywhere are seen
    everywhere. Slices and other views of it are shared arrays too; results that are
    new memory (`S + 1`, `S[mask]`, `S.copy()`) are ordinary arrays.

    Args:
        shape: the dimensions (an int or a tuple), or an existing array to copy
            into shared memory (Julia's `SharedArray(A)`).
        dtype: the element type (no Python objects).
        init: `init(S)` runs on every participating worker before the constructor
            returns, typically filling `S[localindices(S)]`.
        pids: the processes that share it; default every process of this host, the
            master included. All must be on this host.
        filename: back the array by this file, mapped: changes reach the file.
        offset: where the array starts in the file (bytes).
        mode: `"r"` (read only), `"r+"` (read and write an existing file) or `"w+"`
            (create or truncate); default `"r+"` if the file exists, else `"w+"`.

    Raises:
        ValueError: a pid on another host or not in the cluster, a bad mode or
            offset, a file too short for mode `"r"`.
        TypeError: a shape that is not integers, a dtype of Python objects.
        CompositeException: `init` failed on some processes.

    Example:
        >>> S = fd.SharedArray((4, 3), np.float64)
        >>> S[:] = 1.0
        >>> fd.remotecall_fetch(np.sum, 2, S)     # worker 2 reads the same memory
        12.0
    """

    _sa: _Shared | None

    def __new__(cls, shape: Any, dtype: Any = float,
                init: Callable[[SharedArray], Any] | None = None,
                pids: Iterable[int] | None = None, *,
                filename: str | os.PathLike[str] | None = None, offset: int = 0,
                mode: str | None = None) -> SharedArray:
        source = None
        if isinstance(shape, np.ndarray):
            source = shape
            shape, dtype = source.shape, (source.dtype if dtype is float else dtype)
        dims = _check_shape(shape)
        dt = _check_dtype(dtype)
        chosen = _check_pids(pids)
        if filename is not None:
            shared = _open_file(os.fspath(filename), dims, dt, offset, mode, chosen)
        else:
            if mode is not None or offset:
                raise ValueError("SharedArray: mode and offset are for file-backed arrays "
                                 "(give filename=)")
            shared = _make_memory(dims, dt, chosen)
        with _lock:
            _mapped[shared.handle.rrid] = shared
        arr = shared.whole()
        if source is not None:
            _copy_in(shared, arr, source)
        if init is not None:
            _run_init(init, arr)
        return arr

    def __array_finalize__(self, obj: Any) -> None:
        sa = getattr(obj, "_sa", None)
        self._sa = sa if sa is not None and sa.holds(self) else None

    def __array_wrap__(self, array: Any, context: Any = None, return_scalar: bool = False) -> Any:
        out = super().__array_wrap__(array, context, return_scalar)
        if isinstance(out, SharedArray) and out._sa is None:
            plain = out.view(np.ndarray)
            return plain[()] if return_scalar and plain.ndim == 0 else plain
        return out

    def __getitem__(self, key: Any) -> Any:
        out = super().__getitem__(key)
        if type(out) is SharedArray and out._sa is None:
            return out.view(np.ndarray)
        return out

    def copy(self, order: Any = "C") -> np.ndarray:  # type: ignore[override]
        """An ordinary array holding a copy of the data."""
        return self.view(np.ndarray).copy(order)

    def astype(self, *args: Any, **kwargs: Any) -> Any:
        return self.view(np.ndarray).astype(*args, **kwargs)

    def flatten(self, order: Any = "C") -> np.ndarray:
        return self.view(np.ndarray).flatten(order)

    def __copy__(self) -> Any:
        return self.copy()

    def __deepcopy__(self, memo: Any) -> Any:
        return self.copy()

    def __reduce_ex__(self, protocol: Any) -> Any:
        sa = getattr(self, "_sa", None)
        if sa is None:
            return self.view(np.ndarray).__reduce_ex__(protocol)
        return sa.reduce_view(self)

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(2)

    def _shared(self) -> _Shared:
        sa: _Shared | None = getattr(self, "_sa", None)
        if sa is None:
            raise ValueError("this array is a copy of a SharedArray's data, not shared memory")
        return sa

    # Julia's generic functions on a SharedArray, as methods too.

    def procs(self) -> list[int]:
        """The pids that share this array (Julia's `procs(S)`)."""
        return list(self._shared().handle.pids)

    def indexpids(self) -> int:
        """This process's index (from 1) among the array's workers; 0 if it is none."""
        return indexpids(self)

    def localindices(self) -> range:
        """The flat indices this worker is responsible for (see `localindices`)."""
        return localindices(self)

    def sdata(self) -> np.ndarray:
        """The plain ndarray view of this process's mapping."""
        return self.view(np.ndarray)


class _OfDimensions(type):
    """SharedVector and SharedMatrix: SharedArray constructors for 1 and 2 dimensions,
    and `isinstance` checks for shared arrays of that many dimensions."""

    ndim: int

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, SharedArray) and obj.ndim == cls.ndim


def _dims_of(shape: Any) -> tuple[Any, ...]:
    if isinstance(shape, np.ndarray):
        return tuple(shape.shape)
    return (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)


class SharedVector(metaclass=_OfDimensions):
    """A one-dimensional SharedArray (Julia's `SharedVector{T}(n)`): `SharedVector(n,
    dtype=float, ...)` or `SharedVector(vector)`, the other arguments as SharedArray's."""

    ndim = 1

    def __new__(cls, n: Any, *args: Any, **kwargs: Any) -> SharedArray:  # type: ignore[misc]
        if len(_dims_of(n)) != 1:
            raise ValueError(f"SharedVector: one dimension, not shape {_dims_of(n)}")
        return SharedArray(n, *args, **kwargs)


class SharedMatrix(metaclass=_OfDimensions):
    """A two-dimensional SharedArray (Julia's `SharedMatrix{T}(m, n)`):
    `SharedMatrix((m, n), dtype=float, ...)` or `SharedMatrix(matrix)`."""

    ndim = 2

    def __new__(cls, shape: Any, *args: Any, **kwargs: Any) -> SharedArray:  # type: ignore[misc]
        if len(_dims_of(shape)) != 2:
            raise ValueError(f"SharedMatrix: two dimensions, not shape {_dims_of(shape)}")
        return SharedArray(shape, *args, **kwargs)


# -- Julia's functions on shared arrays ---------------------------------------------------


def sdata(arr: Any) -> Any:
    """The plain ndarray view of this process's mapping of shared array `arr` (Julia's
    `sdata`); any other array as it is."""
    if isinstance(arr, SharedArray):
        return arr.view(np.ndarray)
    return arr


def indexpids(arr: SharedArray) -> int:
    """This process's index, counted from 1, among the workers that share `arr` (the
    master too when it is alone); 0 if it is not one of them (Julia's `indexpids`)."""
    workers = _workers_of(_as_shared(arr).handle.pids)
    me = _node.current().myid
    return workers.index(me) + 1 if me in workers else 0


def localindices(arr: SharedArray) -> range:
    """The flat indices (0-based: `arr.reshape(-1)[r.start:r.stop]`) this process is
    responsible for: the array's elements split into contiguous, near-equal parts,
    one per worker, in the order of `procs(S)` (Julia's `localindices`); empty on a
    process that is not one of its workers."""
    handle = _as_shared(arr).handle
    return _part(int(np.prod(handle.shape, dtype=np.int64)), len(_workers_of(handle.pids)),
                 indexpids(arr))


def _part(length: int, nworkers: int, index: int) -> range:
    """Julia's `range_1dim`, from 0: worker `index` (from 1) of `nworkers`."""
    if index == 0:
        return range(0)
    if length < nworkers:
        return range(index - 1, index) if index <= length else range(0)
    partlen = length // nworkers
    stop = length if index == nworkers else index * partlen
    return range((index - 1) * partlen, stop)


def _as_shared(arr: Any) -> _Shared:
    if not isinstance(arr, SharedArray):
        raise TypeError(f"expected a SharedArray, not {type(arr).__name__}")
    return arr._shared()
