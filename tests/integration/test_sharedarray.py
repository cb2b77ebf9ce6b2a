"""SharedArray: one copy of an array per host, mapped by every process that uses it.
It is a numpy array everywhere, travels as a handle, splits work as Julia does, can be
backed by a file, and its memory goes when nobody holds it — or when everyone died."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.linalg
from support import eventually, netns_flags, os_alive, wait_until

import fastdist as fd
from fastdist.sharedarray import _part

pytestmark = pytest.mark.timeout(120)

MB = 1 << 20


# -- helpers that run on workers -------------------------------------------------------------


def keep(name, value):
    import __main__

    setattr(__main__, name, value)


def drop(name):
    import __main__

    delattr(__main__, name)
    gc.collect()


def kept_sum(name):
    import __main__

    return float(getattr(__main__, name).sum())


def write(a, index, value):
    a[index] = value


def describe(a):
    return (type(a).__name__, fd.myid(), fd.indexpids(a), fd.localindices(a), fd.procs(a))


def fill_my_part(sa):
    r = fd.localindices(sa)
    sa.reshape(-1)[r.start:r.stop] = fd.myid()


def memory_holders(name: str) -> set[int]:
    """OS pids of every process on this machine that maps or holds memory file `name`."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                if name in f.read():
                    found.add(int(entry))
                    continue
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fdname in fds:
            try:
                if name in os.readlink(f"/proc/{entry}/fd/{fdname}"):
                    found.add(int(entry))
                    break
            except OSError:
                continue  # closed meanwhile
    return found


def memory_name(sa) -> str:
    return sa._shared().handle.memory_name


# -- a numpy array everywhere ----------------------------------------------------------------


def test_it_is_a_numpy_array_on_every_process_and_writes_are_seen_by_all(two_workers):
    w2, w3 = two_workers
    sa = fd.SharedArray((300, 200), np.float64)
    assert isinstance(sa, np.ndarray) and sa.shape == (300, 200) and sa.dtype == np.float64
    assert not sa.any()  # fresh memory is zeros
    sa[:] = np.arange(300 * 200, dtype=np.float64).reshape(300, 200)
    expect = sa.view(np.ndarray).copy()
    # numpy and scipy take it as it is, here and on a worker
    assert float(np.sum(sa)) == float(expect.sum())
    assert np.allclose(scipy.linalg.norm(sa), np.linalg.norm(expect))
    assert np.array_equal(np.asarray(sa), expect)
    assert fd.remotecall_fetch(np.sum, w2, sa) == expect.sum()
    assert fd.remotecall_fetch(lambda a: float(scipy.linalg.norm(a[10:20])), w3, sa) == \
        pytest.approx(float(np.linalg.norm(expect[10:20])))
    # a worker's write is seen by the master and by the other worker
    fd.remotecall_fetch(write, w2, sa, (5, 7), -1.0)
    assert sa[5, 7] == -1.0
    assert fd.remotecall_fetch(lambda a: float(a[5, 7]), w3, sa) == -1.0
    # and the master's by the workers
    sa[299, 199] = 12345.0
    assert fd.remotecall_fetch(lambda a: float(a[299, 199]), w2, sa) == 12345.0
    # a worker's ufunc in place writes the shared memory
    fd.remotecall_fetch(lambda a: np.multiply(a, 2, out=a) is a, w3, sa)
    assert sa[5, 7] == -2.0 and sa[1, 1] == 2 * expect[1, 1]


def test_passing_it_sends_a_handle_never_the_data(two_workers):
    w = two_workers[0]
    sa = fd.SharedArray((4 * MB,), np.float64)  # 32 MB
    sa[:] = 1.0
    fd.remotecall_fetch(np.sum, w, sa)  # connections, imports, the worker's first mapping
    before = fd.stats()["peers"][w]
    for _ in range(5):
        assert fd.remotecall_fetch(np.sum, w, sa) == 4 * MB
    after = fd.stats()["peers"][w]
    assert after["bytes_sent"] - before["bytes_sent"] < 5 * 4096
    assert after["shm_bytes_sent"] == before["shm_bytes_sent"]


