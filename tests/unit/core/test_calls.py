"""The small-call path of `_calls`: which frames it takes, and that what it sends
is what the general path would have sent."""

from __future__ import annotations

import os
import pickle

import pytest

from fastdist._core import _wire
from fastdist._fastpath import _calls
from fastdist._fastpath._runqueue import RunQueue
from fastdist.callpool import CallPool
from fastdist.exceptions import RemoteException
from fastdist.handlers import reply_to_call
from fastdist.protocol import serialize
from fastdist.protocol.messages import FLAG_ERROR, FLAG_RELEASED, FLAG_SERIAL, Kind
from fastdist.protocol.values import decode_result
from fastdist.refs import Future
from fastdist.refstore import Waiter

pytestmark = pytest.mark.timeout(30)


class Conn:
    """Records the RESULT frames a call's reply became."""

    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def send_frame(self, kind, flags, aux, whence, ref_id, body, buffers=()):
        self.sent.append((kind, flags, whence, ref_id, bytes(body), list(buffers)))


class NoSharedMemory:
    def outgoing(self, conn, flags, buffers):
        return flags, buffers


class Node(_calls.NodeCore):
    """What the worker side reads of a node (the C fields, see _calls.pxd)."""

    def __init__(self) -> None:
        self.myid = 2
        self.callpool = CallPool(name="calls-test")
        self.store: dict = {}
        self.shm = NoSharedMemory()
        self.ran: list = []
        run_user = self.callpool.run_user

        def counting(fn, *args, **kwargs):
            self.ran.append(fn)
            return run_user(fn, *args, **kwargs)

        self.callpool.run_user = counting  # type: ignore[method-assign]


def known_by_name(f) -> None:
    """Make `f` a function that travels by name, its pickle kept (what the first
    calls to it do), whatever the tests before did."""
    serialize.dumps((f, (), {}))
    assert serialize.function_pickle(f) is not None


def call_frame(f, *args, kind=Kind.CALL, **kwargs) -> _wire.Frame:
    known_by_name(f)
    fpickle = serialize.function_pickle(f)
    serialize.loads_function(fpickle)  # as a worker would have on the first call
    frame = _wire.Frame.__new__(_wire.Frame)
    frame.kind, frame.flags, frame.whence, frame.id = kind, 0, 1, 77
    frame.aux = len(fpickle)
    frame.body = fpickle + pickle.dumps((args, kwargs), 5)
    frame.buffers = []
    return frame


@pytest.fixture(autouse=True)
def _known_functions():
    # A function travels by name once the pickler has seen it importable.
    serialize.dumps((os.path.join, divmod, sorted), dest=None)


def run(frame: _wire.Frame) -> tuple[bool, Node, Conn]:
    node, conn = Node(), Conn()
    return _calls.run_small_call(node, conn, frame), node, conn


def test_a_small_call_runs_and_its_released_result_is_sent():
    taken, node, conn = run(call_frame(divmod, 17, 5))
    assert taken and node.ran == [divmod]
    [(kind, flags, whence, ref_id, body, buffers)] = conn.sent
    assert (kind, flags, whence, ref_id, buffers) == (Kind.RESULT, FLAG_RELEASED, 1, 77, [])
    assert pickle.loads(body) == (3, 2)


def test_call_fetch_results_are_not_marked_released_and_kwargs_arrive():
    taken, _, conn = run(call_frame(sorted, [3, 1, 2], kind=Kind.CALL_FETCH, reverse=True))
    assert taken
    [(_, flags, _, _, body, _)] = conn.sent
    assert flags == 0 and pickle.loads(body) == [3, 2, 1]


def test_what_the_general_path_sends_for_an_error_is_sent():
    frame = call_frame(divmod, 1, 0)
    taken, _, conn = run(frame)
    assert taken
    [(_, flags, _, _, body, _)] = conn.sent
    assert flags & FLAG_ERROR and flags & FLAG_RELEASED
    value, is_error = decode_result(flags, body, [])
    assert is_error and isinstance(value.__cause__ or value.captured.ex, ZeroDivisionError)
    # The general path, given the same exception, sends the same frame.
    node, general = Node(), Conn()
    try:
        divmod(1, 0)
    except ZeroDivisionError as exc:
        reply_to_call(node, general, frame, exc, True)
    assert general.sent[0][:4] == conn.sent[0][:4]


