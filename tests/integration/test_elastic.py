"""ElasticManager: workers that a plain subprocess starts (as a batch script would) join
at any time, with the cookie from the environment or stdin and never on a command
line; a wrong cookie never joins and nothing it sends is unpickled, in either
direction; joined workers serve the default pool and a pmap already running; one
that dies is dropped as any worker is; a worker in another network namespace joins.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from support import closed_by_peer, eventually, recv_exact, wait_until

import fastdist as fd
from fastdist._core import _wire
from fastdist.protocol import handshake
from fastdist.protocol.messages import Kind

pytestmark = pytest.mark.timeout(120)


class CreatesFile:
    """Unpickling this creates a file: proof that bytes were (or were not) unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_frame(path, kind=Kind.CALL, ref_id=1):
    body = pickle.dumps(CreatesFile(str(path)), protocol=5)
    return _wire.pack_prelude(kind, 0, 0, 10_000, ref_id, len(body), []) + body


def cmdline(ospid):
    with open(f"/proc/{ospid}/cmdline", "rb") as f:
        return f.read()


class Joiners:
    """An ElasticManager and the worker processes a test starts for it, as a batch
    script would: `subprocess.Popen` of `em.connect_command()`."""

    def __init__(self, em):
        self.em = em
        self.procs: list[subprocess.Popen] = []

    def start(self, cookie=None, via="env", command=None, prefix=(), **popen):
        """Start one joining worker; `via` "env" (FASTDIST_COOKIE) or "stdin"."""
        cookie = fd.cluster_cookie() if cookie is None else cookie
        argv = [*prefix, *shlex.split(command or self.em.connect_command())]
        env = {k: v for k, v in os.environ.items() if k != "FASTDIST_COOKIE"}
        # The job's environment has the code it runs importable (these tests' modules).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        if via == "env":
            env["FASTDIST_COOKIE"] = cookie
        popen.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, **popen)
        if via == "stdin":
            proc.stdin.write((cookie + "\n").encode())
            proc.stdin.flush()
        self.procs.append(proc)
        return proc

    def teardown(self):
        live = [p for p in fd.workers() if p != 1]
        if live:
            fd.rmprocs(live, waitfor=30)
        self.em.close()
        left = []
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                left.append(proc.pid)
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        assert not left, f"joined workers left running: {left}"


@pytest.fixture
def joiners():
    j = Joiners(fd.ElasticManager())
    try:
        yield j
    finally:
        j.teardown()


def ospid_of(pid):
    return fd.remotecall_fetch(os.getpid, pid)


# -- joining -------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["env", "stdin"])
def test_a_worker_started_by_a_plain_process_joins(joiners, via):
    em = joiners.em
    assert em.connect_command().endswith(f"-m fastdist.worker --join {em.address[0]}:"
                                         f"{em.address[1]}")
    proc = joiners.start(via=via)
    (pid,) = em.wait_for(1, timeout=60)
    assert pid in fd.workers() and pid in fd.procs()
    assert ospid_of(pid) == proc.pid
    assert fd.remotecall_fetch(lambda x: x * 2, pid, 21) == 42
    # the cookie is on no command line, nor left in the worker's environment
    cookie = fd.cluster_cookie().encode()
    assert b"--join" in cmdline(proc.pid)
    assert cookie not in cmdline(proc.pid)
    assert cookie not in em.connect_command().encode()
    assert fd.remotecall_fetch(lambda: os.environ.get("FASTDIST_COOKIE"), pid) is None
    fd.rmprocs(pid, waitfor=30)
    assert proc.wait(timeout=10) == 0
    assert em.pids() == [] and pid not in fd.workers()


def test_workers_join_at_any_time_and_meet_the_others(joiners, cluster):
    em = joiners.em
    local = cluster.add(1)
    joiners.start()
    (first,) = em.wait_for(1, timeout=60)
    joiners.start(via="stdin")
    second = next(p for p in em.wait_for(2, timeout=60) if p != first)
    assert sorted(fd.workers()) == sorted([*local, first, second])
    # every worker reaches every other one (the addresses were announced)
    for a, b in [(first, second), (second, local[0]), (local[0], second)]:
        assert fd.remotecall_fetch(lambda t: fd.remotecall_fetch(fd.myid, t), a, b) == b
    assert fd.remotecall_fetch(fd.workers, second) == sorted(fd.workers())


def test_wait_for_times_out_naming_the_count(joiners):
    with pytest.raises(TimeoutError, match="0 of 1 workers joined"):
        joiners.em.wait_for(1, timeout=0.2)
    with pytest.raises(ValueError):
        joiners.em.wait_for(1, timeout=-1)


