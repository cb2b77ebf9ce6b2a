"""Hostile bytes on a worker's port: wrong cookies, random bytes, pickles sent before
the handshake, garbage frames after it, silent and idle connections by the thousand,
and a fuzz of the handshake. The worker must stay unharmed and unpickle nothing
from a peer that has not proved it holds the cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import closed_by_peer, recv_exact, wait_until

import fastdist as fd
from fastdist import transport
from fastdist._core import _wire
from fastdist.protocol import handshake, serialize
from fastdist.protocol.messages import Kind
from fastdist.protocol.values import decode_result

VERSION = handshake.PROTOCOL_VERSION


# -- helpers ------------------------------------------------------------------------------


def worker_port(w):
    return fd.remotecall_fetch(lambda: __import__("fastdist").node.current().port, w)


def worker_fd_count(ospid):
    return len(os.listdir(f"/proc/{ospid}/fd"))


class Target:
    """One live worker to attack, and how to check it is unharmed."""

    def __init__(self, w, via="tcp"):
        self.w = w
        self.port = worker_port(w)
        self.host = fd.remotecall_fetch(lambda: __import__("fastdist").node.current().host, w)
        self.ospid = fd.remotecall_fetch(os.getpid, w)
        self.via = via

    def connect(self, timeout=5.0):
        if self.via == "unix":
            # The same-host listener beside the TCP one: the same rules apply there.
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(transport.unix_name(self.host, self.port))
            return sock
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def assert_unharmed(self):
        t = time.monotonic()
        assert fd.remotecall_fetch(lambda x: x * 2, self.w, 21) == 42
        assert fd.remotecall_fetch(os.getpid, self.w) == self.ospid
        assert time.monotonic() - t < 2.0
        assert self.w in fd.workers()


@pytest.fixture
def target(cluster):
    (w,) = cluster.add(1)
    return Target(w)


@pytest.fixture(params=["tcp", "unix"])
def any_target(cluster, request):
    (w,) = cluster.add(1)
    return Target(w, via=request.param)


def mac(cookie, tag, first, second):
    return hmac.new(cookie, tag + first + second, hashlib.sha256).digest()


def hello_and_accept(sock):
    """Step 1 and 2 of the handshake; returns (nonce_c, nonce_s)."""
    nonce_c = os.urandom(32)
    sock.sendall(_wire.pack_hello(VERSION, nonce_c))
    version, status, nonce_s, _ = _wire.unpack_accept(recv_exact(sock, _wire.ACCEPT_NBYTES))
    assert (version, status) == (VERSION, _wire.STATUS_OK)
    return nonce_c, nonce_s


def frame(kind, body=b"", ref_id=0, whence=10_000, aux=0, buffers=()):
    lens = [len(b) for b in buffers]
    prelude = _wire.pack_prelude(kind, 0, aux, whence, ref_id, len(body), lens)
    return prelude + body + b"".join(buffers)


def authenticated(target, as_pid=10_000):
    """A connection that passed the handshake with the real cookie and named itself."""
    sock = target.connect()
    handshake.connect_blocking(sock.recv, sock.sendall, fd.cluster_cookie().encode())
    body, _ = serialize.dumps({"pid": as_pid}, what="identity")
    sock.sendall(frame(Kind.IDENTIFY, body, whence=as_pid))
    return sock


def read_results(sock, reader, ids, timeout=5.0):
    """The RESULT frames answering `ids`, by id (pings and other frames are skipped)."""
    sock.settimeout(timeout)
    results = {}
    while not set(ids) <= set(results):
        data = sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        results.update((f.id, f) for f in reader.feed(data) if f.kind == Kind.RESULT)
    return results


class CreatesFile:
    """Unpickling this creates a file: proof that bytes were (or were not) unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_pickle(path):
    # A plain pickle stream referring only to builtins: any unpickler in any process runs it.
    return pickle.dumps(CreatesFile(str(path)), protocol=5)


