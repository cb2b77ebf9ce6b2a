"""The macro family on real workers: spawnat, fetchfrom, fetch_any, everywhere,
distributed, clear, and sync collecting what they start."""

from __future__ import annotations

import operator
import sys
import time
from collections import Counter

import numpy as np
import pytest
from _module_workers import shared_workers

import fastdist as fd
from fastdist.workerpool import cached_function_count

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ws():
    with shared_workers(2) as pids:
        yield pids
        main = sys.modules["__main__"]
        for name in [n for n in vars(main) if n.startswith("sp_")]:
            delattr(main, name)


def main_attr(name, default="<unset>"):
    """A global of this process's __main__ (run it anywhere with fetchfrom)."""
    return getattr(sys.modules["__main__"], name, default)


def call_main(name, *args):
    """Call a function of this process's __main__."""
    return getattr(sys.modules["__main__"], name)(*args)


def everywhere_value(name, ws):
    return [main_attr(name)] + [fd.fetchfrom(w, main_attr, name) for w in ws]


def fail(msg):
    raise ValueError(msg)


# -- spawnat, fetchfrom, fetch_any --------------------------------------------------------


def test_spawnat_and_fetchfrom(ws):
    fut = fd.spawnat(ws[1], fd.myid)
    assert isinstance(fut, fd.Future) and fd.fetch(fut) == ws[1]
    assert fd.spawnat(ws[0], operator.add, 2, 3).fetch() == 5
    assert fd.spawnat(1, fd.myid).fetch() == 1
    assert fd.fetchfrom(ws[0], fd.myid) == ws[0]
    assert fd.fetchfrom(ws[1], lambda a, b=1: a * b, 4, b=5) == 20
    with pytest.raises(fd.RemoteException, match="nope"):
        fd.fetchfrom(ws[0], fail, "nope")
    with pytest.raises(fd.RemoteException, match="nope"):
        fd.spawnat(ws[0], fail, "nope").fetch()
    with pytest.raises(ValueError, match="any"):
        fd.spawnat("all", fd.myid)


def test_any_goes_round_robin_over_the_workers(ws):
    assert sorted(fd.fetch_any(fd.myid) for _ in ws) == sorted(ws)
    assert sorted(fd.spawnat("any", fd.myid).fetch() for _ in ws) == sorted(ws)
    assert sorted(fd.fetchfrom("any", fd.myid) for _ in range(2 * len(ws))) == sorted(ws * 2)


# -- everywhere ---------------------------------------------------------------------------


def test_everywhere_source_runs_in_main_on_every_process(ws):
    assert fd.everywhere("import fastdist\nsp_where = fastdist.myid()") is None
    assert everywhere_value("sp_where", ws) == [1, *ws]
    fd.everywhere("def sp_square(x):\n    return x * x")
    assert fd.fetchfrom(ws[0], call_main, "sp_square", 7) == 49
    assert main_attr("sp_square")(3) == 9


def test_everywhere_binds_variables_first(ws):
    data = np.arange(4)
    fd.everywhere("sp_total = int(sp_data.sum()) + sp_offset", sp_data=data, sp_offset=10)
    assert everywhere_value("sp_total", ws) == [16, 16, 16]


def test_everywhere_on_chosen_processes(ws):
    w, other = ws
    fd.everywhere("sp_count = globals().get('sp_count', 0) + 1", procs=[w, w, w])
    assert fd.fetchfrom(w, main_attr, "sp_count") == 3, "a repeated pid runs again"
    assert fd.fetchfrom(other, main_attr, "sp_count") == "<unset>"
    assert main_attr("sp_count") == "<unset>"
    fd.everywhere("sp_count = globals().get('sp_count', 0) + 1", procs=[1, w, 1])
    assert main_attr("sp_count") == 2
    assert fd.fetchfrom(w, main_attr, "sp_count") == 4


def test_everywhere_on_one_pid_returns_the_value(ws):
    w = ws[1]
    assert fd.everywhere("import fastdist; fastdist.myid() + 1", procs=w) == w + 1
    assert fd.everywhere("sp_defined_on_p = 1", procs=w) == 1, "an assignment's value, as Julia"
    assert fd.everywhere("sp_defined_on_p += 1", procs=[w, w]) is None
    assert fd.everywhere("sp_defined_on_p", procs=w) == 3
    assert fd.everywhere("import os", procs=w) is None
    assert fd.everywhere(lambda: fd.myid() * 2, procs=w) == 2 * w
    assert fd.everywhere("2 * 21", procs=1) == 42


