"""The shared-memory segments of `_shm`: a frame's buffers copied once into one
segment, mapped (not copied) out, the segment reused once the receiver lets go of
every buffer of that frame, never named in /dev/shm."""

from __future__ import annotations

import gc
import os
import pickle

import numpy as np
import pytest

from fastdist._core import _shm

pytestmark = pytest.mark.timeout(60)


def shm_names() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def send(out, inbox, *buffers):
    descriptors = out.put(list(buffers))
    return None if descriptors is None else inbox.attach(descriptors)


def test_a_buffer_arrives_as_a_view_of_the_shared_segment():
    out, inbox = _shm.Outbox(), _shm.Inbox()
    a = np.arange(500_000, dtype=np.float64)
    (received,) = send(out, inbox, a)
    b = np.frombuffer(received, dtype=np.float64)
    assert np.array_equal(a, b) and b.flags.writeable
    a[0] = -1.0  # the sender's array is copied at put: changing it later changes nothing
    assert b[0] == 0.0
    b[1] = 7.0  # the receiver's view is writable, as a received array is
    assert send(out, inbox, a) is not None  # the first segment is still held: a new one
    assert out.nsegments == 2


@pytest.mark.parametrize("nbytes", [
    (2 << 20) - 1, 4 << 20, (4 << 20) + 1, 8_000_000, (12 << 20) + 4095, (33 << 20) + 7])
def test_a_large_buffer_copied_in_pieces_arrives_whole(nbytes):
    """Buffers of many megabytes are copied by a few threads at once (_parcopy.pxi):
    every byte lands where it belongs, whatever the size's remainders, and next to
    the buffers around it."""
    out, inbox = _shm.Outbox(), _shm.Inbox()
    rng = np.random.default_rng(nbytes)
    big = rng.integers(0, 256, nbytes, dtype=np.uint8)
    small = np.arange(1000, dtype=np.uint8)
    got = send(out, inbox, small, big, small[::-1].copy())
    assert [len(memoryview(g)) for g in got] == [1000, nbytes, 1000]
    assert bytes(got[0]) == small.tobytes() and bytes(got[2]) == small[::-1].tobytes()
    assert np.array_equal(np.frombuffer(got[1], dtype=np.uint8), big)


def test_a_frames_buffers_share_one_segment_until_all_are_let_go():
    out, inbox = _shm.Outbox(max_segments=1), _shm.Inbox()
    parts = [np.full(n, float(n)) for n in (3, 100_000, 17, 250_000)]
    got = [np.frombuffer(b, dtype=np.float64) for b in send(out, inbox, *parts)]
    assert out.nsegments == 1
    for a, b in zip(parts, got):
        assert np.array_equal(a, b) and b.ctypes.data % 16 == 0
    del b
    assert out.put([parts[0]]) is None  # in use, and no room for another
    del got[:3]
    gc.collect()
    assert out.put([parts[0]]) is None  # the last buffer of the frame still holds it
    del got
    gc.collect()
    assert out.put([parts[1]]) is not None and out.nsegments == 1


def test_pickle_out_of_band_buffers_travel_through_a_segment():
    out, inbox = _shm.Outbox(), _shm.Inbox()
    value = {"x": np.arange(200_000, dtype=np.int64), "y": np.zeros((300, 300))}
    pbs: list[pickle.PickleBuffer] = []
    body = pickle.dumps(value, 5, buffer_callback=pbs.append)
    back = pickle.loads(body, buffers=send(out, inbox, *[pb.raw() for pb in pbs]))
    assert np.array_equal(back["x"], value["x"]) and np.array_equal(back["y"], value["y"])


def test_descriptors_outside_their_segment_are_refused():
    out, inbox = _shm.Outbox(), _shm.Inbox()
    (d,) = out.put([b"z" * 5000])
    pid, fd, seg_id, size, gen, offset, _ = _shm.DESCRIPTOR.unpack(d)
    with pytest.raises(ValueError):
        inbox.attach([_shm.DESCRIPTOR.pack(pid, fd, seg_id, size, gen, offset, size)])
    with pytest.raises(ValueError):
        inbox.attach([_shm.DESCRIPTOR.pack(pid, fd, seg_id, size, gen, 0, 10)])  # the header
    with pytest.raises(ValueError):  # a second buffer naming another segment
        inbox.attach([d, _shm.DESCRIPTOR.pack(pid, fd, seg_id + 1, size, gen, offset, 10)])


def test_the_probe_is_checked_by_its_token():
    probe = _shm.Probe()
    pid, fd, token = probe.offer()
    assert _shm.check_probe(pid, fd, token)
    assert not _shm.check_probe(pid, fd, bytes(16))  # another file at that fd
    assert not _shm.check_probe(2**22 + 12345, fd, token)  # no such process here


def test_segments_have_no_name_in_dev_shm():
    before = shm_names()
    out = _shm.Outbox()
    out.put([np.ones(1_000_000)])
    assert shm_names() == before
    out.close()


def test_idle_free_segments_are_trimmed_and_forgotten_by_the_receiver():
    out, inbox = _shm.Outbox(), _shm.Inbox()
    (held,) = send(out, inbox, np.ones(200_000))
    (let_go,) = send(out, inbox, np.zeros(200_000))
    assert out.nsegments == 2 and inbox.nmappings == 2
    del let_go
    gc.collect()
    dropped = out.trim(0.0)  # idle for 0 s: every free one
    assert len(dropped) == 1 and out.nsegments == 1  # the held one stays
    inbox.forget(dropped)
    assert inbox.nmappings == 1
    assert np.frombuffer(held, dtype=np.float64)[-1] == 1.0
    assert out.trim(3600.0) == []  # nothing idle that long
