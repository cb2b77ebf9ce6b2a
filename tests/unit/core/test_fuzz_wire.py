"""Fuzz of the frame reader: random bytes, mutated valid streams, any chunking, any
reader geometry. The reader must only ever produce the frames a pure-Python
reference parser finds, or raise ProtocolError where the reference does; never
crash, hang, or allocate for a length above its maximum frame size.

A longer run of the same properties: tests/soak_fuzz_wire.py.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fastdist._core import _wire
from fastdist.exceptions import ProtocolError

pytestmark = pytest.mark.timeout(120)

PRELUDE = struct.Struct("<BBHIIIQQ")  # kind flags nbufs aux whence reserved id body_nbytes
assert PRELUDE.size == _wire.PRELUDE_SIZE
MAX_FRAME = 1 << 20  # a small maximum, so announced sizes above it are cheap to try
MAX_NBUFS = 16
SMALL_READER = {"max_frame_nbytes": MAX_FRAME, "max_nbufs": MAX_NBUFS,
                "staging_nbytes": 4096, "direct_threshold": 512}


# -- the reference: a plain parser of the frame layout ------------------------------------


def reference_parse(data, max_frame, max_nbufs):
    """(frames, error): complete frames in `data` and whether a limit was broken."""
    frames, pos = [], 0
    while True:
        if len(data) - pos < PRELUDE.size:
            return frames, False
        kind, flags, nbufs, aux, whence, _, ref_id, body_n = PRELUDE.unpack_from(data, pos)
        if nbufs > max_nbufs or body_n > max_frame:
            return frames, True
        table = pos + PRELUDE.size
        if len(data) < table + 8 * nbufs:
            return frames, False
        lens = struct.unpack_from(f"<{nbufs}Q", data, table)
        total = body_n
        for n in lens:
            total += n
            if n > max_frame or total > max_frame:
                return frames, True
        start = table + 8 * nbufs
        if len(data) < start + total:
            return frames, False
        body = data[start:start + body_n]
        bufs, at = [], start + body_n
        for n in lens:
            bufs.append(data[at:at + n])
            at += n
        frames.append((kind, flags, aux, whence, ref_id, body, bufs))
        pos = at


def as_tuple(f):
    return (f.kind, f.flags, f.aux, f.whence, f.id, bytes(f.body), [bytes(b) for b in f.buffers])


def run_reader(reader, data, cuts, max_window):
    """Feed `data` split at `cuts` the way a socket would; return (frames, error)."""
    frames, pos = [], 0
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {len(data)})
    try:
        for end in bounds:
            while pos < end:
                window = reader.get_buffer()
                # The receive window is staging or one frame's own allocation: never
                # larger than the biggest of the two, whatever the stream announced.
                assert 0 < len(window) <= max_window
                n = min(len(window), end - pos)
                window[:n] = data[pos:pos + n]
                reader.buffer_updated(n)
                pos += n
            frames.extend(as_tuple(f) for f in reader.take_frames())
    except ProtocolError:
        frames.extend(as_tuple(f) for f in reader.take_frames())
        return frames, True
    return frames, False


def check(data, cuts, **geometry):
    params = {**SMALL_READER, **geometry}
    reader = _wire.FrameReader(**params)
    max_window = max(params["max_frame_nbytes"], params["staging_nbytes"])
    got = run_reader(reader, data, cuts, max_window)
    want = reference_parse(data, params["max_frame_nbytes"], params["max_nbufs"])
    assert got == want


# -- strategies ---------------------------------------------------------------------------

frames_st = st.tuples(
    st.integers(0, 255), st.integers(0, 255), st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
    st.one_of(st.binary(max_size=64), st.binary(min_size=500, max_size=3000)),
    st.lists(st.one_of(st.binary(max_size=32), st.binary(min_size=600, max_size=2000)),
             max_size=4),
)


def encode(frame):
    kind, flags, aux, whence, ref_id, body, bufs = frame
    return (_wire.pack_prelude(kind, flags, aux, whence, ref_id, len(body), [len(b) for b in bufs])
            + body + b"".join(bufs))


streams = st.lists(frames_st, min_size=1, max_size=5).map(lambda fs: b"".join(map(encode, fs)))
cuts_st = st.lists(st.integers(0, 1 << 16), max_size=12)


@st.composite
def mutated_streams(draw):
    data = bytearray(draw(streams))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "length"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=40))
        elif op == "length" and len(data) >= pos + 8:
            # Overwrite 8 bytes with an interesting length: around the limits, or huge.
            n = draw(st.sampled_from([0, 1, MAX_FRAME - 1, MAX_FRAME, MAX_FRAME + 1,
                                      2**31, 2**32 + 1, 2**63, 2**64 - 1]))
            data[pos:pos + 8] = n.to_bytes(8, "little")
    return bytes(data)


fuzz_settings = settings(max_examples=120, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow])


# -- properties ---------------------------------------------------------------------------


@fuzz_settings
@given(data=st.binary(max_size=2000), cuts=cuts_st)
def test_random_bytes_give_frames_or_protocol_error(data, cuts):
    check(data, cuts)


@fuzz_settings
@given(data=streams, cuts=cuts_st)
def test_valid_streams_parse_whole_in_any_chunking(data, cuts):
    check(data, cuts)


@fuzz_settings
@given(data=mutated_streams(), cuts=cuts_st)
def test_mutated_streams_match_the_reference(data, cuts):
    check(data, cuts)


@fuzz_settings
@given(data=streams, cuts=cuts_st, max_nbufs=st.integers(1, 8),
       staging=st.integers(1, 3000), threshold=st.integers(1, 1500))
@example(data=encode((2, 0, 0, 1, 1, b"abc", [])), cuts=[], max_nbufs=1, staging=16,
         threshold=1)
def test_any_accepted_geometry_parses_valid_streams(data, cuts, max_nbufs, staging, threshold):
    geometry = {"max_nbufs": max_nbufs, "staging_nbytes": staging, "direct_threshold": threshold}
    try:
        _wire.FrameReader(max_frame_nbytes=MAX_FRAME, **geometry)
    except ValueError:
        return  # refused at construction: fine, as long as an accepted one always works
    check(data, cuts, **geometry)


@pytest.mark.parametrize("lengths", [
    (MAX_FRAME + 1, []), (2**63, []), (2**64 - 1, []),
    (0, [MAX_FRAME + 1]), (10, [MAX_FRAME // 2, MAX_FRAME // 2]), (0, [2**64 - 1, 2]),
    (0, [1] * (MAX_NBUFS + 1)),
])
def test_announced_sizes_above_the_maximum_fail_before_any_allocation(lengths):
    body_n, bufs = lengths
    reader = _wire.FrameReader(**SMALL_READER)
    header = _wire.pack_prelude(3, 0, 0, 1, 1, body_n, bufs)
    # The header alone is enough to refuse: no body byte was sent, nothing was allocated
    # for it (a 2**63-byte malloc would raise MemoryError, not ProtocolError).
    with pytest.raises(ProtocolError, match="maximum"):
        reader.feed(header)


def test_sizes_at_the_maximum_are_accepted():
    reader = _wire.FrameReader(**SMALL_READER)
    body = b"b" * (MAX_FRAME - 100)
    (f,) = reader.feed(_wire.pack_prelude(3, 0, 0, 1, 1, len(body), [100]) + body + b"x" * 100)
    assert bytes(f.body) == body and [bytes(b) for b in f.buffers] == [b"x" * 100]


def test_large_buffers_in_default_geometry_round_trip():
    # Sizes around the default reader's thresholds (direct reads, large allocations).
    reader = _wire.FrameReader()
    sizes = [0, 1, 64 * 1024 - 1, 64 * 1024, 4 * 1024 * 1024 - 1, 4 * 1024 * 1024 + 1]
    bufs = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    data = _wire.pack_prelude(2, 0, 0, 1, 9, 70_000, [len(b) for b in bufs]) + b"p" * 70_000
    data += b"".join(bufs)
    frames = []
    for i in range(0, len(data), 1 << 20):
        frames.extend(reader.feed(data[i:i + (1 << 20)]))
    (f,) = frames
    assert bytes(f.body) == b"p" * 70_000
    assert [bytes(b) for b in f.buffers] == bufs
