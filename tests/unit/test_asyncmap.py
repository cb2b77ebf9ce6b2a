"""Tests for asyncmap: order, zipping, generators, real concurrency, batches, errors."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdist.asyncmap import asyncmap


class Gauge:
    """Counts calls running at once and remembers the peak."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def __enter__(self) -> None:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.running -= 1


@pytest.mark.timeout(10)
def test_results_in_input_order_whatever_finishes_first() -> None:
    n = 30

    def slow_first(i: int) -> int:
        time.sleep((n - i) * 0.003)  # later elements finish first
        return i * i

    assert asyncmap(slow_first, range(n)) == [i * i for i in range(n)]


@pytest.mark.timeout(10)
def test_zip_stops_at_shortest() -> None:
    gen = (c for c in "abcdefgh")
    assert asyncmap(lambda a, b, c: f"{a}{b}{c}", range(100), gen, ["x", "y", "z"]) == [
        "0ax",
        "1by",
        "2cz",
    ]
    assert asyncmap(str, []) == []


@pytest.mark.timeout(10)
def test_generator_is_read_in_the_calling_thread_only() -> None:
    readers: set[int] = set()

    def gen():
        for i in range(50):
            readers.add(threading.get_ident())
            yield i

    assert asyncmap(lambda x: -x, gen()) == [-i for i in range(50)]
    assert readers == {threading.get_ident()}


@pytest.mark.timeout(10)
def test_calls_run_concurrently() -> None:
    gauge = Gauge()

    def nap(x: int) -> int:
        with gauge:
            time.sleep(0.2)
        return x

    t0 = time.monotonic()
    assert asyncmap(nap, range(20)) == list(range(20))
    assert time.monotonic() - t0 < 2.0
    assert gauge.peak > 1


@pytest.mark.timeout(10)
@pytest.mark.parametrize("ntasks", [1, 3, lambda: 2])
def test_ntasks_bounds_concurrency(ntasks) -> None:
    gauge = Gauge()
    limit = ntasks() if callable(ntasks) else ntasks

    def nap(x: int) -> int:
        with gauge:
            time.sleep(0.02)
        return x

    assert asyncmap(nap, range(12), ntasks=ntasks) == list(range(12))
    assert gauge.peak <= limit
    if limit > 1:
        assert gauge.peak > 1


@pytest.mark.timeout(10)
def test_batch_mode_passes_lists_of_argument_tuples() -> None:
    batches: list[list[tuple]] = []
    lock = threading.Lock()

    def add_batch(batch: list[tuple[int, int]]) -> list[int]:
        with lock:
            batches.append(batch)
        return [a + b for a, b in batch]

    out = asyncmap(add_batch, range(10), range(100, 110), batch_size=4)
    assert out == [a + b for a, b in zip(range(10), range(100, 110))]
    assert sorted(len(b) for b in batches) == [2, 4, 4]
    assert all(isinstance(t, tuple) and len(t) == 2 for b in batches for t in b)
    single = asyncmap(lambda batch: [t for (t,) in batch], "abc", batch_size=2)
    assert single == ["a", "b", "c"]


@pytest.mark.timeout(10)
def test_batch_with_wrong_number_of_results_raises() -> None:
    with pytest.raises(ValueError, match="2 inputs"):
        asyncmap(lambda batch: [0], range(4), batch_size=2)


@pytest.mark.timeout(10)
def test_first_exception_propagates_and_stops_the_feed() -> None:
    consumed = 0

    def endless():
        nonlocal consumed
        for i in itertools.count():
            consumed += 1
            yield i

    def f(x: int) -> int:
        if x == 5:
            raise ArithmeticError("five")
        return x

    with pytest.raises(ArithmeticError, match="five"):
        asyncmap(f, endless(), ntasks=4)
    # The feed stops promptly: at most one element per thread beyond the failure, plus one.
    assert consumed <= 5 + 4 + 2


@pytest.mark.timeout(10)
def test_running_calls_finish_before_the_error_is_raised() -> None:
    gate = threading.Event()
    finished: list[int] = []

    def f(x: int) -> int:
        if x == 0:
            assert gate.wait(5)
            finished.append(x)
            return x
        gate.set()
        raise LookupError(x)

    with pytest.raises(LookupError):
        asyncmap(f, range(2), ntasks=2)
    assert finished == [0]


@pytest.mark.timeout(10)
def test_iterable_error_propagates() -> None:
    def broken():
        yield 1
        raise OSError("disk")

    with pytest.raises(OSError, match="disk"):
        asyncmap(lambda x: x, broken())


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "kwargs", [{}, {"ntasks": -1}, {"batch_size": 0}], ids=["no-iterables", "ntasks", "batch"]
)
def test_bad_arguments(kwargs: dict) -> None:
    iterables = () if not kwargs else ([1, 2],)
    with pytest.raises(ValueError):
        asyncmap(abs, *iterables, **kwargs)


@pytest.mark.timeout(30)
@settings(max_examples=40, deadline=None)
@given(
    xs=st.lists(st.integers()),
    ntasks=st.integers(0, 8),
    batch_size=st.none() | st.integers(1, 5),
)
def test_matches_builtin_map(xs: list[int], ntasks: int, batch_size: int | None) -> None:
    if batch_size is None:
        got = asyncmap(lambda x: x * 3 - 1, xs, ntasks=ntasks)
    else:
        got = asyncmap(
            lambda b: [x * 3 - 1 for (x,) in b], xs, ntasks=ntasks, batch_size=batch_size
        )
    assert got == [x * 3 - 1 for x in xs]
