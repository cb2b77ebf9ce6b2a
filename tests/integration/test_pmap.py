"""pmap on real workers: order and inputs, every keyword and their combinations
(Julia's walk_args), on_error, retries, retry_check, workers killed mid-run,
batches, progress bars and pipelining."""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
from _module_workers import os_pid, shared_workers, wait_gone
from support import bytes_sent, same_items

import fastdist as fd
from fastdist.pmap import calls as pmap_calls
from fastdist.pmap import engine as pmap_engine
from fastdist.pmap import scheduling as pmap_scheduling
from fastdist.pmap import worker as pmap_worker
from fastdist.protocol.serialize import SerializationError
from fastdist.workerpool import cached_function_count

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ws():
    with shared_workers(2) as pids:
        yield pids


def fails_first_time(path, x):
    """Raise on the first call for `x` (a marker file remembers), return x*10 after."""
    marker = os.path.join(path, f"seen-{x}")
    try:
        fd_ = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return x * 10
    os.close(fd_)
    raise ConnectionError(f"transient failure for {x}")


def attempts(path, x):
    return len([n for n in os.listdir(path) if n.startswith(f"try-{x}-")])


def always_fails(path, x):
    open(os.path.join(path, f"try-{x}-{time.monotonic_ns()}"), "w").close()
    raise ValueError(f"bad {x}")


# -- results and inputs -----------------------------------------------------------------------


def test_results_in_input_order_for_any_iterable(ws):
    assert fd.pmap(lambda x: x * 2, range(50)) == [x * 2 for x in range(50)]
    assert fd.pmap(str.upper, "Hello World!") == list("HELLO WORLD!")
    assert fd.pmap(lambda x: x + 1, (x for x in range(20))) == list(range(1, 21))
    arr = np.arange(12.0)
    assert fd.pmap(lambda v: v * v, arr) == [v * v for v in arr]
    assert fd.pmap(pow, [2, 3, 4], [10, 2]) == [1024, 9], "zipped, shortest wins"
    assert fd.pmap(lambda a, b, c: a + b + c, "ab", "cd", "ef", batch_size=2) == ["ace", "bdf"]
    assert fd.pmap(lambda x: x, []) == []
    assert fd.pmap(lambda x: x, {3: "a", 1: "b"}) == [3, 1]
    assert fd.pmap(lambda g: g(2), [lambda x: x + 1, lambda x: x * 3]) == [3, 6]
    assert fd.pmap(len, ["x" * 10_000, b"y" * 100_000, (1, 2)]) == [10_000, 100_000, 2]


@pytest.mark.parametrize("batch_size", [1, 3, "auto"])
def test_lists_and_tuples_taken_in_slices_map_like_any_iterable(ws, batch_size):
    def odd_fails(x):
        if x % 2:
            raise ValueError(x)
        return -x

    expect = [-x if x % 2 == 0 else None for x in range(41)]
    for items in (list(range(41)), tuple(range(41)), iter(range(41))):
        got = fd.pmap(odd_fails, items, batch_size=batch_size, on_error=lambda e: None)
        assert got == expect, type(items)
    assert fd.pmap(lambda x: x, (), batch_size=batch_size) == []


def test_every_worker_takes_part(ws):
    assert sorted(fd.pmap(lambda _: fd.myid(), range(len(ws)))) == sorted(ws), "one each"
    pool = fd.WorkerPool(ws)
    assert sorted(fd.pmap(lambda _: fd.myid(), pool, range(len(ws)))) == sorted(ws)
    assert set(fd.pmap(lambda _: fd.myid(), range(100))) == set(ws)
    assert set(fd.pmap(lambda _: fd.myid(), range(100), batch_size=7)) == set(ws)


def test_pool_positional_or_keyword_and_specific_workers(ws):
    only = fd.WorkerPool([ws[1]])
    assert set(fd.pmap(lambda _: fd.myid(), only, range(20))) == {ws[1]}
    assert set(fd.pmap(lambda _: fd.myid(), range(20), pool=only)) == {ws[1]}
    with pytest.raises(TypeError):
        fd.pmap(abs, only, range(3), pool=only)
    with pytest.raises(TypeError):
        fd.pmap(abs)


