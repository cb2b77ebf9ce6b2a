# The C-level state of the socket I/O loop and its connections.

from cpython.pythread cimport PyThread_type_lock
from libc.stdint cimport uint64_t

from fastdist._core._keepalive cimport Keepalive
from fastdist._core._wire cimport FrameReader


from fastdist._core._syscalls cimport pollfd

cdef class MessageLoop:
    cdef int epfd                   # the epoll instance every registered fd lives in
    cdef int wakefd                 # eventfd that wakeup() writes to, to end an epoll_wait
    cdef dict conns                 # fd -> SocketConnection
    cdef dict readers               # fd -> callable, for listeners and output pipes
    cdef list dirty                 # connections with deferred frames to write
    cdef object on_tick             # called on the loop thread after each wake-up or tick
    cdef int tick_ms                # longest sleep between two on_tick calls
    cdef bint running               # cleared by stop()
    cdef public object thread_ident # the thread running run(), or None

    cdef int _watch(self, int fd, unsigned int events, int op) except -1
    cdef int _set_write_interest(self, SocketConnection conn, bint want) except -1
    cdef int _set_read_interest(self, SocketConnection conn, bint want) except -1
    cdef int _update_interest(self, SocketConnection conn) except -1


cdef class SocketConnection:
    cdef readonly int fd            # the socket, non-blocking; -1 once closed
    cdef MessageLoop loop           # the loop that reads this socket
    cdef FrameReader reader         # turns received bytes into frames
    cdef public object handler      # has on_frames(conn, frames), on_close(conn, exc), on_authenticated(conn)
    cdef public object handshake    # while not None: raw handshake bytes go to handshake.feed()
    cdef public object peer         # whatever the owner attaches (the peer's pid, ...)
    cdef PyThread_type_lock send_lock  # held by whichever thread is writing to fd
    cdef PyThread_type_lock read_lock  # held by whichever thread is reading fd (loop or direct)
    cdef list outq                  # segments (buffer-protocol objects) not yet written
    cdef Py_ssize_t out_off         # bytes of outq[0] already written
    cdef list pending               # small frames from non-blocking senders, not yet in outq
    cdef bint write_interest        # EPOLLOUT is registered
    cdef bint read_interest         # EPOLLIN is registered (off while a thread reads directly)
    cdef bint direct_wanted         # a thread waits to read directly: the loop thread leaves it
    cdef bint closed                # no more reads or writes
    cdef int spin_misses            # consecutive spins that ended without data (capped)
    cdef int spin_skip              # waits left to block at once before spinning again
    cdef bint close_fd_pending      # the fd is shut down but a sender still holds send_lock
    cdef Keepalive keepalive        # what the GIL-free keepalive thread reads and writes
    cdef readonly uint64_t msgs_sent
    cdef uint64_t frame_bytes_sent  # bytes of frames written (pings apart: see bytes_sent)
    cdef readonly uint64_t writes     # sendmsg calls that wrote: frames per write shows batching
    cdef readonly uint64_t msgs_received
    cdef readonly uint64_t bytes_received

    cdef int _acquire(self) except -1
    cdef int _release(self) except -1
    cdef int _finish_ping(self) except -1
    cdef int _move_pending(self) except -1
    cdef Py_ssize_t _write_some(self) except -1
    cdef int _flush_blocking(self) except -1
    cdef int _try_flush_nowait(self) except -1
    cdef int _on_readable(self) except -1
    cdef int _read_available(self) except -1
    cdef int _read_handshake(self) except -1
    cdef int _spin(self, pollfd* pfd, int n) noexcept nogil
