# cython: language_level=3
"""Large buffers between processes of one host, through shared memory.

A sender keeps, per destination, a few segments: anonymous memory files
(`memfd_create`) that it maps once and fills again and again. A frame's large
buffers are copied into one free segment, back to back (one copy, into pages
that are already mapped), and the frame carries small descriptors in place of
the bytes. The receiver maps the segment once — it opens it through
`/proc/<sender pid>/fd/<fd>` — and hands the unpickler views of it: the received
arrays' memory is the shared pages, with no copy on that side. When the last
object using any of the frame's views is freed, the receiver marks the segment
free in its header, and the sender may fill it again.

Nothing is named in /dev/shm: a segment's memory goes when the last process that
maps it unmaps it, exits or dies.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_FillInfo, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy

import os
import struct
import time

_monotonic = time.monotonic

cdef extern from "<sys/mman.h>" nogil:
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void* addr, size_t length)
    int memfd_create(const char* name, unsigned int flags)
    int PROT_READ
    int PROT_WRITE
    int MAP_SHARED
    int MAP_POPULATE
    int MFD_CLOEXEC
    void* MAP_FAILED

cdef extern from "<fcntl.h>" nogil:
    int c_open "open"(const char* path, int flags)
    int O_RDWR
    int O_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    int ftruncate(int fd, long length)
    int c_close "close"(int fd)

cdef extern from "<errno.h>":
    int errno

# The header page: u64 state at offset 0 (0: free, else the generation of the buffer
# it holds), a probe's token after it. Data starts on the next page, so arrays are
# page-aligned.
DEF DATA_OFFSET = 4096
DEF SEGMENT_ROUND = 1 << 20

# pid u32, fd u32, segment id u64, segment size u64, generation u64, offset u64, nbytes u64
DESCRIPTOR = struct.Struct("<IIQQQQQ")
# Each buffer of a frame starts on this boundary in its segment (numpy needs at most 16).
DEF ALIGN = 64
DEF TOKEN_OFFSET = 8


cdef extern from *:
    # GCC's atomic builtins, on the state word that both processes write.
    uint64_t __atomic_load_n(uint64_t* p, int order) nogil
    void __atomic_store_n(uint64_t* p, uint64_t v, int order) nogil
    bint __atomic_compare_exchange_n(uint64_t* p, uint64_t* expected, uint64_t desired,
                                     bint weak, int success, int failure) nogil
    int __ATOMIC_ACQUIRE
    int __ATOMIC_RELEASE
    int __ATOMIC_RELAXED


include "_parcopy.pxi"


cdef inline uint64_t _load_state(char* base) noexcept nogil:
    return __atomic_load_n(<uint64_t*>base, __ATOMIC_ACQUIRE)


cdef inline void _store_state(char* base, uint64_t value) noexcept nogil:
    __atomic_store_n(<uint64_t*>base, value, __ATOMIC_RELEASE)


cdef inline bint _free_if(char* base, uint64_t generation) noexcept nogil:
    """Mark the segment free if it still holds `generation`."""
    cdef uint64_t expected = generation
    return __atomic_compare_exchange_n(<uint64_t*>base, &expected, 0, False,
                                       __ATOMIC_RELEASE, __ATOMIC_RELAXED)


cdef class Segment:
    """A memfd mapped into this (the sending) process; its fd stays open so that the
    receiver can open it through /proc."""

    cdef readonly int fd
    cdef char* base
    cdef readonly size_t size
    cdef readonly uint64_t seg_id
    cdef public double last_used  # monotonic seconds of its last fill

    def __cinit__(self):
        self.fd = -1
        self.base = NULL
        self.last_used = 0.0

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.size)
        if self.fd >= 0:
            c_close(self.fd)


cdef Segment _create_segment(size_t size, uint64_t seg_id):
    cdef Segment seg = Segment.__new__(Segment)
    cdef int fd = memfd_create(b"fastdist", MFD_CLOEXEC)
    if fd < 0:
        raise OSError(errno, f"memfd_create: {os.strerror(errno)}")
    seg.fd = fd
    if ftruncate(fd, <long>size) != 0:
        raise OSError(errno, f"ftruncate: {os.strerror(errno)}")
    cdef void* p
    with nogil:
        # Populated now: every later fill writes into pages that are already there.
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0)
    if p == MAP_FAILED:
        raise OSError(errno, f"mmap: {os.strerror(errno)}")
    seg.base = <char*>p
    seg.size = size
    seg.seg_id = seg_id
    return seg


cdef uint64_t _next_seg_id = 0
cdef uint64_t _next_generation = 0


cdef class Outbox:
    """The segments this process fills for one receiver."""

    cdef list segments
    cdef readonly size_t max_segments
    cdef readonly size_t max_nbytes
    cdef uint32_t pid

    def __cinit__(self, size_t max_segments=4, size_t max_nbytes=1 << 31):
        self.segments = []
        self.max_segments = max_segments
        self.max_nbytes = max_nbytes
        self.pid = os.getpid()

    @property
    def nsegments(self):
        return len(self.segments)

    cdef Segment _segment_for(self, size_t need):
        """A free segment of at least `need` bytes: the smallest that fits, else a new
        one (replacing a free one that is too small when the count is at its cap)."""
        global _next_seg_id
        cdef Segment seg, best = None, spare = None
        cdef size_t total = 0
        for seg in self.segments:
            total += seg.size
            if _load_state(seg.base) != 0:
                continue
            if seg.size >= need:
                if best is None or seg.size < best.size:
                    best = seg
            elif spare is None or seg.size < spare.size:
                spare = seg
        if best is not None:
            return best
        if len(self.segments) >= self.max_segments:
            if spare is None:
                return None  # all in use: this buffer takes the socket
            self.segments.remove(spare)
            total -= spare.size
        cdef size_t size = (need + SEGMENT_ROUND - 1) // SEGMENT_ROUND * SEGMENT_ROUND
        if total + size > self.max_nbytes:
            return None
        _next_seg_id += 1
        seg = _create_segment(size, _next_seg_id)
        self.segments.append(seg)
        return seg

    def put(self, buffers):
        """Copy a frame's `buffers` into one free segment, back to back; their
        descriptors, or None if no segment can take them now (the caller then sends
        the bytes through the socket)."""
        global _next_generation
        cdef Py_buffer view
        cdef Segment seg
        cdef size_t need = DATA_OFFSET, offset
        lengths = []
        for b in buffers:
            n = memoryview(b).nbytes
            lengths.append(n)
            need += (n + ALIGN - 1) // ALIGN * ALIGN
        seg = self._segment_for(need)
        if seg is None:
            return None
        _next_generation += 1
        # Taken before the copy: the receiver frees only the generation it got.
        _store_state(seg.base, _next_generation)
        seg.last_used = _monotonic()
        descriptors = []
        offset = DATA_OFFSET
        for b, n in zip(buffers, lengths):
            PyObject_GetBuffer(b, &view, PyBUF_SIMPLE)
            try:
                with nogil:
                    _parallel_copy(seg.base + offset, <const char*>view.buf, <size_t>view.len)
            finally:
                PyBuffer_Release(&view)
            descriptors.append(DESCRIPTOR.pack(self.pid, seg.fd, seg.seg_id, seg.size,
                                               _next_generation, offset, n))
            offset += (<size_t>n + ALIGN - 1) // ALIGN * ALIGN
        return descriptors

    def trim(self, double idle_seconds):
        """Drop the free segments not filled for `idle_seconds`; their ids (the
        receiver is told to unmap them, or their memory would live on there)."""
        cdef Segment seg
        cdef double cutoff = _monotonic() - idle_seconds
        dropped = [seg for seg in self.segments
                   if seg.last_used < cutoff and _load_state(seg.base) == 0]
        for seg in dropped:
            self.segments.remove(seg)
        return [seg.seg_id for seg in dropped]

    def close(self):
        self.segments = []


cdef class Mapping:
    """A sender's segment mapped into this (the receiving) process."""

    cdef char* base
    cdef readonly size_t size

    def __cinit__(self):
        self.base = NULL

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.size)

    def token(self, Py_ssize_t n):
        """The probe token written after the state word (see `Probe`)."""
        return (self.base + TOKEN_OFFSET)[:n]