def test_pool_of_this_process_alone_runs_locally(ws):
    assert fd.pmap(lambda _: fd.myid(), fd.WorkerPool([1]), range(5)) == [1] * 5
    assert fd.pmap(lambda _: fd.myid(), fd.WorkerPool([]), range(3)) == [1] * 3


def test_pmap_from_a_worker_uses_all_workers(ws):
    got = fd.remotecall_fetch(lambda: fd.pmap(lambda _: fd.myid(), range(100)), ws[0])
    assert set(got) == set(ws), "the calling worker works too"


def test_bad_arguments(ws):
    for bad in (0, -1, "big", 1.5):
        with pytest.raises(ValueError, match="batch_size"):
            fd.pmap(abs, [1], batch_size=bad)
    with pytest.raises(TypeError, match="retry_delays"):
        fd.pmap(abs, [1], retry_delays=0.1)
    with pytest.raises(TypeError, match="on_error"):
        fd.pmap(abs, [1], on_error="ignore")


# -- every keyword, every combination (Julia's walk_args) ---------------------------------------


def _walk_args_case(ws, distributed, batch_size, on_error, retry_delays, retry_check):
    kwargs = {}
    if distributed is not None:
        kwargs["distributed"] = distributed
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    if on_error is not None:
        kwargs["on_error"] = on_error
    if retry_delays is not None:
        kwargs["retry_delays"] = retry_delays
    if retry_check is not None:
        kwargs["retry_check"] = retry_check
    data = range(1, 101)
    testw = [1] if distributed is False else ws

    if retry_delays is not None:
        def mapf(x):
            if fd.myid() % 2 == 0:
                raise RuntimeError("notfoobar")
            return x * 2, fd.myid()

        res = fd.pmap(mapf, data, **kwargs)
        assert [r[0] for r in res] == [2 * x for x in data]
        pids = {r[1] for r in res}
        for p in testw:
            assert (p in pids) == (p % 2 == 1), (p, pids)
    elif on_error is None:
        res = fd.pmap(lambda x: (x * 2, fd.myid()), data, **kwargs)
        assert [r[0] for r in res] == [2 * x for x in data]
        assert {r[1] for r in res} == set(testw)
    else:
        def mapf(x):
            if x % 2 == 0:
                raise RuntimeError("foobar")
            return x * 2, fd.myid()

        res = fd.pmap(mapf, data, **kwargs)
        for x, r in zip(data, res):
            if x % 2 == 0:
                assert r is True
            else:
                assert r[0] == 2 * x and r[1] in testw


def _on_error(e):
    if str(e) == "foobar":
        return True
    raise e


def test_all_combinations_of_keywords(ws):
    assert {w % 2 for w in ws} == {0, 1}, "needs an even and an odd worker"
    names = ("distributed", "batch_size", "on_error", "retry_delays", "retry_check")
    choices = itertools.product(
        (None, False),
        (None, 2),
        (None, _on_error),
        (None, [0.001] * 1000),
        (None, lambda s, e: (s, str(e).endswith("foobar"))),
    )
    for combo in choices:
        try:
            _walk_args_case(ws, *combo)
        except BaseException as exc:
            given = [name for name, value in zip(names, combo) if value is not None]
            exc.add_note(f"pmap keywords given: {given}")
            raise


# -- errors ----------------------------------------------------------------------------------


def test_an_error_stops_pmap_and_raises_the_remote_exception(ws, monkeypatch):
    read = []
    read_at_failure = []
    fail = pmap_engine.Engine._fail

    def noting_fail(self, exc):
        read_at_failure.append(len(read))
        return fail(self, exc)

    monkeypatch.setattr(pmap_engine.Engine, "_fail", noting_fail)

    def source():
        for i in range(100_000):
            read.append(i)
            yield i

    def f(x):
        if x == 50:
            raise ValueError("foobar")
        return x

    with pytest.raises(fd.RemoteException) as info:
        fd.pmap(f, source())
    assert info.value.pid in ws
    assert isinstance(info.value.captured.ex, ValueError)
    assert str(info.value.captured.ex) == "foobar"
    # How many were read before the failure came back depends on the pipeline
    # (hundreds of calls in flight); after it, none.
    assert read_at_failure and len(read) == read_at_failure[0] < 100_000, (
        "no new element is read after the failure")
    with pytest.raises(fd.RemoteException, match="foobar"):
        fd.pmap(f, range(100), batch_size=8)