def test_everywhere_runs_here_first_then_the_others_at_once(ws):
    code = ("import time, fastdist\n"
            "sp_t0 = time.monotonic()\n"
            "time.sleep(0.2 if fastdist.myid() == 1 else 0.5)\n"
            "sp_t1 = time.monotonic()\n")
    start = time.monotonic()
    fd.everywhere(code)
    elapsed = time.monotonic() - start
    here_done = main_attr("sp_t1")
    for w in ws:
        assert fd.fetchfrom(w, main_attr, "sp_t0") >= here_done, "pid 1 finished first"
    assert elapsed < 0.2 + 0.5 * len(ws) - 0.2, f"workers ran one after the other ({elapsed:.2f} s)"


def test_everywhere_collects_errors(ws):
    with pytest.raises(fd.CompositeException) as info:
        fd.everywhere("raise ValueError('everywhere on all')")
    errors = info.value.exceptions
    assert [e.pid for e in errors] == [1, *ws]
    for e in errors:
        assert isinstance(e, fd.RemoteException)
        assert isinstance(e.captured.ex, ValueError) and str(e.captured.ex) == "everywhere on all"

    with pytest.raises(fd.CompositeException) as info:
        fd.everywhere("import fastdist\nif fastdist.myid() != 1: raise KeyError('p')",
                      procs=[ws[1], 1, ws[0]])
    assert [e.pid for e in info.value.exceptions] == [ws[1], ws[0]]

    with pytest.raises(fd.RemoteException) as one:
        fd.everywhere("raise ValueError('everywhere on p')", procs=ws[0])
    assert one.value.pid == ws[0] and str(one.value.captured.ex) == "everywhere on p"
    with pytest.raises(fd.RemoteException) as here:
        fd.everywhere("raise ValueError('on myid')", procs=1)
    assert here.value.pid == 1


def test_everywhere_calls_a_callable_on_each_process(ws):
    def sp_setup():
        sys.modules["__main__"].sp_flag = fd.myid() * 100

    assert fd.everywhere(sp_setup) is None
    assert everywhere_value("sp_flag", ws) == [100, *(100 * w for w in ws)]
    with pytest.raises(fd.CompositeException):
        fd.everywhere(lambda: 1 / 0)


def test_everywhere_as_a_decorator_defines_the_function(ws):
    @fd.everywhere
    def sp_triple(x):
        return 3 * x

    assert sp_triple(2) == 6, "the decorator gives the function back"
    assert main_attr("sp_triple")(5) == 15
    for w in ws:
        assert fd.fetchfrom(w, call_main, "sp_triple", 4) == 12

    @fd.everywhere
    def sp_never_called():
        raise AssertionError("defining must not call it")

    assert callable(fd.fetchfrom(ws[0], main_attr, "sp_never_called"))


def test_everywhere_decorator_with_procs(ws):
    @fd.everywhere(procs=[ws[0]])
    def sp_only_on_first():
        return "first"

    assert fd.fetchfrom(ws[0], call_main, "sp_only_on_first") == "first"
    assert fd.fetchfrom(ws[1], main_attr, "sp_only_on_first") == "<unset>"
    assert main_attr("sp_only_on_first") == "<unset>"
    assert sp_only_on_first() == "first"


# -- distributed ----------------------------------------------------------------------------


def test_distributed_reduction(ws):
    squares = sum(i * i for i in range(100))
    assert fd.distributed(lambda i: i * i, range(100), operator.add) == squares
    assert fd.distributed(lambda i: 1, range(1, 101), operator.add) == 100
    assert fd.distributed(lambda i: i, range(1, 3), operator.add) == 3, "a very short range"
    assert fd.distributed(lambda i: i, range(5, 6), operator.add) == 5
    assert fd.distributed(lambda x: x, [1.5, 2.5, 3.0], operator.mul) == 11.25
    assert fd.distributed(lambda x: x, (i for i in range(10)), max) == 9
    assert fd.distributed(float, np.arange(10), operator.add) == 45.0
    assert fd.distributed(str.upper, "abcde", operator.add) == "ABCDE", "order is kept"
    a = 2.0  # captured, like Julia's issue #6760
    assert fd.distributed(lambda _: [a * 3], range(2), operator.add) == [6.0, 6.0]


def test_distributed_splits_into_balanced_contiguous_chunks(ws):
    # Julia: every worker gets M or M+1 iterations, contiguous, in order.
    got = fd.distributed(lambda i: [(fd.myid(), i)], range(7), operator.add)
    assert [i for _, i in got] == list(range(7))
    counts = Counter(p for p, _ in got)
    assert set(counts) == set(ws) and max(counts.values()) - min(counts.values()) <= 1
    owners = [p for p, _ in got]
    assert owners == sorted(owners, key=ws.index), "one contiguous chunk per worker"
    got = fd.distributed(lambda i: [fd.myid()], range(1), operator.add)
    assert len(got) == 1 and got[0] in ws


