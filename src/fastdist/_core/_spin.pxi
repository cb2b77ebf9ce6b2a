# Waiting for data: spin, then block (included by _msgloop.pyx).
#
# Waking a sleeping vCPU is most of a small round trip on a VM (tens of
# microseconds), so a thread that waits for a reply, or a worker's idle main thread
# for its next call, first polls without sleeping for a moment, yielding the CPU
# to any other runnable process, then blocks (SocketConnection._spin,
# poll_direct_many).

# A thread waiting for a reply (or a worker waiting for its next call) first polls
# without sleeping for this long. On a machine where a sleeping CPU takes tens of
# microseconds to wake (most VMs), that is most of a small round trip: the sender's
# wake-up of a running receiver costs next to nothing. FASTDIST_SPIN_US=0 turns it off.
cdef long long _spin_ns = max(0, int(os.environ.get("FASTDIST_SPIN_US", "100"))) * 1000


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

# A spin that ends without data makes the next waits on that connection block at
# once: 1, then 3, 7, ... up to this many, so a slow peer costs little CPU.
cdef int MAX_SPIN_SKIP = 255
