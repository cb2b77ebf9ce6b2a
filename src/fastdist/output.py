"""Worker output and logging, brought to the master.

What a worker prints reaches the master's matching stream, each line prefixed
`From worker N:` (as Julia does); the pipes are read by the master's I/O loop,
and read to their end, so lines printed just before a worker exits still
arrive. `logging` records emitted on a worker travel to the master as LOG
frames and go to the master's handlers with `record.worker` set.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

from fastdist.protocol import serialize
from fastdist.protocol.messages import Kind


class _LineRelay:
    """Reads one worker pipe on the loop thread and prints it line by line."""

    def __init__(self, node: Any, pid: int, stream: Any, target: str,
                 leftover: bytes = b"") -> None:
        self.node = node
        self.pid = pid
        self.stream = stream
        self.fd = stream.fileno()
        self.target = target  # "stdout" or "stderr": looked up at print time (capture-friendly)
        self.partial = leftover
        os.set_blocking(self.fd, False)

    def __call__(self) -> None:
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._emit_lines(final=True)
            self.node.loop.remove_reader(self.fd)
            try:
                self.stream.close()
            except OSError:
                pass
            return
        self.partial += chunk
        self._emit_lines(final=False)

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
    if config.io is not None and hasattr(config.io, "fileno"):
        relay = _LineRelay(node, pid, config.io, "stdout", leftover)
        node.loop.add_reader(relay.fd, relay)
        relay._emit_lines(final=False)
    proc = config.process
    err = getattr(proc, "stderr", None)
    if err is not None:
        relay = _LineRelay(node, pid, err, "stderr")
        node.loop.add_reader(relay.fd, relay)


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


def handle_log_record(pid: int, body: Any) -> None:
    """On the master: hand a worker's record to the master's own handlers."""
    d = serialize.loads(body, what="log record")
    d["worker"] = pid
    record = logging.makeLogRecord(d)
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


_factory_installed = False


def install_worker_record_field() -> None:
    """Give every record a `worker` attribute (the local pid) so `%(worker)s` always works."""
    global _factory_installed
    if _factory_installed:
        return
    _factory_installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if not hasattr(record, "worker"):
            from fastdist.cluster import myid

            record.worker = myid()
        return record

    logging.setLogRecordFactory(factory)
