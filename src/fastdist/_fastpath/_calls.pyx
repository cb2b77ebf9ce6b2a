# cython: freethreading_compatible = False
"""Small calls, without the interpreter's frame-per-step overhead: most calls are
a function that travels by name with plain arguments and a plain result.

On the worker, `run_small_call` decodes such a call (function cache, one
pickle.loads), runs it (`run_user`, which is CallPool.run_user) and pickles its
result; the reply waits behind the replies of calls queued after it
(`queue_reply`) or goes out through handlers.send_reply. Anything else, and every
failure, takes the Python path in fastdist.handlers — the fast path changes what
a call costs, never what it does. `run_user`, `interrupt_calls`, `shield` and
`unshield` keep CallPool's record of which threads run user code: in C, each is
one step under the GIL, so an interrupt can never fall between a check and what
it decides.
On the caller, `remotecall_plain` makes the common remotecall whole (its body by
`encode_plain_call`, its Future, a deferred send), `route_frames` hands each frame
the I/O thread reads to its handler, `handle_result` gives the common pushed
result to its Future, `materialize` and `fetch_value` unpickle it into the
Future's cache when fetched, and `loads_locked` unpickles small streams for
serialize. The Future's fields are C fields (`RefCore`, `FutureCore`, the bases
of refs._RefBase and refs.Future). `is_plain` decides what counts as plain for
all of them, and for serialize. Each C twin of Python code names its original.

The registries it reads (functions found importable, their pickles, the function
cache, the unpickling lock) are fastdist.protocol.serialize's own objects, handed
over once by `configure`.
"""

import functools
import pickle

from cpython.bytes cimport PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Next
from cpython.pythread cimport PyThread_get_thread_ident
from cpython.ref cimport PyObject

cdef extern from "Python.h":
    int PyThreadState_SetAsyncExc(unsigned long ident, PyObject* exc)
    void PyObject_GC_Track(void* op)
    void PyObject_GC_UnTrack(void* op)
    int PyObject_GC_IsTracked(object op)
    PyObject* PyExc_KeyboardInterrupt


cdef extern from "<signal.h>" nogil:
    int pthread_kill(unsigned long thread, int sig)

from fastdist._fastpath._runqueue cimport RunQueue
from fastdist._core._wire cimport Frame

# Message kinds and flags this path deals with (protocol/messages.py).
cdef enum:
    CALL = 2
    CALL_FETCH = 3
    REMOTE_DO = 4
    RESULT = 5
    FLAG_ERROR = 0x01
    FLAG_RELEASED = 0x02
    FLAG_SERIAL = 0x08  # a pool's call: run after the caller's other pool calls, never beside
    FLAG_SHM = 0x80  # sharedmem.FLAG_SHM

cdef object _pickle_loads = pickle.loads
cdef object _pickle_dumps = pickle.dumps
# The arguments of a call without any, pickled once: a pickler made per call cost
# more than the rest of encoding it.
cdef bytes _NO_ARGUMENTS = pickle.dumps(((), {}), 5)
cdef bytes _NONE = pickle.dumps(None, 5)  # ... and the most common result
cdef Py_ssize_t _small_reply_nbytes = 0  # handlers.SMALL_REPLY_NBYTES
cdef Py_ssize_t _max_queued_replies = 0  # handlers.MAX_QUEUED_REPLIES

cdef dict _by_reference = {}
cdef dict _function_pickles = {}
cdef dict _functions = {}
cdef object _loads_lock = None
cdef Py_ssize_t _oob_threshold = 64 * 1024
cdef object _FunctionType = None
cdef object _BuiltinFunctionType = None
cdef object _send_reply = None
cdef object _reply_to_call = None
cdef object _PUSHED = None  # refs._PUSHED (see handle_result)
cdef object _EMPTY = None  # refs._EMPTY: a Future's value before it is known
cdef object _decode_result = None  # protocol.values.decode_result
cdef object _handle_worker_logs = None  # output.handle_worker_logs
cdef dict _log_queues = {}  # output._log_queues: pid -> that worker's log records
cdef object _Future = None  # refs.Future
cdef object _sync_block = None  # tasks._current_block: the @sync block a call joins
cdef Py_ssize_t _defer_max_nbytes = 0  # remotecall.DEFER_MAX_NBYTES
cdef object _partial = functools.partial
cdef object _run_call_general = None  # handlers.run_general_call


