"""The compiled core: frames and buffers (`_wire`), the socket I/O loop (`_msgloop`),
shared-memory segments for large buffers on one host (`_shm`), small calls on both
sides (`_calls`).

There is no pure-Python fallback: without the compiled modules fastdist would be
a different, slower product, so a missing build is an import error that says how
to build.
"""

try:
    from fastdist._core import _calls, _msgloop, _shm, _wire  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - exercised by an install check
    raise ImportError(
        "fastdist's compiled core (fastdist._core._wire / _msgloop / _shm / _calls) is not built. "
        "Install the package with `pip install .` (needs a C compiler and Cython), or "
        "build in place with `python setup.py build_ext --inplace`."
    ) from exc

__all__ = ["_calls", "_msgloop", "_shm", "_wire"]
