"""Connections: TCP sockets authenticated by the handshake, listeners, and framed
connections over arbitrary byte streams for custom cluster managers.

Sockets are served by the compiled `_msgloop`; a `StreamConnection` serves any
pair of binary file-like objects with a reader thread and the same frame reader,
so a custom transport gets the same protocol, just not the zero-syscall-overhead path.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from typing import Any, Protocol

from fastdist._core import _wire
from fastdist.protocol import handshake
from fastdist.signals import block_sigint

# The kernel queues this many not-yet-accepted connections per listener.
LISTEN_BACKLOG = 1024


# Unix sockets default to ~200 KiB of buffer, so a 100 MB array would take ~500
# wake-ups each way; TCP tunes its own buffers.
UNIX_BUFFER_NBYTES = 4 * 1024 * 1024


def tune_socket(sock: socket.socket) -> None:
    """No Nagle delay on TCP; large buffers on Unix sockets."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    elif sock.family == socket.AF_UNIX:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, UNIX_BUFFER_NBYTES)
            except OSError:
                pass


def unix_name(host: str, port: int) -> bytes:
    """The abstract Unix socket a worker listening on host:port also listens on.

    Abstract names live in the kernel, per network namespace: nothing on disk
    to clean up, and a process in another namespace (another "host") cannot
    reach it by mistake — it falls back to TCP.
    """
    return f"\0fastdist:{host}:{port}".encode()


def unix_enabled() -> bool:
    """FASTDIST_UNIX_SOCKETS=0 forces TCP between processes of one host (to measure it)."""
    return os.environ.get("FASTDIST_UNIX_SOCKETS", "1") != "0"


def open_stream(host: str, port: int, timeout: float) -> socket.socket:
    """A connected socket to a worker: its Unix socket when it shares our network
    namespace (same host: no TCP/IP stack, about twice the bandwidth), else TCP."""
    if unix_enabled():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(unix_name(host, port))
            tune_socket(sock)
            return sock
        except OSError:
            sock.close()
    return socket.create_connection((host, port), timeout=timeout)