cdef class RefCore:
    """The fields of refs._RefBase (Future and RemoteChannel), as C fields (declared
    in _calls.pxd): the owner (`where`), the reference's identity (`whence`, `id`)
    and the holds this process has on it. The methods are refs.py's; the C code here
    reads and sets the fields of the Futures it makes, delivers and fetches without
    attribute look-ups."""


cdef class FutureCore(RefCore):
    """refs.Future's own fields: the value once known (`_value`, refs._EMPTY before)
    and whether it is an error, the raw result pushed here and not yet unpickled,
    the push's state (`_push`: refs._PUSHED, or the Waiter of the push), and whether
    the reference was passed on while its value was due (`_shared`)."""


cdef class NodeCore:
    """The fields of node.Node the call paths read and write (see _calls.pxd)."""

    def __cinit__(self, *args, **kwargs):
        self.peers = {}
        self.pushes = {}
        self.waiters = {}


cdef class CallsCore:
    """callpool.CallPool's record of which threads run user code (see _calls.pxd)."""

    def __cinit__(self, *args, **kwargs):
        self.running_user = {}
        self.shielded = set()
        self.deferred = set()


def configure(dict by_reference, dict function_pickles, dict functions, loads_lock,
              Py_ssize_t oob_threshold, function_type,
              builtin_function_type):
    """Share serialize's registries with this module (called once, at its import)."""
    global _by_reference, _function_pickles, _functions, _loads_lock, _oob_threshold
    global _FunctionType, _BuiltinFunctionType
    _by_reference = by_reference
    _function_pickles = function_pickles
    _functions = functions
    _loads_lock = loads_lock
    _oob_threshold = oob_threshold
    _FunctionType = function_type
    _BuiltinFunctionType = builtin_function_type


cdef inline bint _plain_scalar(object x):
    cdef type t = type(x)
    return t is int or t is float or t is str or x is None or t is bool


cpdef bint is_plain(object obj, int depth=3):
    """Whether `obj` is plain data (and functions already found importable): most
    calls and results are, and `pickle.dumps` writes them ~5x faster than a
    CloudPickler, which costs a Python-level hook per object. Builtin scalars,
    bytes below the out-of-band threshold, and tuples, lists and str-keyed dicts of
    such items, nested at most `depth` deep. However long a container, the look
    costs less than pickling what it looks at, and it stops at the first item
    that is not plain."""
    cdef type t = type(obj)
    cdef object x, k, v
    if (t is int or t is float or t is str or t is bool or obj is None
            or t is complex):
        return True
    if t is bytes:
        return PyBytes_GET_SIZE(obj) < _oob_threshold
    # Items are looked at inline when they are the common scalars: a batch of
    # thousands of numbers is then a pointer compare per item, not a call.
    if t is list or t is tuple:
        if depth == 0:
            return False
        for x in obj:  # (Cython walks an exact list or tuple by index)
            if not _plain_scalar(x) and not is_plain(x, depth - 1):
                return False
        return True
    if t is dict:
        if depth == 0:
            return False
        for k, v in (<dict>obj).items():
            if type(k) is not str or not is_plain(v, depth - 1):
                return False
        return True
    if t is _FunctionType or t is _BuiltinFunctionType or t is type:
        return _by_reference.get(id(obj)) is obj
    return False


def encode_plain_call(object f, tuple args, dict kwargs):
    """(aux, body, ()) of a call frame whose function travels by name (its pickle
    already cached) and whose arguments are plain data, or None: serialize's
    general encoder takes the call (see remotecall.encode_call)."""
    if _by_reference.get(id(f)) is not f:
        return None
    fpickle = _function_pickles.get(id(f))
    if fpickle is None:
        return None
    if not args and not kwargs:
        return PyBytes_GET_SIZE(fpickle), fpickle + _NO_ARGUMENTS, ()
    if not is_plain(args, 3) or not is_plain(kwargs, 2):
        return None
    return PyBytes_GET_SIZE(fpickle), fpickle + _pickle_dumps((args, kwargs), 5), ()


cdef inline bint _small_stream(object body, object buffers):
    """Whether pickle.loads reads this stream as it is: bytes, no out-of-band
    buffers, and not serialize's large-bytes layout (a leading 0, see _loads)."""
    return (type(body) is bytes and not buffers and PyBytes_GET_SIZE(body) > 0
            and (<bytes>body)[0] != 0)


cdef object _loads_small(bytes body):
    """pickle.loads under the unpickling lock (see serialize._loads_lock)."""
    _loads_lock.acquire()
    try:
        return _pickle_loads(body)
    finally:
        _loads_lock.release()


