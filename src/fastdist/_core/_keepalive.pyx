# cython: freethreading_compatible = False
"""Keepalive: a ping on every quiet connection, without the GIL.

A process whose user code holds the GIL in one long C routine (a numpy kernel,
`sum(range(10**9))`) runs no Python at all: neither the loop thread nor the
heartbeat in Node._tick. Its peers must still hear from it, or they would declare
it dead. So a plain pthread, started on the first registration, wakes a few times
per interval and writes a PING frame on every registered connection that has
written nothing for the interval (a quarter of FASTDIST_HEARTBEAT_TIMEOUT). It
never waits for a lock: a connection whose send lock is held is being written to
(or will be), and one whose queue holds a half-written frame must not get bytes in
between. What receives the pings is the peer's business (Node._heartbeat counts
received bytes); a process frozen whole (SIGSTOP) or gone sends none, and is
declared dead.

The connections' side of it (their `Keepalive` fields, kept up to date by every
writer) is _msgloop.SocketConnection's.
"""

import os

from cpython.pythread cimport (
    NOWAIT_LOCK,
    WAIT_LOCK,
    PyThread_acquire_lock,
    PyThread_allocate_lock,
    PyThread_release_lock,
)
from libc.errno cimport errno
from libc.stdlib cimport realloc
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, nanosleep, timespec

from fastdist._core._wire cimport PRELUDE_NBYTES, encode_prelude


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


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int sockfd, const void* buf, size_t len, int flags)
    enum:
        MSG_DONTWAIT
        MSG_NOSIGNAL


cdef inline long long _monotonic_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1000000000LL + ts.tv_nsec


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


cdef int keepalive_add(Keepalive* k) except -1:
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


cdef void keepalive_remove(Keepalive* k) noexcept nogil:
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


cdef Py_ssize_t keepalive_send_rest(Keepalive* k) noexcept nogil:
    """Send what the kernel did not take of `k`'s last ping (its send lock held);
    bytes written, or -1 with errno set."""
    cdef Py_ssize_t r = send(k.fd, _ping_frame + PRELUDE_NBYTES - k.ping_left, k.ping_left,
                             MSG_DONTWAIT | MSG_NOSIGNAL)
    if r > 0:
        k.ping_left -= r
        k.ping_bytes += r
    return r
