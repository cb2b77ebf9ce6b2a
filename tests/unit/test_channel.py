"""Tests for the local Channel: rendezvous, buffering, close, timeouts, identity, pickling."""

from __future__ import annotations

import copy
import math
import pickle
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastdist.channel as channel_mod
from fastdist.exceptions import ChannelClosedError

Channel = channel_mod.Channel
AbstractChannel = channel_mod.AbstractChannel

BLOCKED = 0.15  # how long a call must stay blocked to count as blocked


class Caller:
    """Runs one channel call on a thread and records how it ended."""

    def __init__(self, fn, *args) -> None:
        self.value = None
        self.error: BaseException | None = None
        self.returned_at: float | None = None
        self.finished = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self._thread.start()

    def _run(self, fn, *args) -> None:
        try:
            self.value = fn(*args)
            self.returned_at = time.monotonic()
        except BaseException as e:  # noqa: BLE001 - inspected by the test
            self.error = e
        finally:
            self.finished.set()

    def join(self) -> Caller:
        assert self.finished.wait(5), "call did not finish"
        return self


@pytest.mark.timeout(10)
def test_unbuffered_put_returns_only_after_take() -> None:
    ch = Channel()
    v = object()
    putter = Caller(ch.put, v)
    assert not putter.finished.wait(BLOCKED), "put returned with no taker"
    assert ch.isready() and len(ch) == 1
    take_called_at = time.monotonic()
    assert ch.take() is v
    putter.join()
    assert putter.error is None and putter.value is ch
    assert putter.returned_at >= take_called_at
    assert len(ch) == 0 and not ch.isready()


@pytest.mark.timeout(10)
def test_unbuffered_take_blocks_until_put() -> None:
    ch = Channel(0)
    taker = Caller(ch.take)
    assert not taker.finished.wait(BLOCKED)
    assert not ch.isready()
    v = ["payload"]
    ch.put(v)
    assert taker.join().value is v


@pytest.mark.timeout(30)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.sampled_from([0, 1, 3, math.inf]),
    nproducers=st.integers(1, 4),
    nconsumers=st.integers(1, 4),
    per_producer=st.integers(0, 25),
)
def test_every_value_delivered_exactly_once(
    size: float, nproducers: int, nconsumers: int, per_producer: int
) -> None:
    ch = Channel(size)
    values = [[object() for _ in range(per_producer)] for _ in range(nproducers)]
    lock = threading.Lock()
    takes_started = 0
    puts_returned = 0
    violations: list[str] = []
    received: list[list[object]] = [[] for _ in range(nconsumers)]

    def produce(mine: list[object]) -> None:
        nonlocal puts_returned
        for v in mine:
            ch.put(v)
            with lock:
                puts_returned += 1
                # Each finished unbuffered put was taken by a distinct take call.
                if size == 0 and puts_returned > takes_started:
                    violations.append(f"{puts_returned} puts returned, {takes_started} takes")

    def consume(out: list[object]) -> None:
        nonlocal takes_started
        while True:
            with lock:
                takes_started += 1
            try:
                out.append(ch.take())
            except ChannelClosedError:
                return

    producers = [threading.Thread(target=produce, args=(m,)) for m in values]
    consumers = [threading.Thread(target=consume, args=(r,)) for r in received]
    for t in producers + consumers:
        t.start()
    for t in producers:
        t.join()
    ch.close()
    for t in consumers:
        t.join()

    assert not violations
    origin = {id(v): (p, i, v) for p, mine in enumerate(values) for i, v in enumerate(mine)}
    got = [v for r in received for v in r]
    assert len(got) == len(origin) == len({id(v) for v in got})
    assert all(origin[id(v)][2] is v for v in got)  # the very objects, each once
    for r in received:  # FIFO: a consumer sees each producer's values in put order
        for p in range(nproducers):
            order = [origin[id(v)][1] for v in r if origin[id(v)][0] == p]
            assert order == sorted(order)


@pytest.mark.timeout(10)
def test_bounded_buffer_blocks_when_full() -> None:
    ch = Channel(2)
    ch.put(1).put(2)
    assert len(ch) == 2 and ch.size == 2
    putter = Caller(ch.put, 3)
    assert not putter.finished.wait(BLOCKED), "put into a full buffer returned"
    assert ch.take() == 1
    assert putter.join().error is None
    assert [ch.take(), ch.take()] == [2, 3]


@pytest.mark.timeout(10)
def test_unbounded_never_blocks() -> None:
    ch = Channel(math.inf)
    for i in range(10_000):
        ch.put(i, timeout=0)
    assert len(ch) == 10_000
    assert ch.take() == 0


@pytest.mark.timeout(10)
def test_close_drains_then_raises() -> None:
    ch = Channel(3).put("a").put("b")
    ch.close()
    ch.close()  # idempotent
    assert ch.closed and not ch.isopen()
    with pytest.raises(ChannelClosedError):
        ch.put("c")
    assert ch.isready()
    assert ch.fetch() == "a"
    assert ch.take() == "a"
    ch.wait()
    assert ch.take() == "b"
    for call in (ch.take, ch.fetch, ch.wait):
        with pytest.raises(ChannelClosedError):
            call()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("size", [0, 1])
