"""Read-only buffers stored once per host: an array that cannot change, sent to many
processes of this host, is copied into shared memory once and every receiver maps
that one copy (see sharedmem.py, which decides which buffers come here).

A large read-only buffer (a numpy array with `writeable=False`, such as one captured
by a CachingPool or pmap function) travels as a 56-byte descriptor naming a memory
file of the sender (`memfd_create`) that holds it: the first send copies it in, later
sends of the same buffer — the same exporting object, address and length, while that
object lives — name the same file. A receiver opens the file through
`/proc/<sender>/fd/<n>`, maps it read-only and hands the unpickler a view of it;
several frames naming it map it once.

    descriptor: magic "FDHOST01" · sender pid u32 · fd u32 · segment id u64 ·
                nbytes u64 · slot u64 · token 16 bytes
    memory file: page 0 = token (16 bytes) · one ack byte per slot · data from 4096

Each send takes a slot of the file's first page; the receiver writes 1 there once it
has mapped the file. The sender closes its file (the memory then lives as long as
receivers map it) once the buffer is gone or unused for IDLE_SECONDS and every slot
has been acknowledged or its receiver is gone. The buffer must truly not change
while it lives: later sends reuse the copy made at the first.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
import threading
import time
import weakref
from typing import Any

HOST_DESCRIPTOR = struct.Struct("<8sIIQQQ16s")
MAGIC = b"FDHOST01"
HEADER_NBYTES = 4096
TOKEN_NBYTES = 16
FIRST_SLOT = TOKEN_NBYTES
MAX_SLOTS = HEADER_NBYTES - FIRST_SLOT
MADV_POPULATE_WRITE = 23  # Linux 5.14: make every page now, without a fault per page
# A segment no send has named for this long (and whose receivers have all mapped it)
# is closed; a later send of the same buffer copies it again.
IDLE_SECONDS = 2.0


_madvise: Any = None


def populate(mm: mmap.mmap, start: int = 0, length: int | None = None) -> None:
    """Make the pages of bytes [start, start + length) of a fresh shared mapping at
    once, the GIL released (ctypes), rather than by a page fault per page while they
    are filled: 0.4 s per GB here instead of 0.65. Nothing happens on a kernel
    without MADV_POPULATE_WRITE."""
    global _madvise
    try:
        if _madvise is None:
            import ctypes

            f = ctypes.CDLL(None, use_errno=True).madvise
            f.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            f.restype = ctypes.c_int
            _madvise = (f, ctypes)
        f, ctypes = _madvise
        anchor = ctypes.c_char.from_buffer(mm)
        address = ctypes.addressof(anchor)
        del anchor  # (an export of the mapping: it could not be closed while it lives)
        end = len(mm) if length is None else min(len(mm), start + length)
        first = start - start % mmap.PAGESIZE
        f(address + first, end - first, MADV_POPULATE_WRITE)
    except (OSError, TypeError, ValueError, AttributeError):
        pass


# A copy into fresh shared memory is split among threads from this size on: making
# the pages (the kernel zeroes them) and copying run with the GIL released, so two
# cores fill 1 GB in 0.25-0.3 s rather than 0.4.
PARALLEL_COPY_NBYTES = 64 << 20
MAX_COPY_THREADS = 4


def copy_into(mm: mmap.mmap, offset: int, buf: Any) -> None:
    """Copy `buf` into the fresh mapping `mm` at `offset`, its pages made first (see
    `populate`), in parallel for a large buffer."""
    import numpy as np

    src = np.frombuffer(buf, np.uint8)
    dst = np.frombuffer(mm, np.uint8, count=src.size, offset=offset)
    nparts = 1
    if src.size >= PARALLEL_COPY_NBYTES:
        nparts = max(1, min(os.cpu_count() or 1, MAX_COPY_THREADS))
    bounds = [src.size * i // nparts for i in range(nparts + 1)]

    def part(i: int) -> None:
        lo, hi = bounds[i], bounds[i + 1]
        populate(mm, offset + lo, hi - lo)
        dst[lo:hi] = src[lo:hi]

    threads = [threading.Thread(target=part, args=(i,), name="fastdist-copy")
               for i in range(1, nparts)]
    for t in threads:
        t.start()
    try:
        part(0)
    finally:
        for t in threads:
            t.join()


def is_host_descriptor(d: bytes) -> bool:
    return len(d) == HOST_DESCRIPTOR.size and d[:8] == MAGIC


def _root(buf: memoryview) -> Any:
    """The object that exports `buf`'s memory (through views of views)."""
    obj = buf.obj
    while isinstance(obj, memoryview):
        obj = obj.obj
    return obj


