"""The exceptions fastdist raises, and how a remote failure is carried back (Julia's names)."""

from __future__ import annotations

import os
import traceback as _tb
import types
import weakref
from collections.abc import Sequence
from typing import Any, Self

__all__ = [
    "CapturedException",
    "ChannelClosedError",
    "ClusterError",
    "CompositeException",
    "FutureAlreadySetError",
    "ProcessExitedException",
    "ProtocolError",
    "RemoteException",
    "RemoteExceptionStandIn",
]


class ClusterError(RuntimeError):
    """A cluster could not be formed: bad cookie, version mismatch, launch failure."""


class ProtocolError(ConnectionError):
    """A peer sent bytes that are not a valid fastdist frame or handshake."""


class FutureAlreadySetError(RuntimeError):
    """`put` on a Future that already holds a value (Futures are write-once)."""


class ChannelClosedError(RuntimeError):
    """`put` on a closed channel, or `take`/`fetch` on a closed and drained one."""


class ProcessExitedException(RuntimeError):
    """The worker a call depends on died or was removed.

    Attributes:
        worker_id: the pid of that worker.
    """

    def __init__(self, worker_id: int) -> None:
        super().__init__(worker_id)
        self.worker_id = worker_id

    def __str__(self) -> str:
        return f"ProcessExitedException: worker {self.worker_id} has exited"

    def __reduce__(self) -> tuple[Any, ...]:
        return (ProcessExitedException, (self.worker_id,))


