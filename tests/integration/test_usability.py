"""What a new user trips over: a clear error for a wrong keyword or timeout, keywords that
pass through untouched, and nothing shipped back that nobody asked for."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

import fastdist as fd
from fastdist.exceptions import FutureAlreadySetError

pytestmark = pytest.mark.timeout(90)


# -- addprocs keywords ----------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "meant"), [
    ({"evn": {"A": "1"}}, "did you mean 'env'"),
    ({"exe_flags": ("-X", "dev")}, "did you mean 'exeflags'"),
    ({"enable_threaded_blass": True}, "did you mean 'enable_threaded_blas'"),
    ({"tunnel": True}, "does not apply to LocalManager"),
    ({"bogus": 1}, "not an addprocs keyword"),
])
def test_addprocs_refuses_a_keyword_local_workers_do_not_read(cluster, kwargs, meant):
    name = next(iter(kwargs))
    with pytest.raises(TypeError, match=rf"'{name}'.*{meant}"):
        cluster.add(1, **kwargs)
    assert fd.workers() == [1], "no worker may start when a keyword is refused"


def test_addprocs_refuses_keywords_of_another_manager():
    with pytest.raises(TypeError, match=r"'restrict' for SSHManager"):
        fd.addprocs(["nohost.invalid"], restrict=False)
    with pytest.raises(TypeError, match=r"'partition' for SlurmManager.*SlurmManager\(np, "):
        fd.addprocs(fd.SlurmManager(1), partition="debug")
    with pytest.raises(TypeError, match="count, a list of machines or a ClusterManager"):
        fd.addprocs(True)
    assert fd.workers() == [1]


class _OwnKeywords(fd.ClusterManager):
    """A user's manager: it reads a keyword of its own from `params`."""

    def __init__(self) -> None:
        self.seen: dict[str, object] = {}

    def launch(self, params, launched, launch_ntfy):
        self.seen = dict(params)
        with launch_ntfy:
            launch_ntfy.notify_all()

    def manage(self, pid, config, op):
        pass


def test_a_users_manager_gets_every_keyword():
    m = _OwnKeywords()
    assert fd.addprocs(m, queue="long", topology="all_to_all") == []
    assert m.seen["queue"] == "long"


# -- keywords named like fastdist's own parameters pass through -----------------------

def _echo(**kwargs):
    return sorted(kwargs.items())


@pytest.mark.parametrize("call", [
    lambda p: fd.remotecall_fetch(_echo, p, f=1, fn=2, pool=3, pid=4),
    lambda p: fd.fetch(fd.remotecall(_echo, p, f=1, fn=2, pool=3, pid=4)),
    lambda p: fd.fetch(fd.remotecall_wait(_echo, p, f=1, fn=2, pool=3, pid=4)),
    lambda p: fd.fetch(fd.spawnat(p, _echo, f=1, fn=2, pool=3, pid=4)),
    lambda p: fd.fetchfrom(p, _echo, f=1, fn=2, pool=3, pid=4),
    lambda p: fd.Executor().submit(_echo, f=1, fn=2, pool=3, pid=4).result(timeout=30),
], ids=["remotecall_fetch", "remotecall", "remotecall_wait", "spawnat", "fetchfrom",
        "Executor.submit"])
def test_keywords_named_f_fn_pool_reach_the_function(two_workers, call):
    assert call(two_workers[0]) == [("f", 1), ("fn", 2), ("pid", 4), ("pool", 3)]


def test_remote_do_passes_a_keyword_named_f(two_workers):
    rc = fd.RemoteChannel(lambda: fd.Channel(1), two_workers[1])
    fd.remote_do(lambda rc, **kw: rc.put(kw), two_workers[0], rc, f=1, pool=2)
    assert rc.take(timeout=30) == {"f": 1, "pool": 2}


# -- timeouts ---------------------------------------------------------------------------

BAD_TIMEOUTS = [(float("nan"), ValueError, "nan"), ("1", TypeError, "str '1'"),
                (-1, ValueError, ">= 0"), (True, TypeError, "bool")]


