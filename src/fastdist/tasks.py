"""Thread-backed tasks and the `sync` block that waits for them (Julia's `@async` and `@sync`)."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from fastdist.channel import check_timeout
from fastdist.exceptions import CompositeException

__all__ = ["Task", "Waitable", "register_sync", "run_async", "sync"]


class Waitable(Protocol):
    """Anything `sync` can wait for: `wait()` returns when done, raises if it failed."""

    def wait(self) -> Any: ...


class Task:
    """A function call running on its own daemon thread (Julia's `Task`).

    The thread runs in a copy of the creating thread's `contextvars` context, so a
    task started inside a `sync` block registers what it starts to that block.

    Args:
        fn: the function to call.
        *args: its positional arguments.
        **kwargs: its keyword arguments.

    Example:
        >>> t = Task(sum, [1, 2, 3]).start()
        >>> t.result()
        6
    """

    def __init__(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        self._fn = fn
        self._args = args
        self._kwargs = kwargs
        self._context = contextvars.copy_context()
        self._finished = threading.Event()
        self._started = False
        self._start_lock = threading.Lock()
        self._value: Any = None
        self._exception: BaseException | None = None

    def start(self) -> Task:
        """Start running the function on a new daemon thread.

        Returns:
            The task itself.

        Raises:
            RuntimeError: the task was started before.

        Example:
            >>> Task(print, "hi").start().wait()
            hi
        """
        with self._start_lock:
            if self._started:
                raise RuntimeError("a Task can be started only once")
            self._started = True
        name = f"fastdist-task-{getattr(self._fn, '__name__', 'fn')}"
        threading.Thread(
            target=self._context.run, args=(self._run,), name=name, daemon=True
        ).start()
        return self

    def _run(self) -> None:
        try:
            self._value = self._fn(*self._args, **self._kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the task
            self._exception = e
        finally:
            # Drop references the task no longer needs, so large arguments can be freed.
            self._fn = self._args = self._kwargs = None  # type: ignore[assignment]
            self._finished.set()

    def done(self) -> bool:
        """Whether the function has returned or raised (Julia's ``istaskdone``).

        Returns:
            ``True`` once the task has finished.

        Example:
            >>> t = Task(int).start(); t.wait(); t.done()
            True
        """
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the task finishes; a task that is never started never finishes.

        Args:
            timeout: seconds to wait at most; ``None`` waits forever.

        Raises:
            TimeoutError: the time ran out (the task goes on).
            BaseException: whatever the function raised, re-raised as the same object.

        Example:
            >>> run_async(int, "x").wait()
            Traceback (most recent call last):
            ValueError: invalid literal for int() with base 10: 'x'
        """
        if not self._finished.wait(check_timeout(timeout)):
            raise TimeoutError(f"task did not finish within {timeout} s")
        if self._exception is not None:
            raise self._exception

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the task and return what the function returned (Julia's ``fetch``).

        Args:
            timeout: seconds to wait at most; ``None`` waits forever.

        Returns:
            The function's return value.

        Raises:
            TimeoutError: the time ran out (the task goes on).
            BaseException: whatever the function raised.

        Example:
            >>> run_async(pow, 2, 10).result()
            1024
        """
        self.wait(timeout)
        return self._value

    fetch = result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait for the task and return the exception it raised, or ``None``.

        Args:
            timeout: seconds to wait at most; ``None`` waits forever.

        Returns:
            The exception the function raised, or ``None`` if it returned.

        Raises:
            TimeoutError: the time ran out (the task goes on).

        Example:
            >>> run_async(int, "x").exception()
            ValueError("invalid literal for int() with base 10: 'x'")
        """
        if not self._finished.wait(check_timeout(timeout)):
            raise TimeoutError(f"task did not finish within {timeout} s")
        return self._exception

    def __repr__(self) -> str:
        if not self._started:
            state = "created"
        elif not self.done():
            state = "runnable"
        else:
            state = "failed" if self._exception is not None else "done"
        return f"<Task {state}>"


class _SyncBlock:
    """The waitables registered inside one `sync` block, appended to from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Waitable] = []
        self._open = True

    def add(self, w: Waitable) -> None:
        with self._lock:
            if self._open:
                self._items.append(w)

    def wait_all(self) -> list[Exception]:
        """Wait for every item, including those registered while waiting, then close."""
        errors: list[Exception] = []
        i = 0
        while True:
            with self._lock:
                if i == len(self._items):
                    # Closing under the lock makes "waited for" and "registered" agree:
                    # an item is either in the list we finished or not accepted at all.
                    self._open = False
                    return errors
                w = self._items[i]
            i += 1
            try:
                w.wait()
            except Exception as e:  # noqa: BLE001 - collected into a CompositeException
                errors.append(e)


# The innermost open `sync` block of this context. A ContextVar rather than a
# thread-local so that tasks (whose threads run in a copy of the context) register
# what they start to the block that was open where they were started.
_current_block: contextvars.ContextVar[_SyncBlock | None] = contextvars.ContextVar(
    "fastdist_sync_block", default=None
)


def register_sync(waitable: Waitable) -> None:
    """Have the innermost enclosing `sync` block wait for `waitable`.

    Called by `run_async`, and by `remotecall`, `spawnat` and `distributed` for the
    Futures they create. Outside a `sync` block, or after the block has finished
    waiting, it does nothing.

    Args:
        waitable: an object whose ``wait()`` returns when it is done and raises if it failed.

    Example:
        >>> with sync():
        ...     register_sync(Task(print, "registered").start())
        registered
    """
    block = _current_block.get()
    if block is not None:
        block.add(waitable)


def run_async(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Task:
    """Start ``fn(*args, **kwargs)`` on a new thread (Julia's ``@async``).

    Args:
        fn: the function to call.
        *args: its positional arguments.
        **kwargs: its keyword arguments.

    Returns:
        The started `Task`, registered to the enclosing `sync` block if any.

    Example:
        >>> run_async(sorted, [3, 1, 2]).result()
        [1, 2, 3]
    """
    task = Task(fn, *args, **kwargs)
    register_sync(task)
    return task.start()


@contextmanager
def sync() -> Iterator[None]:
    """Wait, on leaving the block, for everything started inside it (Julia's ``@sync``).

    Everything registered by this thread inside the block, or by tasks started from
    it, is waited for: `run_async` tasks, and the Futures of `remotecall`, `spawnat`
    and `distributed`. A nested block waits for its own items; the outer block does
    not wait for them again. All items are waited for even when some fail.

    Raises:
        CompositeException: one or more items failed; it holds every failure, in
            the order the items were registered.
        BaseException: the body's own exception propagates unchanged (after the
            waiting); failures of the items are then added to it as a note.

    Example:
        >>> results = []
        >>> with sync():
        ...     for i in range(3):
        ...         _ = run_async(results.append, i)
        >>> sorted(results)
        [0, 1, 2]
    """
    block = _SyncBlock()
    token = _current_block.set(block)
    try:
        yield
    except BaseException as body_error:
        _current_block.reset(token)
        errors = block.wait_all()
        if errors:
            body_error.add_note(
                f"also, {len(errors)} task(s) in this sync block failed: "
                + "; ".join(repr(e) for e in errors)
            )
        raise
    _current_block.reset(token)
    errors = block.wait_all()
    if errors:
        raise CompositeException(f"{len(errors)} task(s) in a sync block failed", errors)
