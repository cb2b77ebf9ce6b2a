"""SSHManager against a real sshd (and two network-namespace hosts): machine specs, counts,
tunnels, shared connections, one session per host, output, launch errors, and that no
worker outlives its master, its removal or its ssh session."""

from __future__ import annotations

import os
import signal
import socket
import sys
import textwrap
import time

import pytest
from support import (
    collect_printed,
    eventually,
    netns_flags,
    workers_outlive_a_crashed_master,
)
from support import os_alive as alive

import fastdist as fd
from fastdist.managers.ssh import SSHManager, parse_machine

pytestmark = pytest.mark.timeout(120)


# -- helpers --------------------------------------------------------------------------


def flags_without_port(srv) -> list[str]:
    """The server's ssh flags minus its `-p PORT`: tests put the port in the machine spec."""
    flags, out = list(srv.sshflags), []
    i = 0
    while i < len(flags):
        if flags[i] == "-p":
            i += 2
            continue
        out.append(flags[i])
        i += 1
    return out


def spec_of(srv, user: str | None = None) -> str:
    host = f"[{srv.host}]" if ":" in srv.host else srv.host
    return f"{user or srv.user}@{host}:{srv.port}"


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def peer_config(pid: int):
    from fastdist import node

    return node.current().peers[pid].config


@pytest.fixture
def ssh_cluster(cluster, sshd_server):
    """Add SSH workers on the test sshd; the `cluster` fixture removes them and checks
    that no process is left (ssh sessions, tunnels, shared connections)."""

    class SSHCluster:
        srv = sshd_server
        spec = spec_of(sshd_server)
        flags = flags_without_port(sshd_server)

        def add(self, machines=None, **kwargs):
            kwargs.setdefault("sshflags", self.flags)
            pids = fd.addprocs(machines if machines is not None else [self.spec], **kwargs)
            cluster.pids.extend(pids)
            return pids

    return SSHCluster()


# -- machine specifications ---------------------------------------------------------------


@pytest.mark.parametrize("spec, expected", [
    ("node1", (None, "node1", None, None, None)),
    ("alice@node1", ("alice", "node1", None, None, None)),
    ("alice@node1:2222", ("alice", "node1", 2222, None, None)),
    ("alice@node1:2222 10.0.0.5", ("alice", "node1", 2222, "10.0.0.5", None)),
    ("node1 10.0.0.5:9000", (None, "node1", None, "10.0.0.5", 9000)),
    ("[::1]", (None, "::1", None, None, None)),
    ("bob@[fe80::1]:22 [::1]:9009", ("bob", "fe80::1", 22, "::1", 9009)),
])
def test_parse_machine(spec, expected):
    m = parse_machine(spec)
    assert (m.user, m.host, m.port, m.bind_addr, m.bind_port) == expected


@pytest.mark.parametrize("spec", ["", "a b c", "host:notaport", "host:0", "host:70000",
                                  "[::1", "::1", "@host", "host:22:33"])
def test_parse_machine_rejects_malformed_specs(spec):
    with pytest.raises(ValueError):
        parse_machine(spec)


def test_manager_counts_add_up_and_validate():
    m = SSHManager(["h", "h", ("h", 2), ("u@g", "auto"), ("u@g", 3)])
    assert m.machines == {"h": 4, "u@g": "auto"}
    assert SSHManager(("h", 3)).machines == {"h": 3}
    assert SSHManager("h").machines == {"h": 1}
    with pytest.raises(ValueError):
        SSHManager([("h", -1)])
    with pytest.raises(ValueError):
        SSHManager([("h", "many")])
    with pytest.raises(ValueError):
        SSHManager([("h 10.0.0.1:9000", 2)])  # two workers cannot share one bind port
    assert fd.SSHManager is SSHManager


# -- workers over ssh --------------------------------------------------------------------


def test_ssh_workers_run_calls_and_group_by_host(ssh_cluster):
    pids = ssh_cluster.add([(ssh_cluster.spec, 2)])
    assert len(pids) == 2 and set(pids) <= set(fd.workers())
    assert [fd.remotecall_fetch(fd.myid, p) for p in pids] == pids
    ospids = [fd.remotecall_fetch(os.getpid, p) for p in pids]
    assert os.getpid() not in ospids and len(set(ospids)) == 2
    # Worker to worker, and a channel held by one worker used by the other.
    assert fd.remotecall_fetch(lambda: fd.remotecall_fetch(fd.myid, pids[1]), pids[0]) == pids[1]
    rc = fd.RemoteChannel(lambda: fd.Channel(4), pids[0])
    fd.remotecall_wait(lambda ch: ch.put("via ssh"), pids[1], rc)
    assert fd.take(rc) == "via ssh"
    # 127.0.0.1 is this machine: the workers group with the master.
    assert set(fd.procs(pids[0])) >= {1, *pids}
    config = peer_config(pids[0])
    assert config.host == "127.0.0.1" and config.process is not None
    assert config.bind_addr == "127.0.0.1"


