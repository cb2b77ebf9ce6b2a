# The keepalive thread's side of a connection (see _keepalive.pyx).

from cpython.pythread cimport PyThread_type_lock
from libc.stdint cimport uint64_t


# What the keepalive thread needs of a connection, readable without the GIL: it
# lives inside the SocketConnection, which deregisters it before closing its fd.
cdef struct Keepalive:
    int fd                          # the socket (mirrors SocketConnection.fd while registered)
    PyThread_type_lock send_lock    # the connection's send_lock: a ping never splits a frame
    long long last_write_ns         # when bytes last went out (monotonic ns), by anyone
    bint half_written               # outq held a partly written frame when send_lock was let go
    int ping_left                   # bytes of a ping the kernel has not taken yet (see _finish_ping)
    uint64_t ping_bytes             # bytes of pings written, counted into bytes_sent
    bint registered                 # in the keepalive thread's table


cdef int keepalive_add(Keepalive* k) except -1       # (GIL held) ping k when it is quiet
cdef void keepalive_remove(Keepalive* k) noexcept nogil  # before k's socket is closed
cdef Py_ssize_t keepalive_send_rest(Keepalive* k) noexcept nogil  # finish a partial ping