def test_views_travel_as_views_of_the_same_memory(two_workers):
    w = two_workers[0]
    sa = fd.SharedArray((6, 8), np.int64)
    sa[:] = np.arange(48).reshape(6, 8)
    for view in (sa[2:], sa[1::2, ::3], sa.T, sa[::-1, 4], sa[3], sa.reshape(8, 6)[2:4]):
        assert type(view) is fd.SharedArray
        got = fd.remotecall_fetch(lambda v: (type(v).__name__, v.copy()), w, view)
        assert got[0] == "SharedArray" and np.array_equal(got[1], view)
    fd.remotecall_fetch(write, w, sa[1::2, ::3], (0, 1), 1000)  # sa[1, 3]
    assert sa[1, 3] == 1000
    fd.remotecall_fetch(write, w, sa.T, (7, 5), 2000)  # sa[5, 7]
    assert sa[5, 7] == 2000


def test_results_in_new_memory_are_ordinary_arrays_and_travel_as_data(two_workers):
    sa = fd.SharedArray((10,), np.float64)
    sa[:] = np.arange(10.0)
    for new in (sa + 1, sa[sa > 4], sa[[1, 2, 3]], sa.copy(), sa.astype(np.int32), np.copy(sa),
                sa.flatten(), np.asarray(sa), fd.sdata(sa)):
        assert type(new) is np.ndarray
    assert type(sa.sum()) is np.float64 and sa.sum() == 45.0
    copy = sa.copy()
    fd.remotecall_fetch(write, two_workers[0], copy, 0, 99.0)
    assert copy[0] == 0.0  # a copy, sent by value
    fd.remotecall_fetch(write, two_workers[0], sa, 0, 99.0)
    assert sa[0] == 99.0
    assert fd.sdata(copy) is copy
    assert fd.sdata(sa).base is not None and np.shares_memory(fd.sdata(sa), sa)


def test_an_existing_array_is_copied_in_and_vectors_and_matrices_have_their_names(two_workers):
    a = np.random.default_rng(0).random((50, 40))
    sa = fd.SharedArray(a)
    assert type(sa) is fd.SharedArray and np.array_equal(sa, a) and not np.shares_memory(sa, a)
    total = fd.remotecall_fetch(lambda s: float(s.sum()), two_workers[0], sa)
    assert total == pytest.approx(a.sum())
    v = fd.SharedVector(7, np.int32)
    m = fd.SharedMatrix((3, 4))
    assert v.shape == (7,) and v.dtype == np.int32 and m.shape == (3, 4) and m.dtype == float
    assert isinstance(v, fd.SharedVector) and not isinstance(v, fd.SharedMatrix)
    assert isinstance(m, fd.SharedMatrix) and isinstance(m, fd.SharedArray)
    assert not isinstance(a, fd.SharedMatrix)
    assert np.array_equal(fd.SharedMatrix(a), a)
    with pytest.raises(ValueError, match="one dimension"):
        fd.SharedVector((2, 3))
    with pytest.raises(ValueError, match="two dimensions"):
        fd.SharedMatrix(5)
    assert fd.SharedArray(()).shape == () and fd.SharedArray((0, 3)).size == 0
    empty = fd.SharedArray((0,), np.int8)
    assert fd.remotecall_fetch(lambda e: e.shape, two_workers[0], empty) == (0,)


# -- pids, init and Julia's split ------------------------------------------------------------


def test_julia_split_of_the_flat_indices():
    # Julia's range_1dim, from 0: near-equal contiguous parts, the last takes the rest
    assert [_part(10, 3, i) for i in (1, 2, 3)] == [range(3), range(3, 6), range(6, 10)]
    assert [_part(2, 3, i) for i in (1, 2, 3)] == [range(1), range(1, 2), range(0)]
    assert _part(10, 3, 0) == range(0)
    for length in (0, 1, 7, 64, 1001):
        for nworkers in (1, 2, 5, 8):
            parts = [_part(length, nworkers, i) for i in range(1, nworkers + 1)]
            assert [i for r in parts for i in r] == list(range(length))


def test_init_runs_on_every_worker_and_each_fills_its_local_indices(cluster):
    pids = cluster.add(3)
    sa = fd.SharedArray((10, 3), np.int64, init=fill_my_part)
    assert fd.procs(sa) == sa.procs() == [1, *pids]
    assert fd.indexpids(sa) == 0 and fd.localindices(sa) == range(0)  # the master: not a worker
    assert list(sa.reshape(-1)) == [pids[0]] * 10 + [pids[1]] * 10 + [pids[2]] * 10
    seen = [fd.remotecall_fetch(describe, p, sa) for p in pids]
    assert seen == [("SharedArray", p, i + 1, range(10 * i, 10 * i + 10), [1, *pids])
                    for i, p in enumerate(pids)]
    # chosen pids: only they share the work, in the order given
    ta = fd.SharedArray((5,), np.int64, init=fill_my_part, pids=[pids[2], pids[0]])
    assert list(ta) == [pids[2], pids[2], pids[0], pids[0], pids[0]]
    assert fd.procs(ta) == [pids[2], pids[0]]
    assert fd.remotecall_fetch(describe, pids[1], ta)[2:] == (0, range(0), [pids[2], pids[0]])