def loads_locked(object body, object buffers, object general):
    """Unpickle a stream under the unpickling lock (see serialize._loads_lock): a
    small one with pickle.loads, any other with `general(body, buffers)`."""
    if _small_stream(body, buffers):
        return _loads_small(body)
    _loads_lock.acquire()
    try:
        return general(body, buffers)
    finally:
        _loads_lock.release()


cdef object _cached_function(bytes body, Py_ssize_t k):
    """The function whose pickle is `body[:k]`, if the cache has it and its module
    still binds it to that name; else None (the Python path looks it up)."""
    hit = _functions.get(body[:k])
    if hit is None:
        return None
    f, namespace, name = <tuple>hit
    if (<dict>namespace).get(name) is not f:
        return None
    return f


def configure_replies(send_reply, reply_to_call, run_general_call,
                      Py_ssize_t small_reply_nbytes, Py_ssize_t max_queued_replies):
    """What the worker side needs of handlers.py (called once, at its import): how a
    reply is sent, how any value or failure is made into one, the general path for
    a call this module declines, and the bounds of reply queueing."""
    global _send_reply, _reply_to_call, _small_reply_nbytes, _max_queued_replies
    global _run_call_general
    _send_reply, _reply_to_call = send_reply, reply_to_call
    _run_call_general = run_general_call
    _small_reply_nbytes = small_reply_nbytes
    _max_queued_replies = max_queued_replies


def run_small_call(object node, object conn, Frame frame):
    """Run a CALL or CALL_FETCH frame if it is a small call; True if it was run and
    its reply handed on, False if nothing was done (the Python path takes it)."""
    cdef int kind = frame.kind
    cdef Py_ssize_t k = frame.aux
    cdef object body = frame.body
    if (kind != CALL and kind != CALL_FETCH) or k == 0 or type(body) is not bytes or frame.buffers:
        return False
    f = _cached_function(<bytes>body, k) if k < PyBytes_GET_SIZE(body) else None
    if f is None:
        return False
    arguments = (<bytes>body)[k:]
    if not _small_stream(arguments, ()):
        return False
    if arguments == _NO_ARGUMENTS:
        decoded = ((), {})
    else:
        try:
            decoded = _loads_small(arguments)
        except BaseException:
            return False  # decoded again on the Python path, which reports the error
    if type(decoded) is not tuple or len(<tuple>decoded) != 2:
        return False
    args, kwargs = <tuple>decoded
    if type(args) is not tuple or type(kwargs) is not dict:
        return False
    cdef NodeCore n = <NodeCore?>node
    try:
        value = n.callpool.run_user(f, *args, **kwargs)
    except BaseException as exc:  # KeyboardInterrupt from interrupt() too
        _reply_to_call(node, conn, frame, exc, True)
        return True
    # A CALL's value is kept here only if another process holds its Future; a
    # worker holding any value at all, or a result that is not plain, goes the
    # general way.
    if (kind == CALL and len(n.store)) or not is_plain(value):
        _reply_to_call(node, conn, frame, value, False)
        return True
    flags = FLAG_RELEASED if kind == CALL else 0
    try:
        body = _NONE if value is None else _pickle_dumps(value, 5)
    except BaseException:
        # (pickle.dumps of plain data fails only by running out of memory, or a
        # BaseException from elsewhere: the general path makes the error reply.)
        _reply_to_call(node, conn, frame, value, False)
        return True
    if not _queue_reply(n.callpool, conn, frame, flags, body):
        _send_reply(node, conn, frame, flags, body, ())
    return True


def queue_reply(object pool, object conn, Frame frame, int flags, object body):
    """Queue a call's small RESULT (`body` bytes, no buffers) on `conn` when more
    calls wait to run in this process: the reply then goes out with theirs in one
    write, when the thread that runs them finds nothing left to run, every
    MAX_QUEUED_REPLIES replies, or when CallPool's monitor finds them waiting
    behind a call that takes long. True if queued; False: send the reply now
    (handlers.send_reply)."""
    return type(body) is bytes and _queue_reply(pool, conn, frame, flags, body)


