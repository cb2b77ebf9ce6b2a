# The state the fast path (_calls.pyx) shares with the runtime's Python classes, as C
# fields of their bases: the C code reads and writes them without attribute look-ups,
# and this file is the contract. Every thread may read a field (under the GIL); the
# comment says who writes it.


cdef class RefCore:
    # refs._RefBase's fields (Future and RemoteChannel).
    cdef public object where        # the owner's pid (set when the reference is made)
    cdef public object whence       # the pid that made it   (set when made)
    cdef public object id           # a counter on that pid  (set when made)
    cdef public object _holds       # holds this process has on the owner (any thread, under the Future's lock)
    cdef object __weakref__


cdef class FutureCore(RefCore):
    # refs.Future's own fields; every write is under refs._futures_lock.
    cdef public object _value       # the value once known; refs._EMPTY before (the thread that fetches)
    cdef public object _is_error    # _value is an exception to raise
    cdef public object _raw         # (flags, body, buffers) pushed here, not unpickled yet (the reader)
    cdef public object _push        # refs._PUSHED, or the Waiter of the push once someone waits
    cdef public object _shared      # passed on to another process while its value was due


cdef class NodeCore:
    # node.Node's fields the call paths use.
    cdef public int myid            # this process's pid (the thread that joins it, once)
    cdef public dict peers          # pid -> node.Peer (membership: the reader of IDENTIFY/PEERS, addprocs)
    cdef public dict pushes         # Future id -> Future whose remotecall pushes its value (callers add; readers pop)
    cdef public dict waiters        # waiter id -> Waiter or pmap Call (callers add; readers pop)
    cdef public object ids          # itertools.count of this process's reference and waiter ids (any thread)
    cdef public object store        # refstore.RefStore: the values this process owns
    cdef public object callpool     # callpool.CallPool (set once)


cdef class CallsCore:
    # callpool.CallPool's record of which threads run user code (see run_user,
    # interrupt_calls): each update is one step under the GIL, so no lock guards it.
    cdef public dict running_user   # thread ident -> depth of user calls (that thread)
    cdef public set shielded        # threads dispatching frames for others (that thread)
    cdef public set deferred        # interrupts held back from them (interrupt_calls; unshield)
    cdef public unsigned long main_ident  # the main thread (set once)
    cdef public int main_signal     # the signal that interrupts the main thread's call; 0: none (install_sigint, once)
    cdef public bint main_pending   # an interrupt signalled to the main thread applies (interrupt_calls; run_user and the handlers clear it)
    cdef public bint sigint_unhandled  # a SIGINT came, its handler has not run (the SIGINT watcher sets; the handlers clear)
    cdef public object runq         # _runqueue.RunQueue (set once)