def test_a_result_that_is_not_plain_goes_the_general_way():
    taken, _, conn = run(call_frame(os.path.join, "a", "b"))
    assert taken and pickle.loads(conn.sent[0][4]) == os.path.join("a", "b")
    taken, _, conn = run(call_frame(sorted, [b"x" * serialize.OOB_THRESHOLD]))
    assert taken
    [(_, _, _, _, body, buffers)] = conn.sent
    assert len(buffers) == 1  # out of band: only the general encoder does that
    assert serialize.loads(body, buffers) == [b"x" * serialize.OOB_THRESHOLD]


@pytest.mark.parametrize("change", ["no function pickle", "buffers", "unknown function",
                                    "remote_do", "not a call body"])
def test_other_frames_are_left_to_the_python_path(change):
    frame = call_frame(divmod, 7, 2)
    if change == "no function pickle":
        frame.aux = 0
    elif change == "buffers":
        frame.buffers = [b"x"]
    elif change == "unknown function":
        frame.body = pickle.dumps(print, 5) + frame.body[frame.aux:]
        frame.aux = len(pickle.dumps(print, 5))
    elif change == "remote_do":
        frame.kind = Kind.REMOTE_DO
    else:
        frame.body = frame.body[:frame.aux] + pickle.dumps([1, 2, 3], 5)
    taken, node, conn = run(frame)
    assert not taken and node.ran == [] and conn.sent == []


def test_is_plain_follows_the_registry_of_importable_functions():
    def local():
        return 1

    assert not _calls.is_plain(local)
    assert _calls.is_plain((divmod, (1, 2), {"k": [1.5, None, "s", b"b", True, 1j]}))
    assert not _calls.is_plain({1: 2}) and not _calls.is_plain([[[[1]]]])


class Caller(_calls.NodeCore):
    """What handle_result reads of a node: its waiters and its pending pushes."""

    def __init__(self) -> None:
        self.myid = 1
        self.ids = iter(range(1, 1_000_000))

    def next_id(self) -> int:
        return next(self.ids)


def result_frame(ref_id: int, value, flags: int = FLAG_RELEASED) -> _wire.Frame:
    frame = _wire.Frame.__new__(_wire.Frame)
    frame.kind, frame.flags, frame.aux, frame.whence, frame.id = Kind.RESULT, flags, 0, 1, ref_id
    frame.body, frame.buffers = pickle.dumps(value, 5), []
    return frame


def test_a_released_push_nobody_waits_for_is_kept_raw_and_uses_up_its_hold():
    caller = Caller()
    fut = Future._for_call(caller, 2)
    frame = result_frame(fut.id, [1, 2])
    _calls.handle_result(caller, None, frame)
    assert caller.pushes == {} and fut._holds == 0
    assert fut._raw == (FLAG_RELEASED, frame.body, ())
    assert fut.fetch() == [1, 2]


def test_other_pushes_take_the_general_way():
    caller = Caller()
    waited = Future._for_call(caller, 2)
    waiter = waited._push_waiter()  # someone waits: the push must wake them
    kept = Future._for_call(caller, 2)  # the owner kept a copy: not released
    kept._holds = 0  # (given back already: no node here to send the give-back to)
    _calls.handle_result(caller, None, result_frame(waited.id, "w"))
    _calls.handle_result(caller, None, result_frame(kept.id, "k", flags=0))
    assert waiter.done() and waited.fetch() == "w" and waited._holds == 0
    assert kept._raw is not None and caller.pushes == {}


def test_a_result_for_a_request_sets_its_waiter():
    caller = Caller()
    w = Waiter(peer=2)
    caller.waiters[7] = w
    frame = result_frame(7, "answer", flags=0)
    _calls.handle_result(caller, None, frame)
    assert w.done() and w.value == (0, frame.body, ()) and caller.waiters == {}


