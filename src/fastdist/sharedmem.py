"""Large buffers to processes of this host through shared memory (see `_core/_shm.pyx`).

A frame whose out-of-band buffers add up to at least `FASTDIST_SHM_MIN_BYTES`
(1 MiB), going over a Unix socket to a peer that has shown it can map this
process's segments, carries descriptors instead of the bytes (flag SHM): the
buffers are copied once into reused segments and the receiver's arrays live in
them. Everything else — small frames, TCP peers on other hosts, custom
transports, a peer that could not open the probe — goes through the socket as
before.

Whether a peer can map our segments is asked once, on the first large frame to
it: SHM_OFFER carries this process's pid, the fd of a one-page probe segment and
the token written in it; the peer answers SHM_ACCEPT if it opened that fd through
/proc and read the same token. Until then (and if it never does) large frames to
it take the socket — except that a frame carrying a large read-only buffer waits a
moment for the answer.

A large read-only buffer (an array with `writeable=False`) is not copied into the
frame's segment but stored once per host (hostbuffers.py): sent to many processes
of this host, it exists in shared memory once.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from typing import Any

from fastdist._core._shm import Inbox, Outbox, Probe, check_probe
from fastdist.hostbuffers import HostInbox, HostStore, is_host_descriptor
from fastdist.protocol.messages import Kind

FLAG_SHM = 0x80  # any kind: every out-of-band buffer is a shared-memory descriptor
OFFER = struct.Struct("<II16s")  # pid, probe fd, token
# Segments kept per peer, and their total size: enough for the calls a pmap keeps in
# flight to a worker; a segment is kept once made (filling it again is the point).
MAX_SEGMENTS = 8
MAX_SEGMENT_NBYTES = 1 << 30
# A free segment not filled for this long is dropped, here and (SHM_FORGET) on the
# receiver: a burst of large transfers must not hold its memory for ever after.
IDLE_SECONDS = 2.0
FORGET = struct.Struct("<Q")  # one per segment id in a SHM_FORGET body
# How long a frame carrying a large read-only buffer waits for a new peer's answer to
# SHM_OFFER (its first round trip; it goes through the socket if none comes).
ACCEPT_WAIT_SECONDS = 1.0


def min_nbytes() -> int:
    return int(os.environ.get("FASTDIST_SHM_MIN_BYTES", str(1 << 20)))


def enabled() -> bool:
    return os.environ.get("FASTDIST_SHM", "1") != "0"


def _is_unix(conn: Any) -> bool:
    fd = conn.fd
    if fd is None or fd < 0:
        return False  # a custom transport's streams
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        return s.family == socket.AF_UNIX
    finally:
        s.close()


class SharedMemory:
    """One process's shared-memory state: what it sends to and maps from each peer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._probe: Probe | None = None
        self._offered: set[int] = set()  # peers asked (SHM_OFFER sent, or not a Unix socket)
        self._accepted: set[int] = set()  # peers that can map our segments
        self._outboxes: dict[int, Outbox] = {}
        self._inboxes: dict[int, Inbox] = {}
        self._sent: dict[int, list[int]] = {}  # pid -> [frames, bytes] sent through segments
        self._answered: dict[int, threading.Event] = {}  # peers offered, set once accepted
        self.host = HostStore()  # read-only buffers stored once per host, as sender
        self._host_inbox = HostInbox()  # ... and as receiver
        self._host_sent: dict[int, int] = {}  # pid -> read-only buffers sent that way
        self.min_nbytes = min_nbytes()
        self.enabled = enabled()

    # -- sending --------------------------------------------------------------------

    def outgoing(self, conn: Any, flags: int, buffers: Any) -> tuple[int, Any]:
        """(flags, buffers) to send on `conn`: descriptors in shared memory for a large
        frame to a peer that accepted, else unchanged."""
        if not buffers or not self.enabled:
            return flags, buffers
        pid = conn.peer
        if pid not in self._accepted:
            if pid is None:
                return flags, buffers
            if pid not in self._offered:
                self._offer(conn, pid)
            if not self._read_only_worth_waiting(pid, buffers):
                return flags, buffers
        views = [memoryview(b) for b in buffers]
        nbytes = sum(v.nbytes for v in views)
        if nbytes < self.min_nbytes:
            return flags, buffers
        with self._lock:
            box = self._outboxes.get(pid)
            if box is None:
                box = self._outboxes[pid] = Outbox(MAX_SEGMENTS, MAX_SEGMENT_NBYTES)
        shared = [i for i, v in enumerate(views) if self.host.eligible(v, self.min_nbytes)]
        if shared:
            return self._outgoing_read_only(pid, box, flags, buffers, views, shared, nbytes)
        try:
            descriptors = box.put(buffers)
        except Exception:  # noqa: BLE001 - no memory or fds for a segment: the socket
            descriptors = None
        if descriptors is None:  # every segment is in use: this frame takes the socket
            return flags, buffers
        sent = self._sent.setdefault(pid, [0, 0])
        sent[0] += 1
        sent[1] += nbytes
        return flags | FLAG_SHM, descriptors

    def _outgoing_read_only(self, pid: int, box: Any, flags: int, buffers: Any,
                            views: list[memoryview], shared: list[int],
                            nbytes: int) -> tuple[int, Any]:
        """A frame with large read-only buffers: those as host-wide descriptors, the
        others in one of the peer's segments; all of it through the socket if that
        cannot be done."""
        descriptors: list[Any] = [None] * len(buffers)
        for i in shared:
            descriptors[i] = self.host.put(views[i], pid)
        rest = [i for i, d in enumerate(descriptors) if d is None]
        if rest:
            try:
                put = box.put([buffers[i] for i in rest])
            except Exception:  # noqa: BLE001 - no memory or fds for a segment: the socket
                put = None
            if put is None:
                for d in descriptors:
                    if d is not None:
                        self.host.cancel(d)
                return flags, buffers
            for i, d in zip(rest, put):
                descriptors[i] = d
        sent = self._sent.setdefault(pid, [0, 0])
        sent[0] += 1
        sent[1] += nbytes
        self._host_sent[pid] = self._host_sent.get(pid, 0) + len(buffers) - len(rest)
        return flags | FLAG_SHM, descriptors

    def _read_only_worth_waiting(self, pid: int, buffers: Any) -> bool:
        """Whether the peer accepted our segments, after waiting for its answer to our
        offer when this frame carries large read-only buffers (stored once per host,
        they are worth a round trip: a new worker's first call often brings them)."""
        answered = self._answered.get(pid)
        if answered is None or not any(
                self.host.eligible(memoryview(b), self.min_nbytes) for b in buffers):
            return False
        if not answered.wait(ACCEPT_WAIT_SECONDS):
            self._answered.pop(pid, None)  # it may never answer (FASTDIST_SHM=0): wait once
        return pid in self._accepted

    def _offer(self, conn: Any, pid: int) -> None:
        with self._lock:
            if pid in self._offered:
                return
            self._offered.add(pid)
            if not _is_unix(conn):
                return  # another host (or a custom transport): its /proc is not ours
            if self._probe is None:
                self._probe = Probe()
            body = OFFER.pack(*self._probe.offer())
            self._answered[pid] = threading.Event()
        try:
            conn.send_nowait(Kind.SHM_OFFER, 0, 0, 0, 0, body)
        except ConnectionError:
            pass

    def on_offer(self, conn: Any, body: Any) -> None:
        pid, fd, token = OFFER.unpack(bytes(body))
        if self.enabled and check_probe(pid, fd, token):
            conn.send_nowait(Kind.SHM_ACCEPT, 0, 0, 0, 0)

    def on_accept(self, pid: int) -> None:
        self._accepted.add(pid)
        answered = self._answered.get(pid)
        if answered is not None:
            answered.set()

    def trim(self, conn_of: Any) -> None:
        """Drop segments idle for IDLE_SECONDS and tell their receivers (loop thread)."""
        self.host.trim()
        if not self._outboxes:
            return
        with self._lock:
            dropped = [(pid, box.trim(IDLE_SECONDS)) for pid, box in self._outboxes.items()]
        for pid, seg_ids in dropped:
            conn = conn_of(pid) if seg_ids else None
            if conn is not None:
                try:
                    conn.send_nowait(Kind.SHM_FORGET, 0, len(seg_ids), 0, 0,
                                     b"".join(FORGET.pack(i) for i in seg_ids))
                except ConnectionError:
                    pass

    def on_forget(self, pid: int, body: Any) -> None:
        box = self._inboxes.get(pid)
        if box is not None:
            box.forget([i for (i,) in FORGET.iter_unpack(bytes(body))])

    # -- receiving ------------------------------------------------------------------

    def incoming(self, pid: int, frame: Any) -> None:
        """Replace a frame's descriptors by the buffers they name (mapped, not copied)."""
        with self._lock:
            box = self._inboxes.get(pid)
            if box is None:
                box = self._inboxes[pid] = Inbox()
        descriptors = [bytes(d) for d in frame.buffers]
        host = [is_host_descriptor(d) for d in descriptors]
        if not any(host):
            frame.buffers = box.attach(descriptors)
        else:
            buffers: list[Any] = [self._host_inbox.attach(pid, d) if h else None
                                  for d, h in zip(descriptors, host)]
            rest = [i for i, h in enumerate(host) if not h]
            if rest:
                for i, b in zip(rest, box.attach([descriptors[i] for i in rest])):
                    buffers[i] = b
            frame.buffers = buffers
        frame.flags &= ~FLAG_SHM

    def forget(self, pid: int) -> None:
        """A peer is gone: drop its segments and mappings (arrays still using them keep
        their own mapping alive)."""
        with self._lock:
            for table in (self._outboxes, self._inboxes):
                box = table.pop(pid, None)
                if box is not None:
                    box.close()
            self._offered.discard(pid)
            self._accepted.discard(pid)
            self._sent.pop(pid, None)
            self._host_sent.pop(pid, None)
            answered = self._answered.pop(pid, None)
        if answered is not None:
            answered.set()  # nobody waits for a gone peer's answer
        self.host.forget(pid)
        self._host_inbox.forget(pid)

    def stats(self, pid: int) -> dict[str, Any]:
        """The shared-memory counters `fastdist.stats` shows for peer `pid`."""
        box = self._outboxes.get(pid)
        inbox = self._inboxes.get(pid)
        frames, nbytes = self._sent.get(pid, (0, 0))
        return {"shm": pid in self._accepted, "shm_segments": box.nsegments if box else 0,
                "shm_mapped": inbox.nmappings if inbox else 0,
                "shm_msgs_sent": frames, "shm_bytes_sent": nbytes,
                "shm_host_buffers_sent": self._host_sent.get(pid, 0)}