cdef Mapping _map_peer_fd(uint32_t pid, uint32_t fd, size_t size):
    cdef bytes path = f"/proc/{pid}/fd/{fd}".encode()
    cdef const char* cpath = path
    cdef int mine
    cdef void* p
    with nogil:
        mine = c_open(cpath, O_RDWR | O_CLOEXEC)
    if mine < 0:
        raise OSError(errno, f"cannot open process {pid}'s segment: {os.strerror(errno)}")
    with nogil:
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, mine, 0)
        c_close(mine)
    if p == MAP_FAILED:
        raise OSError(errno, f"cannot map process {pid}'s segment: {os.strerror(errno)}")
    cdef Mapping m = Mapping.__new__(Mapping)
    m.base = <char*>p
    m.size = size
    return m


cdef class Lease:
    """A frame's hold on a sender's segment: when the last of the frame's buffers
    (and so the last array or view built on them) is freed, the segment is marked
    free for the sender to fill again."""

    cdef Mapping mapping
    cdef uint64_t generation

    def __dealloc__(self):
        if self.mapping is not None:
            _free_if(self.mapping.base, self.generation)


cdef class SharedBuffer:
    """A received buffer living in a sender's segment, exported writable (as a
    received buffer would be)."""

    cdef Lease lease
    cdef size_t offset
    cdef size_t nbytes

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        PyBuffer_FillInfo(buffer, self, self.lease.mapping.base + self.offset,
                          <Py_ssize_t>self.nbytes, 0, flags)

    def __releasebuffer__(self, Py_buffer* buffer):
        pass

    def __len__(self):
        return self.nbytes


