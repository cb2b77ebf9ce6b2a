"""pytest plugin: real servers for integration tests (session-scoped fixtures).

Enable it from the top-level ``tests/conftest.py`` with::

    pytest_plugins = ["services.plugin"]

Fixtures (all need root; missing system packages are installed by install.sh).
ssh sessions get this interpreter's directory first on PATH, so ``python3``
there is the interpreter running the tests.

``sshd_server``
    :class:`services.sshd.SSHServer` on 127.0.0.1 (free port).  Use
    ``srv.address`` (``user@host``), ``srv.sshflags`` and ``srv.ssh_command()``.
``netns_hosts``
    :class:`services.netns.NetnsHosts` with 2 network-namespace "hosts"; each
    ``netns_hosts.hosts[i]`` has ``.addr``, ``.host_side_addr``, ``.name`` and
    ``.sshd`` (an SSHServer bound to ``.addr`` inside the namespace, port 22).
    A master reachable from all hosts listens on ``hosts[0].host_side_addr`` or
    0.0.0.0.  Tests that ``cut()`` a host must ``restore()`` it (or use
    ``with netns_hosts.cut_off(i):``); links are restored after each test that
    used the fixture anyway.  While cut, connects from the other host time out;
    connects from this machine fail at once (EINVAL, blackhole route).
``slurm_cluster``
    :class:`services.slurm.SlurmCluster`: one node (this machine, 2 CPUs),
    partition ``debug`` (default; up to 4 jobs share a CPU).  ``srun`` gives its
    stdin to every task; a step with more tasks than CPUs needs ``--overcommit``.

A server that cannot start makes the fixture raise (the test errors); it is
never skipped.  Everything is torn down at the end of the session, and leftovers
of crashed earlier runs are removed before starting.
"""

from __future__ import annotations

import pytest

from .netns import NetnsHosts
from .slurm import SlurmCluster
from .sshd import SSHServer

_active_netns: list[NetnsHosts] = []


@pytest.fixture(scope="session")
def sshd_server():
    srv = SSHServer("127.0.0.1")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def netns_hosts():
    net = NetnsHosts(2)
    net.start()
    _active_netns.append(net)
    try:
        net.start_sshd()
        yield net
    finally:
        _active_netns.remove(net)
        net.stop()


@pytest.fixture(autouse=True)
def _netns_hosts_relink(request):
    """After each test that used ``netns_hosts``, bring cut-off hosts back."""
    yield
    if "netns_hosts" in request.fixturenames:
        for net in _active_netns:
            for i in range(len(net)):
                if net.is_cut(i):
                    net.restore(i)


@pytest.fixture(scope="session")
def slurm_cluster():
    cluster = SlurmCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
