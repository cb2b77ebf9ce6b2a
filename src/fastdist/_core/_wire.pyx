# cython: freethreading_compatible = False
"""Frame layout, the resumable frame reader, receive buffers and the handshake bytes.

Every frame is a fixed 32-byte prelude, one u64 length per out-of-band buffer, the
body (a pickle stream) and the buffers, all lengths explicit (docs/PROTOCOL.md):

    0   u8   kind          8   u32  whence        16  u64  id
    1   u8   flags         12  u32  reserved (0)  24  u64  body_nbytes
    2   u16  nbufs                                  32  nbufs x u64 buffer lengths
    4   u32  aux

All integers are little-endian. This module knows nothing of pickle or workers.
"""

cimport cython
from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_FillInfo
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memmove

from fastdist.exceptions import ProtocolError

# States of FrameReader.
cdef enum:
    READ_PRELUDE = 0
    READ_BUFLENS = 1
    READ_BODY_STAGED = 2
    READ_BODY_DIRECT = 3
    READ_BUFFER = 4

PRELUDE_SIZE = PRELUDE_NBYTES
# 64 GiB: larger than any array a 2-socket node holds in RAM, small enough that a
# corrupt length is caught before malloc tries to honour it.
DEFAULT_MAX_FRAME_NBYTES = 1 << 36
DEFAULT_MAX_NBUFS = 1024
# Parts smaller than this are parsed out of the staging buffer; larger bodies get
# their own allocation and are read into it directly (one kernel copy, no re-copy).
DEFAULT_STAGING_NBYTES = 256 * 1024
DEFAULT_DIRECT_THRESHOLD = 64 * 1024


cdef inline void put_u16(char* p, uint16_t v) noexcept nogil:
    p[0] = <char>(v & 0xff)
    p[1] = <char>((v >> 8) & 0xff)


cdef inline void put_u32(char* p, uint32_t v) noexcept nogil:
    cdef int i
    for i in range(4):
        p[i] = <char>((v >> (8 * i)) & 0xff)


