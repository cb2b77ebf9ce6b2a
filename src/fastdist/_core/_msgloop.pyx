"""The socket I/O loop: one epoll thread per process reading frames, gathered sends,
and a keepalive thread that needs no GIL.

A connection is read by the loop thread, or for a moment by a thread that waits
for its reply (`begin_direct`), which never runs user code while it holds the
role; complete frames go to a Python handler. Writes happen on the thread that
sends: it gathers prelude, body and out-of-band buffers into one `sendmsg`
straight from their memory, and stays until the kernel holds every byte, so the
caller may reuse an array as soon as its call returns. The loop thread itself
only sends small control frames, and never waits for a busy connection (see
`send_nowait`). The GIL is released exactly around `epoll_wait`, `recv`,
`sendmsg` and `poll`.

Liveness is the process's, not its Python code's: the keepalive thread is a
plain pthread that writes a PING on every connection that has sent nothing for a
while, also while user code holds the GIL in a long C routine (see `Keepalive`).
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

from fastdist._core._wire cimport BUFLEN_NBYTES, PRELUDE_NBYTES, FrameReader, encode_prelude

import os
import sys
import traceback

from fastdist.exceptions import ProtocolError


# EWOULDBLOCK equals EAGAIN on Linux, the only platform fastdist runs on.
cdef extern from "<sys/epoll.h>" nogil:
    cdef union epoll_data:
        void* ptr
        int fd
        unsigned int u32
        unsigned long long u64
    cdef struct epoll_event:
        unsigned int events
        epoll_data data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)
    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)
    enum:
        FIONREAD


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_attr_t:
        pass
    int pthread_create(pthread_t* thread, const pthread_attr_t* attr,
                       void* (*start)(void*) noexcept nogil, void* arg)
    int pthread_detach(pthread_t thread)


cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass
    int sigfillset(sigset_t* s)
    int pthread_sigmask(int how, const sigset_t* s, sigset_t* old)
    enum:
        SIG_BLOCK


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC



cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void* iov_base
        size_t iov_len


cdef extern from "<sys/socket.h>" nogil:
    cdef struct msghdr:
        void* msg_name
        unsigned int msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int sockfd, const msghdr* msg, int flags)
    ssize_t recv(int sockfd, void* buf, size_t len, int flags)
    ssize_t send(int sockfd, const void* buf, size_t len, int flags)
    int shutdown(int sockfd, int how)
    enum:
        MSG_DONTWAIT
        MSG_NOSIGNAL
        SHUT_RDWR


cdef enum:
    MAX_EVENTS = 64
    # Writes gather at most this many segments per sendmsg (IOV_MAX is 1024 on Linux).
    MAX_IOV = 256
    # Reads per readable event before the loop serves the other connections.
    MAX_READS_PER_WAKE = 16
    HANDSHAKE_READ_MAX = 256


cdef extern from "<sched.h>" nogil:
    int sched_yield()


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


# A thread waiting for a reply (or a worker waiting for its next call) first polls
# without sleeping for this long. On a machine where a sleeping CPU takes tens of
# microseconds to wake (most VMs), that is most of a small round trip: the sender's
# wake-up of a running receiver costs next to nothing. FASTDIST_SPIN_US=0 turns it off.
cdef long long _spin_ns = max(0, int(os.environ.get("FASTDIST_SPIN_US", "100"))) * 1000
# A spin that ends without data makes the next waits on that connection block at
# once: 1, then 3, 7, ... up to this many, so a slow peer costs little CPU.
cdef int MAX_SPIN_SKIP = 255


cdef int _poll_spinning(pollfd* fds, int n) noexcept nogil:
    """Poll `fds` without sleeping for up to `_spin_ns`; poll's result (0: nothing
    came)."""
    cdef int r
    cdef long long until = _monotonic_ns() + _spin_ns
    while True:
        r = poll(fds, n, 0)
        if r != 0 or _monotonic_ns() >= until:
            return r
        # Another process runnable on this CPU (more processes than cores) goes first.
        sched_yield()


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


# -- keepalive: a ping on every quiet connection, without the GIL -----------------------
#
# A process whose user code holds the GIL in one long C routine (a numpy kernel,
# `sum(range(10**9))`) runs no Python at all: neither the loop thread nor the
# heartbeat in Node._tick. Its peers must still hear from it, or they would declare
# it dead. So a plain pthread, started on the first registration, wakes a few times
# per interval and writes a PING frame on every registered connection that has
# written nothing for `_keepalive_ns`. It never waits for a lock: a connection
# whose send_lock is held is being written to (or will be), and one whose outq
# holds a half-written frame must not get bytes in between. What receives the
# pings is the peer's business (Node._heartbeat counts received bytes); a process
# that is frozen whole (SIGSTOP) or gone sends none, and is declared dead.

cdef PyThread_type_lock _keepalive_lock = PyThread_allocate_lock()  # guards the table
cdef Keepalive** _keepalives = NULL     # the registered connections' Keepalive fields
cdef Py_ssize_t _nkeepalives = 0
cdef Py_ssize_t _keepalives_cap = 0
cdef bint _keepalive_started = False
cdef long long _keepalive_ns = 7500000000LL  # ping a connection quiet for this long
cdef char _ping_frame[PRELUDE_NBYTES]
encode_prelude(_ping_frame, 9, 0, 0, 0, 0, 0, 0, NULL)  # Kind.PING, nothing else


def set_keepalive_interval(double seconds):
    """Ping a connection that has written nothing for `seconds` (Node sets a quarter
    of FASTDIST_HEARTBEAT_TIMEOUT on every tick, so a change of it takes effect)."""
    global _keepalive_ns
    _keepalive_ns = <long long>(max(seconds, 0.01) * 1e9)


def _keepalive_after_fork():
    """In a forked child: no keepalive thread runs, and the table's lock may have
    been held by it at the fork. Start afresh (with the connections registered
    before the fork forgotten: the child's own registrations start the thread)."""
    global _keepalive_lock, _nkeepalives, _keepalive_started
    _keepalive_lock = PyThread_allocate_lock()
    _nkeepalives = 0
    _keepalive_started = False


os.register_at_fork(after_in_child=_keepalive_after_fork)


cdef int _keepalive_add(Keepalive* k) except -1:
    global _keepalives, _nkeepalives, _keepalives_cap, _keepalive_started
    cdef Keepalive** grown
    cdef pthread_t thread
    with nogil:
        PyThread_acquire_lock(_keepalive_lock, WAIT_LOCK)
    try:
        if k.registered:
            return 0
        if _nkeepalives == _keepalives_cap:
            grown = <Keepalive**>realloc(_keepalives,
                                         sizeof(Keepalive*) * (2 * _keepalives_cap + 16))
            if grown == NULL:
                raise MemoryError()
            _keepalives = grown
            _keepalives_cap = 2 * _keepalives_cap + 16
        _keepalives[_nkeepalives] = k
        _nkeepalives += 1
        k.registered = True
        if not _keepalive_started:
            if pthread_create(&thread, NULL, _keepalive_main, NULL) != 0:
                raise OSError(errno, "could not start the keepalive thread")
            pthread_detach(thread)
            _keepalive_started = True
    finally:
        PyThread_release_lock(_keepalive_lock)
    return 0


cdef void _keepalive_remove(Keepalive* k) noexcept nogil:
    global _nkeepalives
    cdef Py_ssize_t i
    if not k.registered:
        return
    PyThread_acquire_lock(_keepalive_lock, WAIT_LOCK)
    for i in range(_nkeepalives):
        if _keepalives[i] == k:
            _nkeepalives -= 1
            _keepalives[i] = _keepalives[_nkeepalives]
            break
    k.registered = False
    PyThread_release_lock(_keepalive_lock)


cdef void _keepalive_ping(Keepalive* k, long long now) noexcept nogil:
    """Write a PING on `k`'s socket if it has been quiet, without ever waiting."""
    cdef Py_ssize_t r
    if k.fd < 0 or k.ping_left or k.half_written or now - k.last_write_ns < _keepalive_ns:
        return
    if not PyThread_acquire_lock(k.send_lock, NOWAIT_LOCK):
        return
    if not k.half_written and not k.ping_left and k.fd >= 0:
        r = send(k.fd, _ping_frame, PRELUDE_NBYTES, MSG_DONTWAIT | MSG_NOSIGNAL)
        if r > 0:
            k.ping_bytes += r
            # (A socket with room takes 32 bytes whole; should it not, the next
            # writer sends the rest before anything else: see _finish_ping.)
            k.ping_left = PRELUDE_NBYTES - r
        k.last_write_ns = now  # a full socket is retried an interval later, not at once
    PyThread_release_lock(k.send_lock)


cdef void* _keepalive_main(void* arg) noexcept nogil:
    cdef sigset_t all_signals
    cdef timespec pause
    cdef long long step
    cdef Py_ssize_t i
    # Signals are for the threads that run Python: one taken here would wake nobody.
    sigfillset(&all_signals)
    pthread_sigmask(SIG_BLOCK, &all_signals, NULL)
    while True:
        step = min(_keepalive_ns // 4, 250000000LL)
        pause.tv_sec = step // 1000000000LL
        pause.tv_nsec = step % 1000000000LL
        nanosleep(&pause, NULL)
        PyThread_acquire_lock(_keepalive_lock, WAIT_LOCK)
        for i in range(_nkeepalives):
            _keepalive_ping(_keepalives[i], _monotonic_ns())
        PyThread_release_lock(_keepalive_lock)
    return NULL



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


cdef class SocketConnection:
    """One framed, authenticated (or authenticating) socket served by a MessageLoop."""

    def __cinit__(self):
        self.fd = -1
        self.send_lock = PyThread_allocate_lock()
        self.read_lock = PyThread_allocate_lock()
        if self.send_lock == NULL or self.read_lock == NULL:
            raise MemoryError()
        self.outq = []
        self.pending = []
        self.out_off = 0
        self.keepalive.fd = -1
        self.keepalive.send_lock = self.send_lock
        self.keepalive.last_write_ns = _monotonic_ns()

    def __dealloc__(self):
        _keepalive_remove(&self.keepalive)  # (closed connections are removed already)
        if self.send_lock != NULL:
            PyThread_free_lock(self.send_lock)
        if self.read_lock != NULL:
            PyThread_free_lock(self.read_lock)

    @property
    def is_closed(self):
        return self.closed

    @property
    def bytes_sent(self):
        """Bytes written: frames, and the keepalive thread's pings."""
        return self.frame_bytes_sent + self.keepalive.ping_bytes

    def start_keepalive(self):
        """Let the keepalive thread ping this connection when it is quiet (once the
        peer reads frames: after the handshake and its IDENTIFY)."""
        if self.closed or self.handshake is not None:
            return
        self.keepalive.fd = self.fd
        _keepalive_add(&self.keepalive)

    def unread_nbytes(self):
        """Bytes the kernel holds for this socket that nobody has read yet: a peer
        whose pings wait here has spoken, even if this process could not read."""
        cdef int n = 0
        if self.closed or self.fd < 0 or ioctl(self.fd, FIONREAD, &n) < 0:
            return 0
        return n

    cdef int _acquire(self) except -1:
        cdef int ok
        if PyThread_acquire_lock(self.send_lock, NOWAIT_LOCK):
            return 0
        # Wait without the GIL: the holder needs it to finish its sendmsg.
        with nogil:
            ok = PyThread_acquire_lock(self.send_lock, WAIT_LOCK)
        return 0

    cdef int _release(self) except -1:
        # The keepalive thread must not write between the parts of a frame.
        self.keepalive.half_written = bool(self.outq)
        if self.close_fd_pending and self.fd >= 0:
            c_close(self.fd)
            self.fd = -1
            self.close_fd_pending = False
        PyThread_release_lock(self.send_lock)
        return 0

    cdef int _move_pending(self) except -1:
        if self.pending:
            self.outq.extend(self.pending)
            self.msgs_sent += len(self.pending)
            self.pending = []
        return 0

    cdef Py_ssize_t _write_some(self) except -1:
        """One gathered sendmsg of the queue head (send_lock held); bytes written, 0 if full."""
        cdef iovec iov[MAX_IOV]
        cdef Py_buffer views[MAX_IOV]
        cdef msghdr msg
        cdef Py_ssize_t niov = 0, i, written, off = self.out_off, total = 0, left
        cdef int err = 0
        if not self.outq:
            return 0
        if self.fd < 0 or self.closed:
            raise ConnectionResetError("connection closed")
        if self.keepalive.ping_left:
            self._finish_ping()
        try:
            for seg in self.outq:
                if niov == MAX_IOV:
                    break
                PyObject_GetBuffer(seg, &views[niov], PyBUF_SIMPLE)
                iov[niov].iov_base = <char*>views[niov].buf + off
                iov[niov].iov_len = views[niov].len - off
                total += views[niov].len - off
                off = 0
                niov += 1
            msg.msg_name = NULL
            msg.msg_namelen = 0
            msg.msg_iov = iov
            msg.msg_iovlen = niov
            msg.msg_control = NULL
            msg.msg_controllen = 0
            msg.msg_flags = 0
            if total <= SEND_WITH_GIL_MAX:
                # A small non-blocking write takes a few µs: releasing the GIL for it
                # would hand the GIL to the loop thread and wait to get it back.
                written = _sendmsg_retrying(self.fd, &msg)
            else:
                with nogil:
                    written = _sendmsg_retrying(self.fd, &msg)
            if written < 0:
                err = errno
            # Drop the segments the kernel took whole; remember how far into the next.
            if written > 0:
                i = 0
                left = written
                while i < niov and left >= <Py_ssize_t>iov[i].iov_len:
                    left -= iov[i].iov_len
                    i += 1
                if i:
                    del self.outq[:i]
                self.out_off = left if i else self.out_off + left
        finally:
            for i in range(niov):
                PyBuffer_Release(&views[i])
        if written < 0:
            if err == EAGAIN:
                return 0
            raise ConnectionResetError(err, os.strerror(err))
        self.frame_bytes_sent += written
        self.keepalive.last_write_ns = _monotonic_ns()
        self.writes += 1
        return written

    cdef int _finish_ping(self) except -1:
        """Write what the kernel did not take of a keepalive ping (send_lock held),
        before any other byte: a frame must not start inside it."""
        cdef pollfd pfd
        cdef Py_ssize_t r
        cdef int left
        while self.keepalive.ping_left:
            left = self.keepalive.ping_left
            with nogil:
                r = send(self.fd, _ping_frame + PRELUDE_NBYTES - left, left,
                         MSG_DONTWAIT | MSG_NOSIGNAL)
            if r > 0:
                self.keepalive.ping_left -= r
                self.keepalive.ping_bytes += r
            elif r < 0 and errno != EAGAIN and errno != EINTR:
                raise ConnectionResetError(errno, os.strerror(errno))
            else:
                pfd.fd = self.fd
                pfd.events = POLLOUT
                pfd.revents = 0
                with nogil:
                    poll(&pfd, 1, 1000)
                if self.closed:
                    raise ConnectionResetError("connection closed")
        return 0

    cdef int _flush_blocking(self) except -1:
        cdef pollfd pfd
        cdef int r
        while self.outq:
            if self._write_some() == 0 and self.outq:
                pfd.fd = self.fd
                pfd.events = POLLOUT
                pfd.revents = 0
                with nogil:
                    r = poll(&pfd, 1, 1000)
                if r < 0 and errno == EINTR:
                    PyErr_CheckSignals()
                if self.closed:
                    raise ConnectionResetError("connection closed")
        return 0

    cdef int _try_flush_nowait(self) except -1:
        """Write what the loop thread queued, without ever waiting for send_lock."""
        if not PyThread_acquire_lock(self.send_lock, NOWAIT_LOCK):
            # A sender holds the lock; it drains `pending` before releasing, and
            # EPOLLOUT brings us back here in case it released just before our append.
            self.loop._set_write_interest(self, True)
            return 0
        try:
            self._move_pending()
            if self.outq:
                self._write_some()
            self.loop._set_write_interest(self, bool(self.outq))
        finally:
            self._release()
        return 0

    def send_frame(self, int kind, int flags, unsigned int aux, unsigned int whence,
                   unsigned long long ref_id, body=b"", buffers=()):
        """Send one frame; returns once the kernel holds all of it.

        `body` and each of `buffers` may be any contiguous buffer-protocol object;
        they are written from their own memory with one gathered sendmsg.
        """
        cdef Py_ssize_t nbufs = len(buffers), i
        cdef Py_ssize_t* lens = <Py_ssize_t*>malloc(sizeof(Py_ssize_t) * (nbufs + 1))
        if lens == NULL:
            raise MemoryError()
        cdef bytes prelude
        try:
            for i in range(nbufs):
                lens[i] = memoryview(buffers[i]).nbytes
            prelude = PyBytes_FromStringAndSize(NULL, PRELUDE_NBYTES + BUFLEN_NBYTES * nbufs)
            encode_prelude(PyBytes_AS_STRING(prelude), <unsigned char>kind, <unsigned char>flags,
                           aux, whence, ref_id, memoryview(body).nbytes, nbufs, lens)
        finally:
            free(lens)
        self._acquire()
        try:
            if self.closed:
                raise ConnectionResetError("connection closed")
            self._move_pending()
            self.outq.append(prelude)
            if len(body):
                self.outq.append(body)
            for b in buffers:
                if memoryview(b).nbytes:
                    self.outq.append(b)
            self.msgs_sent += 1
            self._flush_blocking()
            # Frames the loop thread queued while we held the lock go out now too.
            while self.pending:
                self._move_pending()
                self._flush_blocking()
        except BaseException:
            # A half-written frame leaves the stream out of sync: this connection is done.
            self.outq = []
            self.out_off = 0
            raise
        finally:
            self._release()

    def send_nowait(self, int kind, int flags, unsigned int aux, unsigned int whence,
                    unsigned long long ref_id, body=b""):
        """Send a small control frame without blocking the loop thread.

        On the loop thread the frame is queued and written when the socket and the
        send lock allow; elsewhere this is `send_frame`.
        """
        if not self.loop.in_loop_thread():
            self.send_frame(kind, flags, aux, whence, ref_id, body)
            return
        if self.closed:
            raise ConnectionResetError("connection closed")
        self.pending.append(_small_frame(kind, flags, aux, whence, ref_id, body))
        self._try_flush_nowait()

    def send_deferred(self, int kind, int flags, unsigned int aux, unsigned int whence,
                      unsigned long long ref_id, body=b""):
        """Queue a small frame; the loop thread writes the queue with one sendmsg.

        A burst of calls (pipelined remotecalls, pmap) then costs one syscall per
        burst rather than per call. A thread about to wait for a reply calls
        `flush()` first, so deferring never delays a round trip.
        """
        if self.closed:
            raise ConnectionResetError("connection closed")
        cdef bint first = not self.pending
        self.pending.append(_small_frame(kind, flags, aux, whence, ref_id, body))
        if first:
            self.loop.dirty.append(self)
            self.loop.wakeup()

    def queue_frame(self, int kind, int flags, unsigned int aux, unsigned int whence,
                    unsigned long long ref_id, body=b""):
        """Queue a small frame for this thread's next `send_frame` or `flush`.

        Unlike `send_deferred` the loop thread is not woken: the caller is about to
        send again (a worker's replies while more calls wait in its lane) and
        promises to flush. Returns how many frames are queued.
        """
        if self.closed:
            raise ConnectionResetError("connection closed")
        self.pending.append(_small_frame(kind, flags, aux, whence, ref_id, body))
        return len(self.pending)

    @property
    def has_pending(self):
        return bool(self.pending)

    def flush(self):
        """Write every deferred frame now (on this thread)."""
        if not self.pending:
            return
        self._acquire()
        try:
            if self.closed:
                raise ConnectionResetError("connection closed")
            while self.pending:
                self._move_pending()
                self._flush_blocking()
        finally:
            self._release()

    def send_raw_nowait(self, bytes data):
        """Write handshake bytes (tiny; the socket buffer is empty at that point)."""
        cdef Py_ssize_t n = len(data), r
        cdef const char* p = data
        with nogil:
            r = send(self.fd, p, n, MSG_DONTWAIT | MSG_NOSIGNAL)
        if r != n:
            raise ProtocolError("could not write the handshake")

    cdef int _read_handshake(self) except -1:
        cdef char buf[HANDSHAKE_READ_MAX]
        cdef Py_ssize_t need = self.handshake.need, r
        if need <= 0 or need > HANDSHAKE_READ_MAX:
            raise ProtocolError("handshake asked for an impossible read")
        with nogil:
            r = recv(self.fd, buf, need, MSG_DONTWAIT)
        if r == 0:
            raise ConnectionResetError("peer closed the connection during the handshake")
        if r < 0:
            if errno == EAGAIN or errno == EINTR:
                return 0
            raise ConnectionResetError(errno, os.strerror(errno))
        self.bytes_received += r
        out = self.handshake.feed(PyBytes_FromStringAndSize(buf, r))
        if out:
            self.send_raw_nowait(out)
        error = getattr(self.handshake, "error", None)
        if error is not None:
            raise error
        if self.handshake.done:
            self.handshake = None
            self.handler.on_authenticated(self)
        return 0

    cdef int _on_readable(self) except -1:
        if self.closed:
            return 0
        if self.direct_wanted:
            # A thread waits to become the reader: it reads this, and end_direct turns
            # the loop's interest back on. (Should its wait time out instead, the
            # lock's holder, a direct reader too, does that when it ends.)
            self.loop._set_read_interest(self, False)
            return 0
        if not PyThread_acquire_lock(self.read_lock, NOWAIT_LOCK):
            return 0  # a thread is reading this connection directly
        try:
            if self.handshake is not None:
                self._read_handshake()
            else:
                self._read_available()
        finally:
            PyThread_release_lock(self.read_lock)
        return 0

    cdef int _read_available(self) except -1:
        """Read what the socket holds (read_lock held) and dispatch the frames."""
        cdef char* ptr
        cdef Py_ssize_t n, r
        cdef int i, err
        for i in range(MAX_READS_PER_WAKE):
            self.reader.c_get_buffer(&ptr, &n)
            with nogil:
                r = recv(self.fd, ptr, n, MSG_DONTWAIT)
                err = errno
            if r > 0:
                self.bytes_received += r
                self.reader.c_buffer_updated(r)
                if r < n:
                    break
            elif r == 0:
                self._deliver()
                self.close(ConnectionResetError("peer closed the connection"))
                return 0
            elif err == EINTR:
                continue
            elif err == EAGAIN:
                break
            else:
                self._deliver()
                self.close(ConnectionResetError(err, os.strerror(err)))
                return 0
        self._deliver()
        return 0

    def begin_direct(self, double timeout=0.0):
        """Become this connection's reader: the loop thread leaves it alone until
        `end_direct()`. A thread about to send a request and wait for its reply
        calls it *before* sending, so the reply can only wake that thread — not
        the loop thread, which would then have to wake it. False if another
        thread is reading it now (and, given a `timeout` in seconds, still was
        that long: the loop thread under a steady stream holds the role nearly
        all the time, and gives it up only to a thread already waiting for it).
        """
        cdef int got
        cdef long long us = <long long>(timeout * 1e6)
        if self.closed or self.handshake is not None:
            return False
        if us > 0:
            # The loop thread, seeing this, stops reading the connection (_on_readable)
            # rather than taking the lock again before this thread wakes up.
            self.direct_wanted = True
            try:
                with nogil:
                    got = PyThread_acquire_lock_timed(self.read_lock, us, 0)
                # Timed out just as the lock came free: the loop thread, which may have
                # turned its interest off for us meanwhile, will not read it; we must.
                if got != 1 and PyThread_acquire_lock(self.read_lock, NOWAIT_LOCK):
                    got = 1
            finally:
                self.direct_wanted = False
            if got != 1 or self.closed:
                if got == 1:
                    PyThread_release_lock(self.read_lock)
                return False
        elif not PyThread_acquire_lock(self.read_lock, NOWAIT_LOCK):
            return False
        try:
            self.loop._set_read_interest(self, False)
        except BaseException:
            PyThread_release_lock(self.read_lock)
            raise
        return True

    cdef int _spin(self, pollfd* pfd, int n) noexcept nogil:
        """Poll `pfd[:n]` without sleeping for up to `_spin_ns`, unless recent spins on
        this connection went unanswered; poll's result (0: nothing came)."""
        cdef int r
        if _spin_ns <= 0:
            return 0
        if self.spin_skip > 0:
            self.spin_skip -= 1
            return 0
        r = _poll_spinning(pfd, n)
        if r == 0:
            self.spin_misses = min(self.spin_misses * 2 + 1, MAX_SPIN_SKIP)
            self.spin_skip = self.spin_misses
        else:
            self.spin_misses = 0
        return r

    def poll_direct(self, double timeout, int wake_fd=-1):
        """As this connection's reader, wait up to `timeout` s for frames and dispatch
        them on this thread; 1 if something was read, 0 on timeout. It polls
        without sleeping for a moment first (see `_spin_ns`). A `wake_fd` (an
        eventfd) ends the wait too, and is drained: a worker's idle main thread
        waits so for calls and for work handed to it by the loop thread."""
        cdef pollfd pfd[2]
        cdef int r, n = 2 if wake_fd >= 0 else 1
        cdef int ms = <int>(timeout * 1000) if timeout >= 0 else -1
        cdef uint64_t counter
        if self.closed:
            return 1
        pfd[0].fd = self.fd
        pfd[0].events = POLLIN
        pfd[0].revents = 0
        pfd[1].fd = wake_fd
        pfd[1].events = POLLIN
        pfd[1].revents = 0
        with nogil:
            r = self._spin(pfd, n) if ms != 0 else 0
            if r == 0:
                r = poll(pfd, n, ms)
            if r > 0 and pfd[1].revents:
                c_read(wake_fd, &counter, 8)
        if r > 0:
            # A Ctrl-C that came while we waited raises here, before any frame is
            # taken: raised while dispatching, it would drop other callers' frames.
            PyErr_CheckSignals()
            if pfd[0].revents:
                self._read_available()
        elif r < 0 and errno == EINTR:
            PyErr_CheckSignals()
        return 1 if r > 0 else 0

    def end_direct(self):
        """Give the connection back to the loop thread."""
        try:
            if not self.closed:
                self.loop._set_read_interest(self, True)
        finally:
            PyThread_release_lock(self.read_lock)

    def read_direct(self, double timeout):
        """`begin_direct`, `poll_direct(timeout)`, `end_direct`: 1 if something was
        read, 0 on timeout, -1 if another thread is reading."""
        if not self.begin_direct():
            return -1
        try:
            return self.poll_direct(timeout)
        finally:
            self.end_direct()

    def _deliver(self):
        frames = self.reader.take_frames()
        if frames:
            self.msgs_received += len(frames)
            self.handler.on_frames(self, frames)

    def close(self, exc=None):
        """Stop serving this connection and tell the handler (once)."""
        if self.closed:
            return
        self.closed = True
        _keepalive_remove(&self.keepalive)
        self.keepalive.fd = -1
        self.loop.conns.pop(self.fd, None)
        if self.fd >= 0:
            epoll_ctl(self.loop.epfd, EPOLL_CTL_DEL, self.fd, NULL)
            shutdown(self.fd, SHUT_RDWR)
            # Close the fd only once no sender is inside sendmsg on it.
            if PyThread_acquire_lock(self.send_lock, NOWAIT_LOCK):
                c_close(self.fd)
                self.fd = -1
                PyThread_release_lock(self.send_lock)
            else:
                self.close_fd_pending = True
        self.pending = []
        try:
            self.handler.on_close(self, exc)
        except Exception:
            _report("a connection close handler")

    def stats(self):
        return {
            "msgs_sent": self.msgs_sent,
            "bytes_sent": self.frame_bytes_sent + self.keepalive.ping_bytes,
            "writes": self.writes,
            "msgs_received": self.msgs_received,
            "bytes_received": self.bytes_received,
        }


# A map waiting on several workers polls at most this many connections at once.
cdef enum:
    MAX_DIRECT_CONNS = 64
POLL_DIRECT_MANY_MAX = MAX_DIRECT_CONNS


def poll_direct_many(list conns, double timeout):
    """`poll_direct` over several connections this thread is the reader of (see
    `begin_direct`): wait up to `timeout` s (negative: no limit) for any of them,
    then read and dispatch what each holds, on this thread. A thread that waits for
    the replies of many peers (pmap) is then woken by the sockets themselves, not
    by the loop thread that would have read them and then had to wake it.
    Returns how many had something (0 on timeout)."""
    cdef pollfd fds[MAX_DIRECT_CONNS]
    cdef SocketConnection conn
    cdef Py_ssize_t i, n = len(conns)
    # (A timeout is rounded up to whole milliseconds: rounded down, a caller waiting
    # for a moment a fraction of a millisecond away would poll in a busy loop.)
    cdef int r = 0, ms = <int>(timeout * 1000 + 0.999) if timeout >= 0 else -1
    if n > MAX_DIRECT_CONNS:
        raise ValueError(f"at most {MAX_DIRECT_CONNS} connections")
    for i in range(n):
        conn = <SocketConnection?>conns[i]
        if conn.closed:
            return 1  # its reader sees it closed: the caller looks again
        fds[i].fd = conn.fd
        fds[i].events = POLLIN
        fds[i].revents = 0
    with nogil:
        if _spin_ns > 0 and ms != 0:
            r = _poll_spinning(fds, <int>n)
        if r == 0:
            r = poll(fds, n, ms)
    if r > 0:
        PyErr_CheckSignals()  # before any frame is taken, as in poll_direct
        for i in range(n):
            if fds[i].revents:
                conn = <SocketConnection>conns[i]
                if not conn.closed:
                    conn._read_available()
    elif r < 0 and errno == EINTR:
        PyErr_CheckSignals()
    return r if r > 0 else 0