def _address(buf: memoryview) -> int:
    import numpy as np  # a buffer large enough to get here is almost always numpy's

    return int(np.frombuffer(buf, np.uint8).ctypes.data)


class _Segment:
    """A memory file holding one read-only buffer, on its sender."""

    __slots__ = ("data", "fd", "header", "last_used", "nbytes", "next_slot", "pending", "root",
                 "seg_id", "token")

    def __init__(self, seg_id: int, buf: memoryview, root: Any) -> None:
        self.seg_id = seg_id
        self.nbytes = buf.nbytes
        self.token = os.urandom(TOKEN_NBYTES)
        self.root = weakref.ref(root)
        self.next_slot = 0
        self.pending: dict[int, int] = {}  # slot -> receiver pid, until acknowledged
        self.last_used = time.monotonic()
        self.fd = os.memfd_create("fastdist-host-buffer", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, HEADER_NBYTES + self.nbytes)
            # Kept mapped while the segment lives, though only receivers read it: the
            # pages then show in this process's memory figures (PSS) as they should.
            self.data = mmap.mmap(self.fd, self.nbytes, offset=HEADER_NBYTES)
            copy_into(self.data, 0, buf)
            self.header = mmap.mmap(self.fd, HEADER_NBYTES)
            self.header[:TOKEN_NBYTES] = self.token
        except BaseException:
            os.close(self.fd)
            raise

    def take_slot(self, pid: int) -> int | None:
        if self.next_slot >= MAX_SLOTS:
            return None
        slot = self.next_slot
        self.next_slot += 1
        self.pending[slot] = pid
        self.last_used = time.monotonic()
        return slot

    def settle(self) -> None:
        """Forget the slots whose receiver has mapped the file."""
        for slot in [s for s in self.pending if self.header[FIRST_SLOT + s]]:
            del self.pending[slot]

    def close(self) -> None:
        self.header.close()
        self.data.close()
        os.close(self.fd)


