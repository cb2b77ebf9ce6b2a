"""serialize.dumps/loads: the plain-data fast path, by-value functions, reducers
registered with copyreg at any time, and out-of-band buffers."""

from __future__ import annotations

import copyreg
import os
import pickle

import numpy as np
import pytest

from fastdist.protocol import serialize

pytestmark = pytest.mark.timeout(60)


def roundtrip(obj):
    body, buffers = serialize.dumps(obj)
    return serialize.loads(body, buffers), body, buffers


def test_plain_data_takes_the_c_pickler_and_round_trips():
    obj = (1, 2.5, 3j, True, None, "text", b"bytes", [1, (2, 3)], {"k": [4]})
    assert serialize.is_plain(obj)
    back, body, buffers = roundtrip(obj)
    assert back == obj and buffers == []
    assert body == pickle.dumps(obj, 5)


def test_a_long_container_of_plain_items_is_plain():
    # A batch of a pmap: pickled by the C pickler, exactly as cloudpickle would.
    obj = (list(range(10_000)), [(i, str(i)) for i in range(2_000)],
           {f"k{i}": i for i in range(100)})
    assert serialize.is_plain(obj)
    back, body, buffers = roundtrip(obj)
    assert back == obj and buffers == []
    assert body == pickle.dumps(obj, 5)


def test_what_is_not_plain():
    assert not serialize.is_plain(b"x" * serialize.OOB_THRESHOLD)  # goes out of band
    assert not serialize.is_plain({1: 2})  # only str keys are checked cheaply
    assert not serialize.is_plain([[[[1]]]])  # deeper than the look goes
    assert not serialize.is_plain(list(range(10_000)) + [np.zeros(3)])  # one item is enough
    assert not serialize.is_plain(np.zeros(3))
    assert not serialize.is_plain(lambda: 1)


def test_a_function_is_plain_only_once_found_importable():
    serialize._BY_REFERENCE.pop(id(os.getpid), None)
    assert not serialize.is_plain((os.getpid, (), {}))
    serialize.dumps((os.getpid, (), {}))
    assert serialize.is_plain((os.getpid, (), {}))


def test_a_function_pickle_is_cached_only_for_functions_that_travel_by_name():
    import json

    assert serialize.function_pickle(lambda: 1) is None
    serialize.dumps(json.dumps)  # found importable: travels by name from now on
    data = serialize.function_pickle(json.dumps)
    assert data is not None and serialize.function_pickle(json.dumps) is data
    assert serialize.loads_function(data) is json.dumps


def test_travels_by_name_tells_importable_functions_from_the_others():
    import json

    serialize._BY_REFERENCE.pop(id(json.dumps), None)
    assert serialize.travels_by_name(json.dumps)  # unseen by dumps, and found so
    assert serialize.is_plain((json.dumps, (), {}))  # ... remembered as dumps would
    assert serialize.travels_by_name(len) and serialize.travels_by_name(json.JSONDecoder)
    k = 1
    assert not serialize.travels_by_name(lambda x: x)
    assert not serialize.travels_by_name(lambda x: x + k)  # a closure
    assert not serialize.travels_by_name(3) and not serialize.travels_by_name("json.dumps")


def test_a_cached_function_rebound_in_its_module_is_looked_up_again(monkeypatch):
    # A worker that reloads a module (or rebinds one of its functions) runs the
    # function the module names now, as an uncached unpickle would.
    import json

    serialize.dumps(json.loads)
    data = serialize.function_pickle(json.loads)
    assert serialize.loads_function(data) is json.loads  # cached now

    def replacement(s):
        return "replaced"

    monkeypatch.setattr(json, "loads", replacement)
    assert serialize.loads_function(data) is replacement


def test_local_functions_still_travel_by_value():
    k = 41

    def closure(x):
        return x + k

    back, _, _ = roundtrip((closure, (1,), {}))
    assert back[0](1) == 42 and back[1] == (1,)
    again, _, _ = roundtrip((lambda y: y * 2, (), {}))
    assert again[0](4) == 8


class Registered:
    def __init__(self, value):
        self.value = value


def _rebuild(value):
    return Registered(value * 10)


def test_a_reducer_registered_after_pickling_started_is_used():
    serialize.dumps(np.zeros(2))  # the dispatch table is built by now
    copyreg.pickle(Registered, lambda r: (_rebuild, (r.value,)))
    try:
        back, _, _ = roundtrip(Registered(4))
        assert back.value == 40
    finally:
        copyreg.dispatch_table.pop(Registered, None)


def test_cloudpickle_reducers_apply():
    # Modules pickle by reference only through cloudpickle's own reducer table.
    back, _, _ = roundtrip(os)
    assert back is os


def test_arrays_and_large_bytes_travel_out_of_band():
    a = np.arange(serialize.OOB_THRESHOLD, dtype=np.float64)
    big = b"y" * (2 * serialize.OOB_THRESHOLD)
    back, body, buffers = roundtrip((a, big, memoryview(big)))
    assert len(buffers) == 3 and len(body) < 1024
    np.testing.assert_array_equal(back[0], a)
    assert back[1] == big and bytes(back[2]) == big


def test_a_body_in_any_buffer_unpickles():
    # Large bodies arrive in receive buffers that only have the buffer protocol.
    obj = {"k": list(range(10))}
    body, buffers = serialize.dumps(obj)
    assert serialize.loads(bytearray(body), buffers) == obj
    assert serialize.loads(memoryview(body), buffers) == obj
    with pytest.raises(serialize.SerializationError):
        serialize.loads(b"")


MATRIX = np.arange(6, dtype=np.int64).reshape(2, 3)


@pytest.mark.parametrize("view", [
    memoryview(MATRIX), memoryview(MATRIX.T), memoryview(np.asfortranarray(MATRIX)),
    memoryview(MATRIX)[::2], memoryview(np.arange(4.0))[1:3],
    memoryview(np.float32(3.5).tobytes()).cast("f", []), memoryview(bytearray(b"xyz")),
    memoryview(np.zeros(1 << 20, dtype=np.int32)),  # large: out of band
], ids=["int64 2x3", "transposed", "fortran", "strided", "slice", "0-d", "bytes", "large"])
def test_a_memoryview_keeps_its_format_shape_and_values(view):
    back, _, _ = roundtrip(view)
    assert isinstance(back, memoryview)
    assert (back.format, back.shape) == (view.format, view.shape)
    assert back.tolist() == view.tolist()


@pytest.mark.parametrize("dtype", [">i4", [("a", "i4"), ("b", "f8")]], ids=["big-endian", "struct"])
def test_a_memoryview_that_cannot_be_rebuilt_is_refused_not_flattened(dtype):
    with pytest.raises(serialize.SerializationError, match=r"cannot be rebuilt.*np\.asarray"):
        serialize.dumps(memoryview(np.zeros(2, dtype=dtype)))
