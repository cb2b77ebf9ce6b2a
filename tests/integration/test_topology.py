"""Worker-to-worker links: lazy and eager all_to_all, master_worker, custom topologies."""

from __future__ import annotations

import pytest

import fastdist as fd

pytestmark = pytest.mark.timeout(90)


def connected_peers():
    import fastdist

    return sorted(p for p, info in fastdist.stats()["peers"].items())


def call_peer(other):
    import fastdist

    return fastdist.remotecall_fetch(fastdist.myid, other)


def test_lazy_links_open_on_first_use_either_direction(cluster):
    a, b, c = cluster.add(3)
    assert connected_peers() and fd.remotecall_fetch(connected_peers, a) == [1]
    assert fd.remotecall_fetch(call_peer, a, c) == c  # lower pid asks the higher to connect
    assert fd.remotecall_fetch(call_peer, c, b) == b  # higher pid connects directly
    assert fd.remotecall_fetch(connected_peers, a) == [1, c]
    assert fd.remotecall_fetch(connected_peers, c) == [1, a, b]
    # Workers know every pid even before talking to it.
    assert fd.remotecall_fetch(fd.workers, a) == [a, b, c]
    assert fd.remotecall_fetch(fd.procs, b) == [1, a, b, c]


def test_eager_all_to_all_connects_at_start(cluster):
    pids = cluster.add(3, lazy=False)
    for p in pids:
        assert fd.remotecall_fetch(connected_peers, p) == sorted({1, *pids} - {p})


def test_workers_added_later_join_lazy_cluster(cluster):
    a = cluster.add(1)[0]
    b = cluster.add(1)[0]
    assert fd.remotecall_fetch(fd.workers, a) == [a, b]
    assert fd.remotecall_fetch(call_peer, a, b) == b


def test_master_worker_topology_refuses_worker_calls(cluster):
    a, b = cluster.add(2, topology="master_worker")
    assert fd.remotecall_fetch(fd.myid, a) == a
    with pytest.raises(fd.RemoteException, match="master_worker"):
        fd.remotecall_fetch(call_peer, a, b)


def test_mixing_topologies_and_laziness_is_refused(cluster):
    cluster.add(1, lazy=False)
    with pytest.raises(ValueError, match="lazy"):
        fd.addprocs(1, lazy=True)
    with pytest.raises(ValueError, match="topology"):
        fd.addprocs(1, topology="master_worker", lazy=False)


def test_worker_id_from_socket(two_workers):
    a, b = two_workers

    def peer_of_connection_to(other):
        import fastdist
        from fastdist import node

        fastdist.remotecall_fetch(fastdist.myid, other)
        conn = node.current().peers[other].conn
        return fastdist.worker_id_from_socket(conn)

    assert fd.remotecall_fetch(peer_of_connection_to, a, b) == b
    assert fd.remotecall_fetch(peer_of_connection_to, b, 1) == 1
    assert fd.worker_id_from_socket(object()) == -1


def test_only_pid1_adds_or_removes(two_workers):
    with pytest.raises(fd.RemoteException, match="Only process 1"):
        fd.remotecall_fetch(lambda: __import__("fastdist").addprocs(1), two_workers[0])
    with pytest.raises(fd.RemoteException, match="Only process 1"):
        fd.remotecall_fetch(lambda p: __import__("fastdist").rmprocs(p), two_workers[0],
                            two_workers[1])


class RingManager(fd.LocalManager):
    """Local workers in a custom topology: worker i links only to worker i-1."""

    def launch(self, params, launched, launch_ntfy):
        import threading

        mine: list = []
        inner = threading.Condition()
        super().launch(params, mine, inner)
        for i, config in enumerate(mine):
            config.ident = f"w{i}"
            config.connect_idents = [f"w{i - 1}"] if i else []
            with launch_ntfy:
                launched.append(config)
                launch_ntfy.notify_all()


def test_custom_topology_links_only_what_connect_idents_name(cluster):
    pids = fd.addprocs(RingManager(3), topology="custom")
    cluster.pids.extend(pids)
    a, b, c = pids
    assert fd.remotecall_fetch(connected_peers, a) == [1, b]
    assert fd.remotecall_fetch(connected_peers, b) == [1, a, c]
    assert fd.remotecall_fetch(call_peer, c, b) == b
    with pytest.raises(fd.RemoteException, match="custom topology"):
        fd.remotecall_fetch(call_peer, a, c)