cdef inline void put_u64(char* p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = <char>((v >> (8 * i)) & 0xff)


cdef inline uint16_t get_u16(const char* p) noexcept nogil:
    return (<uint8_t>p[0]) | ((<uint16_t><uint8_t>p[1]) << 8)


cdef inline uint32_t get_u32(const char* p) noexcept nogil:
    cdef uint32_t v = 0
    cdef int i
    for i in range(4):
        v |= (<uint32_t><uint8_t>p[i]) << (8 * i)
    return v


cdef inline uint64_t get_u64(const char* p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v |= (<uint64_t><uint8_t>p[i]) << (8 * i)
    return v


cdef Py_ssize_t encode_prelude(char* out, uint8_t kind, uint8_t flags, uint32_t aux,
                               uint32_t whence, uint64_t ref_id, uint64_t body_nbytes,
                               Py_ssize_t nbufs, Py_ssize_t* buflens) noexcept nogil:
    """Write the prelude and buffer lengths to `out`; return how many bytes."""
    cdef Py_ssize_t i
    out[0] = <char>kind
    out[1] = <char>flags
    put_u16(out + 2, <uint16_t>nbufs)
    put_u32(out + 4, aux)
    put_u32(out + 8, whence)
    put_u32(out + 12, 0)
    put_u64(out + 16, ref_id)
    put_u64(out + 24, body_nbytes)
    for i in range(nbufs):
        put_u64(out + PRELUDE_NBYTES + BUFLEN_NBYTES * i, <uint64_t>buflens[i])
    return PRELUDE_NBYTES + BUFLEN_NBYTES * nbufs


def pack_prelude(int kind, int flags, uint32_t aux, uint32_t whence, uint64_t ref_id,
                 uint64_t body_nbytes, buflens=()):
    """The prelude and buffer-length table of a frame, as bytes."""
    cdef Py_ssize_t n = len(buflens)
    if n > 0xFFFF:
        raise ValueError("a frame carries at most 65535 out-of-band buffers")
    cdef bytearray out = bytearray(PRELUDE_NBYTES + BUFLEN_NBYTES * n)
    cdef char* p = out
    cdef Py_ssize_t i
    encode_prelude(p, <uint8_t>kind, <uint8_t>flags, aux, whence, ref_id, body_nbytes, 0, NULL)
    put_u16(p + 2, <uint16_t>n)
    for i in range(n):
        put_u64(p + PRELUDE_NBYTES + BUFLEN_NBYTES * i, <uint64_t>buflens[i])
    return bytes(out)


cdef extern from "<sys/mman.h>" nogil:
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void* addr, size_t length)
    int madvise(void* addr, size_t length, int advice)
    void* MAP_FAILED
    enum:
        PROT_READ
        PROT_WRITE
        MAP_PRIVATE
        MAP_ANONYMOUS
        MADV_HUGEPAGE

# At and above this size a receive buffer is its own mapping backed by huge pages:
# first-touching fresh memory costs ~0.65 ns/byte in 4 KiB pages, several times
# less in 2 MiB ones, and that cost, not the copy, bounds large transfers.
HUGE_BUFFER_NBYTES = 4 * 1024 * 1024
HUGE_PAGE_NBYTES = 2 * 1024 * 1024
# Above this, no huge-page advice: with THP defrag on "madvise", faulting in
# gigabytes of advised memory can stall for seconds in direct compaction.
HUGE_ADVICE_MAX_NBYTES = 1024 * 1024 * 1024
# Freed large mappings kept for the next receive of a similar size (their pages
# are already faulted in): at most this many, of at most this many bytes in all.
cdef int CACHE_SLOTS = 2
cdef Py_ssize_t CACHE_MAX_NBYTES = 512 * 1024 * 1024
cdef list _map_cache = []  # (mapped length, address as int)


cdef char* _take_mapping(Py_ssize_t length):
    cdef Py_ssize_t i
    for i in range(len(_map_cache)):
        if _map_cache[i][0] == length:
            addr = _map_cache.pop(i)[1]
            return <char*><size_t>addr
    cdef void* p = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if p == MAP_FAILED:
        return NULL
    if length <= HUGE_ADVICE_MAX_NBYTES:
        madvise(p, length, MADV_HUGEPAGE)
    return <char*>p


cdef void _give_mapping(char* data, Py_ssize_t length):
    if length <= CACHE_MAX_NBYTES // CACHE_SLOTS:
        _map_cache.append((length, <size_t>data))
        if len(_map_cache) <= CACHE_SLOTS:
            return
        length, addr = _map_cache.pop(0)
        data = <char*><size_t>addr
    munmap(data, length)


# Receive buffers alive in this process, and their bytes (see `live_recv_buffers`).
cdef Py_ssize_t _live_buffers = 0
cdef Py_ssize_t _live_nbytes = 0


def live_recv_buffers():
    """(count, bytes) of the receive buffers alive in this process: what received
    frames still hold, through the arrays unpickled from them or otherwise (a check
    that nothing keeps a finished call's arguments)."""
    return _live_buffers, _live_nbytes


cdef class RecvBuffer:
    """A writable allocation that one received body or out-of-band buffer lands in.

    Unpickled numpy arrays keep it as their base, so the bytes the kernel wrote
    are the array's memory: no copy after `recv_into`.
    """

    def __cinit__(self, Py_ssize_t nbytes):
        if nbytes < 0:
            raise ValueError("negative buffer size")
        self.mapped = 0
        if nbytes >= HUGE_BUFFER_NBYTES:
            self.mapped = (nbytes + HUGE_PAGE_NBYTES - 1) // HUGE_PAGE_NBYTES * HUGE_PAGE_NBYTES
            self.data = _take_mapping(self.mapped)
            if self.data == NULL:
                self.mapped = 0
        if self.mapped == 0:
            # malloc, not calloc: zero-filling would touch every page once more.
            self.data = <char*>malloc(nbytes if nbytes > 0 else 1)
        if self.data == NULL:
            raise MemoryError(f"cannot allocate a {nbytes}-byte receive buffer")
        self.nbytes = nbytes
        self.filled = 0
        self.exports = 0
        global _live_buffers, _live_nbytes
        _live_buffers += 1
        _live_nbytes += nbytes

    def __dealloc__(self):
        global _live_buffers, _live_nbytes
        if self.data != NULL:
            _live_buffers -= 1
            _live_nbytes -= self.nbytes
        if self.mapped:
            _give_mapping(self.data, self.mapped)
        else:
            free(self.data)
        self.data = NULL

    def __getbuffer__(self, Py_buffer* view, int flags):
        PyBuffer_FillInfo(view, self, self.data, self.nbytes, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer* view):
        self.exports -= 1

    def __len__(self):
        return self.nbytes

    @property
    def address(self):
        """The address of the allocation (to check zero-copy in tests)."""
        return <size_t>self.data

    def __reduce__(self):
        # Sent onwards (e.g. a forwarded value), it travels as bytes.
        return (bytearray, (memoryview(self).tobytes(),))


@cython.no_gc
cdef class Frame:
    """One received frame: header fields, body and out-of-band buffers.

    Not tracked by the garbage collector: it holds bytes, receive buffers and a
    list of them, never a cycle, and a process receives one per call (each tracked
    allocation brings the next collection closer).
    """

    def __repr__(self):
        return (f"Frame(kind={self.kind}, flags={self.flags}, aux={self.aux}, "
                f"whence={self.whence}, id={self.id}, body={len(self.body)}B, "
                f"buffers={[len(b) for b in self.buffers]})")


cdef class FrameReader:
    """Turns any chunking of a byte stream into frames, without re-parsing.

    Feed it with `get_buffer()` / `buffer_updated(n)` (as `recv_into` would) or
    with `feed(data)`; complete frames are collected and handed out by
    `take_frames()`. Every length is checked against the limits before anything
    is allocated; a violation raises `ProtocolError`, after which the reader (and
    the connection it serves) must be discarded.
    """

    def __cinit__(self, uint64_t max_frame_nbytes=DEFAULT_MAX_FRAME_NBYTES,
                  uint32_t max_nbufs=DEFAULT_MAX_NBUFS,
                  Py_ssize_t staging_nbytes=DEFAULT_STAGING_NBYTES,
                  Py_ssize_t direct_threshold=DEFAULT_DIRECT_THRESHOLD):
        # Every part parsed out of staging (prelude, buffer table, small body) must fit
        # in it whole, or feeding never completes the part and never makes room for it.
        if (staging_nbytes < 2 * PRELUDE_NBYTES or staging_nbytes < 2 * BUFLEN_NBYTES * max_nbufs
                or staging_nbytes < 2 * direct_threshold):
            raise ValueError(
                "staging buffer too small for the prelude, the buffer table or the direct threshold")
        if direct_threshold < 1:
            raise ValueError("direct_threshold must be positive")
        self.staging = <char*>PyMem_Malloc(staging_nbytes)
        self.buflens = <uint64_t*>PyMem_Malloc(sizeof(uint64_t) * (max_nbufs + 1))
        if self.staging == NULL or self.buflens == NULL:
            raise MemoryError()
        self.staging_nbytes = staging_nbytes
        self.direct_threshold = direct_threshold
        self.max_frame_nbytes = max_frame_nbytes
        self.max_nbufs = max_nbufs
        self.rpos = 0
        self.wpos = 0
        self.state = READ_PRELUDE
        self.ready = []

    def __dealloc__(self):
        PyMem_Free(self.staging)
        PyMem_Free(self.buflens)

    cdef int c_get_buffer(self, char** ptr, Py_ssize_t* nbytes) except -1:
        if self.state == READ_BODY_DIRECT or self.state == READ_BUFFER:
            ptr[0] = self.target.data + self.target.filled
            nbytes[0] = self.target.nbytes - self.target.filled
            return 0
        if self.rpos == self.wpos:
            self.rpos = 0
            self.wpos = 0
        elif self.rpos > 0 and self.staging_nbytes - self.wpos < self.staging_nbytes // 2:
            # Keep at least half the staging free so any staged part fits contiguously.
            memmove(self.staging, self.staging + self.rpos, self.wpos - self.rpos)
            self.wpos -= self.rpos
            self.rpos = 0
        ptr[0] = self.staging + self.wpos
        nbytes[0] = self.staging_nbytes - self.wpos
        return 0

    cdef int c_buffer_updated(self, Py_ssize_t nbytes) except -1:
        if self.state == READ_BODY_DIRECT or self.state == READ_BUFFER:
            self.target.filled += nbytes
            if self.target.filled < self.target.nbytes:
                return 0
            if self.state == READ_BODY_DIRECT:
                self.buf_index = 0
            else:
                self.buf_index += 1
            self._begin_buffer()
        else:
            self.wpos += nbytes
        return self._parse()

    cdef int _fill_target_from_staging(self) except -1:
        cdef Py_ssize_t n = self.wpos - self.rpos
        cdef Py_ssize_t need = self.target.nbytes - self.target.filled
        if n > need:
            n = need
        if n > 0:
            memcpy(self.target.data + self.target.filled, self.staging + self.rpos, n)
            self.target.filled += n
            self.rpos += n
        return 0

    cdef int _begin_buffer(self) except -1:
        """Start (or finish, when none is left) the out-of-band buffer `buf_index`."""
        while self.buf_index < self.nbufs:
            self.target = RecvBuffer(<Py_ssize_t>self.buflens[self.buf_index])
            self.frame.buffers.append(self.target)
            self._fill_target_from_staging()
            if self.target.filled < self.target.nbytes:
                self.state = READ_BUFFER
                return 0
            self.buf_index += 1
        self._finish_frame()
        return 0

    cdef int _finish_frame(self) except -1:
        self.ready.append(self.frame)
        self.frame = None
        self.target = None
        self.state = READ_PRELUDE
        return 0

    cdef int _parse(self) except -1:
        cdef const char* p
        cdef Py_ssize_t avail, need, i
        cdef uint64_t total
        while True:
            avail = self.wpos - self.rpos
            p = self.staging + self.rpos
            if self.state == READ_PRELUDE:
                if avail < PRELUDE_NBYTES:
                    return 0
                self.nbufs = get_u16(p + 2)
                self.body_nbytes = get_u64(p + 24)
                if self.nbufs > self.max_nbufs:
                    raise ProtocolError(
                        f"frame announces {self.nbufs} buffers, more than the maximum {self.max_nbufs}")
                if self.body_nbytes > self.max_frame_nbytes:
                    raise ProtocolError(
                        f"frame body of {self.body_nbytes} bytes exceeds the maximum "
                        f"frame size {self.max_frame_nbytes}")
                self.frame = Frame.__new__(Frame)
                self.frame.kind = <uint8_t>p[0]
                self.frame.flags = <uint8_t>p[1]
                self.frame.aux = get_u32(p + 4)
                self.frame.whence = get_u32(p + 8)
                self.frame.id = get_u64(p + 16)
                self.frame.buffers = []
                self.rpos += PRELUDE_NBYTES
                self.state = READ_BUFLENS if self.nbufs else READ_BODY_STAGED
                if self.nbufs == 0:
                    self._begin_body()
            elif self.state == READ_BUFLENS:
                need = BUFLEN_NBYTES * self.nbufs
                if avail < need:
                    return 0
                total = self.body_nbytes
                for i in range(self.nbufs):
                    self.buflens[i] = get_u64(p + BUFLEN_NBYTES * i)
                    # Each term is checked before the sum, so the sum cannot wrap.
                    if self.buflens[i] > self.max_frame_nbytes:
                        raise ProtocolError(
                            f"out-of-band buffer of {self.buflens[i]} bytes exceeds the "
                            f"maximum frame size {self.max_frame_nbytes}")
                    total += self.buflens[i]
                    if total > self.max_frame_nbytes:
                        raise ProtocolError(
                            f"frame of more than {self.max_frame_nbytes} bytes exceeds the maximum frame size")
                self.rpos += need
                self._begin_body()
            elif self.state == READ_BODY_STAGED:
                if avail < <Py_ssize_t>self.body_nbytes:
                    return 0
                self.frame.body = PyBytes_FromStringAndSize(p, <Py_ssize_t>self.body_nbytes)
                self.rpos += <Py_ssize_t>self.body_nbytes
                self.buf_index = 0
                self._begin_buffer()
            else:
                # A direct read is in progress: the staging is empty by construction.
                return 0

    cdef int _begin_body(self) except -1:
        if self.body_nbytes >= <uint64_t>self.direct_threshold:
            self.target = RecvBuffer(<Py_ssize_t>self.body_nbytes)
            self.frame.body = self.target
            self._fill_target_from_staging()
            if self.target.filled < self.target.nbytes:
                self.state = READ_BODY_DIRECT
            else:
                self.buf_index = 0
                self._begin_buffer()
        else:
            self.state = READ_BODY_STAGED
        return 0

    # Python-level API (tests, custom transports that read into a buffer).

    def get_buffer(self):
        """A writable memoryview that the next received bytes should be written into."""
        cdef char* ptr
        cdef Py_ssize_t n
        self.c_get_buffer(&ptr, &n)
        return _Window.wrap(self, ptr, n)

    def buffer_updated(self, Py_ssize_t nbytes):
        """Tell the reader that `nbytes` were written into the last `get_buffer()` view."""
        if nbytes < 0:
            raise ValueError("negative byte count")
        self.c_buffer_updated(nbytes)

    def feed(self, data):
        """Copy `data` (any bytes-like) in; return the frames it completed."""
        cdef const unsigned char[::1] view = memoryview(data).cast("B")
        cdef Py_ssize_t off = 0, total = view.shape[0], n
        cdef char* ptr
        while off < total:
            self.c_get_buffer(&ptr, &n)
            if n > total - off:
                n = total - off
            memcpy(ptr, &view[off], n)
            off += n
            self.c_buffer_updated(n)
        return self.take_frames()

    def take_frames(self):
        """The frames completed so far (and forget them)."""
        frames = self.ready
        self.ready = []
        return frames

    @property
    def mid_frame(self):
        """True when part of a frame has arrived but not all of it."""
        return self.state != READ_PRELUDE or self.wpos != self.rpos


cdef class _Window:
    """A writable view onto a FrameReader's current receive window."""
    cdef object owner
    cdef char* ptr
    cdef Py_ssize_t n

    @staticmethod
    cdef object wrap(object owner, char* ptr, Py_ssize_t n):
        cdef _Window w = _Window.__new__(_Window)
        w.owner = owner
        w.ptr = ptr
        w.n = n
        return memoryview(w)

    def __getbuffer__(self, Py_buffer* view, int flags):
        PyBuffer_FillInfo(view, self, self.ptr, self.n, 0, flags)


# --- Handshake bytes (the state machine and the HMAC live in protocol/handshake.py) ---
#
#  step  from       bytes  layout
#  1     connector  48     b"FDSTHELO" | u32 version | u32 0 | nonce_c (32)
#  2     acceptor   80     b"FDSTACPT" | u32 version | u32 status | nonce_s (32) | mac_a (32)
#  3     connector  40     b"FDSTPROF" | mac_c (32)
#  4     acceptor   8      b"FDSTWELC"
NONCE_NBYTES = 32
MAC_NBYTES = 32
HELLO_NBYTES = 48
ACCEPT_NBYTES = 80
PROOF_NBYTES = 40
WELCOME_NBYTES = 8
HELLO_MAGIC = b"FDSTHELO"
ACCEPT_MAGIC = b"FDSTACPT"
PROOF_MAGIC = b"FDSTPROF"
WELCOME = b"FDSTWELC"
STATUS_OK = 0
STATUS_VERSION_MISMATCH = 1


def pack_hello(uint32_t version, bytes nonce):
    if len(nonce) != NONCE_NBYTES:
        raise ValueError("nonce must be 32 bytes")
    cdef char buf[16]
    put_u32(buf, version)
    put_u32(buf + 4, 0)
    return HELLO_MAGIC + PyBytes_FromStringAndSize(buf, 8) + nonce


def unpack_hello(bytes data):
    """(version, nonce) from a hello, or ProtocolError."""
    if len(data) != HELLO_NBYTES or data[:8] != HELLO_MAGIC:
        raise ProtocolError("not a fastdist handshake")
    cdef const char* p = data
    return get_u32(p + 8), data[16:48]


def pack_accept(uint32_t version, uint32_t status, bytes nonce, bytes mac):
    if len(nonce) != NONCE_NBYTES or len(mac) != MAC_NBYTES:
        raise ValueError("nonce and mac must be 32 bytes each")
    cdef char buf[8]
    put_u32(buf, version)
    put_u32(buf + 4, status)
    return ACCEPT_MAGIC + PyBytes_FromStringAndSize(buf, 8) + nonce + mac


def unpack_accept(bytes data):
    """(version, status, nonce, mac) from an accept, or ProtocolError."""
    if len(data) != ACCEPT_NBYTES or data[:8] != ACCEPT_MAGIC:
        raise ProtocolError("not a fastdist handshake reply")
    cdef const char* p = data
    return get_u32(p + 8), get_u32(p + 12), data[16:48], data[48:80]


def pack_proof(bytes mac):
    if len(mac) != MAC_NBYTES:
        raise ValueError("mac must be 32 bytes")
    return PROOF_MAGIC + mac


def unpack_proof(bytes data):
    if len(data) != PROOF_NBYTES or data[:8] != PROOF_MAGIC:
        raise ProtocolError("not a fastdist handshake proof")
    return data[8:40]
