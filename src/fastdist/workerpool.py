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
import struct
import threading
import weakref
from collections import deque
from typing import Any

from fastdist import node as _node
from fastdist.exceptions import ProcessExitedException
from fastdist.protocol.messages import Kind

_pool_ids = itertools.count(1)
_pools: weakref.WeakValueDictionary[int, "WorkerPool"] = weakref.WeakValueDictionary()
_callbacks_installed: set[int] = set()


class AbstractWorkerPool(abc.ABC):
    """What every pool does: hand out free workers and take them back."""

    @abc.abstractmethod
    def push(self, w: int) -> "AbstractWorkerPool":
        """Add worker `w` to the pool (free)."""

    @abc.abstractmethod
    def put(self, w: int) -> "AbstractWorkerPool":
        """Give back worker `w` after use."""

    @abc.abstractmethod
    def take(self, timeout: float | None = None) -> int:
        """A free worker, waiting until one is free."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """How many workers the pool has (free or busy)."""

    @abc.abstractmethod
    def isready(self) -> bool:
        """True when a worker is free now."""

    @abc.abstractmethod
    def workers(self) -> list[int]:
        """Every worker in the pool."""

    def wait(self, timeout: float | None = None) -> None:
        """Wait until a worker is free."""
        w = self.take(timeout)
        self.put(w)


class WorkerPool(AbstractWorkerPool):
    """A set of workers to run calls on, one call per worker at a time.

    Example:
        >>> pool = fd.WorkerPool([2, 3])
        >>> fd.remotecall_fetch(lambda: fd.myid(), pool) in (2, 3)
        True
    """

    def __init__(self, pids: Any = ()) -> None:
        n = _node.current()
        self._cond = threading.Condition()
        self._all: set[int] = set()
        self._free: deque[int] = deque()
        self._owner = n.myid
        self._id = next(_pool_ids)
        self._is_default = False
        _pools[self._id] = self
        _watch_removals(n)
        for p in pids:
            self.push(int(p))

    # -- local operations (on the pool's owner) --------------------------------------------

    def push(self, w: int) -> "WorkerPool":
        if self._remote():
            self._call("push", w)
            return self
        with self._cond:
            if w not in self._all:
                self._all.add(w)
                self._free.append(w)
                self._cond.notify()
        return self

    def put(self, w: int) -> "WorkerPool":
        if self._remote():
            self._call("put", w)
            return self
        with self._cond:
            if w in self._all and w not in self._free:
                self._free.append(w)
                self._cond.notify()
        return self

    def take(self, timeout: float | None = None) -> int:
        if self._remote():
            return int(self._call("take", timeout))
        with self._cond:
            while True:
                while self._free:
                    w = self._free.popleft()
                    if w in self._all:
                        return w
                if not self._all:
                    if self._is_default:
                        return 1  # no workers: the master works alone, as in Julia
                    raise RuntimeError("No active worker available in pool")
                if not self._cond.wait(timeout):
                    raise TimeoutError(f"no worker of the pool became free within {timeout} s")

    def __len__(self) -> int:
        if self._remote():
            return int(self._call("len"))
        return len(self._all)

    def isready(self) -> bool:
        if self._remote():
            return bool(self._call("isready"))
        with self._cond:
            return any(w in self._all for w in self._free) or (self._is_default and not self._all)

    def workers(self) -> list[int]:
        if self._remote():
            return list(self._call("workers"))
        return sorted(self._all)

    def _remove_worker(self, w: int) -> None:
        with self._cond:
            self._all.discard(w)
            self._cond.notify_all()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.workers()})"

    # -- travelling ------------------------------------------------------------------------------

    def _remote(self) -> bool:
        return self._owner != _node.current().myid

    def _call(self, op: str, *args: Any) -> Any:
        from fastdist.remotecall import remotecall_fetch

        return remotecall_fetch(_pool_op, self._owner, self._id, op, *args)

    def __reduce__(self) -> Any:
        return (_pool_proxy, (type(self), self._owner, self._id))


def _pool_proxy(cls: type, owner: int, pool_id: int) -> WorkerPool:
    if owner == _node.current().myid and pool_id in _pools:
        return _pools[pool_id]
    proxy = cls.__new__(cls)
    proxy._owner, proxy._id, proxy._is_default = owner, pool_id, False
    return proxy  # type: ignore[no-any-return]


def _pool_op(pool_id: int, op: str, *args: Any) -> Any:
    pool = _pools.get(pool_id)
    if pool is None:
        raise RuntimeError(f"worker pool {pool_id} no longer exists on process {_node.current().myid}")
    if op == "len":
        return len(pool)
    return getattr(pool, op)(*args)


def _watch_removals(n: Any) -> None:
    if id(n) in _callbacks_installed:
        return
    _callbacks_installed.add(id(n))

    def removed(pid: int) -> None:
        for pool in list(_pools.values()):
            if pool._owner == n.myid:
                pool._remove_worker(pid)

    n.worker_removed_callbacks.append(removed)


_default_pool: WorkerPool | None = None
_default_lock = threading.Lock()


def default_worker_pool() -> WorkerPool:
    """The pool of all workers (pid 1 alone when there are none).

    Workers added by `addprocs` join it; workers that die or are removed leave it.
    On a worker it is a proxy for pid 1's default pool.
    """
    global _default_pool
    n = _node.current()
    if n.myid != 1:
        if _default_pool is None or _default_pool._owner != 1:
            from fastdist.remotecall import remotecall_fetch

            _default_pool = remotecall_fetch(default_worker_pool, 1)
        return _default_pool
    with _default_lock:
        if _default_pool is None:
            pool = WorkerPool(n.worker_pids())
            pool._is_default = True
            _default_pool = pool
        return _default_pool


def add_to_default_pool(pids: list[int]) -> None:
    if _default_pool is not None:
        for p in pids:
            _default_pool.push(p)


def remote(f: Any, pool: AbstractWorkerPool | None = None) -> Any:
    """A function that runs `f` on a free worker of `pool` (default: all workers)."""
    from fastdist.remotecall import remotecall_fetch

    def call(*args: Any, **kwargs: Any) -> Any:
        return remotecall_fetch(f, pool if pool is not None else default_worker_pool(),
                                *args, **kwargs)

    call.__name__ = f"remote({getattr(f, '__name__', 'f')})"
    return call


# -- calls on a pool ----------------------------------------------------------------------


def pool_call(pool: AbstractWorkerPool, fn: Any, f: Any, args: Any, kwargs: Any) -> Any:
    """`fn(f, w, *args, **kwargs)` on a worker `w` taken from the pool and given back."""
    w = pool.take()
    try:
        if isinstance(pool, CachingPool) and w != _node.current().myid:
            return fn(pool._token_for(f, w), w, *args, **kwargs)
        return fn(f, w, *args, **kwargs)
    finally:
        pool.put(w)


def pool_remotecall(pool: AbstractWorkerPool, f: Any, args: Any, kwargs: Any) -> Any:
    """`remotecall` on a pool: the worker goes back to the pool when the call is done."""
    from fastdist.remotecall import remotecall

    w = pool.take()
    try:
        if isinstance(pool, CachingPool) and w != _node.current().myid:
            fut = remotecall(pool._token_for(f, w), w, *args, **kwargs)
        else:
            fut = remotecall(f, w, *args, **kwargs)
    except BaseException:
        pool.put(w)
        raise

    def give_back() -> None:
        try:
            waiter = fut._push if fut._push is not None else None
            if waiter is not None:
                waiter.wait()
            else:
                fut.wait()
        except BaseException:  # noqa: BLE001 - the caller sees the failure on fetch
            pass
        pool.put(w)

    _node.current().callpool.submit(give_back)
    return fut


# -- CachingPool --------------------------------------------------------------------------


class CachedFunction:
    """Stands for a function in a call to a CachingPool worker: the key, and the
    function itself the first time it goes to that worker."""

    __slots__ = ("owner", "key", "func")

    def __init__(self, owner: int, key: int, func: Any) -> None:
        self.owner = owner
        self.key = key
        self.func = func

    def __reduce__(self) -> Any:
        return (CachedFunction, (self.owner, self.key, self.func))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        f = resolve_cached_function(_node.current(), self)
        return f(*args, **kwargs)


class CachingPool(WorkerPool):
    """A WorkerPool that sends each function to each worker once for the life of the pool.

    `clear(pool)` (or `pool.clear()`) frees the workers' copies. A CachingPool
    stays on the process that made it: it refuses to be pickled.

    Example:
        >>> big = np.ones(2_000_000)
        >>> pool = fd.CachingPool(fd.workers())
        >>> fd.pmap(lambda i: big[i], pool, range(100))  # `big` travels once per worker
    """

    def __init__(self, pids: Any = ()) -> None:
        super().__init__(pids)
        self._keys: dict[int, tuple[Any, int]] = {}  # id(f) -> (f, key): keeps f alive
        self._sent: set[tuple[int, int]] = set()  # (key, worker)
        self._cache_lock = threading.Lock()

    def _token_for(self, f: Any, w: int) -> CachedFunction:
        n = _node.current()
        with self._cache_lock:
            entry = self._keys.get(id(f))
            if entry is None or entry[0] is not f:
                entry = self._keys[id(f)] = (f, n.next_id())
            key = entry[1]
            first = (key, w) not in self._sent
            self._sent.add((key, w))
        return CachedFunction(n.myid, key, f if first else None)

    def clear(self) -> None:
        """Free the cached functions on every worker."""
        n = _node.current()
        with self._cache_lock:
            by_worker: dict[int, list[int]] = {}
            for key, w in self._sent:
                by_worker.setdefault(w, []).append(key)
            self._sent.clear()
            self._keys.clear()
        for w, keys in by_worker.items():
            body = struct.pack(f"<{len(keys)}Q", *keys)
            try:
                n.send(w, Kind.FORGET_FUNCS, 0, 0, n.myid, 0, body)
            except (ProcessExitedException, ValueError):
                pass

    def __del__(self) -> None:
        try:
            if self._sent:
                self.clear()
        except Exception:  # noqa: BLE001
            pass

    def __reduce__(self) -> Any:
        raise TypeError("a CachingPool stays on the process that made it and cannot be "
                        "serialised; pass a WorkerPool instead")


# -- the worker side of cached functions ----------------------------------------------------

_func_cache: dict[tuple[int, int], Any] = {}
_func_cond = threading.Condition()


def resolve_cached_function(node: Any, token: Any) -> Any:
    """The function a CachedFunction stands for, defining it on first sight."""
    if not isinstance(token, CachedFunction):
        return token
    k = (token.owner, token.key)
    with _func_cond:
        if token.func is not None:
            _func_cache[k] = token.func
            _func_cond.notify_all()
            return token.func
        # The call that carries the function may be decoded on another thread just now.
        if not _func_cond.wait_for(lambda: k in _func_cache, timeout=60):
            raise RuntimeError(f"cached function {token.key} from process {token.owner} "
                               "is unknown here (was the pool cleared?)")
        return _func_cache[k]


def forget_cached_functions(node: Any, owner: int, body: bytes) -> None:
    keys = struct.unpack(f"<{len(body) // 8}Q", body)
    with _func_cond:
        for key in keys:
            _func_cache.pop((owner, key), None)


def cached_function_count() -> int:
    """How many pool functions this process holds (for tests and stats)."""
    return len(_func_cache)

