"""The compiled frame reader against the pure-Python reference: any chunking, bad lengths,
zero copy."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_framing import RefFrame, decode_all, encode

from fastdist._core import _wire
from fastdist.exceptions import ProtocolError
from fastdist.protocol import serialize

pytestmark = pytest.mark.timeout(120)

SAMPLE = [
    RefFrame(2, 0, 0, 1, 7, b"small body"),
    RefFrame(5, 1, 3, 2, 2**40, b"", []),
    RefFrame(3, 0, 0, 1, 8, b"x" * 70_000),  # a body read directly into its own allocation
    RefFrame(5, 0, 0, 3, 9, b"with buffers", [b"a" * 100, b"", b"b" * 200_000]),
    RefFrame(8, 0, 2, 1, 0, bytes(range(256)) * 3),
]


def as_tuple(f) -> tuple:
    return (f.kind, f.flags, f.aux, f.whence, f.id, bytes(f.body), [bytes(b) for b in f.buffers])


def feed_chunks(reader, data: bytes, cuts: list[int]) -> list:
    frames = []
    prev = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        frames += reader.feed(data[prev:cut])
        prev = cut
    return frames


def test_pack_prelude_matches_reference():
    f = RefFrame(9, 3, 77, 12, 2**33 + 5, b"abc", [b"12", b"345"])
    encoded = encode(f)
    prelude = _wire.pack_prelude(9, 3, 77, 12, 2**33 + 5, 3, [2, 3])
    assert encoded.startswith(prelude)
    assert len(prelude) == _wire.PRELUDE_SIZE + 16


def test_every_split_offset_of_the_sample_stream():
    data = b"".join(encode(f) for f in SAMPLE[:2] + SAMPLE[3:4])
    expected = [as_tuple(f) for f in decode_all(data)]
    for cut in range(len(data) + 1):
        reader = _wire.FrameReader()
        frames = reader.feed(data[:cut]) + reader.feed(data[cut:])
        assert [as_tuple(f) for f in frames] == expected, f"split at {cut}"
        assert not reader.mid_frame


def test_byte_at_a_time_with_large_parts():
    data = b"".join(encode(f) for f in SAMPLE)
    reader = _wire.FrameReader()
    frames = []
    for i in range(len(data)):
        frames += reader.feed(data[i:i + 1])
    assert [as_tuple(f) for f in frames] == [as_tuple(f) for f in SAMPLE]


frame_strategy = st.builds(
    RefFrame,
    kind=st.integers(0, 255),
    flags=st.integers(0, 255),
    aux=st.integers(0, 2**32 - 1),
    whence=st.integers(0, 2**32 - 1),
    id=st.integers(0, 2**64 - 1),
    body=st.binary(max_size=3000),
    buffers=st.lists(st.binary(max_size=3000), max_size=4),
)


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(frame_strategy, min_size=1, max_size=6), seed=st.integers(0, 2**32),
       direct=st.sampled_from([16, 1024, 64 * 1024]))
def test_random_frames_random_chunking(frames, seed, direct):
    data = b"".join(encode(f) for f in frames)
    rng = random.Random(seed)
    cuts = [rng.randrange(len(data) + 1) for _ in range(rng.randrange(0, 20))]
    reader = _wire.FrameReader(staging_nbytes=max(2 * direct, 16384), direct_threshold=direct)
    got = feed_chunks(reader, data, cuts)
    assert [as_tuple(f) for f in got] == [as_tuple(f) for f in frames]
    assert not reader.mid_frame


def test_get_buffer_and_buffer_updated_like_recv_into():
    data = b"".join(encode(f) for f in SAMPLE)
    reader = _wire.FrameReader()
    pos = 0
    while pos < len(data):
        window = reader.get_buffer()
        n = min(len(window), len(data) - pos, 4099)
        window[:n] = data[pos:pos + n]
        reader.buffer_updated(n)
        pos += n
    assert [as_tuple(f) for f in reader.take_frames()] == [as_tuple(f) for f in SAMPLE]


def test_oversized_body_is_refused_before_allocation():
    reader = _wire.FrameReader(max_frame_nbytes=1 << 20)
    huge = _wire.pack_prelude(2, 0, 0, 1, 1, 1 << 40)
    with pytest.raises(ProtocolError, match="exceeds the maximum"):
        reader.feed(huge)


def test_oversized_buffer_and_sum_overflow_are_refused():
    reader = _wire.FrameReader(max_frame_nbytes=1 << 20)
    with pytest.raises(ProtocolError):
        reader.feed(_wire.pack_prelude(2, 0, 0, 1, 1, 10, [2**64 - 1]))
    reader = _wire.FrameReader(max_frame_nbytes=1 << 20)
    with pytest.raises(ProtocolError):
        reader.feed(_wire.pack_prelude(2, 0, 0, 1, 1, 10, [(1 << 20) - 5, 100]))


def test_too_many_buffers_is_refused():
    reader = _wire.FrameReader(max_nbufs=8)
    with pytest.raises(ProtocolError, match="buffers"):
        reader.feed(_wire.pack_prelude(2, 0, 0, 1, 1, 0, [1] * 9))


def test_negative_looking_lengths_are_huge_and_refused():
    # A length with the top bit set (a negative i64) is a very large u64: refused.
    prelude = bytearray(_wire.pack_prelude(2, 0, 0, 1, 1, 0))
    prelude[24:32] = (-5).to_bytes(8, "little", signed=True)
    with pytest.raises(ProtocolError):
        _wire.FrameReader().feed(bytes(prelude))


def test_truncated_stream_stays_mid_frame():
    data = encode(SAMPLE[3])
    for cut in (1, 31, 40, len(data) - 1):
        reader = _wire.FrameReader()
        assert reader.feed(data[:cut]) == []
        assert reader.mid_frame


def test_received_array_lives_in_the_receive_allocation():
    arr = np.arange(1_000_000, dtype=np.float64)
    body, buffers = serialize.dumps(arr)
    assert len(buffers) == 1 and len(body) < 1000, "the array must travel out of band"
    # The buffer handed to the sender is the array's own memory: no copy before sendmsg.
    assert np.frombuffer(buffers[0], dtype=np.uint8).ctypes.data == arr.ctypes.data
    prelude = _wire.pack_prelude(5, 0, 0, 1, 1, len(body), [b.nbytes for b in buffers])
    data = prelude + body + bytes(buffers[0])
    reader = _wire.FrameReader()
    (frame,) = reader.feed(data)
    (recv,) = frame.buffers
    out = serialize.loads(frame.body, frame.buffers)
    assert np.array_equal(out, arr)
    assert out.ctypes.data == recv.address, "the array must be the receive allocation itself"
    assert out.flags.writeable


def test_small_arrays_stay_in_band_and_bytes_bytearray_memoryview_go_out_of_band():
    small = np.arange(10)
    body, buffers = serialize.dumps(small)
    assert buffers == []
    for value in (b"z" * 100_000, bytearray(b"q" * 100_000), memoryview(b"m" * 100_000)):
        body, buffers = serialize.dumps(value)
        assert len(buffers) == 1 and len(body) < 500
        back = serialize.loads(body, [bytes(buffers[0])])
        assert bytes(back) == bytes(value)


def test_functions_by_reference_and_lambdas_by_value():
    body, _ = serialize.dumps(np.linalg.norm)
    assert b"numpy" in body and len(body) < 200  # a reference, not code
    offset = 3
    body, _ = serialize.dumps(lambda x: x + offset)
    assert serialize.loads(body)(1) == 4
    assert pickle.loads(serialize.dumps(len)[0]) is len