cdef bint _queue_reply(object pool, object conn, Frame frame, int flags, bytes body) except -1:
    cdef RunQueue runq = (<CallsCore?>pool).runq
    if PyBytes_GET_SIZE(body) > _small_reply_nbytes or runq.nwaiting <= 0:
        return False
    queue = getattr(conn, "queue_frame", None)
    if queue is None:
        return False
    try:
        if queue(RESULT, flags, 0, frame.whence, frame.id, body) >= _max_queued_replies:
            conn.flush()
            return True
    except ConnectionError:
        return True  # the caller is gone: nobody to answer
    # Recorded first, then the monitor armed if it was not: it clears its event
    # before it looks at the record for the last time (CallPool._watch).
    runq.replies[conn] = True
    if not runq.monitor_armed:
        runq.monitor_armed = True
        runq.arm()
    return True


def run_user(pool, fn, /, *args, **kwargs):
    """CallPool.run_user: call user code, marking this thread as interruptible while
    it runs (`pool.running_user`, thread ident -> depth).

    An interrupt aimed at the user code that comes as it returns is dropped then
    (the call is done): the thread never carries it into what it does next. Each
    update of the marks is one step under the GIL, as `interrupt_calls` is, so no
    lock is needed — and none may be taken: on the main thread a lock's wait can
    run the SIGINT handler, which could raise in the middle of the unmarking."""
    cdef CallsCore p = <CallsCore?>pool
    cdef dict running = p.running_user
    cdef unsigned long ident = PyThread_get_thread_ident()
    running[ident] = running.get(ident, 0) + 1
    try:
        return fn(*args, **kwargs)
    finally:
        depth = running.pop(ident) - 1
        if depth:
            running[ident] = depth
        else:
            PyThreadState_SetAsyncExc(ident, NULL)
            p.deferred.discard(ident)
            if ident == p.main_ident:
                p.main_pending = False


def interrupt_calls(pool, bint from_signal=False):
    """CallPool.interrupt: raise KeyboardInterrupt in every thread running user code;
    return how many. A thread that is dispatching frames for others (`shield`) gets
    it when it is done. The main thread of a worker, which installed
    CallPool.on_call_interrupt, gets `main_signal`, which also ends a sleep, a wait
    on a lock or a socket, a poll; it then raises in the handler (`from_signal`: we
    are in the SIGINT handler, which raises by itself). Other threads get an asynchronous
    exception, which Python code sees at once and a blocking call when it
    returns."""
    cdef CallsCore p = <CallsCore?>pool
    cdef dict running = p.running_user
    cdef set shielded = p.shielded
    cdef set deferred = p.deferred
    cdef unsigned long main = p.main_ident
    cdef PyObject* key
    cdef PyObject* value
    cdef Py_ssize_t pos = 0
    cdef unsigned long ident
    cdef int n = 0
    while PyDict_Next(running, &pos, &key, &value):
        n += 1
        ident = <unsigned long><object>key
        if ident in shielded:
            deferred.add(ident)
        elif ident == main and p.main_signal:
            if not from_signal:
                p.main_pending = True
                pthread_kill(main, p.main_signal)
        else:
            PyThreadState_SetAsyncExc(ident, PyExc_KeyboardInterrupt)
    return n


def shield(pool):
    """CallPool.shield: hold interrupts of this thread back until `unshield`."""
    (<CallsCore?>pool).shielded.add(PyThread_get_thread_ident())


def unshield(pool):
    """CallPool.unshield: let interrupts through again; raise one held back."""
    cdef CallsCore p = <CallsCore?>pool
    cdef unsigned long ident = PyThread_get_thread_ident()
    p.shielded.discard(ident)
    if ident in p.deferred:
        p.deferred.discard(ident)
        if ident in p.running_user:
            raise KeyboardInterrupt


def configure_refs(pushed, empty, decode_result, handle_worker_logs, dict log_queues):
    """What handle_result and materialize need of refs.py: its markers (a remotecall
    Future's `_push` while nobody waits for it; a value not known yet), the general
    result decoder, and the hand-over of a worker's log records (and where they
    wait, to look without a Python call)."""
    global _PUSHED, _EMPTY, _decode_result, _handle_worker_logs, _log_queues
    _PUSHED, _EMPTY = pushed, empty
    _decode_result, _handle_worker_logs = decode_result, handle_worker_logs
    _log_queues = log_queues


def configure_remotecall(future, sync_block, Py_ssize_t defer_max_nbytes):
    """What remotecall_plain needs of remotecall.py: the Future class, the context
    variable of the enclosing @sync block, and the largest call it defers."""
    global _Future, _sync_block, _defer_max_nbytes
    _Future, _sync_block, _defer_max_nbytes = future, sync_block, defer_max_nbytes