def test_alone_the_master_is_the_worker():
    assert fd.workers() == [1]  # no workers: the master shares the work alone
    sa = fd.SharedArray((4,), np.int64, init=fill_my_part)
    assert fd.procs(sa) == [1] and fd.indexpids(sa) == 1 and fd.localindices(sa) == range(4)
    assert list(sa) == [1, 1, 1, 1]


def test_init_failures_are_collected(two_workers):
    def fails_on_the_second(sa):
        if fd.indexpids(sa) == 2:
            raise RuntimeError("no good")

    with pytest.raises(fd.CompositeException) as info:
        fd.SharedArray((4,), init=fails_on_the_second)
    assert len(info.value.exceptions) == 1
    assert isinstance(info.value.exceptions[0], fd.RemoteException)
    assert info.value.exceptions[0].pid == two_workers[1]
    assert "no good" in str(info.value.exceptions[0])


def test_bad_arguments_are_clear_errors(two_workers):
    with pytest.raises(ValueError, match="no process with pid 99"):
        fd.SharedArray((3,), pids=[two_workers[0], 99])
    with pytest.raises(ValueError, match="twice"):
        fd.SharedArray((3,), pids=[two_workers[0], two_workers[0]])
    with pytest.raises(TypeError, match="Python objects"):
        fd.SharedArray((3,), object)
    with pytest.raises(ValueError, match="negative"):
        fd.SharedArray((3, -1))
    with pytest.raises(TypeError, match="integers"):
        fd.SharedArray((3, 2.5))
    with pytest.raises(ValueError, match="file-backed"):
        fd.SharedArray((3,), mode="r+")
    with pytest.raises(TypeError, match="SharedArray"):
        fd.localindices(np.zeros(3))
    with pytest.raises(ValueError, match="copy"):
        fd.SharedArray((3,)).copy().view(fd.SharedArray).procs()


def test_a_worker_of_this_host_outside_pids_maps_it_too(cluster):
    first = cluster.add(1)
    sa = fd.SharedArray((6,), np.float64, pids=first)
    later = cluster.add(1)[0]  # not among sa's pids
    fd.remotecall_fetch(write, later, sa, 2, 5.0)
    assert sa[2] == 5.0
    assert fd.remotecall_fetch(describe, later, sa)[2:] == (0, range(0), first)


def test_one_made_on_a_worker_reaches_the_master_and_the_other_workers(two_workers):
    w2, w3 = two_workers

    def make():
        sa = fd.SharedArray((1000,), np.float64)
        sa[:] = 3.0
        return sa

    sa = fd.remotecall_fetch(make, w2)
    assert type(sa) is fd.SharedArray and sa.sum() == 3000.0
    sa[0] = 10.0
    assert fd.remotecall_fetch(lambda a: float(a[0]), w3, sa) == 10.0
    assert fd.remotecall_fetch(lambda a: float(a.sum()), w2, sa) == 3007.0


# -- file-backed arrays ----------------------------------------------------------------------


