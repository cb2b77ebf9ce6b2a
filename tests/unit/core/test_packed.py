"""Packed lists of numbers (_fastpath/_packed.pyx): what is packed, what is left a
list, that unpacking gives back equal items of the same types, and that a bad
buffer is refused rather than read past its end."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import same_items

from fastdist._fastpath._packed import MIN_PACKED, pack, unpack, unpack_into

INT64 = st.integers(-(2**63), 2**63 - 1)


@given(st.lists(INT64, min_size=MIN_PACKED, max_size=300))
def test_ints_come_back_equal(values):
    packed = pack(values)
    assert packed[:5] == b"FDpkq" and len(packed) == 8 + 8 * len(values)
    assert same_items(unpack(packed), values)


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=MIN_PACKED,
                max_size=300))
def test_floats_come_back_bit_for_bit(values):
    assert same_items(unpack(pack(values)), values)


def test_signed_zero_nan_and_the_int64_edges():
    floats = [-0.0, 0.0, math.nan, math.inf, -math.inf, 5e-324] * 3
    back = unpack(pack(floats))
    assert same_items(back, floats) and math.copysign(1.0, back[0]) == -1.0
    ints = [-(2**63), 2**63 - 1, -1, 0, 1] * 4
    assert same_items(unpack(pack(ints)), ints)


class Int(int):
    pass


@pytest.mark.parametrize("values", [
    [1] * (MIN_PACKED - 1),                      # short: pickle is as quick
    [True] * MIN_PACKED,                         # bools stay bools
    [1] * (MIN_PACKED - 1) + [True],
    [Int(1)] * MIN_PACKED,                       # a subclass keeps its type
    [1] * (MIN_PACKED - 1) + [2**63],            # past int64
    [1] * (MIN_PACKED - 1) + [-(2**63) - 1],
    [1] * (MIN_PACKED - 1) + [1.0],              # mixed
    [1.0] * (MIN_PACKED - 1) + [1],
    [1.0] * (MIN_PACKED - 1) + [None],
    ["a"] * MIN_PACKED,
    tuple(range(MIN_PACKED)),                    # only lists
    [(1, 2)] * MIN_PACKED,
])
def test_anything_else_stays_a_list(values):
    assert pack(values) is None


@pytest.mark.parametrize("data", [
    b"", b"FDpk", b"FDpkq\0\0", b"FDpkq\0\0\0\1", b"FDpkq\0\0\0" + b"\0" * 7,
    b"FDpkx\0\0\0" + b"\0" * 8, b"FDpkq\0\1\0" + b"\0" * 8, b"XDpkq\0\0\0" + b"\0" * 8,
])
def test_a_bad_buffer_is_refused(data):
    with pytest.raises(ValueError, match="not a packed list"):
        unpack(data)


def test_an_empty_packed_list_is_an_empty_list():
    assert unpack(b"FDpkq\0\0\0") == [] and unpack(b"FDpkd\0\0\0") == []


def test_unpack_into_replaces_a_slice_in_place():
    dest = [None] * 40
    assert unpack_into(dest, 5, pack(list(range(100, 120)))) == 20
    assert dest[:5] == [None] * 5 and dest[5:25] == list(range(100, 120))
    assert dest[25:] == [None] * 15
    assert unpack_into(dest, 0, pack([0.5] * 16)) == 16 and dest[:17] == [0.5] * 16 + [111]


def test_unpack_into_releases_what_it_replaces():
    import sys

    marker = object()
    dest = [marker] * 30
    before = sys.getrefcount(marker)
    unpack_into(dest, 10, pack(list(range(20))))
    assert sys.getrefcount(marker) == before - 20


@pytest.mark.parametrize("start", [-1, 11, 100])
def test_unpack_into_refuses_what_does_not_fit(start):
    dest = [None] * 30
    with pytest.raises(ValueError, match="do not fit"):
        unpack_into(dest, start, pack(list(range(20))))
    assert dest == [None] * 30