def test_a_fetched_value_that_will_not_unpickle_is_the_fetchers_error():
    # materialize unpickles small results itself; one that fails goes to the general
    # decoder, which makes it the error the fetch raises (the worker's value is lost,
    # the caller is told why).
    caller = Caller()
    fut = Future._for_call(caller, 2)
    _calls.handle_result(caller, None, result_frame(fut.id, None))
    fut._raw = (FLAG_RELEASED, b"\x80\x05not a pickle", ())
    with pytest.raises(RemoteException) as info:
        fut.fetch()
    assert isinstance(info.value.captured.ex, serialize.SerializationError)
    assert fut._raw is None  # cached: a second fetch raises the same, reads nothing
    with pytest.raises(RemoteException):
        fut.fetch()


def test_a_fetched_error_is_raised_as_the_remote_exception():
    caller = Caller()
    fut = Future._for_call(caller, 2)
    frame = call_frame(divmod, 1, 0)
    node, conn = Node(), Conn()
    _calls.run_small_call(node, conn, frame)  # the worker's side: the error reply
    [(_, flags, _, _, body, _)] = conn.sent
    reply = result_frame(fut.id, None, flags=flags)
    reply.body = body
    _calls.handle_result(caller, None, reply)
    with pytest.raises(RemoteException) as info:
        fut.fetch()
    assert isinstance(info.value.__cause__ or info.value.captured.ex, ZeroDivisionError)


class Link:
    """A peer's connection: records deferred frames, or fails as a closed one."""

    def __init__(self, closed: bool = False) -> None:
        self.closed = closed
        self.deferred: list[tuple] = []

    def send_deferred(self, kind, flags, aux, whence, ref_id, body=b""):
        if self.closed:
            raise ConnectionResetError("connection closed")
        self.deferred.append((kind, flags, aux, whence, ref_id, body))


class Peer:
    def __init__(self, conn) -> None:
        self.conn = conn


def caller_with_peer(conn) -> Caller:
    caller = Caller()
    caller.peers = {2: Peer(conn)}  # type: ignore[attr-defined]
    return caller


def test_a_plain_remotecall_is_deferred_with_the_general_encoding():
    from fastdist.remotecall import encode_call

    known_by_name(divmod)
    link = Link()
    caller = caller_with_peer(link)
    fut = _calls.remotecall_plain(caller, divmod, 2, (7, 2), {})
    assert isinstance(fut, Future) and (fut.where, fut.whence, fut._holds) == (2, 1, 1)
    assert caller.pushes == {fut.id: fut}
    [(kind, flags, aux, whence, ref_id, body)] = link.deferred
    assert (kind, flags, whence, ref_id) == (Kind.CALL, 0, 1, fut.id)
    assert (aux, body, ()) == encode_call(divmod, (7, 2), {}, 2)
    # Its result arrives, and fetch takes the value in C.
    _calls.handle_result(caller, None, result_frame(fut.id, (3, 1)))
    assert _calls.fetch_value(fut) == (3, 1) and fut.fetch() == (3, 1)


def test_a_remotecall_that_is_not_the_common_case_is_left_to_python():
    from fastdist.tasks import _current_block

    known_by_name(divmod)
    link = Link()
    caller = caller_with_peer(link)
    for target in (1, 3, 2.0, True, [2]):  # itself, not connected, not a pid
        assert _calls.remotecall_plain(caller, divmod, target, (7, 2), {}) is None
    assert _calls.remotecall_plain(caller, lambda: 1, 2, (), {}) is None  # by value
    assert _calls.remotecall_plain(caller, divmod, 2, (object(),), {}) is None
    token = _current_block.set(object())  # inside @sync: the call must join it
    try:
        assert _calls.remotecall_plain(caller, divmod, 2, (7, 2), {}) is None
    finally:
        _current_block.reset(token)
    assert link.deferred == [] and caller.pushes == {}


def test_a_remotecall_to_a_closed_connection_leaves_nothing_behind():
    known_by_name(divmod)
    caller = caller_with_peer(Link(closed=True))
    assert _calls.remotecall_plain(caller, divmod, 2, (7, 2), {}) is None
    assert caller.pushes == {}  # the Python path tries again and raises