@pytest.mark.parametrize(("timeout", "error", "says"), BAD_TIMEOUTS)
def test_a_bad_timeout_is_refused_at_once(two_workers, timeout, error, says):
    p = two_workers[0]
    fut = fd.remotecall(time.sleep, p, 0.2)
    rc = fd.RemoteChannel(lambda: fd.Channel(1), p)
    local = fd.Channel(1)
    waits = [lambda: fd.fetch(fut, timeout=timeout), lambda: fd.wait(fut, timeout=timeout),
             lambda: fd.take(rc, timeout=timeout), lambda: fd.put(rc, 1, timeout=timeout),
             lambda: rc.fetch(timeout=timeout), lambda: rc.wait(timeout=timeout),
             lambda: local.take(timeout=timeout),
             lambda: fd.default_worker_pool().take(timeout=timeout),
             lambda: fd.run_async(int, "1").wait(timeout)]
    for wait in waits:
        start = time.monotonic()
        with pytest.raises(error, match=rf"timeout.*{says}"):
            wait()
        assert time.monotonic() - start < 5
    assert fd.fetch(fut, timeout=30) is None  # and the call itself went on
    assert not fd.isready(rc)


def test_infinite_timeout_means_no_limit(two_workers):
    fut = fd.remotecall(lambda: 5, two_workers[0])
    assert fd.fetch(fut, timeout=math.inf) == 5


def test_rmprocs_refuses_a_bad_waitfor_before_removing_anything(cluster):
    pids = cluster.add(1)
    with pytest.raises(TypeError, match="waitfor"):
        fd.rmprocs(pids, waitfor="1")
    assert fd.remotecall_fetch(fd.myid, pids[0]) == pids[0]


def test_rmprocs_timeout_says_the_removal_goes_on(cluster):
    pids = cluster.add(1)
    with pytest.raises(TimeoutError, match="removal goes on"):
        fd.rmprocs(pids, waitfor=0.0001)
    deadline = time.monotonic() + 30
    while pids[0] in fd.workers():
        assert time.monotonic() < deadline, f"worker {pids[0]} was never removed"
        time.sleep(0.05)


# -- put on a remotecall Future ---------------------------------------------------------

def test_put_on_a_remotecall_future_is_refused_and_the_result_kept(two_workers):
    fut = fd.remotecall(lambda: "real", two_workers[0])
    with pytest.raises(FutureAlreadySetError, match="set by its call"):
        fd.put(fut, "mine")
    assert fd.fetch(fut, timeout=30) == "real"
    done = fd.remotecall_wait(lambda: "done", two_workers[0])
    with pytest.raises(FutureAlreadySetError):
        fd.put(done, "mine")
    assert fd.fetch(done) == "done"


# -- stats()["refs"] -----------------------------------------------------------------------

def _keep(refs: list) -> None:
    import __main__

    __main__.US_KEPT = refs


def _fetch_kept() -> list:
    import __main__

    return [fd.fetch(f) for f in __main__.US_KEPT]


def test_stats_refs_counts_the_values_a_process_holds(two_workers):
    p, q = two_workers
    before = fd.stats(p)["refs"]
    futs = [fd.Future(p) for _ in range(3)]  # owned by p: their values are stored there
    fd.remotecall_fetch(_keep, q, futs)  # and held by q as well as here
    assert fd.stats(p)["refs"] == before, "a Future with no value stores nothing yet"
    for i, f in enumerate(futs):
        fd.put(f, i)
    rc = fd.RemoteChannel(lambda: fd.Channel(1), p)
    assert fd.stats(p)["refs"] == before + 4
    assert fd.remotecall_fetch(_fetch_kept, q) == [0, 1, 2]
    del futs, f
    fd.remotecall_fetch(_keep, q, [])
    assert _eventually(lambda: fd.stats(p)["refs"] == before + 1)
    del rc
    assert _eventually(lambda: fd.stats(p)["refs"] == before)


def _eventually(pred, timeout: float = 20) -> bool:
    import gc

    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        gc.collect()
        time.sleep(0.05)
    return True


# -- everywhere sends nothing back ----------------------------------------------------

def _main_summary() -> tuple[str, int]:
    import __main__

    return type(__main__.US_LOCK).__name__, int(__main__.US_BIG.sum())


