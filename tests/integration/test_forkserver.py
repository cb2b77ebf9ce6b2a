"""Workers forked by the fork server behave as fresh processes, and never outlive their master."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from support import UNJOINED_MASTER, collect_printed, os_alive, reap_master, wait_until

import fastdist as fd
from fastdist import forkserver
from fastdist import node as _node

pytestmark = pytest.mark.timeout(60)


# -- helpers ------------------------------------------------------------------------------


def handle(pid):
    """The Popen-like handle the master keeps for worker `pid`."""
    return _node.current().peers[pid].config.process


def say(text, stream="stdout"):
    print(text, file=getattr(sys, stream))


def py_getenv(name):
    # `os.environ.get` itself would travel by value, with the master's environment.
    return os.environ.get(name)


def c_getenv(name):
    """The variable as C code (BLAS, OpenMP) sees it, not os.environ's copy."""
    import ctypes

    getenv = ctypes.CDLL(None).getenv
    getenv.restype = ctypes.c_char_p
    value = getenv(name.encode())
    return value.decode() if value is not None else None


def blas_vars():
    return {v: (os.environ.get(v), c_getenv(v))
            for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def import_value(module):
    import importlib

    return importlib.import_module(module).VALUE


def master_env(**extra):
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **extra)


# -- forked workers are workers -----------------------------------------------------------


def test_workers_are_forked_by_one_single_threaded_server_without_numpy(cluster):
    pids = cluster.add(2)
    server = forkserver.server_pid()
    assert server is not None
    assert [fd.remotecall_fetch(os.getppid, p) for p in pids] == [server, server]
    assert fd.remotecall_fetch(sum, pids[0], [1, 2, 3]) == 6
    for p in pids:
        h = handle(p)
        assert isinstance(h, forkserver.ForkedProcess)
        assert h.pid == fd.remotecall_fetch(os.getpid, p)
        assert h.poll() is None and h.returncode is None
    with open(f"/proc/{server}/status") as f:
        assert "Threads:\t1\n" in f.read()  # forking is only safe with one thread
    with open(f"/proc/{server}/maps") as f:
        maps = f.read().lower()
    assert "numpy" not in maps and "blas" not in maps
    # A second addprocs reuses the server.
    (more,) = cluster.add(1)
    assert fd.remotecall_fetch(os.getppid, more) == server