def test_fetch_value_leaves_errors_and_missing_values_to_future_fetch():
    caller = Caller()
    fut = Future._for_call(caller, 2)
    assert _calls.fetch_value(fut) is refs_empty()  # nothing delivered yet
    frame = call_frame(divmod, 1, 0)
    node, conn = Node(), Conn()
    _calls.run_small_call(node, conn, frame)
    [(_, flags, _, _, body, _)] = conn.sent
    reply = result_frame(fut.id, None, flags=flags)
    reply.body = body
    _calls.handle_result(caller, None, reply)
    assert _calls.fetch_value(fut) is refs_empty()  # an error: Future.fetch raises it
    with pytest.raises(RemoteException):
        fut.fetch()


def refs_empty():
    from fastdist.refs import _EMPTY

    return _EMPTY


def test_a_remotecall_future_is_tracked_by_the_collector_only_once_its_value_could_cycle():
    import gc

    known_by_name(divmod)
    caller = caller_with_peer(Link())
    atomic = _calls.remotecall_plain(caller, divmod, 2, (7, 2), {})
    container = _calls.remotecall_plain(caller, divmod, 2, (7, 2), {})
    cached = _calls.remotecall_plain(caller, divmod, 2, (7, 2), {})
    assert not any(gc.is_tracked(f) for f in (atomic, container, cached))
    _calls.handle_result(caller, None, result_frame(atomic.id, 5))
    _calls.handle_result(caller, None, result_frame(container.id, [5]))
    assert atomic.fetch() == 5 and not gc.is_tracked(atomic)
    assert container.fetch() == [5] and gc.is_tracked(container)
    cached._cache({"a": cached}, False)  # a value that refers back: collectable again
    assert gc.is_tracked(cached)


class Identified:
    peer = 2


def test_route_frames_sends_results_to_handle_result_and_the_rest_to_dispatch():
    caller = Caller()
    waiters = {i: Waiter(peer=2) for i in (1, 2)}
    caller.waiters.update(waiters)
    other = result_frame(3, None)
    other.kind = Kind.FETCH
    dispatched = []
    frames = [result_frame(1, "a", flags=0), other, result_frame(2, "b", flags=0)]
    _calls.route_frames(caller, Identified(), frames, lambda n, c, f: dispatched.append(f),
                        lambda c, f: True, None)
    assert dispatched == [other]
    assert all(w.done() for w in waiters.values()) and caller.waiters == {}


def test_route_frames_fails_one_bad_frame_and_hands_on_the_rest_after_an_interrupt():
    caller = Caller()
    caller.waiters = None  # type: ignore[assignment]  # no waiters to look in: each frame fails
    errors, dispatched = [], []
    frames = [result_frame(1, "a"), result_frame(2, "b")]
    _calls.route_frames(caller, Identified(), frames, None, lambda c, f: True,
                        lambda n, c, f, exc: errors.append((f, type(exc))))
    assert [f for f, _ in errors] == frames and dispatched == []

    def interrupted(node, conn, frame):
        dispatched.append(frame)
        if len(dispatched) == 1:
            raise KeyboardInterrupt

    first = result_frame(3, None)
    first.kind = Kind.PUT_FUTURE
    later = [result_frame(4, None), result_frame(5, None)]
    for f in later:
        f.kind = Kind.PUT_FUTURE
    with pytest.raises(KeyboardInterrupt):
        _calls.route_frames(caller, Identified(), [first, *later], interrupted,
                            lambda c, f: True, None)
    assert dispatched == [first, *later]


class RecordingPool:
    """A call pool that records what is handed to it (see CallPool.submit_calls)."""

    def __init__(self) -> None:
        self.batches: list[list] = []

    def submit_calls(self, calls):
        self.batches.append(list(calls))


def test_the_calls_of_a_batch_go_to_the_pool_at_once_in_order_even_after_an_interrupt():
    node = Caller()
    node.callpool = RecordingPool()  # type: ignore[attr-defined]
    calls = [call_frame(divmod, 7, i, kind=Kind.CALL_FETCH) for i in (1, 2)]
    calls[1].flags |= FLAG_SERIAL
    stop = result_frame(9, None)
    stop.kind = Kind.PING
    after = call_frame(divmod, 7, 3, kind=Kind.CALL_FETCH)

    dispatched = []

    def interrupted(n, c, f):
        dispatched.append(f)
        if f is stop:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _calls.route_frames(node, Identified(), [*calls, stop, after], interrupted,
                            lambda c, f: True, None)
    # The two calls read before the interrupt were handed over in one batch (the
    # pool's call in its caller's serial lane); the frame after it went on to its
    # handler (for a call, handle_call) before the interrupt propagated.
    [batch] = node.callpool.batches  # type: ignore[attr-defined]
    assert [key for key, _ in batch] == [None, calls[1].whence]
    assert [task.args[2] for _, task in batch] == calls
    assert dispatched == [stop, after]


