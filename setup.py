"""Build the Cython core: fastdist._core._wire, _msgloop, _shm, _runqueue and _calls."""

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
        f"fastdist._core.{name}",
        [f"src/fastdist/_core/{name}.pyx"],
        define_macros=macros,
        extra_compile_args=extra,
    )
    for name in ("_wire", "_msgloop", "_shm", "_runqueue", "_calls")
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        annotate=DEBUG,
        include_path=["src"],
    )
)