def test_cookie_never_on_a_command_line(ssh_cluster):
    (pid,) = ssh_cluster.add()
    cookie = fd.cluster_cookie()
    config = peer_config(pid)
    assert cookie not in cmdline(config.process.pid)
    assert "fastdist.worker" in cmdline(config.process.pid)
    worker_ospid = fd.remotecall_fetch(os.getpid, pid)
    assert cookie not in cmdline(worker_ospid)
    assert "--bind-to 127.0.0.1" in cmdline(worker_ospid)


def test_keywords_reach_the_remote_worker(ssh_cluster, tmp_path):
    (pid,) = ssh_cluster.add(
        dir=str(tmp_path), env={"FASTDIST_TEST_VAR": "it's \"quoted\" $HOME"},
        exeflags=("-X", "utf8"), sshflags=" ".join(ssh_cluster.flags))
    facts = fd.remotecall_fetch(
        lambda: (os.getcwd(), os.environ.get("FASTDIST_TEST_VAR"), sys.flags.utf8_mode,
                 os.environ.get("OMP_NUM_THREADS")), pid)
    assert facts == (str(tmp_path), "it's \"quoted\" $HOME", 1, "1")


def test_threaded_blas_and_auto_count(ssh_cluster):
    pids = ssh_cluster.add([(ssh_cluster.spec, "auto")], enable_threaded_blas=True)
    assert len(pids) == os.cpu_count()
    assert fd.remotecall_fetch(lambda: os.environ.get("OMP_NUM_THREADS"), pids[0]) != "1"


def test_localhost_by_name_and_bind_address(ssh_cluster):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    srv = ssh_cluster.srv
    pids = ssh_cluster.add([f"{srv.user}@localhost:{srv.port}",
                            f"{srv.user}@127.0.0.1:{srv.port} 127.0.0.1:{free}"])
    assert [fd.remotecall_fetch(fd.myid, p) for p in pids] == pids
    # machines launch in parallel: find which pid is which
    by_name, by_bind = sorted(pids, key=lambda p: peer_config(p).host != "localhost")
    assert peer_config(by_name).host == "localhost"
    assert peer_config(by_bind).port == free
    assert fd.remotecall_fetch(lambda: fd.remotecall_fetch(fd.myid, by_name), by_bind) == by_name


def test_tunnel_connects_through_localhost(ssh_cluster):
    pids = ssh_cluster.add([(ssh_cluster.spec, 2)], tunnel=True, max_parallel=1)
    assert [fd.remotecall_fetch(fd.myid, p) for p in pids] == pids
    forwards = [peer_config(p).forward for p in pids]
    from fastdist import node

    for pid, forward in zip(pids, forwards):
        local_port, target = forward.split(":", 1)
        assert target == f"127.0.0.1:{peer_config(pid).port}"
        # the master's connection goes to the forward's local end, not to the worker's port
        conn = node.current().peers[pid].conn
        with socket.socket(fileno=os.dup(conn.fd)) as s:
            assert s.getpeername() == ("127.0.0.1", int(local_port))
        assert int(local_port) != peer_config(pid).port
    # worker-to-worker links stay direct
    assert fd.remotecall_fetch(lambda: fd.remotecall_fetch(fd.myid, pids[0]), pids[1]) == pids[0]


def test_multiplex_shares_one_connection(ssh_cluster):
    pids = ssh_cluster.add([(ssh_cluster.spec, 3)], multiplex=True, tunnel=True)
    assert [fd.remotecall_fetch(fd.myid, p) for p in pids] == pids
    flags = peer_config(pids[0]).sshflags
    assert "ControlMaster=no" in flags
    control = next(f for f in flags if f.startswith("ControlPath="))[len("ControlPath="):]
    assert os.path.exists(control)
    fd.rmprocs(pids, waitfor=30)
    assert eventually(lambda: not os.path.exists(control), 15), \
        "the shared connection outlived its workers"