cdef class Inbox:
    """The segments of one sender that this process has mapped, by segment id."""

    cdef dict mappings
    cdef readonly size_t max_mappings

    def __cinit__(self, size_t max_mappings=8):
        self.mappings = {}
        self.max_mappings = max_mappings

    def attach(self, descriptors):
        """The SharedBuffers a frame's descriptors name, all in one segment (mapped on
        first use) and sharing one Lease on it."""
        first = DESCRIPTOR.unpack(descriptors[0])
        pid, fd, seg_id, size, generation = first[:5]
        cdef Mapping m = self.mappings.get(seg_id)
        if m is None or m.size != size:
            m = _map_peer_fd(pid, fd, size)
            # Segments the sender replaced are never named again: forget the oldest.
            while len(self.mappings) >= self.max_mappings:
                del self.mappings[next(iter(self.mappings))]
            self.mappings[seg_id] = m
        cdef Lease lease = Lease.__new__(Lease)
        lease.mapping = m
        lease.generation = generation
        cdef SharedBuffer b
        out = []
        for d in descriptors:
            fields = DESCRIPTOR.unpack(d)
            offset, nbytes = fields[5], fields[6]
            if fields[:5] != first[:5] or offset < DATA_OFFSET or offset + nbytes > size:
                lease.mapping = None  # a forged frame frees nothing
                raise ValueError("shared-memory descriptor outside its frame's segment")
            b = SharedBuffer.__new__(SharedBuffer)
            b.lease = lease
            b.offset = offset
            b.nbytes = nbytes
            out.append(b)
        return out

    def forget(self, seg_ids):
        """The sender dropped these segments: unmap them once no buffer uses them."""
        for seg_id in seg_ids:
            self.mappings.pop(seg_id, None)

    @property
    def nmappings(self):
        return len(self.mappings)

    def close(self):
        self.mappings = {}


cdef class Probe:
    """A one-page segment holding a random token: a peer that can open it through
    /proc and read the token can map this process's segments."""

    cdef Segment segment
    cdef readonly bytes token

    def __cinit__(self):
        global _next_seg_id
        _next_seg_id += 1
        self.segment = _create_segment(DATA_OFFSET, _next_seg_id)
        self.token = os.urandom(16)
        memcpy(self.segment.base + TOKEN_OFFSET, <const char*>self.token, 16)

    def offer(self):
        """(pid, fd, token) for the peer to check."""
        return os.getpid(), self.segment.fd, self.token


def check_probe(uint32_t pid, uint32_t fd, bytes token):
    """True if this process can map `pid`'s segments: it opens the probe and reads
    the same token (a pid of another host, or no permission, fails)."""
    try:
        m = _map_peer_fd(pid, fd, DATA_OFFSET)
    except OSError:
        return False
    return m.token(len(token)) == token