class HostStore:
    """The sender's read-only buffers in shared memory, by (exporter, address, length)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._segments: dict[tuple[int, int, int], _Segment] = {}
        self._retired: list[_Segment] = []  # replaced (slots used up), until all acknowledged
        self._ids = itertools.count(1)

    @staticmethod
    def eligible(buf: memoryview, min_nbytes: int) -> bool:
        """A buffer that may be stored once per host: large, read-only, its exporter
        one that can be watched (weakly referenced) for when it goes."""
        if not buf.readonly or buf.nbytes < max(min_nbytes, 1) or not buf.c_contiguous:
            return False
        try:
            weakref.ref(_root(buf))
        except TypeError:
            return False  # bytes: cannot tell when they go
        return True

    def put(self, buf: memoryview, pid: int) -> bytes | None:
        """A descriptor of `buf` for receiver `pid` (copied into a segment on its first
        send), or None if no segment can be had now."""
        root = _root(buf)
        key = (id(root), _address(buf), buf.nbytes)
        with self._lock:
            seg = self._segments.get(key)
            if seg is not None and seg.root() is root:
                slot = seg.take_slot(pid)
                if slot is not None:
                    return self._descriptor(seg, slot)
        # A new copy, made without the lock: the loop thread's trim must not wait for it.
        try:
            new = _Segment(next(self._ids), buf, root)
        except OSError:
            return None  # no memory or fds for a segment: the usual path
        with self._lock:
            old = self._segments.get(key)
            if old is not None:
                self._retire(key, old)  # replaced: closed once its receivers mapped it
            self._segments[key] = new
            slot = new.take_slot(pid)
        assert slot is not None
        return self._descriptor(new, slot)

    @staticmethod
    def _descriptor(seg: _Segment, slot: int) -> bytes:
        return HOST_DESCRIPTOR.pack(MAGIC, os.getpid(), seg.fd, seg.seg_id, seg.nbytes, slot,
                                    seg.token)

    def cancel(self, descriptor: bytes) -> None:
        """A descriptor that will not be sent after all: its slot is not awaited."""
        _, _, _, seg_id, _, slot, _ = HOST_DESCRIPTOR.unpack(descriptor)
        with self._lock:
            for seg in list(self._segments.values()) + self._retired:
                if seg.seg_id == seg_id:
                    seg.pending.pop(slot, None)

    def _retire(self, key: tuple[int, int, int], seg: _Segment) -> None:
        del self._segments[key]
        self._retired.append(seg)

    def trim(self) -> None:
        """Close the segments nobody needs any more (loop thread, every tick)."""
        if not self._segments and not self._retired:
            return
        now = time.monotonic()
        with self._lock:
            for key, seg in list(self._segments.items()):
                seg.settle()
                gone = seg.root() is None or now - seg.last_used > IDLE_SECONDS
                if gone and not seg.pending:
                    del self._segments[key]
                    seg.close()
            for seg in list(self._retired):
                seg.settle()
                if not seg.pending:
                    self._retired.remove(seg)
                    seg.close()

    def forget(self, pid: int) -> None:
        """Receiver `pid` is gone: its slots will never be acknowledged."""
        with self._lock:
            for seg in list(self._segments.values()) + self._retired:
                for slot in [s for s, p in seg.pending.items() if p == pid]:
                    del seg.pending[slot]

    @property
    def nsegments(self) -> int:
        return len(self._segments) + len(self._retired)

    def close(self) -> None:
        with self._lock:
            for seg in list(self._segments.values()) + self._retired:
                seg.close()
            self._segments.clear()
            self._retired = []


class HostInbox:
    """The senders' read-only buffers this process has mapped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mapped: weakref.WeakValueDictionary[tuple[int, int], mmap.mmap] = \
            weakref.WeakValueDictionary()

    def attach(self, pid: int, descriptor: bytes) -> memoryview:
        """The read-only buffer a descriptor from peer `pid` names (mapped on first use),
        acknowledged to its sender."""
        _, ospid, fd, seg_id, nbytes, slot, token = HOST_DESCRIPTOR.unpack(descriptor)
        if slot >= MAX_SLOTS:
            raise ValueError("shared-memory descriptor with a slot outside its segment")
        with self._lock:
            data = self._mapped.get((pid, seg_id))
        path = f"/proc/{ospid}/fd/{fd}"
        mine = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if os.fstat(mine).st_size != HEADER_NBYTES + nbytes:
                raise ValueError(f"{path} is not the segment a descriptor names (its size differs)")
            header = mmap.mmap(mine, HEADER_NBYTES)
            try:
                if header[:TOKEN_NBYTES] != token:
                    raise ValueError(f"{path} is not the segment a descriptor names")
                if data is None:
                    data = mmap.mmap(mine, nbytes, prot=mmap.PROT_READ, offset=HEADER_NBYTES)
                    with self._lock:
                        self._mapped[(pid, seg_id)] = data
                header[FIRST_SLOT + slot] = 1  # mapped: the sender may let go of its file
            finally:
                header.close()
        finally:
            os.close(mine)
        return memoryview(data)

    def forget(self, pid: int) -> None:
        with self._lock:
            for key in [k for k in self._mapped if k[0] == pid]:
                self._mapped.pop(key, None)

    @property
    def nmappings(self) -> int:
        return len(self._mapped)


__all__ = ["HOST_DESCRIPTOR", "HostInbox", "HostStore", "copy_into", "is_host_descriptor",
           "populate"]