def test_close_wakes_blocked_putter(size: int) -> None:
    ch = Channel(size)
    if size:
        ch.put("kept")
    putter = Caller(ch.put, "refused")
    assert not putter.finished.wait(BLOCKED)
    ch.close()
    assert isinstance(putter.join().error, ChannelClosedError)
    assert list(ch) == (["kept"] if size else [])


@pytest.mark.timeout(10)
@pytest.mark.parametrize("size", [0, 3, math.inf])
@pytest.mark.parametrize("method", ["take", "fetch", "wait"])
def test_close_wakes_blocked_reader(size: float, method: str) -> None:
    ch = Channel(size)
    reader = Caller(getattr(ch, method))
    assert not reader.finished.wait(BLOCKED)
    ch.close()
    assert isinstance(reader.join().error, ChannelClosedError)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("size", [0, 1, math.inf])
def test_iteration_until_closed(size: float) -> None:
    ch = Channel(size)

    def produce() -> None:
        for i in range(100):
            ch.put(i)
        ch.close()

    threading.Thread(target=produce).start()
    assert list(ch) == list(range(100))


@pytest.mark.timeout(10)
def test_timeouts_leave_channel_unchanged() -> None:
    full = Channel(2).put("x").put("y")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        full.put("z", timeout=0.05)
    assert time.monotonic() - t0 >= 0.05
    full.close()
    assert list(full) == ["x", "y"]

    unbuffered = Channel(0)
    with pytest.raises(TimeoutError):
        unbuffered.put("z", timeout=0.05)
    assert len(unbuffered) == 0 and not unbuffered.isready()
    with pytest.raises(TimeoutError):
        unbuffered.take(timeout=0.05)  # the timed-out value was not left behind

    empty = Channel(1)
    for call in (empty.take, empty.fetch, empty.wait):
        with pytest.raises(TimeoutError):
            call(timeout=0.02)
    assert empty.put(5).take(timeout=0) == 5


@pytest.mark.timeout(10)
def test_fetch_does_not_remove() -> None:
    v = {"k": 1}
    ch = Channel(2).put(v)
    assert ch.fetch() is v and ch.fetch() is v
    assert len(ch) == 1
    assert ch.take() is v


@pytest.mark.timeout(10)
def test_fetch_on_unbuffered_peeks_at_waiting_putter() -> None:
    ch = Channel(0)
    fetcher = Caller(ch.fetch)
    assert not fetcher.finished.wait(BLOCKED)
    v = object()
    putter = Caller(ch.put, v)
    assert fetcher.join().value is v
    assert not putter.finished.wait(BLOCKED), "fetch completed the hand-over"
    assert ch.take() is v
    assert putter.join().error is None


@pytest.mark.timeout(10)
def test_values_wake_waiters_and_takers_alike() -> None:
    ch = Channel(2)
    waiters = [Caller(ch.wait), Caller(ch.fetch)]
    taker = Caller(ch.take)
    assert not taker.finished.wait(BLOCKED)
    assert not any(w.finished.is_set() for w in waiters)
    ch.put("a").put("b")
    # A waiter woken in the taker's place would leave the taker asleep.
    assert taker.join().value == "a"
    assert [w.join().error for w in waiters] == [None, None]
    assert ch.take() == "b"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickling_refused(protocol: int) -> None:
    with pytest.raises(TypeError, match="use RemoteChannel to share it"):
        pickle.dumps(Channel(1), protocol=protocol)


@pytest.mark.timeout(10)
def test_copy_refused() -> None:
    with pytest.raises(TypeError, match="RemoteChannel"):
        copy.copy(Channel())


@pytest.mark.timeout(10)
@pytest.mark.parametrize("size", [-1, 1.5, "3", None, True, -math.inf])
def test_bad_size_rejected(size: object) -> None:
    with pytest.raises(ValueError):
        Channel(size)


@pytest.mark.timeout(10)
def test_empty_channel_is_still_truthy() -> None:
    ch = Channel(1)
    assert len(ch) == 0 and bool(ch)
    assert "open" in repr(ch)


@pytest.mark.timeout(10)
def test_abstract_channel_gives_iteration_to_subclasses() -> None:
    with pytest.raises(TypeError):
        AbstractChannel()

    class ListChannel(AbstractChannel):
        def __init__(self, items: list[int]) -> None:
            self.items = items

        def put(self, v):
            self.items.append(v)
            return self

        def take(self):
            if not self.items:
                raise ChannelClosedError("drained")
            return self.items.pop(0)

        def fetch(self):
            return self.items[0]

        def isready(self):
            return bool(self.items)

        def wait(self):
            pass

        def close(self):
            pass

    assert list(ListChannel([1, 2, 3])) == [1, 2, 3]
    assert isinstance(Channel(), AbstractChannel)
