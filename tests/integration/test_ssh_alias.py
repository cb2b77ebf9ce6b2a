"""SSH hosts named by an alias of an ssh configuration file (`Host x` / `HostName y`),
a name only ssh knows: workers start, the master and the other workers reach them
(with and without tunnels, on this machine and on network-namespace hosts, through
a jump host), the machine-file command takes them, and a bad alias is a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastdist as fd

COMMON_OPTIONS = ("StrictHostKeyChecking no", "UserKnownHostsFile /dev/null",
                  "BatchMode yes", "LogLevel ERROR")


def host_block(alias: str, **options: object) -> str:
    lines = [f"Host {alias}"]
    lines += [f"    {key} {value}" for key, value in options.items() if value is not None]
    lines += [f"    {option}" for option in COMMON_OPTIONS]
    return "\n".join(lines) + "\n"


def peer_config(pid: int):
    from fastdist import node

    return node.current().peers[pid].config


def worker_to_worker(a: int, b: int) -> int:
    """Worker `a` calls worker `b` over a link of their own."""
    return fd.remotecall_fetch(lambda: fd.remotecall_fetch(fd.myid, b), a)


@pytest.fixture
def ssh_config(tmp_path, sshd_server):
    """An ssh configuration file naming the test sshd `myalias` (everything in it), `bare`
    (address and key only: user and port come from the machine spec), `lost` (a HostName
    that does not resolve) and `hidden` (a HostName this machine cannot look up, reached
    through `myalias` as a jump host)."""
    srv = sshd_server
    path = tmp_path / "ssh_config"
    path.write_text(
        host_block("myalias", HostName=srv.host, Port=srv.port, User=srv.user,
                   IdentityFile=srv.key_path)
        + host_block("bare", HostName=srv.host, IdentityFile=srv.key_path)
        + host_block("lost", HostName="nosuch-host.invalid", Port=srv.port, User=srv.user,
                     IdentityFile=srv.key_path)
        + host_block("hidden", HostName="compute-7.cluster.invalid", Port=srv.port,
                     User=srv.user, IdentityFile=srv.key_path,
                     ProxyCommand=f"ssh -F {path} -W {srv.host}:%p myalias"))
    return str(path)


@pytest.fixture
def add(cluster, ssh_config):
    """addprocs with `-F` the test configuration; the `cluster` fixture removes the workers
    and checks that no process is left (ssh sessions, tunnels, shared connections)."""

    def add(machines, **kwargs):
        kwargs.setdefault("sshflags", ("-F", ssh_config))
        pids = fd.addprocs(machines, **kwargs)
        cluster.pids.extend(pids)
        return pids

    return add


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tunnel", [False, True])
def test_alias_hosts_run_calls_and_reach_each_other(add, tunnel):
    pids = add(["myalias", ("myalias", 2)], tunnel=tunnel)
    assert len(pids) == 3
    assert [fd.remotecall_fetch(fd.myid, p) for p in pids] == pids
    assert worker_to_worker(pids[0], pids[2]) == pids[2]
    assert worker_to_worker(pids[2], pids[1]) == pids[1]
    for pid in pids:
        config = peer_config(pid)
        # named as the user wrote it; reached at the HostName ssh went to
        assert config.host == "myalias"
        assert config.bind_addr == "127.0.0.1"
        if tunnel:
            # the forward's far end is the worker as its own machine reaches it
            assert config.forward.split(":", 1)[1] == f"127.0.0.1:{config.port}"
        else:
            assert config.forward is None
    assert set(fd.procs(pids[0])) >= {1, *pids}  # HostName 127.0.0.1: this machine


@pytest.mark.timeout(120)
def test_alias_with_user_and_port_in_the_spec(add, sshd_server):
    (pid,) = add([f"{sshd_server.user}@bare:{sshd_server.port}"], multiplex=True)
    assert fd.remotecall_fetch(fd.myid, pid) == pid
    assert peer_config(pid).bind_addr == "127.0.0.1"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tunnel", [False, True])
def test_alias_behind_a_jump_host(add, tunnel):
    # The master cannot look compute-7.cluster.invalid up; ssh gets there through
    # myalias. Reached directly at the address the worker reports, or through a tunnel.
    pids = add([("hidden", 2)], tunnel=tunnel)
    assert [fd.remotecall_fetch(fd.myid, p) for p in pids] == pids
    assert worker_to_worker(pids[1], pids[0]) == pids[0]
    config = peer_config(pids[0])
    assert config.host == "hidden"
    assert config.bind_addr == fd.remotecall_fetch(lambda: fd.node.current().host, pids[0])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["one", "counted", "auto", "multiplex", "tunnel"])
def test_alias_whose_hostname_does_not_resolve(add, how):
    machines, kwargs = {
        "one": (["lost"], {}),
        "counted": ([("lost", 2)], {}),
        "auto": ([("lost", "auto")], {}),
        "multiplex": ([("lost", 2)], {"multiplex": True}),
        "tunnel": (["lost"], {"tunnel": True}),
    }[how]
    with pytest.raises(fd.ClusterError) as info:
        add(machines, **kwargs)
    message = str(info.value)
    assert "'lost'" in message, message
    assert "HostName nosuch-host.invalid" in message, message
    assert "Could not resolve hostname" in message, message
    assert fd.workers() == [1]


@pytest.mark.timeout(60)
def test_unknown_alias_without_the_config_file(add):
    # Without -F the alias is just a name nobody can resolve: ssh says so, for that name.
    with pytest.raises(fd.ClusterError) as info:
        add(["myalias"], sshflags=("-o", "BatchMode=yes"))
    message = str(info.value)
    assert "'myalias'" in message and "Could not resolve hostname myalias" in message, message
    assert fd.workers() == [1]


@pytest.mark.timeout(120)
def test_machine_file_with_an_alias(tmp_path, ssh_config):
    machines = tmp_path / "machines"
    machines.write_text("2*myalias\n")
    program = ("import json, os, fastdist as fd\n"
               "pids = fd.workers()\n"
               "other = lambda p: fd.remotecall_fetch(fd.myid, [q for q in pids if q != p][0])\n"
               "print(json.dumps({'workers': pids,\n"
               "                  'ospids': [fd.remotecall_fetch(os.getpid, p) for p in pids],\n"
               "                  'across': [fd.remotecall_fetch(other, p, p) for p in pids]}))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run(
        [sys.executable, "-m", "fastdist", "--machine-file", str(machines),
         "--sshflags", f"-F {ssh_config}", "-c", program],
        capture_output=True, text=True, env=env, timeout=90, stdin=subprocess.DEVNULL,
        check=False)
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["workers"] == [2, 3]
    assert facts["across"] == [3, 2]
    from support import eventually, os_alive

    assert eventually(lambda: not any(os_alive(p) for p in facts["ospids"]), 15), \
        "alias workers outlived the command"


# -- aliases for other machines: network-namespace hosts ---------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("tunnel", [False, True])
def test_aliases_for_two_hosts(cluster, netns_hosts, tmp_path, tunnel):
    h0, h1 = netns_hosts.hosts
    path = Path(tmp_path) / "ssh_config"
    path.write_text(
        host_block("node-a", HostName=h0.addr, User=h0.sshd.user, Port=h0.sshd.port,
                   IdentityFile=h0.sshd.key_path)
        + host_block("node-b", HostName=h1.addr, User=h1.sshd.user, Port=h1.sshd.port,
                     IdentityFile=h1.sshd.key_path))
    pids = fd.addprocs([("node-a", 2), ("node-b", 2)], sshflags=("-F", str(path)),
                       tunnel=tunnel)
    cluster.pids.extend(pids)
    by_alias = {p: peer_config(p).host for p in pids}
    a = sorted(p for p in pids if by_alias[p] == "node-a")
    b = sorted(p for p in pids if by_alias[p] == "node-b")
    assert len(a) == 2 and len(b) == 2, by_alias
    assert {peer_config(p).bind_addr for p in a} == {h0.addr}
    assert {peer_config(p).bind_addr for p in b} == {h1.addr}
    # each worker runs in its own host's namespace
    assert {fd.remotecall_fetch(lambda: fd.node.current().host, p) for p in b} == {h1.addr}
    assert fd.procs(a[0]) == a and fd.procs(b[0]) == b
    # across hosts, worker to worker, over links of their own
    assert worker_to_worker(a[0], b[1]) == b[1]
    assert worker_to_worker(b[0], a[1]) == a[1]

    def link_to(pid):
        from fastdist import cluster as _cluster
        from fastdist import node

        conn = node.current().peers[pid].conn
        return conn is not None and _cluster.conn_peer_host(conn)

    assert fd.remotecall_fetch(link_to, a[0], b[1]) == h1.addr


@pytest.mark.timeout(120)
def test_hostname_where_no_worker_listens_names_alias_address_and_cause(
        cluster, netns_hosts, ssh_config, tmp_path, sshd_server):
    # ssh reaches this machine through a jump host, but the HostName is another host's
    # address: the worker starts, and the master's connection to it is refused there.
    h0 = netns_hosts.hosts[0]
    path = Path(tmp_path) / "misrouted_config"
    path.write_text(
        host_block("misrouted", HostName=h0.addr, Port=sshd_server.port, User=sshd_server.user,
                   IdentityFile=sshd_server.key_path,
                   ProxyCommand=f"ssh -F {ssh_config} -W {sshd_server.host}:%p myalias"))
    with pytest.raises(fd.ClusterError) as info:
        fd.addprocs(["misrouted"], sshflags=("-F", str(path)))
    message = str(info.value)
    assert "'misrouted'" in message and f"at {h0.addr}:" in message, message
    assert "Connection refused" in message, message
    assert fd.workers() == [1]
