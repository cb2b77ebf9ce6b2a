"""Worker pools: WorkerPool, CachingPool, default_worker_pool, remote, and calls on a pool.

Port of Distributed.jl `workerpool.jl`. A pool hands out free workers (`take`)
and gets them back (`put`); a worker that dies or is removed leaves every pool.
A pool passed to another process is a proxy: its operations go back to the
process that made it. A CachingPool sends each function (with its closure,
however large) to each worker once, and calls refer to it by a small key.
"""

from __future__ import annotations

import abc
import itertools
import pickle
import struct
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from fastdist import node as _node
from fastdist._core._wire import Frame
from fastdist.channel import check_timeout, wait_for
from fastdist.dispatch import register
from fastdist.exceptions import ProcessExitedException
from fastdist.node import Node, on_peer_lost
from fastdist.protocol import serialize
from fastdist.protocol.messages import FLAG_SERIAL, Kind
from fastdist.refs import when_ready
from fastdist.remotecall import call_future, on_target, remotecall_fetch
from fastdist.transport import Connection

__all__ = [
    "AbstractWorkerPool",
    "CachingPool",
    "WorkerPool",
    "default_worker_pool",
    "remote",
]

_pool_ids = itertools.count(1)
_pools: weakref.WeakValueDictionary[int, WorkerPool] = weakref.WeakValueDictionary()
class AbstractWorkerPool(abc.ABC):
    """What every pool does: hand out free workers and take them back.

    A subclass implements `push`, `put`, `take`, `__len__`, `isready` and
    `workers`; `remotecall` and friends, `remote` and `pmap` then accept it.
    """

    @abc.abstractmethod
    def push(self, w: int) -> AbstractWorkerPool:
        """Add worker `w` to the pool, free."""

    @abc.abstractmethod
    def put(self, w: int) -> AbstractWorkerPool:
        """Give back worker `w` after use (ignored if `w` is not in the pool)."""

    @abc.abstractmethod
    def take(self, timeout: float | None = None) -> int:
        """Remove and return a free worker, waiting until one is free."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """How many workers the pool has, free or busy."""

    @abc.abstractmethod
    def isready(self) -> bool:
        """True when `take` would not wait."""

    @abc.abstractmethod
    def workers(self) -> list[int]:
        """Every worker in the pool."""

    def nworkers(self) -> int:
        """How many workers `workers()` lists."""
        return len(self.workers())

    def wait(self, timeout: float | None = None) -> None:
        """Wait until a worker is free (without taking it)."""
        self.put(self.take(timeout))


class WorkerPool(AbstractWorkerPool):
    """A set of workers to run calls on, one call per worker at a time.

    Args:
        pids: the workers (any iterable of pids).

    Example:
        >>> pool = fd.WorkerPool([2, 3])
        >>> len(pool), pool.workers()
        (2, [2, 3])
        >>> fd.remotecall_fetch(fd.myid, pool) in (2, 3)
        True
    """

    def __init__(self, pids: Iterable[int] = ()) -> None:
        n = _node.current()
        self._cond = threading.Condition()
        self._all: set[int] = set()
        self._free: deque[int] = deque()
        self._owner = n.myid
        self._id = next(_pool_ids)
        self._is_default = False
        _pools[self._id] = self
        for p in pids:
            self.push(int(p))

    def push(self, w: int) -> WorkerPool:
        """Add worker `w` to the pool, free. Returns the pool."""
        if self._remote():
            self._call("push", int(w))
            return self
        with self._cond:
            if w not in self._all:
                self._all.add(w)
                self._free.append(w)
                self._cond.notify()
        return self

    def put(self, w: int) -> WorkerPool:
        """Give back worker `w`; a worker not in the pool (or gone) is ignored."""
        if self._remote():
            self._call("put", int(w))
            return self
        with self._cond:
            if w in self._all and w not in self._free:
                self._free.append(w)
                self._cond.notify()
        return self

    def take(self, timeout: float | None = None) -> int:
        """Remove and return a free worker, waiting until one is free.

        The default pool with no workers hands out pid 1 (the master works alone).

        Raises:
            RuntimeError: the pool has no workers at all.
            TimeoutError: no worker became free within `timeout` seconds.
        """
        timeout = check_timeout(timeout)
        if self._remote():
            return int(self._call("take", timeout))
        n = _node.current()
        with self._cond:
            while True:
                while self._free:
                    w = self._free.popleft()
                    if w in self._all:
                        if _alive(n, w):
                            return w
                        self._all.discard(w)  # died before we heard of it
                if not self._all:
                    if self._is_default:
                        return 1
                    raise RuntimeError("No active worker available in pool")
                if not wait_for(self._cond, lambda: bool(self._free) or not self._all, timeout):
                    raise TimeoutError(f"no worker of the pool became free within {timeout} s")

    def __len__(self) -> int:
        if self._remote():
            return int(self._call("len"))
        return len(self._all)

    def isready(self) -> bool:
        """True when `take` would not wait."""
        if self._remote():
            return bool(self._call("isready"))
        with self._cond:
            return any(w in self._all for w in self._free) or (self._is_default and not self._all)

    def workers(self) -> list[int]:
        """The pool's workers; `[1]` for the default pool when there are none."""
        if self._remote():
            return list(self._call("workers"))
        with self._cond:
            if not self._all and self._is_default:
                return [1]
            return sorted(self._all)

    def _try_take(self) -> int | None:
        """A free worker now, or None; never waits."""
        try:
            return self.take(0)
        except TimeoutError:
            return None

    def _remove_worker(self, w: int) -> None:
        with self._cond:
            self._all.discard(w)
            self._cond.notify_all()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.workers()})"

    # -- travelling: a pool elsewhere is a proxy for its owner's ---------------------------

    def _remote(self) -> bool:
        return self._owner != _node.current().myid

    def _call(self, op: str, *args: Any) -> Any:
        status, value = remotecall_fetch(_pool_op, self._owner, self._id, op, *args)
        if status == "timeout":
            raise TimeoutError(value)
        if status == "error":
            raise RuntimeError(value)
        return value

    def __reduce__(self) -> Any:
        return (_pool_proxy, (WorkerPool, self._owner, self._id))


