"""Lists of plain numbers as packed 8-byte words: how a pmap batch of ints or
floats, and its results, travel.

Pickle writes a list of ints at ~9 ns an element and reads it back at ~18 ns (an
opcode, a push and an append each); a map of quick elements spends most of its
CPU there, on the master and on every worker. Packed, the same list is a length
check and a copy per element each way (~2 and ~5 ns). A list is packed only when
every item is exactly `int` (in the signed 64-bit range) or exactly `float`: a
bool, an int subclass, a big int or a mix of types leaves it a list, and unpacked
it is equal to what was packed, item for item and type for type.

Layout: an 8-byte header (b"FDpk", the kind, three zero bytes), then one
little-endian word per item: two's-complement ints or IEEE 754 doubles.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_FromDouble
from cpython.list cimport PyList_GET_SIZE, PyList_New
from cpython.long cimport PyLong_FromLongLong
from cpython.ref cimport Py_INCREF, Py_XDECREF, PyObject
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

import sys

cdef extern from "Python.h":
    long long PyLong_AsLongLongAndOverflow(object obj, int *overflow) except? -1
    ctypedef struct PyListObject:
        PyObject **ob_item

cdef extern from *:
    uint64_t __builtin_bswap64(uint64_t x) nogil

cdef enum:
    HEADER = 8  # bytes before the first word
cdef char KIND_INT = b"q"
cdef char KIND_FLOAT = b"d"
cdef bint _BIG_ENDIAN = sys.byteorder == "big"

MIN_PACKED = 16
"""Shorter lists stay lists: pickle is as quick for them, and a call of one
element keeps its arguments readable in a trace."""


cdef inline void _put(char *at, uint64_t word) noexcept nogil:
    if _BIG_ENDIAN:
        word = __builtin_bswap64(word)
    memcpy(at, &word, 8)


cdef inline uint64_t _get(const char *at) noexcept nogil:
    cdef uint64_t word
    memcpy(&word, at, 8)
    if _BIG_ENDIAN:
        word = __builtin_bswap64(word)
    return word


cdef inline bint _differs4(const char *a, const char *b) noexcept nogil:
    return a[0] != b[0] or a[1] != b[1] or a[2] != b[2] or a[3] != b[3]


def pack(object values):
    """`values` packed (bytes), or None when it is not a list of at least
    `MIN_PACKED` exact ints in the 64-bit range, or exact floats. The look stops at
    the first item that does not fit."""
    if type(values) is not list:
        return None
    cdef list items = <list>values
    cdef Py_ssize_t n = len(items), i
    if n < MIN_PACKED:
        return None
    cdef type kind = type(items[0])
    if kind is not int and kind is not float:
        return None
    cdef bytes out = PyBytes_FromStringAndSize(NULL, HEADER + 8 * n)
    cdef char *p = PyBytes_AS_STRING(out)
    memcpy(p, b"FDpk\0\0\0\0", HEADER)
    cdef int overflow = 0
    cdef int64_t v
    cdef double d
    cdef uint64_t word
    cdef object x
    if kind is int:
        p[4] = KIND_INT
        for i in range(n):
            x = items[i]
            if type(x) is not int:
                return None
            v = PyLong_AsLongLongAndOverflow(x, &overflow)
            if overflow:
                return None
            _put(p + HEADER + 8 * i, <uint64_t>v)
    else:
        p[4] = KIND_FLOAT
        for i in range(n):
            x = items[i]
            if type(x) is not float:
                return None
            d = PyFloat_AS_DOUBLE(x)
            memcpy(&word, &d, 8)
            _put(p + HEADER + 8 * i, word)
    return out


cdef Py_ssize_t _count(bytes data) except -1:
    """How many items the packed list `data` holds; ValueError if it is not one."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    cdef const char *p = PyBytes_AS_STRING(data)
    if (size < HEADER or (size - HEADER) % 8 or _differs4(p, b"FDpk")
            or p[5] or p[6] or p[7] or (p[4] != KIND_INT and p[4] != KIND_FLOAT)):
        raise ValueError("not a packed list of numbers")
    return (size - HEADER) // 8


cdef int _fill(list dest, Py_ssize_t start, bytes data, Py_ssize_t n) except -1:
    """Put the `n` items of `data` into dest[start:start + n] (which exist). What the
    slots held (nothing in a new list, None in a map's results) is released once
    all are written: releasing an object may run code (a __del__, or the garbage
    collector making a new int may), which must not find the list half-written."""
    cdef const char *p = PyBytes_AS_STRING(data)
    cdef bint ints = p[4] == KIND_INT
    cdef Py_ssize_t i
    cdef object x
    cdef uint64_t word
    cdef double d
    cdef PyObject *old
    cdef list replaced = []
    for i in range(n):
        word = _get(p + HEADER + 8 * i)
        if ints:
            x = PyLong_FromLongLong(<int64_t>word)
        else:
            memcpy(&d, &word, 8)
            x = PyFloat_FromDouble(d)
        # (Making x may have run a collection, and code with it: look again.)
        if start + i >= PyList_GET_SIZE(dest):
            raise RuntimeError("the list changed size while it was being filled")
        Py_INCREF(x)  # the list's reference
        old = (<PyListObject *>dest).ob_item[start + i]
        (<PyListObject *>dest).ob_item[start + i] = <PyObject *>x
        if old != NULL and old != <PyObject *>None:
            replaced.append(<object>old)
        Py_XDECREF(old)
    return 0


def unpack(bytes data):
    """The list `pack` packed into `data`.

    Raises:
        ValueError: `data` is not a packed list (its header or its length)."""
    cdef Py_ssize_t n = _count(data)
    cdef list out = PyList_New(n)
    _fill(out, 0, data, n)
    return out


def unpack_into(list dest, Py_ssize_t start, bytes data):
    """Put the items `pack` packed into `data` at dest[start:], in place of what is
    there (a map's results go straight to their slots, without a list of their
    own); returns how many.

    Raises:
        ValueError: `data` is not a packed list, or dest is too short for it."""
    cdef Py_ssize_t n = _count(data)
    if start < 0 or start + n > PyList_GET_SIZE(dest):
        raise ValueError(f"{n} items do not fit in a list of {len(dest)} from {start}")
    _fill(dest, start, data, n)
    return n