def test_file_backed_arrays_are_mapped_and_changes_reach_the_file(two_workers, tmp_path):
    path = tmp_path / "data.bin"
    sa = fd.SharedArray((4, 5), np.int32, filename=path, init=fill_my_part)  # "w+": created
    assert os.path.getsize(path) == 4 * 5 * 4
    fd.remotecall_fetch(write, two_workers[1], sa, (3, 4), 77)
    on_disk = np.fromfile(path, np.int32).reshape(4, 5)
    assert np.array_equal(on_disk, sa) and on_disk[3, 4] == 77 and on_disk[0, 0] == two_workers[0]
    # "r+" at an offset: the bytes before it stay as they were, the file grows to fit
    header = b"HEADER-" * 1000
    other = tmp_path / "offset.bin"
    other.write_bytes(header)
    ta = fd.SharedArray((100,), np.float64, filename=other, offset=len(header), mode="r+")
    ta[:] = np.arange(100.0)
    fd.remotecall_fetch(write, two_workers[0], ta, 99, -5.0)
    raw = other.read_bytes()
    assert raw[:len(header)] == header
    assert list(np.frombuffer(raw[len(header):], np.float64)[-2:]) == [98.0, -5.0]
    # "r": read only everywhere
    ra = fd.SharedArray((100,), np.float64, filename=other, offset=len(header), mode="r")
    assert ra[99] == -5.0 and not ra.flags.writeable
    with pytest.raises(fd.RemoteException, match="read-only"):
        fd.remotecall_fetch(write, two_workers[0], ra, 0, 1.0)
    with pytest.raises(ValueError, match="fewer than"):
        fd.SharedArray((1000,), np.float64, filename=other, mode="r")
    with pytest.raises(ValueError, match="mode"):
        fd.SharedArray((10,), filename=other, mode="a")
    with pytest.raises(FileNotFoundError):
        fd.SharedArray((10,), filename=tmp_path / "missing.bin", mode="r+")


# -- lifetime ---------------------------------------------------------------------------------


def test_memory_is_freed_when_no_process_holds_a_reference(two_workers):
    w = two_workers[0]
    sa = fd.SharedArray((MB,), np.float64)
    sa[:] = 2.0
    name = memory_name(sa)
    masters_record = sa._shared().handle.rrid
    fd.remotecall_fetch(keep, w, "sa", sa)
    worker_ospid = fd.remotecall_fetch(os.getpid, w)
    assert os.getpid() in memory_holders(name) and worker_ospid in memory_holders(name)
    del sa
    gc.collect()
    # the worker still holds it: the memory lives, readable there
    time.sleep(0.5)
    assert fd.remotecall_fetch(kept_sum, w, "sa") == 2.0 * MB
    assert masters_record in fd.node.current().store.values
    assert os.getpid() in memory_holders(name)  # the master keeps the memory file open
    fd.remotecall_fetch(drop, w, "sa")
    assert eventually(lambda: not memory_holders(name), 15), memory_holders(name)
    assert masters_record not in fd.node.current().store.values


def test_a_worker_that_received_it_keeps_it_mapped_between_calls_for_a_while(two_workers):
    from fastdist.sharedarray import KEEP_SECONDS

    w = two_workers[0]
    sa = fd.SharedArray((1000,), np.float64)
    name = memory_name(sa)
    worker_ospid = fd.remotecall_fetch(os.getpid, w)
    fd.remotecall_fetch(np.sum, w, sa)
    assert worker_ospid in memory_holders(name)
    # not used for a while: the worker lets go; the master (which holds sa) keeps it
    assert eventually(lambda: worker_ospid not in memory_holders(name), KEEP_SECONDS + 10)
    assert os.getpid() in memory_holders(name)
    assert fd.remotecall_fetch(np.sum, w, sa) == 0.0


KILLED_MASTER = """
import json, os, sys, time
import numpy as np
import fastdist as fd

def keep(sa):
    import __main__
    __main__.sa = sa
    return os.getpid()

pids = fd.addprocs(2)
sa = fd.SharedArray((1 << 20,), np.float64)
sa[:] = 1.0
ospids = [fd.remotecall_fetch(keep, p, sa) for p in pids]
print(json.dumps({"name": sa._shared().handle.memory_name, "workers": ospids}), flush=True)
sys.stdin.readline()
print("still here", fd.remotecall_fetch(lambda: float(__import__("__main__").sa.sum()), pids[1]),
      flush=True)
time.sleep(600)
"""


