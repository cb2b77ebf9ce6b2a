"""Worker output and logging, brought to the master.

What a worker prints reaches the master's matching stream, each line prefixed
`From worker N:` (as Julia does); the pipes are read by the master's I/O loop,
and read to their end, so lines printed just before a worker exits still
arrive. A reply and the output printed before it travel apart (socket and
pipe), so as replies from a worker arrive, that worker's pipes are drained
first, once per batch of frames read together (`drain_worker_pipes`, called by
`Node.on_frames`): `remotecall_fetch(print, 2, "hi")` returns after the line is
printed. `logging` records emitted on a worker travel to the master
as LOG frames, queue per worker, and go to the master's handlers, with
`record.worker` set, in order and before the thread that waits for a reply of
that worker uses it (`handle_worker_logs`).
"""

from __future__ import annotations

import collections
import logging
import os
import select
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from fastdist.dispatch import register
from fastdist.protocol import serialize
from fastdist.protocol.messages import Kind


class _WorkerPipes:
    """The relayed pipes of one worker, polled together by `drain_worker_output`."""

    def __init__(self, relays: list[_LineRelay]) -> None:
        self.by_fd = {relay.fd: relay for relay in relays}
        self.relays = tuple(relays)  # a snapshot: the loop thread may forget one meanwhile
        # One poll object: one syscall tells whether any pipe has something. Python
        # forbids concurrent poll() calls on it, hence the lock.
        self.poller = select.poll()
        for fd in self.by_fd:
            self.poller.register(fd, select.POLLIN)
        self.lock = threading.Lock()

    def drain(self) -> None:
        # Runs for every batch of replies: the common case (nothing printed) is one
        # poll and a look at each relay's lock.
        with self.lock:
            ready = self.poller.poll(0)
        for fd, _ in ready:
            relay = self.by_fd.get(fd)
            if relay is not None:
                relay.drain()
        for relay in self.relays:
            # The loop thread may have read a line before our poll and be printing
            # it: it holds the relay's lock from the read until the line is out.
            if relay.lock.locked():
                with relay.lock:
                    pass

    def forget(self, relay: _LineRelay) -> None:
        """`relay` reached the end of its pipe: poll it no more."""
        if self.by_fd.pop(relay.fd, None) is not None:
            self.relays = tuple(self.by_fd.values())
            try:
                self.poller.unregister(relay.fd)
            except (KeyError, ValueError):
                pass


# The relayed pipes of each worker, by pid, for drain_worker_output.
_pipes: dict[int, _WorkerPipes] = {}


class _LineRelay:
    """Reads one worker pipe and prints it line by line: on the loop thread when the
    pipe is readable, and on a caller's thread when it drains the pipe."""

    def __init__(self, node: Any, pid: int, stream: Any, target: str,
                 leftover: bytes = b"") -> None:
        self.node = node
        self.pid = pid
        self.stream = stream
        self.fd = stream.fileno()
        self.target = target  # "stdout" or "stderr": looked up at print time (capture-friendly)
        self.partial = leftover
        self.closed = False
        # Reads, line splitting and printing happen under it, so lines stay whole and
        # in order whichever thread reads, and the fd is never read once closed.
        self.lock = threading.Lock()
        os.set_blocking(self.fd, False)

    def __call__(self) -> None:
        with self.lock:
            if self.closed:
                return
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._close()
                return
            self.partial += chunk
            self._emit_lines(final=False)

    def drain(self) -> None:
        """Print the complete lines waiting in the pipe now; never blocks."""
        with self.lock:
            while not self.closed:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # BlockingIOError: drained
                    return
                if not chunk:
                    return  # end of file: the loop thread closes the relay
                self.partial += chunk
                self._emit_lines(final=False)

    def _close(self) -> None:
        self._emit_lines(final=True)
        self.closed = True
        self.node.loop.remove_reader(self.fd)
        pipes = _pipes.get(self.pid)
        if pipes is not None:
            pipes.forget(self)
            if not pipes.by_fd:
                _pipes.pop(self.pid, None)
        try:
            self.stream.close()
        except OSError:
            pass

    def _emit_lines(self, final: bool) -> None:
        *lines, self.partial = self.partial.split(b"\n")
        if final and self.partial:
            lines.append(self.partial)
            self.partial = b""
        if not lines:
            return
        out = getattr(sys, self.target)
        text = "".join(f"From worker {self.pid}:\t{line.decode(errors='replace')}\n"
                       for line in lines)
        try:
            out.write(text)
            out.flush()
        except (AttributeError, OSError, ValueError):
            pass  # no stream (sys.stdout is None), or it was closed: the line is dropped


def relay_worker_output(node: Any, pid: int, config: Any) -> None:
    """Start relaying a launched worker's stdout (config.io) and separate stderr, if any."""
    leftover = b""
    if isinstance(config.userdata, dict):
        leftover = config.userdata.pop("_output_leftover", b"")
    relays = []
    if config.io is not None and hasattr(config.io, "fileno"):
        relay = _LineRelay(node, pid, config.io, "stdout", leftover)
        relays.append(relay)
        with relay.lock:
            relay._emit_lines(final=False)
    proc = config.process
    err = getattr(proc, "stderr", None)
    if err is not None:
        relays.append(_LineRelay(node, pid, err, "stderr"))
    if relays:
        _pipes[pid] = _WorkerPipes(relays)
    for relay in relays:
        node.loop.add_reader(relay.fd, relay)


