"""Julia's parallel macros as functions: spawnat, fetchfrom, fetch_any, everywhere,
distributed, and clear.

Port of Distributed.jl `macros.jl` (and `clear!` from `clusterserialize.jl`). A
macro becomes a function taking a callable: `@spawnat p expr` is
`spawnat(p, fn, *args)`, `@distributed (+) for x in r body end` is
`distributed(body, r, operator.add)`.
"""

from __future__ import annotations

import ast
import functools
import importlib
import itertools
import numbers
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fastdist import node as _node
from fastdist.exceptions import CapturedException, CompositeException, RemoteException
from fastdist.protocol import serialize
from fastdist.protocol.messages import Kind
from fastdist.protocol.values import decode_result
from fastdist.refs import Future
from fastdist.refstore import Waiter
from fastdist.workerpool import CachingPool

__all__ = ["clear", "distributed", "everywhere", "fetch_any", "fetchfrom", "spawnat"]

_next_index = itertools.count()


def nextproc() -> int:
    """The next worker in round-robin order (Julia's `nextproc`, used by `"any"`)."""
    from fastdist.cluster import workers

    ws = workers()
    return ws[next(_next_index) % len(ws)]


def _target(p: Any) -> Any:
    if isinstance(p, str):
        if p != "any":
            raise ValueError(f"a process is a pid, a pool or 'any', not {p!r}")
        return nextproc()
    return p


def spawnat(p: int | str | Any, fn: Callable[..., Any], /, *args: Any,
            **kwargs: Any) -> Future:
    """Run ``fn(*args, **kwargs)`` on process `p` and return at once (Julia's `@spawnat`).

    The Future is registered with the enclosing `sync` block, if any.

    Args:
        p: a pid, ``"any"`` (the next worker in round-robin order, as `@spawnat :any`),
            or a worker pool.
        fn: the function to run.

    Returns:
        A Future holding the result.

    Raises:
        ValueError: `p` is a string other than ``"any"``.
        ProcessExitedException: process `p` is gone.

    Example:
        >>> fd.fetch(fd.spawnat(2, fd.myid))
        2
        >>> fd.spawnat("any", sum, [1, 2]).fetch()
        3
    """
    from fastdist.remotecall import remotecall

    return remotecall(fn, _target(p), *args, **kwargs)


def fetchfrom(p: int | str | Any, fn: Callable[..., Any], /, *args: Any,
              **kwargs: Any) -> Any:
    """``fetch(spawnat(p, fn, *args, **kwargs))`` in one round trip (Julia's `@fetchfrom`).

    Raises:
        RemoteException: `fn` raised on `p`.

    Example:
        >>> fd.fetchfrom(2, fd.myid)
        2
    """
    from fastdist.remotecall import remotecall_fetch

    return remotecall_fetch(fn, _target(p), *args, **kwargs)