# -- unauthenticated peers ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_wrong_cookie_is_refused_and_nothing_it_sends_is_unpickled(any_target, tmp_path):
    target = any_target
    marker = tmp_path / "unpickled"
    payload = evil_pickle(marker)

    # As connector with a wrong cookie: the worker's MAC does not verify.
    sock = target.connect()
    with pytest.raises(fd.ClusterError, match="bad cookie"):
        handshake.connect_blocking(sock.recv, sock.sendall, b"not-the-cookie")
    sock.close()

    # A wrong proof, followed by frames carrying the pickle: closed, nothing read.
    sock = target.connect()
    nonce_c, nonce_s = hello_and_accept(sock)
    sock.sendall(_wire.pack_proof(mac(b"not-the-cookie", b"C", nonce_s, nonce_c))
                 + frame(Kind.IDENTIFY, payload) + frame(Kind.CALL, payload, ref_id=1))
    assert closed_by_peer(sock, 5)
    sock.close()
    target.assert_unharmed()
    assert not marker.exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["first", "framed_first", "instead_of_proof", "after_hello"])
def test_pickles_before_the_handshake_are_never_unpickled(any_target, tmp_path, where):
    target = any_target
    marker = tmp_path / "unpickled"
    payload = evil_pickle(marker)
    sock = target.connect()
    if where == "first":
        sock.sendall(payload)
    elif where == "framed_first":
        sock.sendall(frame(Kind.IDENTIFY, payload) + frame(Kind.CALL, payload, ref_id=1))
    elif where == "instead_of_proof":
        hello_and_accept(sock)
        sock.sendall(payload + frame(Kind.CALL, payload, ref_id=1))
    else:
        sock.sendall(_wire.pack_hello(VERSION, os.urandom(32)) + frame(Kind.CALL, payload, ref_id=1)
                     + payload * 4)
    assert closed_by_peer(sock, 5)
    sock.close()
    target.assert_unharmed()
    assert not marker.exists()


@pytest.mark.timeout(60)
def test_the_same_pickle_from_an_authenticated_peer_is_unpickled(target, tmp_path):
    # The control for the tests above: this payload does create the file when a
    # worker unpickles it, so its absence there means it was never unpickled.
    marker = tmp_path / "unpickled"
    sock = authenticated(target)
    sock.sendall(frame(Kind.CALL_FETCH, evil_pickle(marker), ref_id=7))
    read_results(sock, _wire.FrameReader(), [7])
    sock.close()
    assert marker.exists()
    target.assert_unharmed()


