"""The test services themselves work: real sshd, namespace hosts and Slurm."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
import time

import pytest

PY = sys.executable

# Listens on argv[1]:argv[2], prints "ready", then answers every connection with
# "hello <peer address>" until killed.
LISTENER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(("hello " + peer[0]).encode())
    c.close()
"""

# Connects to argv[1]:argv[2] with timeout argv[3]; prints what the server says.
CONNECT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
print(c.recv(100).decode())
"""


class Listener:
    """A LISTENER process, optionally inside a namespace (argv prefix)."""

    def __init__(self, addr: str, port: int, prefix: tuple[str, ...] = ()):
        self.proc = subprocess.Popen(
            [*prefix, PY, "-c", LISTENER, addr, str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.close()
            raise RuntimeError(f"listener did not start: {line!r} {self.proc.stderr.read()}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.communicate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- sshd ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_ssh_runs_command(sshd_server):
    p = subprocess.run(
        sshd_server.ssh_command("echo", "hello", "from", "ssh"),
        check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout == "hello from ssh\n"
    assert p.stderr == ""  # LogLevel=ERROR: no "Permanently added ..." noise


@pytest.mark.timeout(60)
def test_ssh_flags_work_with_plain_ssh(sshd_server):
    argv = ["ssh", *sshd_server.sshflags, f"{sshd_server.user}@{sshd_server.host}", "id -un"]
    p = subprocess.run(
        argv, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == sshd_server.user


@pytest.mark.timeout(60)
def test_ssh_stdin_reaches_remote_command(sshd_server):
    # the way a cluster manager hands the cookie to a worker: first line of stdin
    p = subprocess.run(
        sshd_server.ssh_command("head", "-1"),
        input="cookie-0123456789abcdef\nsecond line\n",
        check=False, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout == "cookie-0123456789abcdef\n"


@pytest.mark.timeout(60)
def test_ssh_stdin_is_streamed_while_open(sshd_server):
    # the line must arrive while our end of stdin is still open
    proc = subprocess.Popen(
        sshd_server.ssh_command(PY, "-u", "-c", "'import sys; print(\"got\", input())'"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        proc.stdin.write("the-cookie\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "got the-cookie\n"
    finally:
        proc.stdin.close()
        proc.wait(timeout=20)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0


@pytest.mark.timeout(60)
def test_ssh_remote_python_is_this_interpreter(sshd_server):
    p = subprocess.run(
        sshd_server.ssh_command("python3", "-c", "'import sys; print(sys.executable)'"),
        check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert os.path.realpath(p.stdout.strip()) == os.path.realpath(PY)


@pytest.mark.timeout(90)
def test_ssh_many_parallel_logins(sshd_server):
    def one(i):
        return subprocess.run(
            sshd_server.ssh_command("echo", str(i)),
            check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    assert [r.returncode for r in results] == [0] * 24, [r.stderr for r in results]
    assert [r.stdout.strip() for r in results] == [str(i) for i in range(24)]


# -- network namespace hosts ----------------------------------------------------------


@pytest.mark.timeout(60)
def test_netns_hosts_layout(netns_hosts):
    hosts = netns_hosts.hosts
    assert len(hosts) == 2
    assert len({h.addr for h in hosts}) == 2
    for h in hosts:
        assert h.addr.startswith("10.213.") and h.addr.endswith(".2")
        assert h.host_side_addr == h.addr.rsplit(".", 1)[0] + ".1"
        out = netns_hosts.exec(h.index, ["ip", "-4", "-o", "addr", "show"]).stdout
        assert f"inet {h.addr}/24" in out
        # only its own link and loopback are visible inside
        assert "eth0" not in out


@pytest.mark.timeout(60)
def test_ssh_into_namespace_hosts(netns_hosts):
    for h in netns_hosts.hosts:
        assert h.sshd.host == h.addr
        p = subprocess.run(
            h.sshd.ssh_command("ip", "-4", "-o", "addr", "show"),
            check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        assert f"inet {h.addr}/24" in p.stdout
        p = subprocess.run(
            h.sshd.ssh_command("head", "-1"),
            input="cookie\n", check=False, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert p.stdout == "cookie\n", p.stderr


@pytest.mark.timeout(60)
def test_netns_host_reaches_other_host_over_tcp(netns_hosts):
    h0, h1 = netns_hosts.hosts
    port = 47001
    with Listener(h1.addr, port, prefix=tuple(h1.exec_argv([]))):
        p = netns_hosts.exec(0, [PY, "-c", CONNECT, h1.addr, port, 5])
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == f"hello {h0.addr}"


@pytest.mark.timeout(60)
def test_netns_hosts_reach_this_machine(netns_hosts):
    h0, h1 = netns_hosts.hosts
    port = _free_port()
    # a "master" bound to host 0's link address is reachable from every host
    with Listener(h0.host_side_addr, port):
        for h in (h0, h1):
            p = netns_hosts.exec(h.index, [PY, "-c", CONNECT, h0.host_side_addr, port, 5])
            assert p.returncode == 0, p.stderr
            assert p.stdout.strip() == f"hello {h.addr}"


@pytest.mark.timeout(60)
def test_worker_started_over_ssh_connects_back(netns_hosts):
    # what an SSH cluster manager does: ssh to a host, the process there dials home
    h0, h1 = netns_hosts.hosts
    port = _free_port()
    with Listener("0.0.0.0", port):
        p = subprocess.run(
            h1.sshd.ssh_command(PY, "-c", f"'{CONNECT}'", h0.host_side_addr, str(port), "5"),
            check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == f"hello {h1.addr}"


@pytest.mark.timeout(90)
def test_cut_and_restore(netns_hosts):
    h0, h1 = netns_hosts.hosts
    port = 47002
    with Listener(h1.addr, port, prefix=tuple(h1.exec_argv([]))):
        ok = netns_hosts.exec(0, [PY, "-c", CONNECT, h1.addr, port, 5])
        assert ok.returncode == 0, ok.stderr

        with netns_hosts.cut_off(1):
            assert netns_hosts.is_cut(1)
            # from another host: packets vanish, the connect times out
            t0 = time.monotonic()
            p = netns_hosts.exec(0, [PY, "-c", CONNECT, h1.addr, port, 1.5])
            assert p.returncode != 0
            assert "timed out" in p.stderr, p.stderr
            assert time.monotonic() - t0 >= 1.4
            # from this machine: fails, and nothing goes out through the real network
            with pytest.raises(OSError):
                socket.create_connection((h1.addr, port), timeout=1.5).close()
            route = subprocess.run(
                ["ip", "route", "get", h1.addr], check=False, capture_output=True, text=True
            )  # fmt: skip
            assert "eth" not in route.stdout and "via" not in route.stdout, route.stdout
            # ssh to the cut host fails too
            p = subprocess.run(
                [*h1.sshd.ssh_command("true")[:1], "-o", "ConnectTimeout=2",
                 *h1.sshd.ssh_command("true")[1:]],
                check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert p.returncode != 0

        assert not netns_hosts.is_cut(1)
        back = netns_hosts.exec(0, [PY, "-c", CONNECT, h1.addr, port, 5])
        assert back.returncode == 0, back.stderr
        assert back.stdout.strip() == f"hello {h0.addr}"
        p = subprocess.run(
            h1.sshd.ssh_command("echo", "back"),
            check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert p.stdout == "back\n", p.stderr


# -- Slurm ----------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_srun_hostname(slurm_cluster):
    p = slurm_cluster.run(["srun", "-n", "2", "hostname"], stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [socket.gethostname().split(".")[0]] * 2


@pytest.mark.timeout(90)
def test_sinfo_shows_partition(slurm_cluster):
    p = slurm_cluster.run(["sinfo", "-h", "-o", "%P %a %D"])
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [f"{slurm_cluster.partition}*", "up", "1"]


# Passing the cookie to Slurm tasks on stdin (slurm-wlm 22.05, checked here):
#  * srun forwards its stdin to EVERY task by default (same as --input=all), so
#    `printf 'COOKIE\n' | srun -n N worker` gives each worker the line; the tasks
#    see EOF when srun's stdin is closed.
#  * `--input=0` (a task id) sends it to that task only; the others read EOF.
#  * srun also exports the caller's environment (--export=ALL by default), so an
#    environment variable reaches every task too, but stdin keeps the secret out
#    of the job record and of other users' `ps`.
#  * One job with more tasks than the node's CPUs (2) waits forever for resources
#    unless srun gets --overcommit (-O); oversubscription (FORCE:4) applies
#    between jobs, not to the tasks of one job.


@pytest.mark.timeout(90)
def test_srun_stdin_goes_to_every_task(slurm_cluster):
    code = "import sys; print('task got', sys.stdin.readline().strip(), sys.stdin.read() == '')"
    p = slurm_cluster.run(["srun", "-n", "2", "-l", PY, "-c", code], input="cookie-xyz\n")
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.splitlines()) == [
        "0: task got cookie-xyz True",
        "1: task got cookie-xyz True",
    ]
    p = slurm_cluster.run(
        ["srun", "-n", "2", "--input=all", "head", "-1"], input="cookie-abc\nnext\n"
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout == "cookie-abc\ncookie-abc\n"


@pytest.mark.timeout(90)
def test_srun_stdin_to_one_task(slurm_cluster):
    code = "import sys; print('task got', repr(sys.stdin.readline().strip()))"
    p = slurm_cluster.run(["srun", "-n", "2", "-l", "--input=0", PY, "-c", code], input="c\n")
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.splitlines()) == ["0: task got 'c'", "1: task got ''"]


@pytest.mark.timeout(90)
def test_srun_stdin_is_streamed_while_open(slurm_cluster):
    env = {**os.environ, **slurm_cluster.env}
    proc = subprocess.Popen(
        ["srun", "-n", "2", "-l", PY, "-u", "-c", "print('got', input())"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip
    try:
        proc.stdin.write("live-cookie\n")
        proc.stdin.flush()
        lines = sorted([proc.stdout.readline(), proc.stdout.readline()])
        assert lines == ["0: got live-cookie\n", "1: got live-cookie\n"]
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0


@pytest.mark.timeout(90)
def test_srun_more_tasks_than_cpus_with_overcommit(slurm_cluster):
    p = slurm_cluster.run(["srun", "-n", "6", "--overcommit", "hostname"], stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.split()) == 6


@pytest.mark.timeout(90)
def test_srun_environment_reaches_tasks(slurm_cluster):
    p = slurm_cluster.run(
        ["srun", "-n", "2", "printenv", "FASTDIST_TEST_VALUE"],
        env={"FASTDIST_TEST_VALUE": "v42"}, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout == "v42\nv42\n"