def test_sigkilled_worker_and_master_leave_nothing_behind():
    dev_shm = set(os.listdir("/dev/shm"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    with subprocess.Popen([sys.executable, "-c", KILLED_MASTER], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=env) as master:
        try:
            assert master.stdin is not None and master.stdout is not None
            info = json.loads(master.stdout.readline())
            name, workers = info["name"], info["workers"]
            assert memory_holders(name) >= {master.pid, *workers}
            os.kill(workers[0], signal.SIGKILL)  # a worker dies: the others go on
            wait_until(lambda: not os_alive(workers[0]), 10, "the killed worker to go")
            master.stdin.write("\n")
            master.stdin.flush()
            assert master.stdout.readline().split() == ["still", "here", str(float(1 << 20))]
            master.send_signal(signal.SIGKILL)  # and then the master
            master.wait(10)
            wait_until(lambda: not any(os_alive(p) for p in workers), 30,
                       "the workers to exit after their master")
            assert memory_holders(name) == set()
        finally:
            if master.poll() is None:
                master.kill()
    assert set(os.listdir("/dev/shm")) == dev_shm


# -- another host ------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_a_process_on_another_host_is_refused_by_name(cluster, netns_hosts):
    h0 = netns_hosts.hosts[0]
    (local,) = cluster.add(1)
    (remote,) = fd.addprocs([f"{h0.sshd.user}@{h0.addr}"], sshflags=netns_flags(netns_hosts))
    cluster.pids.append(remote)
    assert remote not in fd.procs(1)
    with pytest.raises(ValueError, match=f"process {remote} is on another host"):
        fd.SharedArray((10,), pids=[local, remote])
    sa = fd.SharedArray((10,))
    assert fd.procs(sa) == [1, local]
    with pytest.raises(Exception, match=f"cannot go to process {remote}: it is on another host"):
        fd.remotecall_fetch(np.sum, remote, sa)
    # the same array still reaches the processes of this host
    sa[:] = 1.0
    assert fd.remotecall_fetch(np.sum, local, sa) == 10.0


# -- beyond Julia: read-only arrays stored once per host ----------------------------------


def backing(x):
    """(inode, name) of the mapping that holds array `x`'s data, its flags and sum."""
    addr = x.__array_interface__["data"][0]
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if lo <= addr < hi:
                return int(parts[4]), " ".join(parts[5:]), bool(x.flags.writeable), float(x.sum())
    raise AssertionError("no mapping holds the array")


def host_segments_settled():
    """The master's read-only copies left by earlier tests are gone (they go within a
    tick once their arrays are freed): counts below start from zero."""
    from fastdist.hostbuffers import IDLE_SECONDS

    gc.collect()
    shm = fd.node.current().shm
    assert eventually(lambda: shm.host.nsegments == 0, IDLE_SECONDS + 10)
    return shm


def read_only(n, seed=0):
    a = np.random.default_rng(seed).random(n)
    a.flags.writeable = False
    return a


def test_a_read_only_array_sent_to_many_workers_is_stored_once_per_host(cluster):
    shm = host_segments_settled()
    pids = cluster.add(4)  # fresh workers: the first frame to each waits for its answer
    a = read_only(2 * MB)
    seen = [fd.remotecall_fetch(backing, p, a) for p in pids]
    inode, name, writeable, total = seen[0]
    assert seen == [seen[0]] * 4, seen
    assert "fastdist-host-buffer" in name and not writeable and total == float(a.sum())
    assert shm.host.nsegments == 1
    assert [fd.stats()["peers"][p]["shm_host_buffers_sent"] for p in pids] == [1] * 4
    # sent again, it names the same copy
    assert fd.remotecall_fetch(backing, pids[0], a)[0] == inode and shm.host.nsegments == 1
    # a writeable array still gets a copy per worker, writeable there
    b = np.ones(2 * MB)
    for p in pids[:2]:
        fd.remotecall_fetch(np.sum, p, b)  # (the first may take the socket)
    per_worker = [fd.remotecall_fetch(backing, p, b) for p in pids[:2]]
    assert per_worker[0][0] != per_worker[1][0] and per_worker[0][2] and per_worker[1][2]


def test_a_read_only_array_captured_by_a_pmap_function_is_stored_once_per_host(two_workers):
    a = read_only(2 * MB, seed=1)
    total = float(a.sum())

    def uses_a(i):
        return backing(a)[:2] + (fd.myid(), float(a[i]))

    got = fd.pmap(uses_a, range(20))
    assert {g[2] for g in got} == set(two_workers)  # both workers took part
    assert len({g[:2] for g in got}) == 1 and "fastdist-host-buffer" in got[0][1]
    assert [g[3] for g in got] == [float(a[i]) for i in range(20)]
    pool = fd.CachingPool(two_workers)
    got = [fd.remotecall_fetch(uses_a, pool, 3) for _ in range(4)]
    assert len({g[:2] for g in got}) == 1 and all(g[3] == float(a[3]) for g in got)
    assert fd.remotecall_fetch(lambda: float(a.sum()), two_workers[0]) == total
    fd.clear(pool)


def test_a_frame_mixing_read_only_and_other_buffers_arrives_whole(two_workers):
    w = two_workers[0]
    fd.remotecall_fetch(np.sum, w, np.ones(2 * MB))  # the worker accepts our segments
    ro, rw, small = read_only(MB, seed=2), np.arange(2 * MB, dtype=np.float64), np.ones(10)

    def check(d):
        return {k: (backing(v)[1], bool(v.flags.writeable), float(v.sum())) for k, v in d.items()}

    got = fd.remotecall_fetch(check, w, {"ro": ro, "rw": rw, "small": small})
    assert got["ro"] == (got["ro"][0], False, float(ro.sum()))
    assert "fastdist-host-buffer" in got["ro"][0]
    assert "fastdist-host-buffer" not in got["rw"][0]
    assert got["rw"][1:] == (True, float(rw.sum())) and got["small"][1:] == (True, 10.0)


def test_the_senders_copy_goes_once_the_array_is_gone_and_every_receiver_mapped_it(two_workers):
    from fastdist.hostbuffers import IDLE_SECONDS

    shm = host_segments_settled()
    a = read_only(2 * MB, seed=3)
    for w in two_workers:
        fd.remotecall_fetch(keep, w, "ro", a)
    assert shm.host.nsegments == 1
    del a
    gc.collect()
    # the sender lets go of its copy; the workers' arrays live on in their mappings
    assert eventually(lambda: shm.host.nsegments == 0, IDLE_SECONDS + 10)
    assert [fd.remotecall_fetch(kept_sum, w, "ro") for w in two_workers] == \
        [float(read_only(2 * MB, seed=3).sum())] * 2
    for w in two_workers:
        fd.remotecall_fetch(drop, w, "ro")


class _NoSegments:
    """Stands in for a peer's segments when none can be made (no memory, no fds)."""

    nsegments = 0

    def put(self, buffers):
        raise OSError(24, "Too many open files")

    def close(self):
        pass


def test_when_the_rest_of_a_frame_cannot_take_shared_memory_all_of_it_takes_the_socket(
        two_workers):
    from fastdist.hostbuffers import IDLE_SECONDS

    w = two_workers[0]
    fd.remotecall_fetch(np.sum, w, np.ones(2 * MB))
    shm = fd.node.current().shm
    shm._outboxes[w] = _NoSegments()
    try:
        ro, rw = read_only(MB, seed=4), np.arange(2 * MB, dtype=np.float64)
        got = fd.remotecall_fetch(lambda d: {k: backing(v)[1:] for k, v in d.items()}, w,
                                  {"ro": ro, "rw": rw})
        assert got["ro"][1:] == (False, float(ro.sum()))
        assert got["rw"][1:] == (True, float(rw.sum()))
        assert "fastdist-host-buffer" not in got["ro"][0]  # through the socket
        del ro
        gc.collect()
        # the copy made for it is not kept for a receiver that never got its descriptor
        assert eventually(lambda: shm.host.nsegments == 0, IDLE_SECONDS + 10)
    finally:
        shm._outboxes.pop(w, None)


def test_a_worker_without_shared_memory_gets_read_only_arrays_through_the_socket(cluster):
    shm = host_segments_settled()
    (w,) = cluster.add(1, env={"FASTDIST_SHM": "0"})  # it neither offers nor accepts
    a = read_only(2 * MB, seed=5)
    for _ in range(3):
        _inode, name, _writeable, total = fd.remotecall_fetch(backing, w, a)
        assert "fastdist-host-buffer" not in name and total == float(a.sum())
    assert w not in shm._answered  # its answer was waited for once, not at every call
    assert shm.host.nsegments == 0 and fd.stats()["peers"][w]["shm_host_buffers_sent"] == 0


def test_large_copies_into_shared_memory_are_exact(two_workers):
    # From 64 MB the copy is split among threads: every byte still lands in its place.
    a = np.random.default_rng(6).random(9_000_001)  # 72 MB, an odd length
    sa = fd.SharedArray(a)
    assert np.array_equal(sa, a)
    assert fd.remotecall_fetch(lambda s: float(s.sum()), two_workers[0], sa) == float(a.sum())
    a.flags.writeable = False
    got = fd.remotecall_fetch(lambda x: (float(x.sum()), float(x[-1]), backing(x)[1]),
                              two_workers[1], a)
    assert got[:2] == (float(a.sum()), float(a[-1]))
