"""The exceptions fastdist raises, and how a remote failure is carried back (Julia's names)."""

from __future__ import annotations

import traceback as _tb
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
        text = "".join(_tb.format_exception(type(ex), ex, ex.__traceback__))
        return cls(ex, text)

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
    """

    def __init__(self, pid: int, captured: CapturedException) -> None:
        super().__init__(pid, captured)
        self.pid = pid
        self.captured = captured
        if not isinstance(captured.ex, RemoteExceptionStandIn):
            self.__cause__ = captured.ex

    def __str__(self) -> str:
        return f"On worker {self.pid}:\n{self.captured.traceback.rstrip()}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteException, (self.pid, self.captured))


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
