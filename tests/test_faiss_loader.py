"""faiss's bundled OpenBLAS gets the kernels this CPU can run, and nothing else is touched;
without faiss (an extra), no faiss GPUs, and a step that needs it names what to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

from graphbuild.errors import GraphbuildError
from graphbuild.graph.faiss_loader import coretype, faiss_if_installed, load_faiss

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


def test_without_faiss_no_gpus_and_what_needs_it_names_the_install(monkeypatch):
    from graphbuild.graph.ann import faiss_gpus

    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss were not installed
    assert faiss_if_installed() is None and faiss_gpus() == 0
    with pytest.raises(GraphbuildError, match=r"^an IVF-PQ index needs faiss, which is not "
                       r"installed: pip install 'graphbuild\[faiss-cpu\]', or faiss-gpu-cu12"):
        load_faiss("an IVF-PQ index")