def test_addprocs_refuses_keywords_it_would_ignore(joiners):
    with pytest.raises(TypeError, match="tunnel"):
        fd.addprocs(joiners.em, tunnel=True)


def test_join_address_and_missing_cookie_are_clear_errors(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FASTDIST_COOKIE"}
    for args, said in [(["--join", "nowhere"], "HOST:PORT"),
                       (["--join", "127.0.0.1:1"], "no cookie"),
                       (["--join", "127.0.0.1:1", "--cookie", "x"], "never from the command")]:
        done = subprocess.run([sys.executable, "-m", "fastdist.worker", *args], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode != 0
        assert said in done.stderr, done.stderr


# -- wrong cookies, in both directions -------------------------------------------------------


def test_a_worker_with_a_wrong_cookie_never_joins(joiners):
    proc = joiners.start(cookie="not-the-cookie")
    assert proc.wait(timeout=30) == 1
    assert b"bad cookie" in proc.stderr.read()
    assert joiners.em.pids() == [] and fd.workers() == [1]


def test_a_wrong_cookie_at_the_masters_port_is_refused_and_nothing_unpickled(joiners, tmp_path):
    marker = tmp_path / "unpickled"
    host, port = joiners.em.address
    # Pickles before any handshake.
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(evil_frame(marker, Kind.IDENTIFY) + evil_frame(marker))
        assert closed_by_peer(sock, 15)
    # A connector with the wrong cookie: the master's proof does not verify ...
    with (socket.create_connection((host, port), timeout=10) as sock,
          pytest.raises(fd.ClusterError, match="bad cookie")):
        handshake.connect_blocking(sock.recv, sock.sendall, b"not-the-cookie")
    # ... and a wrong proof followed by frames is closed without reading them.
    with socket.create_connection((host, port), timeout=10) as sock:
        nonce_c = os.urandom(32)
        sock.sendall(_wire.pack_hello(handshake.PROTOCOL_VERSION, nonce_c))
        accept = recv_exact(sock, _wire.ACCEPT_NBYTES)
        _, _, nonce_s, _ = _wire.unpack_accept(accept)
        proof = hmac.new(b"not-the-cookie", b"C" + nonce_s + nonce_c, hashlib.sha256).digest()
        sock.sendall(_wire.pack_proof(proof) + b"fastdist_worker:1#127.0.0.1\n"
                     + evil_frame(marker))
        assert closed_by_peer(sock, 15)
    time.sleep(0.5)
    assert not marker.exists()
    assert joiners.em.pids() == [] and fd.workers() == [1]
    # The master still takes a worker that holds the cookie.
    joiners.start()
    assert len(joiners.em.wait_for(1, timeout=60)) == 1


def test_a_joining_worker_unpickles_nothing_from_a_master_without_the_cookie(joiners, tmp_path):
    # A listener that is not the cluster's master: it answers the worker's hello with
    # a wrong proof and sends pickles. The worker must refuse it, read nothing more.
    marker = tmp_path / "unpickled"
    fake = socket.create_server(("127.0.0.1", 0))
    port = fake.getsockname()[1]
    hs = handshake.AcceptorHandshake(b"not-the-cookie")
    proc = joiners.start(command=f"{sys.executable} -m fastdist.worker --join 127.0.0.1:{port}")
    fake.settimeout(30)
    conn, _ = fake.accept()
    with conn:
        conn.settimeout(30)
        out = hs.feed(recv_exact(conn, _wire.HELLO_NBYTES))
        conn.sendall(out + evil_frame(marker, Kind.IDENTIFY) + evil_frame(marker))
        assert proc.wait(timeout=30) == 1
    fake.close()
    assert b"bad cookie" in proc.stderr.read()
    assert not marker.exists()


# -- joined workers at work ---------------------------------------------------------------


def test_joined_workers_serve_the_default_pool(joiners):
    joiners.start()
    joiners.start()
    pids = joiners.em.wait_for(2, timeout=60)
    assert sorted(fd.default_worker_pool().workers()) == pids
    ran_on = {fd.remote(fd.myid)() for _ in range(20)}
    assert ran_on <= set(pids) and ran_on


def wait_for_second_worker(x):
    # Each element waits until a second worker is in the cluster (or 60 s), so the
    # map is surely running when the second worker joins.
    import time as _time

    import fastdist as _fd

    deadline = _time.monotonic() + 60
    while len(_fd.workers()) < 2 and _time.monotonic() < deadline:
        _time.sleep(0.01)
    _time.sleep(0.005)
    return _fd.myid()


@pytest.mark.parametrize("pool", [None, "default"])
def test_a_worker_that_joins_mid_pmap_takes_elements(joiners, pool):
    joiners.start()
    (first,) = joiners.em.wait_for(1, timeout=60)
    kw = {"pool": fd.default_worker_pool()} if pool else {}
    out: dict = {}
    mapper = threading.Thread(
        target=lambda: out.setdefault("r", fd.pmap(wait_for_second_worker, range(200), **kw)))
    mapper.start()
    joiners.start()
    second = next(p for p in joiners.em.wait_for(2, timeout=60) if p != first)
    mapper.join(90)
    assert not mapper.is_alive()
    ran_on = out["r"]
    assert len(ran_on) == 200 and set(ran_on) == {first, second}, ran_on


def sleep_and_pid(x):
    import os as _os
    import time as _time

    _time.sleep(0.01)
    return x, _os.getpid()


def test_a_joined_worker_that_dies_is_dropped(joiners):
    victim_proc = joiners.start()
    (victim,) = joiners.em.wait_for(1, timeout=60)
    f = fd.remotecall(time.sleep, victim, 60)
    os.kill(victim_proc.pid, signal.SIGKILL)
    with pytest.raises(fd.ProcessExitedException):
        f.fetch()
    assert eventually(lambda: victim not in fd.workers(), 10)
    assert joiners.em.pids() == []
    assert victim not in fd.default_worker_pool().workers()


def test_pmap_with_retries_retries_the_elements_of_a_joined_worker_that_died(joiners):
    doomed_proc = joiners.start()
    joiners.start()
    pids = joiners.em.wait_for(2, timeout=60)
    doomed = next(p for p in pids if ospid_of(p) == doomed_proc.pid)
    killer = threading.Timer(0.3, os.kill, (doomed_proc.pid, signal.SIGKILL))
    killer.start()
    try:
        results = fd.pmap(sleep_and_pid, range(300), retry_delays=[0.05] * 3)
    finally:
        killer.cancel()
    assert [x for x, _ in results] == list(range(300))
    ran_on = {ospid for _, ospid in results}
    assert doomed_proc.pid in ran_on, "the doomed worker ran nothing before it died"
    assert doomed_proc.wait(timeout=10) == -signal.SIGKILL
    assert doomed not in fd.workers()
    assert eventually(lambda: joiners.em.pids() == [p for p in pids if p != doomed], 10)
    # without retries, the same death fails the map
    second = joiners.start()
    wait_until(lambda: len(joiners.em.pids()) == 2, 60, "a second worker")
    killer = threading.Timer(0.3, os.kill, (second.pid, signal.SIGKILL))
    killer.start()
    try:
        with pytest.raises(fd.ProcessExitedException):
            fd.pmap(sleep_and_pid, range(300))
    finally:
        killer.cancel()


# -- another host ------------------------------------------------------------------------------


def test_a_worker_on_another_host_joins(netns_hosts):
    h0, h1 = netns_hosts.hosts
    em = fd.ElasticManager(addr="0.0.0.0")
    j = Joiners(em)
    try:
        host, port = em.address
        assert host != "0.0.0.0"
        local = j.start()
        remote = j.start(command=f"{sys.executable} -m fastdist.worker --join "
                                 f"{h0.host_side_addr}:{port}", prefix=h0.exec_argv([]))
        other = j.start(command=f"{sys.executable} -m fastdist.worker --join "
                                f"{h1.host_side_addr}:{port}", prefix=h1.exec_argv([]),
                        via="stdin")
        pids = em.wait_for(3, timeout=90)
        by_ospid = {ospid_of(p): p for p in pids}
        on_h0, on_h1 = by_ospid[remote.pid], by_ospid[other.pid]
        assert fd.remotecall_fetch(lambda: fd.node.current().host, on_h0) == h0.addr
        assert fd.remotecall_fetch(lambda: fd.node.current().host, on_h1) == h1.addr
        assert fd.procs(on_h0) == [on_h0]
        # the two namespace hosts reach each other, and the worker on this host
        assert fd.remotecall_fetch(lambda t: fd.remotecall_fetch(fd.myid, t), on_h1, on_h0) \
            == on_h0
        assert fd.remotecall_fetch(lambda t: fd.remotecall_fetch(fd.myid, t), on_h0,
                                   by_ospid[local.pid]) == by_ospid[local.pid]
    finally:
        j.teardown()