def remotecall_plain(object node, object f, object target, tuple args, dict kwargs,
                     int flags=0):
    """remotecall's common case without its Python frames: `f` travels by name, the
    arguments are plain, `target` is the pid of a connected peer, and no @sync block
    is open. Returns the Future, or None having done nothing: remotecall's Python
    path then takes the call (and reports what is wrong with it). `flags` go on
    the call frame (FLAG_SERIAL for a pool's call).

    What it does is remotecall's (encode_call, Future._for_call, a deferred send).
    """
    if type(target) is not int or _sync_block.get() is not None:
        return None
    cdef NodeCore n = <NodeCore?>node
    cdef int myid = n.myid
    if target == myid:
        return None
    peer = n.peers.get(target)
    if peer is None:
        return None
    conn = peer.conn
    if conn is None:
        return None
    encoded = encode_plain_call(f, args, kwargs)
    if encoded is None:
        return None
    aux, body, _ = <tuple>encoded
    if PyBytes_GET_SIZE(body) > _defer_max_nbytes:
        return None
    cdef FutureCore fut = _call_future(_Future, node, target)
    try:
        conn.send_deferred(CALL, flags, aux, myid, fut.id, body)
    except ConnectionError:
        n.pushes.pop(fut.id, None)  # no value will come for it
        fut._holds = 0
        return None  # the Python path tries again and raises ProcessExitedException
    return fut


def call_future(cls, node, where):
    """refs.Future._for_call: the Future of a remotecall to `where`, held by the
    node until its result is pushed (`node.pushes`, by its id)."""
    return _call_future(cls, node, where)


cdef FutureCore _call_future(object cls, object node, object where):
    cdef NodeCore n = <NodeCore?>node
    ident = next(n.ids)
    cdef FutureCore fut = cls.__new__(cls)
    fut.where = where
    fut.whence = n.myid
    fut.id = ident
    fut._holds = 1
    fut._value = _EMPTY
    fut._is_error = False
    fut._raw = None
    fut._shared = False
    fut._push = _PUSHED  # its Waiter is made only if someone waits before the value
    # Untracked by the garbage collector while it refers only to atomic values (see
    # `_track_with`): 20,000 pipelined calls otherwise made the collector walk
    # 20,000 Futures again and again (0.3 us per call in gen-2 collections).
    PyObject_GC_UnTrack(<void*>fut)
    n.pushes[ident] = fut
    return fut


cdef inline void _track_with(object fut, object value):
    """Track an untracked Future again once its value could lead back to it. Its
    other fields cannot: `_raw` holds received bytes and buffers, and `_push` a
    Waiter whose callbacks are dropped when the value arrives, which it does
    (value or failure) while the node still holds the Future."""
    if PyObject_GC_IsTracked(value) and not PyObject_GC_IsTracked(fut):
        PyObject_GC_Track(<void*>fut)


def track_with(fut, value):
    """`_track_with` for refs.Future._cache."""
    _track_with(fut, value)


def release_on_del(ref):
    """refs._RefBase.__del__: give back the holds a reference still has. Called
    for every Future freed, most with none left, so without a Python frame then."""
    try:
        if ref._holds > 0:
            ref._release_holds()
    except Exception:  # interpreter shutdown
        pass


def result_value(tuple raw):
    """protocol.values.decode_result's common case: the value of a small plain
    result (flags, body, buffers), unpickled here; else refs._EMPTY, and
    decode_result takes it."""
    return _result_value(raw)


cdef object _result_value(tuple raw):
    flags, body, buffers = raw
    if (<int>flags & FLAG_ERROR) or not _small_stream(body, buffers):
        return _EMPTY
    if body == _NONE:
        return None  # no unpickler for the most common result
    try:
        return _loads_small(body)
    except Exception:
        return _EMPTY


def fetch_value(FutureCore fut):
    """Future.fetch's common case: the value if it is here or delivered (unpickled
    now) and not an error; else refs._EMPTY, and Future.fetch takes it."""
    if fut._value is _EMPTY and not _materialize(fut):
        return _EMPTY
    if fut._is_error:
        return _EMPTY
    return fut._value


def materialize(FutureCore fut):
    """refs.Future._materialize: unpickle a delivered value into the Future's cache,
    on the thread that fetches it; False if no value has been delivered.

    A small plain result (bytes, no out-of-band buffers, no error) is unpickled here
    under the unpickling lock; any other, or one that fails to unpickle, goes to
    protocol.values.decode_result, which turns failures into the caller's error.
    """
    return _materialize(fut)