def test_everywhere_code_on_several_processes_returns_nothing(two_workers):
    before = {p: fd.stats(1)["peers"].get(p, {}).get("bytes_received", 0)
              for p in two_workers}
    # The code's last expression is a lock (unpicklable), then a 40 MB array: neither
    # may travel back, and both are defined everywhere.
    try:
        assert fd.everywhere("import threading; US_LOCK = threading.Lock(); US_LOCK") is None
        assert fd.everywhere("import numpy as np; US_BIG = np.ones(5_000_000); US_BIG") is None
        for p in two_workers:
            got = fd.stats(1)["peers"][p]["bytes_received"] - before[p]
            assert got < 1_000_000, f"worker {p} sent {got} bytes back"
            assert fd.remotecall_fetch(_main_summary, p) == (
                type(threading.Lock()).__name__, 5_000_000)
        assert _main_summary()[1] == 5_000_000
    finally:
        fd.everywhere("US_LOCK = US_BIG = None")


# -- remote errors: the user's frames, caught by their own type ------------------------

def _divide(x):
    scaled = x * 2
    return 10 / (scaled - scaled)


class _CodeError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)  # all of them in args: it pickles
        self.code = code


def _raise_code_error():
    raise _CodeError("failed", 42)


FASTDIST_FRAMES = ("fastdist/handlers.py", "_calls.pyx", "fastdist/pmap/worker.py",
                   "fastdist/remotecall.py", "fastdist/requests.py")


def _remote_text(err: BaseException) -> str:
    text = str(err)
    assert text.startswith("On worker "), text
    return text


@pytest.mark.parametrize("run", [
    lambda p: fd.remotecall_fetch(_divide, p, 3),
    lambda p: fd.fetch(fd.remotecall(_divide, p, 3)),
    lambda p: fd.pmap(_divide, [3], retry_delays=[]),
    lambda p: fd.Executor().submit(_divide, 3).result(timeout=30),
], ids=["remotecall_fetch", "remotecall", "pmap", "Executor"])
def test_a_remote_traceback_shows_the_users_code_and_not_fastdists(two_workers, run):
    with pytest.raises(ZeroDivisionError) as info:
        run(two_workers[0])
    text = _remote_text(info.value)
    assert f'File "{__file__}", line' in text and "in _divide" in text
    assert "return 10 / (scaled - scaled)" in text, "the source line, as the file is there"
    for ours in FASTDIST_FRAMES:
        assert ours not in text, f"{ours} in what the user sees:\n{text}"


def test_a_remote_error_is_caught_by_its_own_type_and_keeps_its_fields(two_workers):
    p = two_workers[0]
    with pytest.raises(_CodeError) as info:
        fd.remotecall_fetch(_raise_code_error, p)
    err = info.value
    assert isinstance(err, fd.RemoteException) and err.pid == p
    assert err.code == 42 and err.captured.ex.code == 42
    assert isinstance(err.__cause__, _CodeError)
    with pytest.raises(FileNotFoundError) as oserr:
        fd.remotecall_fetch(open, p, "/no/such/file")
    assert oserr.value.errno == 2 and oserr.value.filename == "/no/such/file"


def test_except_star_matches_remote_errors_by_their_cause(two_workers):
    caught = {}
    try:
        with fd.sync():
            fd.spawnat(two_workers[0], _divide, 1)
            fd.spawnat(two_workers[1], int, "not a number")
            fd.spawnat(two_workers[1], abs, -1)
    except* ZeroDivisionError as group:
        caught["zero"] = group.exceptions
    except* ValueError as group:
        caught["value"] = group.exceptions
    assert sorted(caught) == ["value", "zero"]
    assert [e.pid for e in caught["zero"]] == [two_workers[0]]
    assert "invalid literal" in str(caught["value"][0].__cause__)


def _stop():
    raise StopIteration(7)


def test_remote_interrupt_and_stop_iteration_are_never_taken_for_local_ones(two_workers):
    p = two_workers[0]
    fut = fd.remotecall(time.sleep, p, 30)
    time.sleep(0.3)
    fd.interrupt(p)
    with pytest.raises(fd.RemoteException) as info:
        fd.fetch(fut, timeout=30)
    assert not isinstance(info.value, KeyboardInterrupt)
    assert isinstance(info.value.__cause__, KeyboardInterrupt)
    # A remote StopIteration must not end a loop that fetches it without a word.
    got = []
    with pytest.raises(fd.RemoteException) as info:
        for x in (fd.remotecall_fetch(_stop, p) if i else i for i in range(2)):
            got.append(x)
    assert not isinstance(info.value, StopIteration)
    assert got == [0]