def drain_worker_pipes(pid: int) -> None:
    """Print what worker `pid` has written to its stdout/stderr so far; never blocks.

    Called as replies from `pid` arrive, before they are handed on (once per
    batch of frames: each call's output went into the pipe before its reply was
    sent), so that output a call printed is on the master's streams before the
    call's result is returned. Costs one `poll` when there is nothing to read; a
    worker whose output is not relayed here costs a dictionary look-up.
    """
    pipes = _pipes.get(pid)
    if pipes is not None:
        pipes.drain()


def handle_worker_logs(pid: int) -> None:
    """Hand the records queued from worker `pid` to the handlers, on this thread.

    Called by the thread that is about to use a reply from `pid` (never the I/O
    thread: handlers are user code), so that records a call logged are handled
    before its result is returned.
    """
    q = _log_queues.get(pid)
    if q is not None and q.records:
        q.handle_pending()


def flush_partial_lines(pid: int) -> None:
    """Print the unfinished last line of each of `pid`'s pipes, as it is (at the
    master's exit: the newline will never come)."""
    pipes = _pipes.get(pid)
    if pipes is None:
        return
    for relay in pipes.relays:
        relay.drain()
        with relay.lock:
            if not relay.closed:
                relay._emit_lines(final=True)


def drain_worker_output(pid: int) -> None:
    """Both: print `pid`'s pending output and handle its queued log records."""
    drain_worker_pipes(pid)
    handle_worker_logs(pid)


# -- logging ----------------------------------------------------------------------------


class _ForwardHandler(logging.Handler):
    """On a worker: send each record to the master."""

    def __init__(self, node: Any) -> None:
        super().__init__()
        self.node = node
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._local, "busy", False) or self.node.loop.in_loop_thread():
            return  # never recurse, never block the I/O thread
        self._local.busy = True
        try:
            d = dict(record.__dict__)
            d["msg"] = record.getMessage()
            d["args"] = None
            if record.exc_info:
                d["exc_text"] = logging.Formatter().formatException(record.exc_info)
            d["exc_info"] = None
            d["worker"] = self.node.myid
            d = {k: v for k, v in d.items() if _plain(v)}
            body, _ = serialize.dumps(d, what="log record")
            self.node.send(1, Kind.LOG, 0, 0, self.node.myid, 0, body)
        except Exception:  # noqa: BLE001 - logging must never break the caller
            pass
        finally:
            self._local.busy = False


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, tuple))


def install_log_forwarding(node: Any, level: int) -> None:
    root = logging.getLogger()
    root.addHandler(_ForwardHandler(node))
    root.setLevel(level)


class _LogQueue:
    """One worker's records not yet handled, in arrival order."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.records: collections.deque[Any] = collections.deque()
        # Held while records are handled, so they reach the handlers in order; an
        # RLock, so that a handler that itself calls that worker does not deadlock.
        self.lock = threading.RLock()

    def handle_pending(self) -> None:
        with self.lock:
            while self.records:
                body = self.records.popleft()
                try:
                    handle_log_record(self.pid, body)
                except Exception:  # noqa: BLE001 - a bad record must not stop the others
                    traceback.print_exc()


_log_queues: dict[int, _LogQueue] = {}
_log_queues_lock = threading.Lock()


def handle_log(node: Any, conn: Any, frame: Any) -> None:
    queue_log_record(node, conn.peer, frame.body)


def queue_log_record(node: Any, pid: int, body: Any) -> None:
    """A LOG frame from worker `pid` arrived: queue it, and handle it on a call thread.

    A record logged by a call reaches the socket before the call's reply, so it is
    queued here before the reply is seen; `drain_worker_output(pid)` then handles
    what is queued before the reply is used, and the record is at the handlers by
    the time the call returns.
    """
    q = _log_queues.get(pid)
    if q is None:
        with _log_queues_lock:
            q = _log_queues.get(pid)
            if q is None:
                q = _log_queues[pid] = _LogQueue(pid)
    q.records.append(body)
    node.callpool.submit(q.handle_pending)


def handle_log_record(pid: int, body: Any) -> None:
    """On the master: hand a worker's record to the master's own handlers."""
    d = serialize.loads(body, what="log record")
    d["worker"] = pid
    record = logging.makeLogRecord(d)
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


_factory_installed = False


def install_worker_record_field(myid: Callable[[], int]) -> None:
    """Give every record a `worker` attribute (`myid()`, this process's pid) so
    `%(worker)s` always works."""
    global _factory_installed
    if _factory_installed:
        return
    _factory_installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if not hasattr(record, "worker"):
            record.worker = myid()
        return record

    logging.setLogRecordFactory(factory)


register(Kind.LOG, handle_log)