def connect_socket(host: str, port: int, cookie: bytes, timeout: float) -> socket.socket:
    """Open a connection (Unix socket on this host, TCP elsewhere) and run the
    connector handshake over it.

    Returns a connected, authenticated, non-blocking socket.

    Raises:
        ClusterError: the peer failed the handshake (cookie, version, not fastdist).
        OSError: the connection could not be made.
    """
    sock = open_stream(host, port, timeout)
    try:
        tune_socket(sock)
        sock.settimeout(timeout)
        handshake.connect_blocking(sock.recv, sock.sendall, cookie)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_unix(host: str, port: int) -> socket.socket | None:
    """The abstract Unix listener beside a TCP one on host:port (None if disabled)."""
    if not unix_enabled():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(unix_name(host, port))
    except OSError:
        sock.close()
        return None
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def listen(host: str, port: int = 0) -> socket.socket:
    """A non-blocking listening TCP socket on (host, port); port 0 picks one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def accept_ready(listener: socket.socket) -> list[socket.socket]:
    """Every connection waiting on a non-blocking listener, tuned and non-blocking."""
    accepted: list[socket.socket] = []
    while True:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return accepted
        except OSError:
            # EMFILE and friends: the caller sheds idle connections and retries later.
            return accepted
        sock.setblocking(False)
        tune_socket(sock)
        accepted.append(sock)


class Connection(Protocol):
    """What every framed connection offers: a socket served by the I/O loop
    (`_msgloop.SocketConnection`), or any pair of binary streams
    (`StreamConnection`, for custom transports). Its owner (a Node) gets
    `on_frames(conn, frames)` and `on_close(conn, exc)` from it.

    The capabilities only sockets have are part of it too, so no caller has to
    ask which kind it holds: a stream connection cannot be read by the waiting
    thread (`begin_direct` is False, `read_direct` -1), holds no frames back
    (`queue_frame` and `send_deferred` send at once), and is kept alive by the
    Python heartbeat rather than the keepalive thread (`keeps_alive` False).
    """

    peer: Any  # the peer's pid once known (None before it named itself)
    handshake: Any  # while not None: the connection is authenticating

    @property
    def fd(self) -> int: ...
    @property
    def is_closed(self) -> bool: ...
    @property
    def bytes_received(self) -> int: ...
    @property
    def bytes_sent(self) -> int: ...
    @property
    def has_pending(self) -> bool: ...
    @property
    def keeps_alive(self) -> bool: ...
    def send_frame(self, kind: int, flags: int, aux: int, whence: int, ref_id: int,
                   body: Any = b"", buffers: Any = ()) -> None: ...
    def send_nowait(self, kind: int, flags: int, aux: int, whence: int, ref_id: int,
                    body: Any = b"") -> None: ...
    def send_deferred(self, kind: int, flags: int, aux: int, whence: int, ref_id: int,
                      body: Any = b"") -> None: ...
    def queue_frame(self, kind: int, flags: int, aux: int, whence: int, ref_id: int,
                    body: Any = b"") -> int: ...
    def flush(self) -> None: ...
    def begin_direct(self, timeout: float = 0.0) -> bool: ...
    def poll_direct(self, timeout: float, wake_fd: int = -1) -> int: ...
    def end_direct(self) -> None: ...
    def read_direct(self, timeout: float) -> int: ...
    def start_keepalive(self) -> None: ...
    def unread_nbytes(self) -> int: ...
    def close(self, exc: BaseException | None = None) -> None: ...
    def stats(self) -> dict[str, Any]: ...


class StreamConnection:
    """A framed connection over two binary streams (custom transports): a
    `Connection` whose frames a reader thread of its own reads.
    """

    def __init__(self, handler: Any, instream: Any, outstream: Any, peer: Any = None) -> None:
        self.handler = handler
        self.peer = peer
        self.handshake = None
        self._in = instream
        self._out = outstream
        self._send_lock = threading.Lock()
        self._nowait: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._closed = False
        self.msgs_sent = self.bytes_sent = self.msgs_received = self.bytes_received = 0
        self.fd = -1

    @property
    def is_closed(self) -> bool:
        return self._closed

    # What only sockets can do (see Connection).
    has_pending = False
    keeps_alive = False

    def send_deferred(self, kind: int, flags: int, aux: int, whence: int, ref_id: int,
                      body: Any = b"") -> None:
        self.send_frame(kind, flags, aux, whence, ref_id, body)

    def queue_frame(self, kind: int, flags: int, aux: int, whence: int, ref_id: int,
                    body: Any = b"") -> int:
        self.send_frame(kind, flags, aux, whence, ref_id, body)
        return 0

    def flush(self) -> None:
        """(Nothing is held back.)"""

    def begin_direct(self, timeout: float = 0.0) -> bool:
        return False  # its reader thread reads it

    def poll_direct(self, timeout: float, wake_fd: int = -1) -> int:
        raise RuntimeError("a stream connection is read by its own thread")

    def end_direct(self) -> None:
        raise RuntimeError("a stream connection is read by its own thread")

    def read_direct(self, timeout: float) -> int:
        return -1  # someone else (its reader thread) reads it

    def start_keepalive(self) -> None:
        """(The Python heartbeat pings stream connections: see Node._heartbeat.)"""

    def unread_nbytes(self) -> int:
        return 0

    def start(self) -> None:
        threading.Thread(target=self._read_loop, name="fastdist-stream-reader",
                         daemon=True).start()
        threading.Thread(target=self._write_loop, name="fastdist-stream-writer",
                         daemon=True).start()

    def send_frame(self, kind: int, flags: int, aux: int, whence: int, ref_id: int,
                   body: Any = b"", buffers: Any = ()) -> None:
        lens = [memoryview(b).nbytes for b in buffers]
        nbody = memoryview(body).nbytes
        prelude = _wire.pack_prelude(kind, flags, aux, whence, ref_id, nbody, lens)
        with self._send_lock:
            if self._closed:
                raise ConnectionResetError("connection closed")
            try:
                self._out.write(prelude)
                if len(body):
                    self._out.write(body)
                for b in buffers:
                    self._out.write(b)
                self._out.flush()
            except (OSError, ValueError) as exc:
                self.close(ConnectionResetError(f"stream write failed: {exc}"))
                raise ConnectionResetError(f"stream write failed: {exc}") from exc
            self.msgs_sent += 1
            self.bytes_sent += len(prelude) + memoryview(body).nbytes + sum(lens)

    def send_nowait(self, kind: int, flags: int, aux: int, whence: int, ref_id: int,
                    body: Any = b"") -> None:
        """Queue a small frame for the writer thread (the caller never blocks)."""
        if self._closed:
            raise ConnectionResetError("connection closed")
        self._nowait.put((kind, flags, aux, whence, ref_id, bytes(body)))

    def _write_loop(self) -> None:
        block_sigint()
        while True:
            item = self._nowait.get()
            if item is None:
                return
            try:
                self.send_frame(*item)
            except ConnectionError:
                return

    def _read_loop(self) -> None:
        block_sigint()
        reader = _wire.FrameReader()
        read = getattr(self._in, "readinto1", None) or self._in.readinto
        exc: BaseException | None = None
        try:
            while not self._closed:
                n = read(reader.get_buffer())
                if not n:
                    exc = ConnectionResetError("peer closed the stream")
                    break
                self.bytes_received += n
                reader.buffer_updated(n)
                frames = reader.take_frames()
                if frames:
                    self.msgs_received += len(frames)
                    self.handler.on_frames(self, frames)
        except BaseException as e:  # noqa: BLE001 - any failure ends this connection only
            exc = e
        self.close(exc)

    def close(self, exc: BaseException | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._nowait.put(None)
        for stream in (self._in, self._out):
            try:
                stream.close()
            except Exception:  # noqa: BLE001
                pass
        self.handler.on_close(self, exc)

    def stats(self) -> dict[str, int]:
        return {"msgs_sent": self.msgs_sent, "bytes_sent": self.bytes_sent,
                "writes": self.msgs_sent,  # one flush of the stream per frame
                "msgs_received": self.msgs_received,
                "bytes_received": self.bytes_received}


def stream_handshake(instream: Any, outstream: Any, cookie: bytes, incoming: bool) -> None:
    """Run the handshake over two streams: as acceptor if `incoming`, else as connector."""

    def write(data: bytes) -> None:
        outstream.write(data)
        outstream.flush()

    if incoming:
        handshake.accept_blocking(instream.read, write, cookie)
    else:
        handshake.connect_blocking(instream.read, write, cookie)