cdef bint _materialize(FutureCore fut) except -1:
    if fut._value is not _EMPTY:
        return True
    raw = fut._raw
    if raw is None:
        return False
    # What the call logged comes before its value (output.handle_worker_logs).
    queue = _log_queues.get(fut.where)
    if queue is not None and queue.records:
        _handle_worker_logs(fut.where)
    value = _result_value(<tuple>raw)
    is_error = False
    if value is _EMPTY:
        value, is_error = _decode_result(*raw)
    # What Future._cache does, without its Python frame.
    lock = fut._lock
    lock.acquire()
    try:
        if fut._value is _EMPTY:
            fut._value, fut._is_error, fut._raw = value, is_error, None
            _track_with(fut, value)
    finally:
        lock.release()
    if fut._holds > 0:
        fut._release_holds()
    return True


cpdef handle_call(object node, object conn, Frame frame):
    """A CALL, CALL_FETCH or REMOTE_DO frame, on the thread that read it: a task for
    the call pool (a pool's call in the caller's serial lane)."""
    (<NodeCore?>node).callpool.submit_calls([_call_task(node, conn, frame)])


cdef tuple _call_task(object node, object conn, Frame frame):
    """(serial lane key or None, task) of a call frame (see CallPool.submit_calls)."""
    return (frame.whence if frame.flags & FLAG_SERIAL else None,
            _partial(run_call, node, conn, frame))


def run_call(object node, object conn, Frame frame):
    """Run a call frame and deliver what it produced: the small-call path, or
    handlers.run_general_call for any other call."""
    if not run_small_call(node, conn, frame):
        _run_call_general(node, conn, frame)


def route_frames(object node, object conn, list frames, object dispatch,
                 object map_shared, object reply_error):
    """Node.on_frames' loop: each frame to its handler (`dispatch`), a RESULT straight
    to `handle_result` — most frames a caller's I/O thread reads are results, and
    the Python loop and dispatch cost more than handling one — and the calls of the
    batch to the call pool at once, at its end (one hand-over per batch). Shared-
    memory frames are mapped first (`map_shared`, False: nothing to dispatch); a
    handler's exception fails that frame only (`reply_error`, as dispatch does).
    Should something escape (a KeyboardInterrupt), the frames after it, which
    belong to other callers, are dispatched before it propagates, and the calls
    read so far still run."""
    cdef Frame frame
    cdef Py_ssize_t i, n = len(frames)
    cdef bint identified = conn.peer is not None
    cdef list calls = None
    try:
        for i in range(n):
            frame = <Frame>frames[i]
            try:
                if frame.flags & FLAG_SHM and not map_shared(conn, frame):
                    continue
                kind = frame.kind
                if kind == RESULT and identified:
                    try:
                        handle_result(node, conn, frame)
                    except Exception as exc:
                        reply_error(node, conn, frame, exc)
                elif identified and (kind == CALL or kind == CALL_FETCH or kind == REMOTE_DO):
                    if calls is None:
                        calls = []
                    calls.append(_call_task(node, conn, frame))
                else:
                    dispatch(node, conn, frame)
            except BaseException:
                for rest in frames[i + 1:]:
                    dispatch(node, conn, rest)
                raise
    finally:
        if calls is not None:
            (<NodeCore?>node).callpool.submit_calls(calls)


cpdef handle_result(object node, object conn, Frame frame):
    """A RESULT frame, on the thread that read it: the value for a waiting request,
    or a remotecall's pushed value for its Future.

    The common push — released by the worker (no copy kept), the Future passed to
    no other process, nobody waiting for it yet — is refs.Future._deliver's
    outcome set here directly (its bytes kept, its one hold used up), under the
    Future's lock and without a Python frame; every other push goes to _deliver.
    """
    buffers = frame.buffers
    raw = (frame.flags, frame.body, buffers or ())
    if not buffers:
        PyObject_GC_UnTrack(<void*>raw)  # an int, bytes and (): no cycle can go through it
    cdef NodeCore n = <NodeCore?>node
    w = n.waiters.pop(frame.id, None)
    if w is not None:
        w.set(raw)
        return
    pushed = n.pushes.pop(frame.id, None)
    if pushed is None:
        return
    cdef FutureCore fut = pushed
    released = frame.flags & FLAG_RELEASED
    if released and fut._push is _PUSHED:
        lock = fut._lock
        lock.acquire()
        try:
            if fut._holds == 1 and not fut._shared and fut._push is _PUSHED:
                fut._raw = raw
                fut._holds = 0
                return
        finally:
            lock.release()
    fut._deliver(raw, released)