def _alive(n: Node, w: int) -> bool:
    return w == n.myid or w in n.peers or (w == 1 and n.myid == 1)


def _pool_proxy(cls: type[WorkerPool], owner: int, pool_id: int) -> WorkerPool:
    if owner == _node.current().myid:
        pool = _pools.get(pool_id)
        if pool is not None:
            return pool
    proxy = cls.__new__(cls)
    proxy._owner, proxy._id, proxy._is_default = owner, pool_id, False
    return proxy


def _pool_op(pool_id: int, op: str, *args: Any) -> tuple[str, Any]:
    """On the owner: one pool operation for a proxy; expected failures come back as data."""
    pool = _pools.get(pool_id)
    if pool is None:
        return "error", f"worker pool {pool_id} no longer exists on process {_node.current().myid}"
    try:
        if op == "len":
            return "ok", len(pool)
        return "ok", getattr(pool, op)(*args)
    except TimeoutError as exc:
        return "timeout", str(exc)
    except RuntimeError as exc:
        return "error", str(exc)


@on_peer_lost
def _worker_lost(n: Node, pid: int, p: Any, exc: BaseException | None) -> None:
    """A worker that died or was removed leaves every pool of this process."""
    for pool in list(_pools.values()):
        if pool._owner == n.myid:
            pool._remove_worker(pid)


_default_pool: WorkerPool | None = None
_default_lock = threading.Lock()


def default_worker_pool() -> WorkerPool:
    """The pool of all workers, used by `remote` and `spawnat("any", ...)`.

    Workers added by `addprocs` join it; workers that die or are removed leave it.
    With no workers it hands out pid 1. On a worker it is a proxy for pid 1's pool.

    Returns:
        The default WorkerPool.

    Example:
        >>> fd.default_worker_pool().workers() == fd.workers()
        True
    """
    global _default_pool
    n = _node.current()
    if n.myid != 1:
        pool = _default_pool
        if pool is None or pool._owner != 1:
            pool = _default_pool = remotecall_fetch(default_worker_pool, 1)
        return pool
    with _default_lock:
        if _default_pool is None:
            pool = WorkerPool(n.worker_pids())
            pool._is_default = True
            _default_pool = pool
        return _default_pool


def add_to_default_pool(pids: list[int]) -> None:
    """New workers join the default pool (called by `addprocs`)."""
    if _default_pool is not None and _default_pool._owner == _node.current().myid:
        for p in pids:
            _default_pool.push(p)


def remote(f: Callable[..., Any], pool: AbstractWorkerPool | None = None) -> Callable[..., Any]:
    """A function that runs `f` on a free worker of `pool` (Julia's `remote`).

    Args:
        f: the function to run remotely. `remote(pool, f)`, Julia's order, works too.
        pool: the workers to use; default `default_worker_pool()`.

    Returns:
        A callable: `remote(f)(*args, **kw)` is `remotecall_fetch(f, pool, *args, **kw)`.

    Example:
        >>> fd.remote(fd.myid)() in fd.workers()
        True
    """
    if isinstance(f, AbstractWorkerPool) and not isinstance(pool, AbstractWorkerPool):
        f, pool = pool, f
    def call(*args: Any, **kwargs: Any) -> Any:
        return remotecall_fetch(f, pool if pool is not None else default_worker_pool(),
                                *args, **kwargs)

    call.__name__ = f"remote({getattr(f, '__name__', 'f')})"
    call.__wrapped__ = f  # type: ignore[attr-defined]
    return call


