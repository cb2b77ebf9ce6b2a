"""A cluster manager with its own transport (examples/custom_transport.py): workers reached
over a Unix socketpair wrapped as file objects, not TCP. Calls, futures, channels, errors,
large data and pmap work over it; a worker never outlives the stream to its master."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support import eventually, workers_outlive_a_crashed_master
from support import os_alive as alive

import fastdist as fd

pytestmark = pytest.mark.timeout(60)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_transport.py"


def load_example():
    spec = importlib.util.spec_from_file_location("custom_transport", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["custom_transport"] = module
    spec.loader.exec_module(module)
    return module


example = load_example()


@pytest.fixture
def stream_workers(cluster):
    pids = fd.addprocs(example.SocketPairManager(2), topology="master_worker")
    cluster.pids.extend(pids)
    return pids


def square(x):
    return x * x


def test_connections_are_streams_not_sockets(stream_workers):
    from fastdist import node
    from fastdist.transport import StreamConnection

    for pid in stream_workers:
        conn = node.current().peers[pid].conn
        assert isinstance(conn, StreamConnection)
        config = node.current().peers[pid].config
        assert config.io is None and config.port is None


def test_remote_calls_over_the_stream(stream_workers):
    a, b = stream_workers
    assert [fd.remotecall_fetch(fd.myid, p) for p in stream_workers] == stream_workers
    assert fd.remotecall_fetch(os.getpid, a) != os.getpid()
    fut = fd.remotecall(square, b, 12)
    assert isinstance(fut, fd.Future) and fd.fetch(fut) == 144
    assert fd.remotecall_wait(square, a, 3).fetch() == 9
    fd.remote_do(square, a, 1)
    with pytest.raises(fd.RemoteException, match="ValueError"):
        fd.remotecall_fetch(int, b, "not a number")
    # a second call after an error: the stream stays in sync
    assert fd.remotecall_fetch(square, b, 5) == 25
    big = np.arange(2_000_000, dtype=np.float64)
    back = fd.remotecall_fetch(lambda x: x * 2, a, big)
    np.testing.assert_array_equal(back, big * 2)
    stats = fd.stats()["peers"][a]
    assert stats["bytes_sent"] > big.nbytes and stats["bytes_received"] > big.nbytes


def test_remote_channels_over_the_stream(stream_workers):
    a, b = stream_workers
    on_master = fd.RemoteChannel(lambda: fd.Channel(10))
    fd.remotecall_wait(lambda ch: [ch.put(i) for i in range(5)], a, on_master)
    assert [fd.take(on_master) for _ in range(5)] == list(range(5))
    on_worker = fd.RemoteChannel(lambda: fd.Channel(10), b)
    for i in range(4):
        fd.put(on_worker, i)
    assert fd.isready(on_worker)
    assert fd.remotecall_fetch(lambda: sum(fd.take(on_worker) for _ in range(4)), b) == 6
    fd.close(on_worker)
    with pytest.raises(fd.ChannelClosedError):
        fd.put(on_worker, 1)


def test_pmap_over_the_stream(stream_workers):
    if not hasattr(fd, "pmap"):
        pytest.fail("fastdist.pmap is missing")
    assert fd.pmap(square, range(20)) == [x * x for x in range(20)]
    seen = fd.pmap(lambda _: fd.myid(), range(20), batch_size=2)
    assert set(seen) <= set(stream_workers)


def test_rmprocs_and_interrupt_over_the_stream(stream_workers):
    a, b = stream_workers
    ospid = fd.remotecall_fetch(os.getpid, a)
    fut = fd.remotecall(lambda: [time.sleep(0.05) for _ in range(600)], b)
    time.sleep(0.3)
    fd.interrupt(b)
    with pytest.raises(fd.RemoteException, match="KeyboardInterrupt"):
        fd.fetch(fut, timeout=10)
    fd.rmprocs(a, waitfor=10)
    assert a not in fd.workers()
    assert eventually(lambda: not alive(ospid), 10)
    assert fd.remotecall_fetch(fd.myid, b) == b


# -- a worker never outlives its master's stream ----------------------------------------


def start_bare_worker(env_extra=None):
    """The example's worker side, with the test holding the master's end of the socketpair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
               **(env_extra or {}))
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), "--worker", str(theirs.fileno())],
                            pass_fds=(theirs.fileno(),), stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    theirs.close()
    proc.stdin.write(b"some-cookie\n")
    proc.stdin.close()
    return ours, proc


def test_worker_exits_when_master_closes_before_joining():
    ours, proc = start_bare_worker()
    with proc:
        ours.close()
        t0 = time.monotonic()
        assert proc.wait(timeout=20) != 0
        assert time.monotonic() - t0 < 10  # at once, not after FASTDIST_WORKER_TIMEOUT


def test_worker_exits_when_master_stays_silent():
    ours, proc = start_bare_worker({"FASTDIST_WORKER_TIMEOUT": "1"})
    with proc, ours:
        assert proc.wait(timeout=20) == 1
        assert b"did not complete joining" in proc.stderr.read()


MASTER = """
import json, os, sys
sys.path.insert(0, {examples!r})
import fastdist as fd
from custom_transport import SocketPairManager
pids = fd.addprocs(SocketPairManager(2), topology="master_worker")
print(json.dumps([fd.remotecall_fetch(os.getpid, p) for p in pids]), flush=True)
sys.stdin.readline()
os._exit(1)
"""


def test_workers_exit_when_the_master_dies():
    script = MASTER.format(examples=str(EXAMPLE.parent))
    assert not workers_outlive_a_crashed_master(script, exit_timeout=20, gone_timeout=10), \
        "stream workers outlived their master"


def test_example_runs_as_a_script():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "summed on worker" in done.stdout