def test_output_and_stderr_are_relayed_separately(ssh_cluster):
    (pid,) = ssh_cluster.add()
    with collect_printed() as printed:
        fd.remotecall_fetch(lambda: print("out over ssh", flush=True), pid)
        fd.remotecall_fetch(lambda: print("err over ssh", file=sys.stderr, flush=True), pid)
        printed.wait_for("out over ssh")
        seen = printed.wait_for("err over ssh", "err")
    assert f"From worker {pid}:\tout over ssh" in seen["out"]
    assert f"From worker {pid}:\terr over ssh" in seen["err"]
    assert "err over ssh" not in seen["out"]


# -- launch failures --------------------------------------------------------------------


@pytest.mark.parametrize("case", ["auth", "refused", "no-python", "no-fastdist", "auto-auth",
                                  "multiplex-auth"])
def test_bad_host_is_a_clear_error_not_a_hang(ssh_cluster, case):
    srv = ssh_cluster.srv
    before = fd.workers()
    machines, kw, words = {
        "auth": ([spec_of(srv, "nobody")], {}, "Permission denied"),
        "refused": ([f"{srv.user}@127.0.0.1:1"], {}, "Connection refused"),
        "no-python": ([ssh_cluster.spec], {"exename": "/nonexistent/python3"}, "not found"),
        # -I ignores PYTHONPATH, -S leaves site-packages out: no fastdist either way.
        "no-fastdist": ([ssh_cluster.spec], {"exeflags": ["-I", "-S"]}, "No module named"),
        "auto-auth": ([(spec_of(srv, "nobody"), "auto")], {}, "Permission denied"),
        "multiplex-auth": ([(spec_of(srv, "nobody"), 2)], {"multiplex": True},
                           "Permission denied"),
    }[case]
    t0 = time.monotonic()
    with pytest.raises(fd.ClusterError) as info:
        ssh_cluster.add(machines, **kw)
    assert time.monotonic() - t0 < 20
    message = str(info.value)
    assert "127.0.0.1" in message and words in message
    assert fd.workers() == before


def test_bad_env_name_fails_before_any_login(ssh_cluster):
    with pytest.raises(fd.ClusterError, match="invalid environment variable name"):
        ssh_cluster.add(env={"NOT A NAME": "x"})
    assert fd.workers() == [1]


def test_one_bad_host_adds_nothing(ssh_cluster):
    before = fd.workers()
    with pytest.raises(fd.ClusterError, match="nobody"):
        ssh_cluster.add([ssh_cluster.spec, spec_of(ssh_cluster.srv, "nobody")])
    assert fd.workers() == before


# -- nobody outlives their master, removal or session -----------------------------------------


def test_rmprocs_ends_remote_worker_and_ssh(ssh_cluster):
    (pid,) = ssh_cluster.add()
    worker_ospid = fd.remotecall_fetch(os.getpid, pid)
    ssh_proc = peer_config(pid).process
    fd.rmprocs(pid, waitfor=30)
    assert pid not in fd.workers()
    assert eventually(lambda: not alive(worker_ospid), 15)
    assert eventually(lambda: ssh_proc.poll() is not None, 15)


def test_worker_whose_ssh_session_dies_exits(ssh_cluster, capfd):
    pids = ssh_cluster.add([(ssh_cluster.spec, 2)])
    victim, other = pids
    worker_ospid = fd.remotecall_fetch(os.getpid, victim)
    peer_config(victim).process.kill()
    assert eventually(lambda: victim not in fd.workers(), 15), "worker kept after its ssh died"
    assert eventually(lambda: not alive(worker_ospid), 15), "remote worker outlived its ssh session"
    with pytest.raises(fd.ProcessExitedException):
        fd.remotecall_fetch(fd.myid, victim)
    assert fd.remotecall_fetch(fd.myid, other) == other
    assert f"worker {victim}'s ssh session" in capfd.readouterr().err


MASTER_SCRIPT = """
import json, os, sys
import fastdist as fd
pids = fd.addprocs([({spec!r}, 2)], sshflags={flags!r}, tunnel={tunnel!r},
                   one_session={one_session!r})
print(json.dumps([fd.remotecall_fetch(os.getpid, p) for p in pids]), flush=True)
sys.stdin.readline()
os._exit(1)  # a crash: nobody removes the workers
"""


@pytest.mark.parametrize("tunnel, one_session", [(False, False), (True, False), (False, True)])
def test_workers_exit_when_the_master_dies(sshd_server, tunnel, one_session):
    script = MASTER_SCRIPT.format(spec=spec_of(sshd_server), flags=flags_without_port(sshd_server),
                                  tunnel=tunnel, one_session=one_session)
    assert not workers_outlive_a_crashed_master(script, exit_timeout=30, gone_timeout=20), \
        "remote workers outlived their master"


