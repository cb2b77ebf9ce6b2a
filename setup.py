"""Build the compiled modules: the core (fastdist._core: _wire, _keepalive, _msgloop,
_shm) and the fast path (fastdist._fastpath: _runqueue, _calls, _packed)."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTDIST_DEBUG") == "1"

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "linetrace": DEBUG,
    "embedsignature": True,
}
macros = [("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
extra = ["-O0", "-g"] if DEBUG else ["-O2"]

extensions = [
    Extension(
        f"fastdist.{package}.{name}",
        [f"src/fastdist/{package}/{name}.pyx"],
        define_macros=macros,
        extra_compile_args=extra,
    )
    for package, names in (("_core", ("_wire", "_keepalive", "_msgloop", "_shm")),
                           ("_fastpath", ("_runqueue", "_calls", "_packed")))
    for name in names
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        annotate=DEBUG,
        include_path=["src"],
    )
)