# -- typed memoryviews ------------------------------------------------------------------

def _describe(view: memoryview) -> tuple:
    return view.format, view.shape, view.tolist()


@pytest.mark.parametrize("view", [
    memoryview(np.arange(6, dtype=np.int64).reshape(2, 3)),
    memoryview(np.arange(1 << 20, dtype=np.float64).reshape(1024, 1024)),  # shared memory
], ids=["int64 2x3", "8 MB float64 1024x1024"])
def test_a_typed_memoryview_arrives_as_it_was_sent(two_workers, view):
    assert fd.remotecall_fetch(_describe, two_workers[0], view) == _describe(view)
    back = fd.remotecall_fetch(lambda v: v, two_workers[0], view)
    assert (back.format, back.shape) == (view.format, view.shape)


# -- large data sent again with every call ------------------------------------------------

@pytest.fixture
def fresh_resent_warning(monkeypatch):
    from fastdist.protocol import resent

    monkeypatch.setattr(resent, "_warned", False)
    monkeypatch.setattr(resent, "_seen", type(resent._seen)())
    return resent


def test_large_data_sent_again_is_warned_about_once(two_workers, fresh_resent_warning):
    p = two_workers[0]
    table = np.arange(2 * fresh_resent_warning.LARGE_BYTES // 8, dtype=np.float64)
    assert fd.remotecall_fetch(lambda i: table[i], p, 0) == 0  # once: no warning
    with pytest.warns(fresh_resent_warning.ResentDataWarning) as caught:
        for i in range(1, 6):  # the closure carries the table every time
            assert fd.remotecall_fetch(lambda i: table[i], p, i) == i
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "CachingPool" in message and "SharedArray" in message
    assert caught[0].filename == __file__, "the warning points at the user's call"


def test_one_large_call_or_different_data_is_not_warned_about(two_workers,
                                                              fresh_resent_warning):
    import warnings

    n = fresh_resent_warning.LARGE_BYTES // 8 + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", fresh_resent_warning.ResentDataWarning)
        for i in range(3):
            assert fd.remotecall_fetch(np.sum, two_workers[0], np.full(n, i)) == n * i


# -- Ctrl-C on a long pmap ----------------------------------------------------------------

LONG_PMAP = """
import time
import fastdist as fd

def slow(x):
    time.sleep(0.05)
    return x

fd.addprocs(2)
print("mapping", flush=True)
fd.pmap(slow, range(100_000))
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_on_a_long_pmap_gives_one_short_traceback(tmp_path, presses):
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "long_pmap.py"
    script.write_text(LONG_PMAP)
    for _ in range(3):
        # Its own session: Ctrl-C in a terminal signals the whole group, workers too.
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            assert proc.stdout.readline() == "mapping\n"
            time.sleep(0.5)
            for _ in range(presses):
                os.killpg(proc.pid, signal.SIGINT)
                time.sleep(0.001)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert err.count("Traceback") == 1 and "During handling" not in err, err
        lines = err.strip().splitlines()
        assert lines[-1] == "KeyboardInterrupt", err
        assert len(lines) <= 8, err
        assert "engine.py" not in err and "_msgloop" not in err, err


def test_a_caching_pool_given_a_new_closure_each_time_is_warned_about(two_workers,
                                                                      fresh_resent_warning):
    table = np.arange(2 * fresh_resent_warning.LARGE_BYTES // 8, dtype=np.float64)
    pool = fd.CachingPool(two_workers[:1])
    at = lambda i: table[i]  # noqa: E731 - one function: sent once (one worker), no warning
    assert [fd.remotecall_fetch(at, pool, i) for i in range(4)] == [0, 1, 2, 3]
    assert not fresh_resent_warning._warned
    with pytest.warns(fresh_resent_warning.ResentDataWarning):
        for i in range(3):  # a new lambda each time: a new function, sent again
            assert fd.remotecall_fetch(lambda i: table[i], pool, i) == i