def test_distributed_errors(ws):
    with pytest.raises(fd.RemoteException, match="bad 3"):
        fd.distributed(lambda i: fail(f"bad {i}") if i == 3 else i, range(10), operator.add)
    with pytest.raises(ValueError, match="no elements"):
        fd.distributed(lambda i: i, [], operator.add)


def test_distributed_without_reducer_returns_futures_at_once(ws):
    results = fd.RemoteChannel(lambda: fd.Channel(100))

    def body(i):
        time.sleep(0.05)
        results.put((fd.myid(), i))

    start = time.monotonic()
    with fd.sync():
        futures = fd.distributed(body, range(10))
        assert time.monotonic() - start < 0.2, "it returns before the loop is done"
        assert len(futures) == len(ws) and all(isinstance(f, fd.Future) for f in futures)
    assert all(f.isready() for f in futures)
    got = [results.take(timeout=5) for _ in range(10)]
    assert sorted(i for _, i in got) == list(range(10))
    assert {p for p, _ in got} == set(ws)
    assert fd.distributed(lambda i: None, []) == []


# -- sync -------------------------------------------------------------------------------------


def test_sync_collects_failures_of_what_it_started(ws):
    with pytest.raises(fd.CompositeException) as info, fd.sync():
        fd.distributed(lambda i: fail(f"loop {i}") if i == 4 else None, range(8))
        fd.spawnat(ws[0], fail, "spawned")
        fd.spawnat(ws[1], fd.myid)
        fd.run_async(fail, "local task")
    messages = sorted(str(getattr(e, "captured", e)).strip().splitlines()[-1]
                      for e in info.value.exceptions)
    assert len(messages) == 3
    assert any("loop 4" in m for m in messages) and any("spawned" in m for m in messages)
    assert any("local task" in m for m in messages)


def test_sync_waits_for_spawned_calls(ws):
    rc = fd.RemoteChannel(lambda: fd.Channel(10))
    with fd.sync():
        for w in ws:
            fd.spawnat(w, lambda ch: (time.sleep(0.1), ch.put(fd.myid())), rc)
    assert sorted(rc.take(timeout=1) for _ in ws) == sorted(ws)


# -- clear ------------------------------------------------------------------------------------


def test_clear_sets_globals_to_none_on_workers(ws):
    fd.everywhere("sp_a = 1; sp_b = [2]; sp_c = 3")
    fd.clear(["sp_a", "sp_b"])
    for w in ws:
        assert fd.fetchfrom(w, main_attr, "sp_a") is None
        assert fd.fetchfrom(w, main_attr, "sp_b") is None
        assert fd.fetchfrom(w, main_attr, "sp_c") == 3
    assert main_attr("sp_a") == 1, "pid 1 is not among the default pids"
    fd.clear("sp_c", pids=ws[0])
    assert fd.fetchfrom(ws[0], main_attr, "sp_c") is None
    assert fd.fetchfrom(ws[1], main_attr, "sp_c") == 3
    fd.clear("sp_c", pids=[1, ws[1]])
    assert main_attr("sp_c") is None and fd.fetchfrom(ws[1], main_attr, "sp_c") is None
    fd.clear("sp_never_defined")  # skipped where absent
    assert fd.fetchfrom(ws[0], main_attr, "sp_never_defined") == "<unset>"
    with pytest.raises(ValueError):
        fd.clear("not a name")


def test_clear_refuses_constants(ws):
    fd.everywhere("from typing import Final\nsp_limit: Final = 10", procs=ws)
    with pytest.raises(fd.CompositeException) as info:
        fd.clear("sp_limit")
    assert len(info.value.exceptions) == len(ws)
    assert all("constant" in str(e) for e in info.value.exceptions)
    assert fd.fetchfrom(ws[0], main_attr, "sp_limit") == 10


def test_clear_other_module(ws):
    fd.everywhere("import json; json.sp_marker = 5", procs=ws)
    fd.clear("sp_marker", mod="json")
    assert fd.fetchfrom(ws[1], lambda: __import__("json").sp_marker) is None


def test_clear_a_caching_pool(ws):
    pool = fd.CachingPool(ws)
    big = np.ones(1000)
    assert fd.pmap(lambda i: big[i], pool, range(20)) == [1.0] * 20
    assert all(fd.fetchfrom(w, cached_function_count) >= 1 for w in ws)
    assert fd.clear(pool) is pool
    assert [fd.fetchfrom(w, cached_function_count) for w in ws] == [0, 0]