class RemoteExceptionStandIn(Exception):
    """Takes the place of a remote exception that could not be pickled or unpickled.

    Attributes:
        type_name: the qualified name of the original exception type.
        message: ``str()`` of the original exception.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(type_name, message)
        self.type_name = type_name
        self.message = message

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _is_fastdists(filename: str) -> bool:
    # Compiled modules name their source as it was at build time ("src/fastdist/...").
    if filename.endswith((".pyx", ".pxi")):
        return "fastdist/_core/" in filename or "fastdist/_fastpath/" in filename
    return filename.startswith(_PACKAGE_DIR)


def _runs_users(frame: _tb.FrameSummary) -> bool:
    # The frame from which every call on a process enters the user's function.
    return frame.name == "run_user" and frame.filename.endswith("_calls.pyx")


def user_traceback(ex: BaseException) -> str:
    """`ex`'s traceback as text, without fastdist's own frames: the user's file and
    line, with the source line where this process has the file.

    A traceback made of fastdist frames alone (an error of fastdist itself) is
    kept whole: it would say nothing without them.
    """
    te = _tb.TracebackException(type(ex), ex, ex.__traceback__, compact=True)
    seen: set[int] = set()
    pending = [te]
    while pending:
        t = pending.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        users = [f for f in t.stack if not _is_fastdists(f.filename)]
        # Keep fastdist's frames only for an error of fastdist itself: none of the
        # user's code ran, nor a call of theirs (a builtin, say) from fastdist's.
        if len(users) < len(t.stack) and (users or any(_runs_users(f) for f in t.stack)):
            t.stack = _tb.StackSummary.from_list(users)
        pending.extend(c for c in (t.__cause__, t.__context__) if c is not None)
        pending.extend(t.exceptions or ())
    return "".join(te.format())


class CapturedException(Exception):
    """An exception and the text of its traceback, captured where it was raised.

    Attributes:
        ex: the exception, or a `RemoteExceptionStandIn` when it cannot travel.
        traceback: the formatted traceback (text; traceback objects never travel).
    """

    def __init__(self, ex: BaseException, traceback: str) -> None:
        super().__init__(ex, traceback)
        self.ex = ex
        self.traceback = traceback

    @classmethod
    def capture(cls, ex: BaseException) -> CapturedException:
        return cls(ex, user_traceback(ex))

    def __str__(self) -> str:
        return self.traceback or repr(self.ex)

    def __reduce__(self) -> tuple[Any, ...]:
        return (CapturedException, (self.ex, self.traceback))


class RemoteException(Exception):
    """A call on another process raised.

    Attributes:
        pid: the process the exception was raised on.
        captured: the `CapturedException` with the remote exception and traceback.

    ``str()`` starts with ``On worker {pid}:`` followed by the remote traceback, and
    ``__cause__`` is the original exception where it could be unpickled.

    It is also an instance of the original exception's type (when that is an
    `Exception` this process has, as Ray's task errors are): ``except ValueError``
    and ``except* ValueError`` catch a remote ValueError, and its attributes read
    through (`err.errno`, `err.args` of the original under `captured.ex.args`).
    `type(err)` is then a subclass of both, named ``RemoteException[ValueError]``.
    """

    pid: int
    captured: CapturedException

    def __new__(cls, pid: int, captured: CapturedException) -> Self:
        if cls is RemoteException:
            matching = _matching_class(type(captured.ex))
            if matching is not RemoteException:
                try:
                    # The original's own arguments: a C type's __new__ reads its fields
                    # from them (OSError's errno, strerror, filename).
                    return super(RemoteException, matching).__new__(  # type: ignore[return-value]
                        matching, *captured.ex.args)
                except Exception:  # noqa: BLE001 - arguments its __new__ refuses
                    pass
        return super().__new__(cls, pid, captured)

    def __init__(self, pid: int, captured: CapturedException) -> None:
        # Not super().__init__: past this class, the MRO reaches the original's
        # own __init__, which takes its own arguments.
        Exception.__init__(self, pid, captured)
        # object.__setattr__: the original's class may forbid setting attributes
        # (a frozen dataclass exception).
        object.__setattr__(self, "pid", pid)
        object.__setattr__(self, "captured", captured)
        if not isinstance(captured.ex, RemoteExceptionStandIn):
            object.__setattr__(self, "__cause__", captured.ex)
        if type(self) is not RemoteException:
            _copy_slots(captured.ex, self)

    def __getattr__(self, name: str) -> Any:
        # Only for names this object lacks: the original exception's attributes.
        captured = self.__dict__.get("captured")
        if captured is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(captured.ex, name)

    def __str__(self) -> str:
        return f"On worker {self.pid}:\n{self.captured.traceback.rstrip()}"

    def __repr__(self) -> str:
        return f"RemoteException({self.pid}, {self.captured.ex!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteException, (self.pid, self.captured))


def _copy_slots(original: BaseException, to: BaseException) -> None:
    """The original's slot fields (OSError's errno and filename, StopIteration's
    value, a class's __slots__): they exist on `to` too, unset, where __getattr__
    would not look."""
    for klass in type(original).__mro__:
        if klass is BaseException:
            break
        for name, field in vars(klass).items():
            if isinstance(field, types.MemberDescriptorType):
                try:
                    object.__setattr__(to, name, getattr(original, name))
                except (AttributeError, TypeError):
                    pass


# A RemoteException is never also one of these: a StopIteration would end the loop
# that fetches it without a word (Python reads it as "no more"), and a stand-in or a
# RemoteException is no user type.
_NEVER_MATCHED = (StopIteration, StopAsyncIteration, RemoteExceptionStandIn, RemoteException)

# One class per original type: RemoteException and that type (weakly keyed, so a
# class defined by value in a user's script does not live for ever).
_matching: weakref.WeakKeyDictionary[type, type[RemoteException]] = weakref.WeakKeyDictionary()


def _matching_class(original: type[BaseException]) -> type[RemoteException]:
    """RemoteException[original], or RemoteException itself where there can be none:
    a BaseException that is not an Exception (KeyboardInterrupt must never be caught
    as one, nor SystemExit end the caller), a stand-in, or a type that cannot be a
    second base (a C layout that conflicts, a metaclass or hook that refuses)."""
    if (not issubclass(original, Exception) or issubclass(original, _NEVER_MATCHED)
            or original is Exception):
        return RemoteException
    try:
        return _matching[original]
    except KeyError:
        pass
    name = f"RemoteException[{original.__qualname__}]"
    metaclass: Any = type(original)
    made: type[RemoteException]
    try:
        made = metaclass(name, (RemoteException, original), {
            "__module__": __name__, "__qualname__": name,
            # The original's hooks must not run for a RemoteException.
            "__init_subclass__": classmethod(lambda cls, **kw: None)})
    except Exception:  # noqa: BLE001 - any refusal: the plain RemoteException
        made = RemoteException
    try:
        _matching[original] = made
    except TypeError:
        pass
    return made


class CompositeException(ExceptionGroup[Exception]):
    """Several exceptions from a group of tasks or processes (e.g. `everywhere`, `sync`).

    `CompositeException(excs)` or `CompositeException(message, excs)`.
    """

    def __new__(cls, message_or_excs: str | Sequence[Exception],
                excs: Sequence[Exception] | None = None) -> Self:
        message, excs = _composite_args(message_or_excs, excs)
        return super().__new__(cls, message, excs)

    def __init__(self, message_or_excs: str | Sequence[Exception],
                 excs: Sequence[Exception] | None = None) -> None:
        message, excs = _composite_args(message_or_excs, excs)
        super().__init__(message, excs)

    def derive(self, excs: Sequence[Exception]) -> CompositeException:  # type: ignore[override]
        return CompositeException(self.message, excs)


def _composite_args(message_or_excs: str | Sequence[Exception],
                    excs: Sequence[Exception] | None) -> tuple[str, list[Exception]]:
    if excs is None:
        if isinstance(message_or_excs, str):
            raise TypeError("CompositeException(message, excs) needs the exceptions too")
        return "several tasks failed", list(message_or_excs)
    return str(message_or_excs), list(excs)
