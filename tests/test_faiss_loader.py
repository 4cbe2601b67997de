"""faiss's bundled OpenBLAS gets the kernels this CPU can run, and nothing else is touched."""

from __future__ import annotations

import subprocess
import sys

from graphbuild.graph.faiss_loader import coretype

SKYLAKE_X = "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl\n"


def test_coretype_follows_the_cpu_flags():
    assert coretype(SKYLAKE_X) == "SkylakeX"
    assert coretype("processor : 0\nflags : fpu sse2 avx avx2 fma\n") == "Haswell"
    assert coretype("flags : fpu sse2\n") is None
    assert coretype("") is None  # not x86, or no /proc/cpuinfo


CHILD = """
import ctypes, glob, os
from graphbuild.graph.faiss_loader import coretype, load_faiss
faiss = load_faiss()
assert "OPENBLAS_CORETYPE" not in os.environ  # set for faiss's import only
libs = glob.glob(os.path.join(os.path.dirname(faiss.__file__), "..", "faiss_cpu.libs",
                              "libopenblas*"))
if not libs:
    print("no bundled OpenBLAS")
else:
    lib = ctypes.CDLL(libs[0])
    lib.openblas_get_corename.restype = ctypes.c_char_p
    print(lib.openblas_get_corename().decode(), coretype())
"""


def test_faiss_blas_uses_the_cpu_kernels():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         check=True).stdout.split()
    if out[0] != "no" and out[1] != "None":
        assert out[0].lower() == out[1].lower()