def test_on_error_value_in_place(ws):
    def f(x):
        if x % 3 == 0:
            raise KeyError(x)
        return x

    for batch_size in (1, 4, "auto"):
        got = fd.pmap(f, range(10), on_error=lambda e: ("err", type(e).__name__, e.args[0]),
                      batch_size=batch_size)
        assert got == [("err", "KeyError", x) if x % 3 == 0 else x for x in range(10)]


def test_on_error_bare_raise_rethrows_the_original(ws):
    seen = []

    def handler(e):
        seen.append(e)
        raise  # noqa: PLE0704 - pmap calls on_error while `e` is being handled

    with pytest.raises(fd.RemoteException) as info:
        fd.pmap(lambda x: 1 // x, [1, 0, 2], on_error=handler)
    assert isinstance(info.value.captured.ex, ZeroDivisionError)
    assert seen and all(isinstance(e, ZeroDivisionError) for e in seen)


def test_on_error_raising_something_new(ws):
    def handler(e):
        raise LookupError("translated") from e

    with pytest.raises(LookupError, match="translated"):
        fd.pmap(lambda x: 1 // x, [1, 0], on_error=handler)


def test_input_that_fails_midway(ws):
    def source():
        yield 1
        yield 2
        raise OSError("input broke")

    with pytest.raises(OSError, match="input broke"):
        fd.pmap(lambda x: x, source())


def test_unpicklable_element(ws):
    lock = threading.Lock()
    with pytest.raises(SerializationError):
        fd.pmap(lambda x: 1, [1, lock, 2])
    assert fd.pmap(lambda x: 1, [1, lock, 2], on_error=lambda e: "unsent") == [1, "unsent", 1]


# -- retries ---------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3])
def test_retries_after_transient_failures(ws, tmp_path, batch_size):
    got = fd.pmap(fails_first_time, [str(tmp_path)] * 12, range(12), retry_delays=[0.01],
                  batch_size=batch_size)
    assert got == [x * 10 for x in range(12)]
    assert len(os.listdir(tmp_path)) == 12, "each element failed once"


def test_retries_run_out(ws, tmp_path):
    start = time.monotonic()
    with pytest.raises(fd.RemoteException, match="bad 1") as info:
        fd.pmap(always_fails, [str(tmp_path)], [1], retry_delays=[0.05, 0.1])
    assert isinstance(info.value.captured.ex, ValueError)
    assert attempts(tmp_path, 1) == 3, "one attempt and two retries"
    assert time.monotonic() - start >= 0.15, "the delays were waited"


def test_retry_delays_from_a_one_shot_generator(ws, tmp_path):
    def delays():
        d = 0.001
        while True:  # endless, like ExponentialBackOff without n
            yield d
            d *= 2

    got = fd.pmap(fails_first_time, [str(tmp_path)] * 6, range(6), retry_delays=delays())
    assert got == [x * 10 for x in range(6)]


def test_retry_check_refuses(ws, tmp_path):
    calls = []

    def check(state, exc):
        calls.append((state, type(exc).__name__))
        return state, False

    with pytest.raises(fd.RemoteException, match="bad 7"):
        fd.pmap(always_fails, [str(tmp_path)], [7], retry_delays=[0.0] * 5, retry_check=check)
    assert attempts(tmp_path, 7) == 1
    assert calls == [(None, "ValueError")], "the check sees the original exception"


def test_retry_check_state_and_selective_retry(ws, tmp_path):
    states = []

    def check(state, exc):
        states.append(state)
        return (0 if state is None else state + 1), isinstance(exc, ConnectionError)

    got = fd.pmap(fails_first_time, [str(tmp_path)] * 4, range(4), retry_delays=[0] * 3,
                  retry_check=check)
    assert got == [0, 10, 20, 30] and states == [None] * 4

    def check_counting(state, exc):
        states.append(state)
        return (0 if state is None else state + 1), True

    states.clear()
    with pytest.raises(fd.RemoteException):
        fd.pmap(always_fails, [str(tmp_path)], [5], retry_delays=[0] * 3,
                retry_check=check_counting)
    assert states == [None, 0, 1], "state threads through an element's retries"
    assert attempts(tmp_path, 5) == 4


def test_on_error_is_asked_before_retrying(ws, tmp_path):
    handled = []

    def handler(e):
        handled.append(type(e))
        if isinstance(e, ConnectionError):
            raise e  # let it be retried
        return "handled"

    got = fd.pmap(fails_first_time, [str(tmp_path)] * 3, range(3), on_error=handler,
                  retry_delays=[0.0])
    assert got == [0, 10, 20] and handled == [ConnectionError] * 3
    got = fd.pmap(lambda x: 1 // x, [0], on_error=handler, retry_delays=[0.0] * 3)
    assert got == ["handled"]


# -- workers that die mid-run -------------------------------------------------------------------


def _slow_where(x):
    time.sleep(0.01)
    return x, fd.myid()


@pytest.mark.parametrize("batch_size", [1, 4])
def test_survives_a_worker_killed_mid_run(ws, batch_size):
    (victim,) = fd.addprocs(1)
    ospid = os_pid(victim)
    fd.remotecall_fetch(_slow_where, victim, 0)  # this module is imported there now
    data = list(range(300))
    busy = threading.Event()

    def source():
        for i in data:
            if i == 60:
                busy.set()  # by now the victim has done some and has more in flight
            yield i

    def kill_when_busy():
        busy.wait(10)
        os.kill(ospid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    try:
        got = fd.pmap(_slow_where, source(), retry_delays=[0.05] * 3, batch_size=batch_size)
    finally:
        killer.join()
    assert [x for x, _ in got] == data
    assert victim in {p for _, p in got}, "the victim worked before it died"
    wait_gone(victim)
    assert {p for _, p in got[-20:]} <= set(ws), "the last elements ran on the survivors"


def test_worker_death_without_retries_raises(ws):
    (victim,) = fd.addprocs(1)
    ospid = os_pid(victim)
    threading.Timer(0.3, os.kill, (ospid, signal.SIGKILL)).start()
    with pytest.raises(fd.ProcessExitedException) as info:
        fd.pmap(lambda x: time.sleep(0.02), range(400))
    assert info.value.worker_id == victim
    wait_gone(victim)


def test_every_worker_of_the_pool_gone(ws):
    (victim,) = fd.addprocs(1)
    ospid = os_pid(victim)
    threading.Timer(0.3, os.kill, (ospid, signal.SIGKILL)).start()
    with pytest.raises(RuntimeError, match="No active worker"):
        fd.pmap(lambda x: time.sleep(0.02), fd.WorkerPool([victim]), range(400),
                retry_delays=[0.01] * 3)
    wait_gone(victim)


def _busy_on_second(x, first):
    if x == 0 and fd.myid() == first:
        raise ConnectionError("fails where it ran first")
    if x in (1, 3):
        time.sleep(0.6)
    return x


def test_a_retry_waiting_for_a_busy_worker_does_not_spin(ws):
    # Slots go A, B, A, B: 1 and 3 keep B busy; 0 fails on A and waits for B.
    pool = fd.WorkerPool(ws)
    cpu = time.process_time()
    got = fd.pmap(_busy_on_second, pool, range(6), [ws[0]] * 6, retry_delays=[0])
    assert got == list(range(6))
    assert time.process_time() - cpu < 0.1, "the caller spun while waiting"


# -- batches, pipelining, progress -----------------------------------------------------------


def test_auto_batch_size(ws):
    auto = pmap_scheduling.auto_batch_size
    assert auto(10_000, 2) == 1250 and auto(100, 4) == 6 and auto(5, 4) == 1 and auto(0, 2) == 1
    assert auto(10**9, 2) == pmap_scheduling.AUTO_MAX_FIRST_BATCH
    # Up to 4 workers 4 batches each, then fewer: at most 16 in the first round.
    assert [auto(96_000, n) for n in (2, 4, 5, 8, 16, 32, 64)] == [
        10_000, 6000, 6400, 6000, 6000, 6000, 6000]
    assert fd.pmap(lambda x: x, range(1000), batch_size="auto") == list(range(1000))
    assert fd.pmap(lambda x: x, (i for i in range(1000)), batch_size="auto") == list(range(1000))


class Int(int):
    pass


def _typed(x):
    """Results of several types, by the element: numbers that pack and ones that do not."""
    kinds = [x + 1, x * 0.5, x % 2 == 0, Int(x), 2**70 + x, np.int64(x)]
    return kinds[x % len(kinds)] if x >= 0 else x


def _fails_on_7(x):
    if x % 100 == 7:
        raise ValueError(f"element {x}")
    return x * 2


@pytest.mark.parametrize("batch_size", [50, "auto"])
def test_batches_of_numbers_keep_values_and_types(ws, batch_size):
    """Batches of plain ints or floats travel packed, their results too when they are
    plain numbers: what comes back is what runs here, type for type."""
    ints = list(range(-3, 1000))
    assert same_items(fd.pmap(_typed, ints, batch_size=batch_size), [_typed(x) for x in ints])
    floats = [x / 3 for x in range(500)] + [-0.0, float("inf")]
    assert same_items(fd.pmap(lambda x: x, floats, batch_size=batch_size), floats)
    bools = [x % 3 == 0 for x in range(500)]
    assert same_items(fd.pmap(lambda x: x, bools, batch_size=batch_size), bools)
    big = [2**63 - 1, -(2**63), 2**63] * 100
    assert same_items(fd.pmap(lambda x: x, big, batch_size=batch_size), big)
    mixed = [x if x % 5 else float(x) for x in range(500)]
    assert same_items(fd.pmap(lambda x: x, mixed, batch_size=batch_size), mixed)
    # A failure in a batch of numbers: its results come back as a list, in place.
    out = fd.pmap(_fails_on_7, range(1000), batch_size=batch_size, on_error=lambda e: -1)
    assert out == [-1 if x % 100 == 7 else x * 2 for x in range(1000)]


def test_a_batch_of_ints_travels_packed(ws, monkeypatch):
    """8 bytes an element (pickle writes ~3 for small ints, but reads them at ~18 ns
    each against ~5): the calls carry the packed list, not the pickle of a list."""
    unit = pmap_scheduling.Unit(0, list(range(1000)), True)
    assert type(pmap_calls._travelling(unit)) is bytes
    assert pmap_calls._travelling(pmap_scheduling.Unit(0, [(1, 2)] * 1000, True)) == [(1, 2)] * 1000
    seen = []
    real = pmap_calls._travelling

    def spy(u):
        seen.append(real(u))
        return seen[-1]

    monkeypatch.setattr(pmap_calls, "_travelling", spy)
    assert fd.pmap(lambda x: x + 1, range(4000), batch_size=500) == list(range(1, 4001))
    assert len(seen) == 8 and all(type(b) is bytes for b in seen)


def _slow_myid(x):
    time.sleep(0.02)
    return fd.myid()


def test_workers_past_the_first_round_start_when_it_returns(ws, monkeypatch):
    """More workers than first-round batches: the first batches end on their budget
    after an element of a slow function, and the rest goes to every worker."""
    monkeypatch.setattr(pmap_scheduling, "AUTO_FIRST_ROUND_BATCHES", 1)
    assert pmap_scheduling.auto_batch_size(40, 2) == 40  # one batch: one worker idle at first
    where = fd.pmap(_slow_myid, range(40), batch_size="auto")
    assert set(where) == set(ws)


def _calls_sent(ws, before):
    return sum(fd.stats()["peers"][w]["msgs_sent"] - before[w] for w in ws)


def test_auto_batches_follow_how_long_elements_take(ws):
    before = {w: fd.stats()["peers"][w]["msgs_sent"] for w in ws}
    assert fd.pmap(lambda x: x, range(20_000), batch_size="auto") == list(range(20_000))
    fast = _calls_sent(ws, before)
    assert fast < 40, f"{fast} calls: cheap elements go in big batches (Julia's rule: 200)"

    def slow(x):
        time.sleep(0.002)
        return x

    before = {w: fd.stats()["peers"][w]["msgs_sent"] for w in ws}
    assert fd.pmap(slow, range(200), batch_size="auto") == list(range(200))
    assert _calls_sent(ws, before) > 30, "2 ms elements go a few at a time"


def _sleepy(x):
    time.sleep(0.02)
    if x % 7 == 3:
        raise ValueError(x)
    return x


@pytest.mark.parametrize("by", ["name", "cache"])
def test_auto_first_batches_end_early_when_elements_are_slow(ws, by):
    # 80 elements over 2 workers: first batches of 10, all 8 sent at once. At 20 ms
    # an element, each would run 200 ms before anything was timed; each ends after
    # its first element instead (AUTO_BATCH_SECONDS), and the rest goes again.
    # (A lambda travels through the map's function cache, not by name.)
    f = _sleepy if by == "name" else (lambda x: _sleepy(x))
    before = {w: fd.stats()["peers"][w]["msgs_sent"] for w in ws}
    got = fd.pmap(f, range(80), batch_size="auto", on_error=lambda e: -1, progress=True)
    assert got == [-1 if x % 7 == 3 else x for x in range(80)]
    calls = _calls_sent(ws, before)
    assert calls >= 60, f"{calls} calls: whole first batches ran"


def _sleepy_fails_at_1(x):
    time.sleep(0.02)
    if x == 1:
        raise ValueError(x)
    return x


def test_a_batch_with_a_budget_returns_the_part_it_ran():
    run = pmap_worker.run_elements
    took, out, failed = run(_sleepy_fails_at_1, list(range(40)), False, None, 0.2)
    assert 2 <= len(out) <= 10 and took >= 0.02 * len(out)
    assert failed == [1] and isinstance(out[1], pmap_worker.ElementFailure)
    assert [v for i, v in enumerate(out) if i != 1] == [x for x in range(len(out)) if x != 1]
    took, out, failed = run(lambda x, y: x + y, [(1, 2)] * 1000, True, None, 10.0)
    assert out == [3] * 1000 and failed == [], "a cheap batch runs whole"


def test_big_elements_go_one_per_batch_from_the_first(ws, monkeypatch):
    # 40 elements over 2 workers: first batches of 5, but 3 MB each is more than an
    # 'auto' batch should carry (AUTO_BATCH_NBYTES): one per call from the start,
    # and still at the end, however small the results that came back.
    sizes = []
    send = pmap_engine.Engine._send

    def recording(self, w, unit):
        sizes.append(len(unit.args))
        return send(self, w, unit)

    monkeypatch.setattr(pmap_engine.Engine, "_send", recording)
    blob = b"x" * 3_000_000
    assert fd.pmap(len, [blob] * 40, batch_size="auto") == [3_000_000] * 40
    assert sizes == [1] * 40, sizes


def test_batches_travel_as_one_call_each(ws):
    before = {w: fd.stats()["peers"][w]["msgs_sent"] for w in ws}
    fd.pmap(lambda x: x, range(200), batch_size=50)
    sent = sum(fd.stats()["peers"][w]["msgs_sent"] - before[w] for w in ws)
    assert 4 <= sent <= 10, f"{sent} messages for 4 batches"


def _span(x):
    start = time.monotonic()
    time.sleep(0.05)
    return fd.myid(), start, time.monotonic()


def test_a_worker_runs_a_maps_elements_one_at_a_time_and_back_to_back(ws):
    # A pool gives a worker one call at a time (Julia): a map's elements never
    # overlap on a worker, even while one sleeps; and since the next one is already
    # there while one runs, the worker starts it at once, not a round trip later.
    spans = fd.pmap(_span, range(16))
    gaps = []
    for w in ws:
        mine = sorted((s, e) for p, s, e in spans if p == w)
        assert len(mine) >= 2, f"worker {w} got {len(mine)} elements"
        assert all(b[0] >= a[1] for a, b in itertools.pairwise(mine)), \
            f"two elements overlapped on worker {w}: {mine}"
        gaps.extend(b[0] - a[1] for a, b in itertools.pairwise(mine))
    assert sorted(gaps)[len(gaps) // 2] < 0.01, f"gaps between elements: {sorted(gaps)}"


def _spin(x):
    start = time.monotonic()
    cpu = time.thread_time()
    while time.thread_time() - cpu < 0.05:
        pass
    return fd.myid(), start, time.monotonic()


def test_cpu_bound_elements_take_turns_on_a_worker(ws):
    spans = fd.pmap(_spin, range(8))
    for w in ws:
        mine = sorted((s, e) for p, s, e in spans if p == w)
        assert mine, f"worker {w} got nothing"
        assert all(b[0] >= a[1] - 0.002 for a, b in itertools.pairwise(mine)), \
            "two CPU-bound elements shared a worker's core"


def _waits_for_an_element_elsewhere(x, rc):
    if x == 0:
        return rc.take(timeout=20)
    if x == 1:
        rc.put("from 1")
    return x


def test_an_element_waiting_for_one_on_another_worker_does_not_deadlock(ws):
    # Slots go A, B, A, B: 0 runs on A and waits until 1, on B, has run. (One that
    # waited for an element sent behind it to the same worker would wait for good,
    # as in Julia: a worker runs a pool's calls one at a time.)
    rc = fd.RemoteChannel(lambda: fd.Channel(1))
    start = time.monotonic()
    got = fd.pmap(_waits_for_an_element_elsewhere, range(4), [rc] * 4)
    assert got == ["from 1", 1, 2, 3]
    assert time.monotonic() - start < 5


def test_the_function_travels_once_per_worker(ws):
    blob = bytes(range(256)) * 4096  # 1 MB in the closure

    def f(x):
        return len(blob) + x

    before = bytes_sent()
    assert fd.pmap(f, range(100)) == [len(blob) + x for x in range(100)]
    after = bytes_sent()
    for w in ws:
        assert after[w] - before[w] < 2 * len(blob)


def test_the_calling_thread_reads_the_replies_itself(ws, monkeypatch):
    real = pmap_calls.poll_direct_many
    polled = []

    def counting(conns, timeout):
        polled.append(len(conns))
        return real(conns, timeout)

    monkeypatch.setattr(pmap_calls, "poll_direct_many", counting)
    assert [x for x, _ in fd.pmap(_slow_where, range(40))] == list(range(40))
    assert polled and max(polled) == len(ws), "it waited on every busy worker's socket"


def test_other_callers_are_answered_while_a_map_reads_their_connections(ws):
    done = []

    def other_caller():
        for _ in range(50):
            for w in ws:
                done.append(fd.remotecall_fetch(os.getpid, w))

    # The map takes 1.6 s (8 elements of 0.4 s on 2 workers).
    with_map = threading.Thread(target=lambda: fd.pmap(time.sleep, [0.4] * 8))
    with_map.start()
    time.sleep(0.05)
    started = time.monotonic()
    t = threading.Thread(target=other_caller)
    t.start()
    t.join(20)
    took = time.monotonic() - started
    with_map.join(20)
    assert len(done) == 100
    assert took < 1.0, f"the other caller waited {took:.2f} s, as long as the map"


def test_ctrl_c_while_a_map_waits_leaves_the_connections_working(ws):
    sent = []

    def interrupt():
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    threading.Timer(0.3, interrupt).start()
    with pytest.raises(KeyboardInterrupt):
        fd.pmap(time.sleep, [0.5] * 8)  # 2 s in all
    assert time.monotonic() - sent[0] < 0.3, "the interrupt ended the wait at once"
    # The loop thread reads the workers' connections again: calls are answered.
    assert [fd.remotecall_fetch(os.getpid, w) for w in ws] == [os_pid(w) for w in ws]


def _cached_here(x):
    return cached_function_count()


@pytest.mark.parametrize("batch_size", [1, "auto"])
def test_an_importable_function_goes_by_name_and_is_cached_nowhere(ws, batch_size):
    # Named in every call, as remotecall names it: nothing to leave on the workers.
    assert set(fd.pmap(_cached_here, range(40), batch_size=batch_size)) == {0}
    # A lambda goes once per worker, through a cache that lives as long as the map.
    counts = fd.pmap(lambda x: cached_function_count(), range(40), batch_size=batch_size)
    assert min(counts) >= 1
    assert [fd.remotecall_fetch(cached_function_count, w) for w in ws] == [0, 0]


def test_progress_bar_with_tqdm(ws, capfd):
    pytest.importorskip("tqdm")
    assert fd.pmap(lambda x: x, range(40), progress=True) == list(range(40))
    err = capfd.readouterr().err
    assert "40/40" in err and "100%" in err


def test_progress_bar_without_tqdm(ws, capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now fails
    assert fd.pmap(lambda x: x, range(40), progress=True, batch_size=5) == list(range(40))
    err = capfd.readouterr().err
    assert "pmap [" in err and "40/40 100%" in err and err.endswith("\n")
    assert fd.pmap(lambda x: x, range(3), progress=True, distributed=False) == [0, 1, 2]
    assert "3/3 100%" in capfd.readouterr().err


def test_local_mode_uses_threads_of_this_process(ws):
    got = fd.pmap(lambda _: (fd.myid(), threading.get_ident()), range(20), distributed=False)
    assert {p for p, _ in got} == {1}