@pytest.mark.timeout(60)
def test_random_bytes_and_a_wrong_version_are_refused(target):
    for junk in (os.urandom(4096), b"\x00" * 48, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3,
                 _wire.HELLO_MAGIC + os.urandom(1 << 20)):
        sock = target.connect()
        try:
            sock.sendall(junk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: all the better
        assert closed_by_peer(sock, 5), junk[:20]
        sock.close()
    sock = target.connect()
    sock.sendall(_wire.pack_hello(VERSION + 1, os.urandom(32)))
    version, status, _, _ = _wire.unpack_accept(recv_exact(sock, _wire.ACCEPT_NBYTES))
    assert status == _wire.STATUS_VERSION_MISMATCH and version == VERSION
    assert closed_by_peer(sock, 5)
    sock.close()
    target.assert_unharmed()


@pytest.fixture
def short_handshake(cluster, monkeypatch):
    # Read by the worker when it accepts a connection: set before the worker starts.
    monkeypatch.setenv("FASTDIST_HANDSHAKE_TIMEOUT", "1")
    (w,) = cluster.add(1)
    return Target(w)


@pytest.mark.timeout(60)
def test_silent_and_slow_connections_are_closed_at_the_handshake_deadline(short_handshake):
    target = short_handshake
    silent = target.connect()
    slow = target.connect()
    partial = target.connect()
    opened = time.monotonic()
    partial.sendall(_wire.pack_hello(VERSION, os.urandom(32))[:47])
    hello = _wire.pack_hello(VERSION, os.urandom(32))
    # One byte every 100 ms: the hello would take 4.8 s.
    slow.setblocking(False)
    sent = 0
    while time.monotonic() - opened < 6 and sent < len(hello):
        try:
            slow.send(hello[sent:sent + 1])
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += 1
        time.sleep(0.1)
    assert sent < len(hello), "the slow sender was never cut off"
    for sock in (silent, partial, slow):
        assert closed_by_peer(sock, 1)
        sock.close()
    elapsed = time.monotonic() - opened
    assert elapsed < 4, f"closed only after {elapsed:.1f} s with a 1 s handshake deadline"
    target.assert_unharmed()


# -- authenticated peers sending garbage ------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_peer_must_identify_before_anything_else(target):
    sock = target.connect()
    handshake.connect_blocking(sock.recv, sock.sendall, fd.cluster_cookie().encode())
    sock.sendall(frame(Kind.CALL_FETCH, b"\x80\x05garbage", ref_id=3))
    assert closed_by_peer(sock, 5)
    sock.close()
    target.assert_unharmed()


@pytest.mark.timeout(60)
def test_garbage_frames_fail_that_frame_only(target):
    sock = authenticated(target)
    reader = _wire.FrameReader()
    # A body that is not a pickle, a truncated pickle, a pickle of the wrong shape.
    sock.sendall(frame(Kind.CALL_FETCH, os.urandom(64), ref_id=1)
                 + frame(Kind.CALL_FETCH, pickle.dumps((len, ([1, 2],), {}))[:-3], ref_id=2)
                 + frame(Kind.CALL_FETCH, pickle.dumps(12345), ref_id=3)
                 + frame(Kind.FETCH, b"\x01", ref_id=4)
                 + frame(200, b"unknown kind", ref_id=5)
                 + frame(Kind.REFS, b"\x01\x02\x03")
                 + frame(Kind.CALL_FETCH, serialize.dumps((len, ([1, 2, 3],), {}))[0], ref_id=6))
    frames = read_results(sock, reader, [1, 2, 3, 4, 6])
    for ref_id in (1, 2, 3, 4):
        assert frames[ref_id].flags & 1, f"frame {ref_id} did not fail"
        with pytest.raises(fd.RemoteException):
            raise decode_result(frames[ref_id].flags, frames[ref_id].body, [])[0]
    assert not frames[6].flags & 1
    assert 5 not in frames  # an unknown kind is dropped (and reported on stderr)
    assert serialize.loads(frames[6].body, frames[6].buffers) == 3
    sock.close()
    target.assert_unharmed()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("announce", ["huge_body", "huge_buffer", "too_many_buffers"])
def test_an_oversized_frame_closes_that_connection_only(target, announce):
    sock = authenticated(target)
    if announce == "huge_body":
        prelude = _wire.pack_prelude(Kind.CALL_FETCH, 0, 0, 10_000, 1, 1 << 62)
    elif announce == "huge_buffer":
        prelude = _wire.pack_prelude(Kind.CALL_FETCH, 0, 0, 10_000, 1, 10, [8, 1 << 40, 8])
    else:
        prelude = _wire.pack_prelude(Kind.CALL_FETCH, 0, 0, 10_000, 1, 10, [0] * 5000)
    rss_before = _rss_kib(target.ospid)
    sock.sendall(prelude + b"x" * 64)
    assert closed_by_peer(sock, 5)
    sock.close()
    target.assert_unharmed()
    assert _rss_kib(target.ospid) - rss_before < 50_000


def _rss_kib(ospid):
    with open(f"/proc/{ospid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- many connections ----------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_thousands_of_idle_connections_do_not_stop_real_traffic(cluster):
    w, other = cluster.add(2)
    target = Target(w)
    fds_before = worker_fd_count(target.ospid)
    idle = []
    try:
        for _ in range(2000):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", target.port))
            except BlockingIOError:
                pass
            idle.append(s)
        # Calls answer promptly while the idle crowd is connected, ...
        worst = 0.0
        for i in range(200):
            t = time.monotonic()
            assert fd.remotecall_fetch(lambda x: x + 1, w, i) == i + 1
            worst = max(worst, time.monotonic() - t)
        assert worst < 0.5, f"a call took {worst:.2f} s"
        # ... a new authenticated connection gets through (the other worker's first call
        # to w opens one) ...
        t = time.monotonic()
        assert fd.remotecall_fetch(lambda p: fd.remotecall_fetch(os.getpid, p), other, w) == \
            target.ospid
        assert time.monotonic() - t < 2.0
        # ... and the worker keeps only a bounded number of them.
        assert worker_fd_count(target.ospid) < fds_before + 400
    finally:
        for s in idle:
            s.close()
    target.assert_unharmed()
    wait_until(lambda: worker_fd_count(target.ospid) <= fds_before + 2, 10,
               "the worker to close the idle connections")


# -- fuzz of the handshake against a live worker ------------------------------------------------


def _mutate(data, flips, cut, extra):
    b = bytearray(data)
    for pos, value in flips:
        if b:
            b[pos % len(b)] = value
    if cut is not None:
        b = b[: cut % (len(b) + 1)]
    return bytes(b) + extra


mutations = st.tuples(
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
    st.none() | st.integers(0, 200),
    st.binary(max_size=64),
)


@pytest.mark.timeout(120)
def test_fuzzed_handshakes_never_get_in_and_never_hurt_the_worker(target, tmp_path):
    marker = tmp_path / "unpickled"
    payload = evil_pickle(marker)
    cookie = fd.cluster_cookie().encode()
    fds_before = worker_fd_count(target.ospid)
    outcomes = {"refused": 0, "accepted_hello": 0}

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(hello_mut=mutations, proof_mut=mutations, random_proof=st.booleans())
    def attempt(hello_mut, proof_mut, random_proof):
        nonce_c = os.urandom(32)
        sock = target.connect(timeout=2)
        try:
            hello = _mutate(_wire.pack_hello(VERSION, nonce_c), *hello_mut)
            try:
                sock.sendall(hello)
                if len(hello) < _wire.HELLO_NBYTES:
                    sock.shutdown(socket.SHUT_WR)  # the worker would wait for the rest
                reply = recv_exact(sock, _wire.ACCEPT_NBYTES)
            except (EOFError, OSError):  # refused: closed or reset
                outcomes["refused"] += 1
                return
            _, status, nonce_s, _ = _wire.unpack_accept(reply)
            if status != _wire.STATUS_OK:
                outcomes["refused"] += 1
                return
            outcomes["accepted_hello"] += 1
            proof = (os.urandom(_wire.PROOF_NBYTES) if random_proof else
                     _wire.pack_proof(mac(cookie, b"C", nonce_s, nonce_c)))
            mutated = _mutate(proof, *proof_mut)
            if mutated[:_wire.PROOF_NBYTES] == proof and len(mutated) >= _wire.PROOF_NBYTES:
                return  # the mutation left the genuine proof intact
            try:
                sock.sendall(mutated + frame(Kind.CALL, payload, ref_id=1))
                sock.shutdown(socket.SHUT_WR)
                got = sock.recv(_wire.WELCOME_NBYTES)
            except OSError:  # refused: closed, reset, or timed out waiting
                got = b""
            assert got != _wire.WELCOME, "a mutated proof was accepted"
        finally:
            sock.close()

    attempt()
    assert outcomes["refused"] and outcomes["accepted_hello"], outcomes
    assert not marker.exists()
    target.assert_unharmed()
    wait_until(lambda: worker_fd_count(target.ospid) <= fds_before, 15,
               "the worker to close every fuzzed connection")