def fetch_any(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """``fetch(spawnat("any", fn, ...))``: run on the next worker, return the value
    (Julia's `@fetch`).

    Example:
        >>> sorted(fd.fetch_any(fd.myid) for _ in fd.workers()) == fd.workers()
        True
    """
    from fastdist.remotecall import remotecall_fetch

    return remotecall_fetch(fn, nextproc(), *args, **kwargs)


# -- calls to several processes at once, outside any `sync` block --------------------------


class _Pending:
    """A call in flight to one process; `result()` waits for it.

    Unlike a Future it is not registered with `sync` (everywhere, distributed and
    clear wait for their own calls, as Julia's do in a `@sync` of their own).
    """

    __slots__ = ("outcome", "pid", "waiter", "wid")

    def __init__(self, pid: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        n = _node.current()
        self.pid = pid
        self.wid = 0
        self.waiter: Waiter | None = None
        self.outcome: tuple[Any, bool] | None = None
        if pid == n.myid:
            try:
                self.outcome = (n.callpool.run_user(fn, *args), False)
            except Exception as exc:  # noqa: BLE001 - reported like a remote failure
                err = RemoteException(n.myid, CapturedException.capture(exc))
                err.__cause__ = exc
                self.outcome = (err, True)
            return
        try:
            body, buffers = serialize.dumps((fn, args, {}), dest=pid,
                                            what="call (function and arguments)")
            self.wid = n.next_id()
            self.waiter = Waiter(peer=pid)
            n.waiters[self.wid] = self.waiter
            n.send(pid, Kind.CALL_FETCH, 0, 0, n.myid, self.wid, body, buffers)
        except Exception as exc:  # noqa: BLE001 - raised by result()
            n.waiters.pop(self.wid, None)
            self.outcome = (exc, True)

    def result(self) -> Any:
        if self.outcome is None:
            w = self.waiter
            assert w is not None
            w.wait()
            self.outcome = (w.error, True) if w.error is not None else decode_result(*w.value)
        value, is_error = self.outcome
        if is_error:
            raise value
        return value


def _gather(pending: list[_Pending]) -> tuple[list[Any], list[Exception]]:
    """Wait for every call; the values (None for failures) and the failures, in order."""
    values: list[Any] = []
    errors: list[Exception] = []
    for p in pending:
        try:
            values.append(p.result())
        except Exception as exc:  # noqa: BLE001 - collected
            values.append(None)
            errors.append(exc)
    return values, errors


def _start_all(pids: list[int], fn: Callable[..., Any],
               args: Callable[[int], tuple[Any, ...]], here_first: bool) -> list[_Pending]:
    """Start ``fn(*args(i))`` on ``pids[i]`` for every i; runs on this process happen
    before the others start (`here_first`) or after they all have. In `pids` order."""
    me = _node.current().myid
    pending: list[_Pending | None] = [None] * len(pids)
    for local in ((True, False) if here_first else (False, True)):
        for i, p in enumerate(pids):
            if (p == me) == local:
                pending[i] = _Pending(p, fn, args(i))
    return pending  # type: ignore[return-value]


def _pid_list(procs: Any, default: Callable[[], list[int]]) -> list[int]:
    if procs is None:
        return default()
    if isinstance(procs, numbers.Integral):
        return [int(procs)]
    return [int(p) for p in procs]


# -- everywhere ---------------------------------------------------------------------------


class _Code:
    """Python source to run in `__main__`. Its value, as Julia gives a block's, is
    that of a final expression, or of the variable a final assignment sets."""

    __slots__ = ("source",)

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self) -> Any:
        return (_Code, (self.source,))

    def run(self, namespace: dict[str, Any]) -> Any:
        tree = ast.parse(self.source, filename="<everywhere>", mode="exec")
        final = tree.body[-1] if tree.body else None
        if isinstance(final, ast.Expr):
            tree.body.pop()
            exec(compile(tree, "<everywhere>", "exec"), namespace)
            return eval(compile(ast.Expression(final.value), "<everywhere>", "eval"), namespace)
        exec(compile(tree, "<everywhere>", "exec"), namespace)
        assigned = _assigned_name(final)
        return namespace.get(assigned) if assigned is not None else None


def _assigned_name(stmt: ast.stmt | None) -> str | None:
    if isinstance(stmt, ast.Assign):
        target: ast.expr = stmt.targets[0]
    elif isinstance(stmt, (ast.AugAssign, ast.AnnAssign)) and (
            not isinstance(stmt, ast.AnnAssign) or stmt.value is not None):
        target = stmt.target
    else:
        return None
    return target.id if isinstance(target, ast.Name) else None


class _Define:
    """A function to bind in `__main__` under its own name (the decorator form)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __reduce__(self) -> Any:
        return (_Define, (self.fn,))


def _run_in_main(task: Any, variables: dict[str, Any]) -> Any:
    """On each process: bind the variables in `__main__`, then run the task."""
    main = sys.modules["__main__"]
    for name, value in variables.items():
        setattr(main, name, value)
    if isinstance(task, _Code):
        return task.run(main.__dict__)
    if isinstance(task, _Define):
        setattr(main, task.fn.__name__, task.fn)
        return None
    return task()


def _run_in_main_quietly(task: Any, variables: dict[str, Any]) -> None:
    """`_run_in_main` for a run on several processes: its value stays where it was
    made (Julia's @everywhere returns nothing, and sends nothing back: a large array
    defined this way must not travel, nor a lock that cannot)."""
    _run_in_main(task, variables)


def _is_being_decorated(fn: Any, frame: types.FrameType | None) -> bool:
    """Whether `everywhere(fn)` is `@everywhere` on a `def`: a function of the
    calling module whose name the calling scope has not bound to it yet."""
    if frame is None or not isinstance(fn, types.FunctionType) or fn.__name__ == "<lambda>":
        return False
    if fn.__module__ != frame.f_globals.get("__name__"):
        return False
    name = fn.__name__
    return frame.f_locals.get(name) is not fn and frame.f_globals.get(name) is not fn


def everywhere(code: str | Callable[..., Any] | None = None,
               procs: int | Iterable[int] | None = None, **variables: Any) -> Any:
    """Run code on every process, this one included (Julia's `@everywhere`).

    This process runs it first, then the others concurrently. `code` is

    * a string of Python source, run with ``exec`` in each process's `__main__`;
    * a callable, called with no arguments on each process;
    * as a decorator, ``@everywhere`` or ``@everywhere(procs=[...])`` on a ``def``:
      the function is defined in `__main__` on each process, and returned.

    (``everywhere(fn)`` calls `fn` when the calling scope already has `fn` under its
    name, and defines it when it does not, i.e. on a ``def`` being decorated.)

    Args:
        code: the source, callable or decorated function.
        procs: the pids to run on (default: all processes). A list may repeat a
            pid to run there more than once. A single pid returns the value.
        **variables: bound as globals of `__main__` on each process first
            (Julia's ``$x`` interpolation).

    Returns:
        With a single pid as `procs`, the value of the code's final expression or
        of the variable its final assignment sets (or what the callable returned);
        else None. As a decorator, the function.

    Raises:
        CompositeException: the code raised on one or more processes; it holds a
            `RemoteException` per failure, in the order of `procs`. With a single
            pid as `procs`, that process's `RemoteException` itself.

    Example:
        >>> fd.everywhere("import math; x = math.pi", y=2)
        >>> fd.everywhere("x * y", procs=2)
        6.283185307179586
        >>> @fd.everywhere
        ... def double(v):
        ...     return 2 * v
        >>> fd.everywhere("double(21)", procs=2)
        42
    """
    if code is None:
        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            _run_everywhere(_Define(fn), procs, variables)
            return fn

        return decorate
    if isinstance(code, str):
        return _run_everywhere(_Code(code), procs, variables)
    if not callable(code):
        raise TypeError(f"everywhere takes source code or a callable, not {type(code).__name__}")
    if _is_being_decorated(code, sys._getframe(1)):
        _run_everywhere(_Define(code), procs, variables)
        return code
    return _run_everywhere(code, procs, variables)


def _run_everywhere(task: Any, procs: Any, variables: dict[str, Any]) -> Any:
    from fastdist.cluster import procs as all_procs

    pids = _pid_list(procs, all_procs)
    if isinstance(procs, numbers.Integral):
        return _Pending(pids[0], _run_in_main, (task, variables)).result()
    # This process first, so that what it defines exists here before the others run.
    _, errors = _gather(_start_all(pids, _run_in_main_quietly, lambda i: (task, variables),
                                   here_first=True))
    if errors:
        raise CompositeException(f"everywhere failed on {len(errors)} of {len(pids)} runs", errors)
    return None


# -- distributed ---------------------------------------------------------------------------


def splitrange(n: int, np: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into at most `np` contiguous (lo, hi) chunks whose sizes
    differ by at most one (Julia's `splitrange`); no empty chunks.

    Example:
        >>> splitrange(7, 3)
        [(0, 3), (3, 5), (5, 7)]
    """
    each, extras = divmod(n, np)
    nchunks = np if each > 0 else extras
    chunks = []
    lo = 0
    for i in range(nchunks):
        hi = lo + each + (1 if i < extras else 0)
        chunks.append((lo, hi))
        lo = hi
    return chunks


def _reduce_chunk(reducer: Callable[[Any, Any], Any], body: Callable[[Any], Any],
                  chunk: Iterable[Any]) -> Any:
    it = iter(chunk)
    acc = body(next(it))
    for x in it:
        acc = reducer(acc, body(x))
    return acc


def _run_chunk(body: Callable[[Any], Any], chunk: Iterable[Any]) -> None:
    for x in chunk:
        body(x)


def _sliceable(iterable: Any) -> Any:
    if isinstance(iterable, Mapping) or not (hasattr(iterable, "__len__")
                                             and hasattr(iterable, "__getitem__")):
        return list(iterable)
    return iterable


def distributed(body: Callable[[Any], Any], iterable: Iterable[Any],
                reducer: Callable[[Any, Any], Any] | None = None) -> Any:
    """A parallel for loop over `iterable` (Julia's `@distributed`).

    The elements are split into `nworkers()` contiguous chunks whose sizes differ
    by at most one, one chunk per worker (fewer chunks than workers when there
    are fewer elements). Each worker runs ``body(x)`` for the elements of its chunk.

    Args:
        body: called with each element.
        iterable: the elements; ranges, lists, tuples, strings and arrays are
            sliced (only its chunk goes to each worker), anything else is read
            into a list first.
        reducer: with a reducer ``reducer(a, b)``, each worker reduces the
            ``body(x)`` values of its chunk, left to right, and this process
            reduces the partial results: ``distributed(f, r, operator.add)`` is
            ``sum(f(x) for x in r)`` computed in parallel.

    Returns:
        With a reducer, the reduced value (after every worker is done). Without,
        at once, a list of Futures, one per chunk, registered with the enclosing
        `sync` block; wait on them (or on the block) to know the loop is done.

    Raises:
        RemoteException: with a reducer, `body` or `reducer` raised (the first
            failure in chunk order).
        ValueError: with a reducer, `iterable` is empty.

    Example:
        >>> fd.distributed(lambda i: i * i, range(10), operator.add)
        285
        >>> with fd.sync():
        ...     futures = fd.distributed(print, "ab")
    """
    from fastdist.cluster import workers

    items = _sliceable(iterable)
    ws = workers()
    chunks = splitrange(len(items), len(ws))
    if reducer is None:
        return [spawnat(w, _run_chunk, body, items[lo:hi]) for w, (lo, hi) in zip(ws, chunks)]
    if not chunks:
        raise ValueError("distributed: a reduction over no elements has no value")
    # Others first, so that this process's own chunk (when it works too) overlaps them.
    pending = _start_all(ws[:len(chunks)], _reduce_chunk,
                         lambda i: (reducer, body, items[chunks[i][0]:chunks[i][1]]),
                         here_first=False)
    partials, errors = _gather(pending)
    if errors:
        raise errors[0]
    return functools.reduce(reducer, partials)


# -- clear -------------------------------------------------------------------------------


def _is_constant(module: types.ModuleType, name: str) -> bool:
    annotation = getattr(module, "__annotations__", {}).get(name)
    if annotation is None:
        return False
    if isinstance(annotation, str):
        return annotation.split("[", 1)[0].strip() in ("Final", "typing.Final", "t.Final")
    return annotation is typing.Final or typing.get_origin(annotation) is typing.Final


def _clear_names(names: list[str], module_name: str) -> None:
    """On each process: set the module's globals `names` (those it has) to None."""
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    for name in names:
        if not hasattr(module, name):
            continue
        if _is_constant(module, name):
            raise TypeError(f"{module_name}.{name} is a constant (annotated Final); "
                            "clear cannot reset it")
        setattr(module, name, None)


def clear(names: str | Iterable[str] | CachingPool, pids: int | Iterable[int] | None = None,
          mod: str | types.ModuleType = "__main__") -> Any:
    """Set global variables to None on processes, so their values can be freed
    (Julia's `clear!`); or, given a CachingPool, free its cached functions.

    Args:
        names: a name or names of globals of `mod`; names a process does not
            have are skipped there. Or a CachingPool: `clear(pool)` is `pool.clear()`.
        pids: where (default: all workers, as Julia's `workers()`).
        mod: the module, by name or as a module (default ``"__main__"``).

    Returns:
        None; the pool for `clear(pool)`.

    Raises:
        CompositeException: clearing failed on some processes, e.g. a name is a
            constant (annotated ``Final``) or the module refuses the assignment.

    Example:
        >>> fd.everywhere("big = list(range(10**6))")
        >>> fd.clear("big")
        >>> fd.everywhere("big is None", procs=2)
        True
    """
    from fastdist.cluster import workers

    if isinstance(names, CachingPool):
        return names.clear()
    name_list = [names] if isinstance(names, str) else list(names)
    for name in name_list:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"clear takes names of variables, not {name!r}")
    module_name = mod if isinstance(mod, str) else mod.__name__
    targets = _pid_list(pids, workers)
    _, errors = _gather(_start_all(targets, _clear_names, lambda i: (name_list, module_name),
                                   here_first=False))
    if errors:
        raise CompositeException(f"clear failed on {len(errors)} of {len(targets)} processes",
                                 errors)
    return None
