"""The compiled fast path: C twins of the runtime's hot paths, and the state they share.

`_runqueue` decides which thread runs which call (callpool.py owns the threads);
`_calls` runs small calls on a worker and makes them on a caller, and holds the C
fields of the node, the call pool and the Future that those paths read (declared
in `_calls.pxd`). Both import nothing of fastdist's Python: what they need of the
layers above is handed to them at import (`configure*`).
"""

try:
    from fastdist._fastpath import _calls, _runqueue
except ImportError as exc:  # pragma: no cover - exercised by an install check
    raise ImportError(
        "fastdist's compiled fast path (fastdist._fastpath._calls / _runqueue) is not "
        "built. Install the package with `pip install .` (needs a C compiler and Cython), "
        "or build in place with `python setup.py build_ext --inplace`."
    ) from exc

__all__ = ["_calls", "_runqueue"]
