"""The shared-memory segments of `_shm`: one copy in, mapped (not copied) out, reused
once the receiver lets go, never named in /dev/shm."""

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


def test_a_buffer_arrives_as_a_view_of_the_shared_segment():
    out, inbox = _shm.Outbox(), _shm.Inbox()
    a = np.arange(500_000, dtype=np.float64)
    received = inbox.attach(out.put(a))
    b = np.frombuffer(received, dtype=np.float64)
    assert np.array_equal(a, b) and b.flags.writeable
    a[0] = -1.0  # the sender's array is copied at put: changing it later changes nothing
    assert b[0] == 0.0
    b[1] = 7.0  # the receiver's view is writable, as a received array is
    assert inbox.attach(out.put(a)) is not None  # the first segment is still held: a new one
    assert out.nsegments == 2


def test_a_segment_is_filled_again_only_after_the_receiver_lets_go():
    out, inbox = _shm.Outbox(max_segments=1), _shm.Inbox()
    a = np.ones(300_000)
    first = inbox.attach(out.put(a))
    assert out.put(a) is None  # in use, and no room for another: the socket's turn
    arr = np.frombuffer(first, dtype=np.float64)
    del first
    assert out.put(a) is None  # the array still uses the segment
    del arr
    gc.collect()
    d = out.put(a * 2)
    assert d is not None and out.nsegments == 1
    assert np.frombuffer(inbox.attach(d), dtype=np.float64)[0] == 2.0


def test_pickle_out_of_band_buffers_travel_through_segments():
    out, inbox = _shm.Outbox(), _shm.Inbox()
    value = {"x": np.arange(200_000, dtype=np.int64), "y": np.zeros((300, 300))}
    pbs: list[pickle.PickleBuffer] = []
    body = pickle.dumps(value, 5, buffer_callback=pbs.append)
    descriptors = [out.put(pb.raw()) for pb in pbs]
    back = pickle.loads(body, buffers=[inbox.attach(d) for d in descriptors])
    assert np.array_equal(back["x"], value["x"]) and np.array_equal(back["y"], value["y"])


def test_release_gives_back_a_segment_whose_frame_was_not_sent():
    out = _shm.Outbox(max_segments=1)
    d = out.put(b"x" * 100_000)
    assert out.put(b"y" * 100_000) is None
    out.release(d)
    assert out.put(b"y" * 100_000) is not None


def test_a_descriptor_naming_more_than_its_segment_is_refused():
    out, inbox = _shm.Outbox(), _shm.Inbox()
    pid, fd, seg_id, size, gen, _ = _shm.DESCRIPTOR.unpack(out.put(b"z" * 5000))
    forged = _shm.DESCRIPTOR.pack(pid, fd, seg_id, size, gen, size)
    with pytest.raises(ValueError):
        inbox.attach(forged)


def test_the_probe_is_checked_by_its_token():
    probe = _shm.Probe()
    pid, fd, token = probe.offer()
    assert _shm.check_probe(pid, fd, token)
    assert not _shm.check_probe(pid, fd, bytes(16))  # another file at that fd
    assert not _shm.check_probe(2**22 + 12345, fd, token)  # no such process here


def test_segments_have_no_name_in_dev_shm():
    before = shm_names()
    out = _shm.Outbox()
    out.put(np.ones(1_000_000))
    assert shm_names() == before
    out.close()


def test_idle_free_segments_are_trimmed_and_forgotten_by_the_receiver():
    out, inbox = _shm.Outbox(), _shm.Inbox()
    held = inbox.attach(out.put(np.ones(200_000)))
    let_go = inbox.attach(out.put(np.zeros(200_000)))
    assert out.nsegments == 2 and inbox.nmappings == 2
    del let_go
    gc.collect()
    dropped = out.trim(0.0)  # idle for 0 s: every free one
    assert len(dropped) == 1 and out.nsegments == 1  # the held one stays
    inbox.forget(dropped)
    assert inbox.nmappings == 1
    assert np.frombuffer(held, dtype=np.float64)[-1] == 1.0
    assert out.trim(3600.0) == []  # nothing idle that long