# -- one_session: one ssh session per host, its workers forked there -------------------------


def parent_of(ospid: int) -> int:
    with open(f"/proc/{ospid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_a_hosts_workers_come_from_one_session_and_one_launcher(ssh_cluster):
    pids = ssh_cluster.add([(ssh_cluster.spec, 3)], one_session=True)
    assert len(pids) == 3 and set(pids) <= set(fd.workers())
    assert [fd.remotecall_fetch(fd.myid, p) for p in pids] == pids
    ospids = [fd.remotecall_fetch(os.getpid, p) for p in pids]
    assert len(set(ospids)) == 3 and os.getpid() not in ospids
    # One ssh process for all three, and one launcher that forked them.
    sessions = {peer_config(p).process for p in pids}
    assert len(sessions) == 1
    launchers = {parent_of(o) for o in ospids}
    assert len(launchers) == 1
    launcher = launchers.pop()
    assert "--count 3" in cmdline(launcher)
    cookie = fd.cluster_cookie()
    assert all(cookie not in cmdline(o) for o in [launcher, *ospids])
    assert cookie not in cmdline(sessions.pop().pid)
    # Ordinary workers: they reach each other, and run calls side by side.
    assert fd.remotecall_fetch(lambda: fd.remotecall_fetch(fd.myid, pids[2]), pids[0]) == pids[2]
    assert sorted(fd.pmap(lambda _: fd.myid(), range(30))) != []


def test_each_workers_output_is_relayed_as_its_own(ssh_cluster):
    pids = ssh_cluster.add([(ssh_cluster.spec, 2)], one_session=True)
    with collect_printed() as printed:
        for p in pids:
            fd.remotecall_fetch(lambda: print(f"out of {fd.myid()}", flush=True), p)
            fd.remotecall_fetch(lambda: print(f"err of {fd.myid()}", file=sys.stderr,
                                              flush=True), p)
        for p in pids:
            printed.wait_for(f"out of {p}")
            seen = printed.wait_for(f"err of {p}", "err")
    for p in pids:
        assert f"From worker {p}:\tout of {p}" in seen["out"]
        assert f"From worker {p}:\terr of {p}" in seen["err"]
        assert f"err of {p}" not in seen["out"]


def test_through_a_tunnel(ssh_cluster):
    pids = ssh_cluster.add([(ssh_cluster.spec, 2)], one_session=True, tunnel=True)
    assert [fd.remotecall_fetch(fd.myid, p) for p in pids] == pids
    assert all(peer_config(p).forward for p in pids)


def test_a_worker_that_dies_leaves_alone_and_the_session_ends_with_the_last(ssh_cluster):
    pids = ssh_cluster.add([(ssh_cluster.spec, 3)], one_session=True)
    ospids = [fd.remotecall_fetch(os.getpid, p) for p in pids]
    session = peer_config(pids[0]).process
    launcher = parent_of(ospids[0])
    os.kill(ospids[0], signal.SIGKILL)
    with pytest.raises(fd.ProcessExitedException):
        fd.remotecall_fetch(fd.myid, pids[0])
    assert eventually(lambda: pids[0] not in fd.workers(), 10)
    assert [fd.remotecall_fetch(fd.myid, p) for p in pids[1:]] == pids[1:]
    assert session.poll() is None
    fd.rmprocs(pids[1], waitfor=30)
    assert fd.remotecall_fetch(fd.myid, pids[2]) == pids[2]
    assert session.poll() is None, "the session ended while a worker of it was left"
    fd.rmprocs(pids[2], waitfor=30)
    assert eventually(lambda: session.poll() is not None, 15), "the session outlived its workers"
    assert eventually(lambda: not any(alive(o) for o in [launcher, *ospids]), 15)


def test_all_its_workers_leave_when_the_session_dies(ssh_cluster, capfd):
    pids = ssh_cluster.add([(ssh_cluster.spec, 2)], one_session=True)
    ospids = [fd.remotecall_fetch(os.getpid, p) for p in pids]
    peer_config(pids[0]).process.kill()
    assert eventually(lambda: not set(pids) & set(fd.workers()), 15)
    assert eventually(lambda: not any(alive(o) for o in ospids), 15)
    for p in pids:
        with pytest.raises(fd.ProcessExitedException):
            fd.remotecall_fetch(fd.myid, p)
    assert "ssh session" in capfd.readouterr().err


@pytest.mark.parametrize("case", ["auth", "no-fastdist"])
def test_a_failed_launch_is_a_clear_error(ssh_cluster, case):
    srv = ssh_cluster.srv
    machines, kw, words = {
        "auth": ([(spec_of(srv, "nobody"), 2)], {}, "Permission denied"),
        "no-fastdist": ([(ssh_cluster.spec, 2)], {"exeflags": ["-I", "-S"]}, "No module named"),
    }[case]
    before = fd.workers()
    with pytest.raises(fd.ClusterError) as info:
        ssh_cluster.add(machines, one_session=True, **kw)
    message = str(info.value)
    assert "127.0.0.1" in message and words in message, message
    assert fd.workers() == before


# -- IPv6 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sshd_v6():
    from services.sshd import SSHServer

    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    srv = SSHServer("::1", port=port)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_ipv6_machine_in_brackets(cluster, sshd_v6):
    pids = fd.addprocs([(spec_of(sshd_v6), 2)], sshflags=flags_without_port(sshd_v6))
    cluster.pids.extend(pids)
    assert [fd.remotecall_fetch(fd.myid, p) for p in pids] == pids
    assert peer_config(pids[0]).bind_addr == "::1"
    assert fd.remotecall_fetch(lambda: fd.remotecall_fetch(fd.myid, pids[1]), pids[0]) == pids[1]
    assert set(fd.procs(pids[0])) >= {1, *pids}


# -- several hosts: network namespaces ---------------------------------------------------


def test_workers_on_two_hosts_reach_each_other_directly(cluster, netns_hosts):
    h0, h1 = netns_hosts.hosts
    user = h0.sshd.user
    pids = fd.addprocs([(f"{user}@{h0.addr}", 2), (f"{user}@{h1.addr}", 2)],
                       sshflags=netns_flags(netns_hosts))
    cluster.pids.extend(pids)
    on = {p: fd.remotecall_fetch(lambda: fd.node.current().host, p) for p in pids}
    a = [p for p in pids if on[p] == h0.addr]
    b = [p for p in pids if on[p] == h1.addr]
    assert len(a) == 2 and len(b) == 2, on
    # procs(pid): the pids bound to that pid's address
    assert fd.procs(a[0]) == sorted(a)
    assert fd.procs(b[1]) == sorted(b)
    assert 1 not in fd.procs(a[0])
    # a worker on one host calls one on the other, over a link of their own
    assert fd.remotecall_fetch(lambda: fd.remotecall_fetch(fd.myid, b[0]), a[0]) == b[0]

    def link_to(pid):
        from fastdist import cluster as _cluster
        from fastdist import node

        conn = node.current().peers[pid].conn
        return conn is not None and _cluster.conn_peer_host(conn)

    # the link from a[0] to b[0] goes straight to b[0]'s address, not through the master
    peer_host = fd.remotecall_fetch(link_to, a[0], b[0])
    assert peer_host == h1.addr
    # and the workers see the same grouping
    assert fd.remotecall_fetch(fd.procs, b[0], a[1]) == sorted(a)


def test_unreachable_host_is_a_clear_error(cluster, netns_hosts, monkeypatch):
    _h0, h1 = netns_hosts.hosts
    monkeypatch.setenv("FASTDIST_WORKER_TIMEOUT", "5")
    before = fd.workers()
    with netns_hosts.cut_off(1):
        t0 = time.monotonic()
        with pytest.raises(fd.ClusterError) as info:
            fd.addprocs([f"{h1.sshd.user}@{h1.addr}"], sshflags=netns_flags(netns_hosts))
        assert time.monotonic() - t0 < 20
    assert h1.addr in str(info.value)
    assert fd.workers() == before


def test_multihost_workers_run_code_in_their_namespace(cluster, netns_hosts):
    h0, h1 = netns_hosts.hosts
    pids = fd.addprocs([f"{h0.sshd.user}@{h0.addr}", f"{h1.sshd.user}@{h1.addr}"],
                       sshflags=netns_flags(netns_hosts), topology="all_to_all", lazy=False)
    cluster.pids.extend(pids)
    code = textwrap.dedent("""
        import subprocess
        out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    """)

    def addresses():
        ns: dict = {}
        exec(code, ns)
        return ns["out"]

    seen = sorted((fd.remotecall_fetch(addresses, p) for p in pids), key=lambda t: h0.addr not in t)
    assert h0.addr in seen[0] and h1.addr not in seen[0]
    assert h1.addr in seen[1] and h0.addr not in seen[1]