def test_the_cookie_is_in_no_command_line(cluster):
    (w,) = cluster.add(1)
    cookie = fd.cluster_cookie().encode()
    for pid in (forkserver.server_pid(), handle(w).pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert cookie not in f.read()


def test_worker_main_and_argv_are_those_of_python_m_fastdist_worker(cluster):
    (w,) = cluster.add(1)
    argv, main_names = fd.remotecall_fetch(
        lambda: (sys.argv, sorted(k for k in vars(sys.modules["__main__"])
                                  if not k.startswith("__"))), w)
    assert argv[0].endswith(os.path.join("fastdist", "worker.py"))
    assert argv[1:] == ["--bind-to", "127.0.0.1", "--separate-stderr"]
    assert "serve" not in main_names and "main" in main_names
    fd.everywhere("forked_value = 7")
    assert fd.remotecall_fetch(lambda: sys.modules["__main__"].forked_value, w) == 7


def draw():
    # `random.random` itself would travel by value, with the master's generator state.
    return random.random()


def test_every_worker_gets_its_own_random_state(cluster):
    pids = cluster.add(3)
    draws = [fd.remotecall_fetch(draw, p) for p in pids]
    assert len(set(draws)) == 3


def test_output_reaches_the_master_prefixed(cluster):
    a, b = cluster.add(2)
    with collect_printed() as printed:
        fd.remotecall_fetch(say, a, "forked hello")
        fd.remotecall_fetch(say, b, "forked warning", "stderr")
        printed.wait_for("forked warning", "err")
        seen = printed.wait_for("forked hello")
    assert f"From worker {a}:\tforked hello\n" in seen["out"]
    assert f"From worker {b}:\tforked warning\n" in seen["err"]


def test_output_printed_just_before_exit_still_arrives(cluster):
    (w,) = cluster.add(1)
    h = handle(w)
    with collect_printed() as printed:
        fd.remote_do(lambda: (print("last words"), os._exit(0)), w)
        seen = printed.wait_for("last words")
    assert f"From worker {w}:\tlast words\n" in seen["out"]
    assert h.wait(10) == 0


def test_one_blas_thread_unless_threaded_blas_is_enabled(cluster, monkeypatch):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    (single,) = cluster.add(1)
    assert set(fd.remotecall_fetch(blas_vars, single).values()) == {("1", "1")}
    (threaded,) = cluster.add(1, enable_threaded_blas=True)
    assert set(fd.remotecall_fetch(blas_vars, threaded).values()) == {(None, None)}


def blas_threads_started_by_numpy():
    """Native threads that importing numpy (and a matmul) started: OpenBLAS's pool."""
    import threading
    import time

    def native():
        # Threads of this process that are not Python threads, by thread id: counts
        # would be off by one while a Python thread (a start-up watcher) is exiting.
        python = {t.native_id for t in threading.enumerate()}
        return {int(tid) for tid in os.listdir("/proc/self/task")} - python

    before = native()
    import numpy

    numpy.ones((64, 64)) @ numpy.ones((64, 64))
    started = native() - before
    time.sleep(0.05)  # a Python thread caught between leaving threading and exiting
    return len(started & native())


def test_numpy_on_a_worker_obeys_that_workers_blas_setting(cluster):
    pytest.importorskip("numpy")
    (single,) = cluster.add(1)
    (threaded,) = cluster.add(1, enable_threaded_blas=True,
                              env={"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"})
    assert fd.remotecall_fetch(lambda: "numpy" in sys.modules, single) is False
    assert fd.remotecall_fetch(blas_threads_started_by_numpy, single) == 0
    assert fd.remotecall_fetch(blas_threads_started_by_numpy, threaded) >= 1


def test_env_reaches_workers_and_their_c_environment(cluster):
    (w,) = cluster.add(1, env={"FASTDIST_FORK_TEST": "héllo wörld"})
    assert fd.remotecall_fetch(py_getenv, w, "FASTDIST_FORK_TEST") == "héllo wörld"
    assert fd.remotecall_fetch(c_getenv, w, "FASTDIST_FORK_TEST") == "héllo wörld"


def test_master_environment_changes_after_the_server_started_reach_workers(cluster,
                                                                           monkeypatch):
    cluster.add(1)  # the server is running
    monkeypatch.setenv("FASTDIST_SET_LATER", "later")
    monkeypatch.delenv("HOME", raising=False)
    (w,) = cluster.add(1)
    assert fd.remotecall_fetch(py_getenv, w, "FASTDIST_SET_LATER") == "later"
    assert fd.remotecall_fetch(py_getenv, w, "HOME") is None


def test_dir_sets_the_working_directory_and_import_path(cluster, tmp_path):
    (tmp_path / "forked_dir_module.py").write_text("VALUE = 42\n")
    here = os.getcwd()
    (w,) = cluster.add(1, dir=str(tmp_path))
    assert fd.remotecall_fetch(os.getcwd, w) == str(tmp_path)
    assert fd.remotecall_fetch(lambda: sys.path[0], w) == str(tmp_path)
    assert fd.remotecall_fetch(import_value, w, "forked_dir_module") == 42
    assert os.getcwd() == here


def test_a_missing_dir_fails_addprocs_as_before(cluster, tmp_path):
    with pytest.raises(fd.ClusterError, match="FileNotFoundError"):
        fd.addprocs(1, dir=str(tmp_path / "missing"))
    assert fd.workers() == [1]


def test_sys_path_added_after_the_server_started_reaches_new_workers(cluster, tmp_path,
                                                                     monkeypatch):
    cluster.add(1)  # the server is running, with the old sys.path
    (tmp_path / "forked_late_module.py").write_text("VALUE = 'late'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (w,) = cluster.add(1)
    assert fd.remotecall_fetch(import_value, w, "forked_late_module") == "late"


# -- exits and signals --------------------------------------------------------------------


def test_sigkill_of_a_worker_fails_its_calls_and_the_handle_reports_it(cluster):
    a, b = cluster.add(2)
    h = handle(a)
    fut = fd.remotecall(time.sleep, a, 30)
    os.kill(h.pid, signal.SIGKILL)
    with pytest.raises(fd.ProcessExitedException):
        fut.fetch()
    assert h.wait(10) == -signal.SIGKILL
    assert h.poll() == -signal.SIGKILL
    wait_until(lambda: a not in fd.workers(), 10, "the killed worker to be removed")
    assert fd.remotecall_fetch(lambda: 5, b) == 5
    with pytest.raises(subprocess.TimeoutExpired):
        handle(b).wait(0.01)


def test_signals_go_through_the_server(cluster):
    (w,) = cluster.add(1)
    h = handle(w)
    h.terminate()
    assert h.wait(10) == -signal.SIGTERM
    h.kill()  # after the exit: nothing happens, as with Popen
    wait_until(lambda: w not in fd.workers(), 10, "the terminated worker to be removed")


def test_rmprocs_reaps_forked_workers(cluster):
    pids = cluster.add(3)
    handles = [handle(p) for p in pids]
    fd.rmprocs(pids, waitfor=30)
    for h in handles:
        assert h.wait(10) == 0
    # Reaped, not zombies: the pids are gone.
    wait_until(lambda: not any(os.path.exists(f"/proc/{h.pid}") for h in handles), 5,
               "the removed workers to be reaped")


def test_a_killed_server_leaves_its_workers_serving_and_is_replaced(cluster):
    a, b = cluster.add(2)
    old = forkserver.server_pid()
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: forkserver.server_pid() is None, 10, "the master to see its server die")
    assert fd.remotecall_fetch(lambda: 6, a) == 6
    orphans = [handle(a), handle(b)]
    fd.rmprocs([a, b], waitfor=30)
    for h in orphans:
        assert h.wait(10) is not None  # the exit code itself died with the server
        assert not os_alive(h.pid)
    (c,) = cluster.add(1)
    assert forkserver.server_pid() not in (None, old)
    assert fd.remotecall_fetch(os.getppid, c) == forkserver.server_pid()


# -- when a fresh process is started instead ----------------------------------------------


def test_fastdist_forkserver_0_starts_fresh_processes(cluster, monkeypatch):
    monkeypatch.setenv("FASTDIST_FORKSERVER", "0")
    pids = cluster.add(2)
    assert [fd.remotecall_fetch(os.getppid, p) for p in pids] == [os.getpid()] * 2
    assert all(isinstance(handle(p), subprocess.Popen) for p in pids)


def test_custom_exeflags_start_fresh_processes(cluster):
    (w,) = cluster.add(1, exeflags=["-B"])
    assert fd.remotecall_fetch(os.getppid, w) == os.getpid()
    assert fd.remotecall_fetch(lambda: sys.flags.dont_write_bytecode, w) == 1


def test_an_interpreter_startup_variable_starts_a_fresh_process(cluster):
    (w,) = cluster.add(1, env={"PYTHONHASHSEED": "0"})
    assert fd.remotecall_fetch(os.getppid, w) == os.getpid()
    assert fd.remotecall_fetch(lambda: sys.flags.hash_randomization, w) == 0


def test_an_environment_too_large_to_send_starts_fresh_processes(cluster, capfd):
    # Two variables, each below the kernel's limit for one (128 KiB), together above ours.
    big = "x" * (forkserver.MAX_MESSAGE_NBYTES // 2 + 1000)
    (w,) = cluster.add(1, env={"FASTDIST_BIG1": big, "FASTDIST_BIG2": big})
    assert fd.remotecall_fetch(os.getppid, w) == os.getpid()
    assert fd.remotecall_fetch(py_getenv, w, "FASTDIST_BIG2") == big
    assert "starting the remaining workers as fresh processes" in capfd.readouterr().err
    (forked,) = cluster.add(1)  # the server serves on
    assert fd.remotecall_fetch(os.getppid, forked) == forkserver.server_pid()


FALLBACK_MASTER = """\
import os, sys
from fastdist import forkserver
import fastdist as fd

forkserver.server_command = lambda: [sys.executable, "-c", "raise SystemExit(3)"]
for _ in range(2):
    pids = fd.addprocs(2)
    print(*(fd.remotecall_fetch(os.getppid, p) == os.getpid() for p in pids), flush=True)
    fd.rmprocs(pids, waitfor=30)
"""


def test_a_server_that_cannot_start_falls_back_to_fresh_processes_and_says_so_once(tmp_path):
    path = tmp_path / "master.py"
    path.write_text(FALLBACK_MASTER)
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          env=master_env(), timeout=50)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n") == ["True True", "True True", ""]
    assert done.stderr.count("fork server could not start") == 1, done.stderr
    assert "exited with code 3" in done.stderr


# -- nothing outlives the master ----------------------------------------------------------


MASTER_SCRIPT = """\
import os, sys, time
from fastdist import forkserver
import fastdist as fd

pids = fd.addprocs(2)
ospids = [fd.remotecall_fetch(os.getpid, p) for p in pids]
print(forkserver.server_pid(), *ospids, flush=True)
if sys.argv[1] == "sleep":
    time.sleep(600)
"""


@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_neither_server_nor_workers_outlive_the_master(tmp_path, how):
    path = tmp_path / "master.py"
    path.write_text(textwrap.dedent(MASTER_SCRIPT))
    master = subprocess.Popen([sys.executable, str(path), "sleep" if how == "sigkill" else ""],
                              stdout=subprocess.PIPE, env=master_env(), start_new_session=True)
    left = []
    try:
        left = [int(x) for x in master.stdout.readline().split()]
        assert len(left) == 3, left
        if how == "sigkill":
            master.kill()
        master.wait(20)
        wait_until(lambda: not any(os_alive(p) for p in left), 5,
                   f"the fork server and workers {left} to exit with their master")
    finally:
        reap_master(master, left)


def test_unjoined_forked_workers_exit_with_a_killed_master(tmp_path):
    path = tmp_path / "master.py"
    path.write_text(UNJOINED_MASTER)
    master = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE,
                              env=master_env(FASTDIST_WORKER_TIMEOUT="60"),
                              start_new_session=True)
    ospids = []
    try:
        for _ in range(2):
            ospids.append(int(master.stdout.readline()))
        with open(f"/proc/{ospids[0]}/stat") as f:
            server = int(f.read().rsplit(")", 1)[1].split()[1])
        assert server != master.pid  # forked, not started by the master
        master.kill()
        master.wait(10)
        wait_until(lambda: not any(os_alive(p) for p in [server, *ospids]), 5,
                   "the server and its unjoined workers to exit")
    finally:
        reap_master(master, ospids)
