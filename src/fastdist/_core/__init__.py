"""The compiled core: bytes and syscalls. Frames and buffers (`_wire`), the socket I/O
loop and the GIL-free keepalive (`_msgloop`, `_keepalive`), shared-memory segments for
large buffers on one host (`_shm`).

There is no pure-Python fallback: without the compiled modules fastdist would be
a different, slower product, so a missing build is an import error that says how
to build.
"""

try:
    from fastdist._core import _msgloop, _shm, _wire  # type: ignore[attr-defined, unused-ignore]
except ImportError as exc:  # pragma: no cover - exercised by an install check
    raise ImportError(
        "fastdist's compiled core (fastdist._core._wire / _msgloop / _shm) is not built. "
        "Install the package with `pip install .` (needs a C compiler and Cython), or "
        "build in place with `python setup.py build_ext --inplace`."
    ) from exc

__all__ = ["_msgloop", "_shm", "_wire"]