# -- calls on a pool ----------------------------------------------------------------------


@on_target.register
def _on_pool(pool: AbstractWorkerPool, form: Callable[..., Any], f: Callable[..., Any], args: Any,
             kwargs: Any) -> Any:
    """remotecall and its kin on a pool (see remotecall.on_target)."""
    if form is call_future:
        return pool_remotecall(pool, f, args, kwargs)
    return pool_call(pool, form, f, args, kwargs)


def pool_call(pool: AbstractWorkerPool, fn: Callable[..., Any], f: Callable[..., Any],
              args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`fn(f, w, args, kwargs, FLAG_SERIAL)` (remotecall.call_fetch, call_wait or
    call_do) on a worker `w` taken from the pool and given back: a pool's call,
    which the worker runs one at a time with the pool's others."""
    w = pool.take()
    try:
        if isinstance(pool, CachingPool) and w != _node.current().myid:
            return fn(pool._token_for(f, w), w, args, kwargs, FLAG_SERIAL)
        return fn(f, w, args, kwargs, FLAG_SERIAL)
    finally:
        pool.put(w)


def pool_remotecall(pool: AbstractWorkerPool, f: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """`remotecall` on a pool: the worker goes back to the pool when the call is done."""
    w = pool.take()
    try:
        if isinstance(pool, CachingPool) and w != _node.current().myid:
            fut = call_future(pool._token_for(f, w), w, args, kwargs, FLAG_SERIAL)
        else:
            fut = call_future(f, w, args, kwargs, FLAG_SERIAL)
    except BaseException:
        pool.put(w)
        raise

    def give_back() -> None:
        # A proxy's put is a remote call: never run it on the I/O thread.
        _node.current().callpool.submit(lambda: pool.put(w))

    if not when_ready(fut, give_back):
        def wait_then_give_back() -> None:
            try:
                fut.wait()
            except BaseException:  # noqa: BLE001 - the caller sees the failure on fetch
                pass
            pool.put(w)

        _node.current().callpool.submit(wait_then_give_back)
    return fut


# -- cached functions ---------------------------------------------------------------------


class CachedFunction:
    """Stands for a function in a call: a key, plus the function itself the first
    time it goes to a given worker.

    The function travels as a pickle of its own inside the call, so that a worker
    that cannot unpickle it records the failure under the key and every later
    call naming the key fails at once with it, instead of waiting for a function
    that never comes.
    """

    __slots__ = ("func", "key", "owner")

    def __init__(self, owner: int, key: int, func: Any) -> None:
        self.owner = owner
        self.key = key
        self.func = func

    def __reduce__(self) -> Any:
        if self.func is None:
            return (CachedFunction, (self.owner, self.key, None))
        stream, buffers = serialize.dumps(self.func, dest=serialize.current_destination(),
                                          what="function of a CachingPool call")
        return (_define_cached, (self.owner, self.key, stream,
                                 [pickle.PickleBuffer(b) for b in buffers]))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return cached_entry(self).func(*args, **kwargs)


class _Entry:
    """A cached function on a worker, or the error that unpickling it raised."""

    __slots__ = ("error", "func")

    def __init__(self, func: Any, error: BaseException | None = None) -> None:
        self.func = func
        self.error = error


_func_cache: dict[tuple[int, int], _Entry] = {}
_func_cond = threading.Condition()

# How long a call naming a cached function waits for the call that carries it,
# which may be unpickled on another thread just now.
CACHED_FUNCTION_WAIT = 60.0


def _define_cached(owner: int, key: int, stream: bytes, buffers: list[Any]) -> CachedFunction:
    try:
        entry = _Entry(serialize.loads(stream, buffers, what="cached function"))
    except Exception as exc:  # noqa: BLE001 - recorded, raised by every call naming the key
        entry = _Entry(None, exc)
    with _func_cond:
        _func_cache[(owner, key)] = entry
        _func_cond.notify_all()
    return CachedFunction(owner, key, None)


def cached_entry(token: CachedFunction) -> _Entry:
    """The cache entry `token` names on this process (waiting for it to arrive)."""
    k = (token.owner, token.key)
    entry = _func_cache.get(k)
    if entry is None:
        with _func_cond:
            if not _func_cond.wait_for(lambda: k in _func_cache, timeout=CACHED_FUNCTION_WAIT):
                raise RuntimeError(f"cached function {token.key} from process {token.owner} "
                                   "is unknown here (was the pool cleared?)")
            entry = _func_cache[k]
    if entry.error is not None:
        raise entry.error
    return entry


def resolve_cached_function(node: Node, token: Any) -> Any:
    """The function a CachedFunction stands for (anything else as it is)."""
    if not isinstance(token, CachedFunction):
        return token
    return cached_entry(token).func


def handle_forget_funcs(node: Node, conn: Connection, frame: Frame) -> None:
    forget_cached_functions(node, conn.peer, frame.body)


def forget_cached_functions(node: Node, owner: int, body: bytes) -> None:
    """FORGET_FUNCS from `owner`: drop the functions it cached here."""
    keys = struct.unpack(f"<{len(body) // 8}Q", body)
    with _func_cond:
        for key in keys:
            _func_cache.pop((owner, key), None)


def cached_function_count() -> int:
    """How many cached functions this process holds (for tests and stats)."""
    return len(_func_cache)


class FunctionCache:
    """The caller's side of cached functions: which function went to which worker.

    Used by CachingPool for the life of the pool, and by `pmap` for one call.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[int, tuple[Any, int]] = {}  # id(f) -> (f, key); keeps f alive
        self._sent: set[tuple[int, int]] = set()  # (key, worker)

    def token(self, f: Callable[..., Any], w: int) -> CachedFunction:
        """The stand-in for `f` in a call to worker `w` (with `f` the first time)."""
        n = _node.current()
        with self._lock:
            entry = self._keys.get(id(f))
            if entry is None or entry[0] is not f:
                entry = self._keys[id(f)] = (f, n.next_id())
            key = entry[1]
            first = (key, w) not in self._sent
            if first:
                self._sent.add((key, w))
        return CachedFunction(n.myid, key, f if first else None)

    def unsend(self, f: Callable[..., Any], w: int) -> None:
        """Forget that `f` went to `w` (the call carrying it never left)."""
        with self._lock:
            entry = self._keys.get(id(f))
            if entry is not None and entry[0] is f:
                self._sent.discard((entry[1], w))

    def __len__(self) -> int:
        return len(self._sent)

    def clear(self) -> None:
        """Free the cached copies on every worker."""
        n = _node.peek()
        with self._lock:
            by_worker: dict[int, list[int]] = {}
            for key, w in self._sent:
                by_worker.setdefault(w, []).append(key)
            self._sent.clear()
            self._keys.clear()
        if n is None:
            return
        for w, keys in by_worker.items():
            if w not in n.peers:
                continue  # gone, and its cache with it
            body = struct.pack(f"<{len(keys)}Q", *keys)
            try:
                n.send(w, Kind.FORGET_FUNCS, 0, 0, n.myid, 0, body)
            except (ProcessExitedException, ValueError, ConnectionError):
                pass


class CachingPool(WorkerPool):
    """A WorkerPool that sends each function to each worker once for the life of the pool.

    Calls through the pool (`remotecall*`, `remote_do`, `remote`, `pmap`) send a
    function, with its closure however large, the first time it goes to a
    worker; later calls name it by a key. `clear(pool)` (or `pool.clear()`)
    frees the workers' copies, as does dropping the pool. A CachingPool stays on
    the process that made it: it refuses to be serialised.

    Args:
        pids: the workers (any iterable of pids).

    Example:
        >>> big = np.ones(2_000_000)
        >>> pool = fd.CachingPool(fd.workers())
        >>> fd.pmap(lambda i: big[i], pool, range(100))[:3]  # `big` travels once per worker
        [1.0, 1.0, 1.0]
        >>> fd.clear(pool)
    """

    def __init__(self, pids: Iterable[int] = ()) -> None:
        super().__init__(pids)
        self._cache = FunctionCache()

    def _token_for(self, f: Callable[..., Any], w: int) -> CachedFunction:
        """The stand-in for `f` in a call to worker `w` (with `f` the first time)."""
        return self._cache.token(f, w)

    def clear(self) -> CachingPool:
        """Free the cached functions on every worker. Returns the pool."""
        self._cache.clear()
        return self

    def __del__(self) -> None:
        try:
            if len(self._cache):
                self._cache.clear()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __reduce__(self) -> Any:
        raise TypeError("a CachingPool stays on the process that made it and cannot be "
                        "serialised; pass a WorkerPool instead")


register(Kind.FORGET_FUNCS, handle_forget_funcs)
