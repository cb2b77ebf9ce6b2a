"""The socket I/O loop: one epoll thread per process reading frames, and gathered sends.

A connection is read by the loop thread, or for a moment by a thread that waits
for its reply (`begin_direct`), which never runs user code while it holds the
role; complete frames go to a Python handler. Writes happen on the thread that
sends: it gathers prelude, body and out-of-band buffers into one `sendmsg`
straight from their memory, and stays until the kernel holds every byte, so the
caller may reuse an array as soon as its call returns. The loop thread itself
only sends small control frames, and never waits for a busy connection (see
`send_nowait`). The GIL is released exactly around `epoll_wait`, `recv`,
`sendmsg` and `poll`.

A connection registers with the keepalive thread (`_keepalive`) once its peer
has named itself: a PING then goes out on it whenever it has been quiet, whatever
this process's Python code does.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport (
    NOWAIT_LOCK,
    WAIT_LOCK,
    PyThread_acquire_lock,
    PyThread_allocate_lock,
    PyThread_free_lock,
    PyThread_get_thread_ident,
    PyThread_release_lock,
    PyThread_type_lock,
)
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy
from posix.unistd cimport close as c_close, read as c_read, write as c_write
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, nanosleep, timespec

cdef extern from "pythread.h":
    # (Not in Cython's cpython.pythread: a lock wait with a deadline, 1 if acquired.)
    int PyThread_acquire_lock_timed(PyThread_type_lock lock, long long microseconds,
                                    int intr_flag) nogil

from fastdist._core._keepalive cimport keepalive_add, keepalive_remove, keepalive_send_rest
from fastdist._core._syscalls cimport *
from fastdist._core._wire cimport BUFLEN_NBYTES, PRELUDE_NBYTES, FrameReader, encode_prelude

import os
import sys
import traceback

from fastdist.exceptions import ProtocolError


cdef enum:
    MAX_EVENTS = 64
    # Writes gather at most this many segments per sendmsg (IOV_MAX is 1024 on Linux).
    MAX_IOV = 256
    # Reads per readable event before the loop serves the other connections.
    MAX_READS_PER_WAKE = 16
    HANDSHAKE_READ_MAX = 256


# Writes up to this size keep the GIL (see SocketConnection._write_some).
cdef Py_ssize_t SEND_WITH_GIL_MAX = 64 * 1024


cdef inline Py_ssize_t _sendmsg_retrying(int fd, msghdr* msg) noexcept nogil:
    cdef Py_ssize_t written
    while True:
        written = sendmsg(fd, msg, MSG_DONTWAIT | MSG_NOSIGNAL)
        if written >= 0 or errno != EINTR:
            return written


cdef inline long long _monotonic_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1000000000LL + ts.tv_nsec


include "_spin.pxi"


cdef inline long long _monotonic_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1000LL + ts.tv_nsec // 1000000


def _report(where):
    """Print an exception that escaped a callback; the loop must keep serving."""
    print(f"fastdist: error in {where}:", file=sys.stderr)
    traceback.print_exc()


cdef bytes _small_frame(int kind, int flags, unsigned int aux, unsigned int whence,
                        unsigned long long ref_id, body):
    """A whole frame without out-of-band buffers, as one bytes object (to queue)."""
    cdef Py_ssize_t body_n = len(body)
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, PRELUDE_NBYTES + body_n)
    cdef char* p = PyBytes_AS_STRING(frame)
    cdef const unsigned char[::1] view
    encode_prelude(p, <unsigned char>kind, <unsigned char>flags, aux, whence, ref_id,
                   body_n, 0, NULL)
    if body_n and type(body) is bytes:  # (most are: no memoryview to make)
        memcpy(p + PRELUDE_NBYTES, PyBytes_AS_STRING(body), body_n)
    elif body_n:
        view = memoryview(body).cast("B")
        memcpy(p + PRELUDE_NBYTES, &view[0], body_n)
    return frame


cdef class MessageLoop:
    """An epoll loop over sockets (framed connections) and plain readable fds."""

    def __cinit__(self, on_tick=None, int tick_ms=1000):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, os.strerror(errno))
        self.wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.wakefd < 0:
            raise OSError(errno, os.strerror(errno))
        self.conns = {}
        self.readers = {}
        self.dirty = []
        self.on_tick = on_tick
        self.tick_ms = tick_ms
        self.running = True
        self.thread_ident = None
        self._watch(self.wakefd, EPOLLIN, EPOLL_CTL_ADD)

    def __dealloc__(self):
        if self.epfd >= 0:
            c_close(self.epfd)
        if self.wakefd >= 0:
            c_close(self.wakefd)

    cdef int _watch(self, int fd, unsigned int events, int op) except -1:
        cdef epoll_event ev
        ev.events = events
        ev.data.fd = fd
        if epoll_ctl(self.epfd, op, fd, &ev) < 0:
            raise OSError(errno, os.strerror(errno))
        return 0

    cdef int _set_write_interest(self, SocketConnection conn, bint want) except -1:
        if conn.write_interest == want or conn.closed:
            return 0
        conn.write_interest = want
        return self._update_interest(conn)

    cdef int _set_read_interest(self, SocketConnection conn, bint want) except -1:
        if conn.read_interest == want or conn.closed:
            return 0
        conn.read_interest = want
        return self._update_interest(conn)

    cdef int _update_interest(self, SocketConnection conn) except -1:
        # Called with the GIL held, so the two flags and the epoll mask change together.
        cdef unsigned int events = EPOLLRDHUP
        if conn.read_interest:
            events |= EPOLLIN
        if conn.write_interest:
            events |= EPOLLOUT
        self._watch(conn.fd, events, EPOLL_CTL_MOD)
        return 0

    def add_connection(self, int fd, handler, handshake=None, peer=None):
        """Serve the connected, non-blocking socket `fd`; return its SocketConnection."""
        cdef SocketConnection conn = SocketConnection.__new__(SocketConnection)
        conn.fd = fd
        conn.loop = self
        conn.reader = FrameReader()
        conn.handler = handler
        conn.handshake = handshake
        conn.peer = peer
        conn.read_interest = True
        self.conns[fd] = conn
        self._watch(fd, EPOLLIN | EPOLLRDHUP, EPOLL_CTL_ADD)
        return conn

    def add_reader(self, int fd, callback):
        """Call `callback()` on the loop thread whenever `fd` is readable."""
        self.readers[fd] = callback
        self._watch(fd, EPOLLIN, EPOLL_CTL_ADD)

    def remove_reader(self, int fd):
        if self.readers.pop(fd, None) is not None:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)

    def connections(self):
        return list(self.conns.values())

    def wakeup(self):
        """End the current epoll_wait early and run on_tick (safe from any thread, __del__ too)."""
        cdef uint64_t one = 1
        # With the GIL held: an eventfd write never blocks, and releasing the GIL here
        # would hand it to the loop thread woken by the previous wakeup (measured:
        # ~60 µs lost per deferred send in a pmap refill).
        c_write(self.wakefd, &one, 8)

    def stop(self):
        self.running = False
        self.wakeup()

    def in_loop_thread(self):
        return self.thread_ident == PyThread_get_thread_ident()

    def _flush_dirty(self):
        """Write the frames senders deferred (one gathered sendmsg per connection)."""
        cdef SocketConnection conn
        if not self.dirty:
            return
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            if not conn.closed:
                try:
                    conn._try_flush_nowait()
                except BaseException as exc:
                    conn.close(exc)

    def run(self):
        """Serve until stop(); call on the thread that is to be the I/O thread."""
        cdef epoll_event events[MAX_EVENTS]
        cdef int n, i, fd
        cdef unsigned int ev
        cdef uint64_t counter
        cdef bint woken
        cdef SocketConnection conn
        cdef long long now, next_tick = _monotonic_ms() + self.tick_ms
        cdef int wait_ms
        self.thread_ident = PyThread_get_thread_ident()
        while self.running:
            wait_ms = <int>max(0, min(next_tick - _monotonic_ms(), <long long>self.tick_ms))
            with nogil:
                n = epoll_wait(self.epfd, events, MAX_EVENTS, wait_ms)
            if n < 0:
                if errno == EINTR:
                    PyErr_CheckSignals()
                    continue
                raise OSError(errno, os.strerror(errno))
            woken = n == 0
            for i in range(n):
                fd = events[i].data.fd
                ev = events[i].events
                if fd == self.wakefd:
                    c_read(self.wakefd, &counter, 8)
                    woken = True
                    self._flush_dirty()
                    continue
                conn = self.conns.get(fd)
                if conn is not None:
                    try:
                        if ev & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP):
                            conn._on_readable()
                        if ev & EPOLLOUT and not conn.closed:
                            conn._try_flush_nowait()
                    except BaseException as exc:
                        conn.close(exc)
                    continue
                callback = self.readers.get(fd)
                if callback is not None:
                    try:
                        callback()
                    except Exception:
                        _report("a reader callback")
            # Steady traffic never lets epoll_wait time out: tick on the clock too, or
            # heartbeats and handshake deadlines would wait for the traffic to stop.
            now = _monotonic_ms()
            if now >= next_tick:
                woken = True
            if woken and self.on_tick is not None:
                next_tick = now + self.tick_ms
                try:
                    self.on_tick()
                except Exception:
                    _report("the loop tick")
        self.thread_ident = None


# The connection itself (SocketConnection) and the wait on several at once.
include "_connection.pxi"