def test_route_frames_skips_a_shared_memory_frame_that_could_not_be_mapped():
    caller = Caller()
    w = Waiter(peer=2)
    caller.waiters[1] = w
    frame = result_frame(1, "a", flags=0)
    frame.flags |= 0x80  # sharedmem.FLAG_SHM
    _calls.route_frames(caller, Identified(), [frame], None, lambda c, f: False, None)
    assert not w.done()


def test_a_call_without_arguments_is_encoded_as_the_general_path_would():
    known_by_name(os.getpid)
    aux, body, buffers = _calls.encode_plain_call(os.getpid, (), {})
    fpickle = serialize.function_pickle(os.getpid)
    assert (aux, body, buffers) == (len(fpickle), fpickle + pickle.dumps(((), {}), 5), ())


def test_a_freed_reference_gives_back_the_holds_it_still_has():
    given_back = []

    class Ref:
        _holds = 2

        def _release_holds(self):
            given_back.append(self._holds)

    _calls.release_on_del(Ref())
    held_none = Ref()
    held_none._holds = 0
    _calls.release_on_del(held_none)
    assert given_back == [2]


def test_run_user_marks_the_thread_interruptible_while_user_code_runs():
    import threading

    pool = CallPool(name="run-user-test")
    me = threading.get_ident()
    seen = []

    def inner():
        seen.append(dict(pool.running_user))
        raise ValueError("user code failed")

    def outer(x, *, y):
        seen.append(dict(pool.running_user))
        with pytest.raises(ValueError):
            pool.run_user(inner)
        return x + y

    assert pool.run_user(outer, 1, y=2) == 3
    assert seen == [{me: 1}, {me: 2}] and pool.running_user == {}


class QueueingConn(Conn):
    """A socket-like connection: replies may wait in its queue."""

    def __init__(self) -> None:
        super().__init__()
        self.queued: list[tuple] = []
        self.flushes = 0

    def queue_frame(self, kind, flags, aux, whence, ref_id, body=b""):
        self.queued.append((kind, flags, whence, ref_id, bytes(body)))
        return len(self.queued)

    def flush(self):
        self.flushes += 1
        self.sent.extend(q + ([],) for q in self.queued)
        self.queued.clear()


def test_a_reply_waits_while_more_calls_wait_and_goes_out_in_bursts():
    from fastdist.handlers import MAX_QUEUED_REPLIES

    node, conn = Node(), QueueingConn()
    armed = []
    # A run queue with no thread to run what waits in it, and a monitor that only
    # records being armed.
    runq = node.callpool.runq = RunQueue(lambda: armed.append(True), lambda: None,
                                         print, 0, 1.0)
    for _ in range(3):  # more calls wait to run here: replies may wait for theirs
        runq.submit(lambda: None)
    assert armed == [True]  # (by the waiting work)
    for _ in range(MAX_QUEUED_REPLIES - 1):
        assert _calls.run_small_call(node, conn, call_frame(os.getpid, kind=Kind.CALL_FETCH))
    assert conn.sent == [] and len(conn.queued) == MAX_QUEUED_REPLIES - 1
    # The monitor watches them (armed already: it stays so), in case the calls
    # that wait take long.
    assert runq.replies == {conn: True} and armed == [True]
    assert _calls.run_small_call(node, conn, call_frame(divmod, 7, 2, kind=Kind.CALL_FETCH))
    assert conn.flushes == 1 and len(conn.sent) == MAX_QUEUED_REPLIES
    assert pickle.loads(conn.sent[-1][4]) == (3, 1)
    node.callpool.runq = RunQueue(lambda: None, lambda: None, print, 0, 1.0)
    # Nothing else to run: this reply goes out at once.
    assert _calls.run_small_call(node, conn, call_frame(os.getpid, kind=Kind.CALL_FETCH))
    assert len(conn.sent) == MAX_QUEUED_REPLIES + 1 and conn.queued == []
