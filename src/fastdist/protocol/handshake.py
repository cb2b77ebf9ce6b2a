"""The connection handshake: both sides prove they hold the cluster cookie before
anything is unpickled, and agree on the protocol version.

The cookie never crosses the wire: each side answers the other's random nonce
with an HMAC-SHA256 keyed by the cookie (as multiprocessing.connection does, but
mutual). Every read has a fixed size and the acceptor a deadline, so a silent or
hostile peer costs one socket for a bounded time and is never unpickled.

  step  from       message                                         check
  1     connector  HELLO   version, nonce_c                        magic, size
  2     acceptor   ACCEPT  version, status, nonce_s, mac_a          connector: version, mac_a
                   mac_a = HMAC(cookie, "A" | nonce_c | nonce_s)
  3     connector  PROOF   mac_c = HMAC(cookie, "C" | nonce_s | nonce_c)   acceptor: mac_c
  4     acceptor   WELCOME                                          connector: magic
After step 4 both sides speak frames (docs/PROTOCOL.md).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable

from fastdist._core import _wire
from fastdist.exceptions import ClusterError, ProtocolError

PROTOCOL_VERSION = 1
DEFAULT_TIMEOUT = 10.0


def handshake_timeout() -> float:
    """FASTDIST_HANDSHAKE_TIMEOUT, read each time a connection is accepted (seconds,
    default 10): how long an unauthenticated connection may take to prove itself."""
    return float(os.environ.get("FASTDIST_HANDSHAKE_TIMEOUT", DEFAULT_TIMEOUT))


def _mac(cookie: bytes, tag: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(cookie, tag + first + second, hashlib.sha256).digest()


class AcceptorHandshake:
    """The accepting side as a sans-IO state machine, fed by the I/O loop.

    `need` is how many more bytes the current step wants (the loop reads at most
    that); `feed(data)` returns bytes to send; `done` turns true on success. A
    failure raises ProtocolError, or sets `error` after a reply worth sending
    (a version mismatch); either way the loop closes the connection.
    """

    def __init__(self, cookie: bytes, timeout: float | None = None,
                 version: int = PROTOCOL_VERSION) -> None:
        self.cookie = cookie
        self.version = version
        self.deadline = time.monotonic() + (handshake_timeout() if timeout is None else timeout)
        self.done = False
        self.error: ProtocolError | None = None
        self._step = 1
        self._buf = b""
        self._want: int = _wire.HELLO_NBYTES
        self._nonce_c = b""
        self._nonce_s = b""

    @property
    def need(self) -> int:
        return self._want - len(self._buf)

    def feed(self, data: bytes) -> bytes | None:
        self._buf += data
        if len(self._buf) < self._want:
            return None
        msg, self._buf = self._buf, b""
        if self._step == 1:
            version, self._nonce_c = _wire.unpack_hello(msg)
            if version != self.version:
                # Tell the connector why, then fail: the loop sends `out` before raising `error`.
                self.error = ProtocolError(
                    f"protocol version mismatch: peer speaks {version}, we speak {self.version}")
                mismatch: bytes = _wire.pack_accept(self.version, _wire.STATUS_VERSION_MISMATCH,
                                                     bytes(32), bytes(32))
                return mismatch
            self._nonce_s = os.urandom(_wire.NONCE_NBYTES)
            mac_a = _mac(self.cookie, b"A", self._nonce_c, self._nonce_s)
            self._step = 3
            self._want = _wire.PROOF_NBYTES
            accept: bytes = _wire.pack_accept(self.version, _wire.STATUS_OK, self._nonce_s, mac_a)
            return accept
        if self._step == 3:
            mac_c = _wire.unpack_proof(msg)
            expected = _mac(self.cookie, b"C", self._nonce_s, self._nonce_c)
            if not hmac.compare_digest(mac_c, expected):
                raise ProtocolError("the peer does not hold the cluster cookie")
            self.done = True
            self._want = 0
            welcome: bytes = _wire.WELCOME
            return welcome
        raise ProtocolError("handshake already finished")


def accept_blocking(read: Callable[[int], bytes], write: Callable[[bytes], object],
                    cookie: bytes) -> None:
    """Run the acceptor side over blocking byte streams (custom transports)."""
    hs = AcceptorHandshake(cookie)
    while not hs.done:
        data = _read_exact(read, hs.need)
        out = hs.feed(data)
        if out:
            write(out)
        if hs.error is not None:
            raise hs.error


def connect_blocking(read: Callable[[int], bytes], write: Callable[[bytes], object],
                     cookie: bytes, version: int = PROTOCOL_VERSION) -> None:
    """Run the connector side; raises ClusterError naming what went wrong."""
    nonce_c = os.urandom(_wire.NONCE_NBYTES)
    write(_wire.pack_hello(version, nonce_c))
    try:
        accept = _read_exact(read, _wire.ACCEPT_NBYTES)
        their_version, status, nonce_s, mac_a = _wire.unpack_accept(accept)
    except ProtocolError as exc:
        raise ClusterError(f"handshake failed: the peer is not a fastdist process ({exc})") from exc
    except (ConnectionError, EOFError) as exc:
        raise ClusterError(f"handshake failed: the peer closed the connection ({exc})") from exc
    if status == _wire.STATUS_VERSION_MISMATCH or their_version != version:
        raise ClusterError(
            f"protocol version mismatch: this process speaks {version}, the peer {their_version}")
    if not hmac.compare_digest(mac_a, _mac(cookie, b"A", nonce_c, nonce_s)):
        raise ClusterError("bad cookie: the peer does not hold this cluster's cookie")
    write(_wire.pack_proof(_mac(cookie, b"C", nonce_s, nonce_c)))
    try:
        welcome = _read_exact(read, _wire.WELCOME_NBYTES)
    except (ConnectionError, EOFError) as exc:
        raise ClusterError("bad cookie: the peer rejected this process's cookie") from exc
    if welcome != _wire.WELCOME:
        raise ClusterError("handshake failed: unexpected reply from the peer")


def _read_exact(read: Callable[[int], bytes], n: int) -> bytes:
    chunks = []
    while n > 0:
        data = read(n)
        if not data:
            raise EOFError("connection closed during the handshake")
        chunks.append(data)
        n -= len(data)
    return b"".join(chunks)
