"""faiss's bundled OpenBLAS gets the kernels this CPU can run, and nothing else is touched;
without faiss (an extra), no faiss GPUs, and a step that needs it names what to install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

import pytest

from graphbuild.errors import GraphbuildError
from graphbuild.graph.faiss_loader import coretype, faiss_if_installed, load_faiss

SKYLAKE_X = "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl\n"


def test_coretype_follows_the_cpu_flags():
    assert coretype(SKYLAKE_X) == "SkylakeX"
    assert coretype("processor : 0\nflags : fpu sse2 avx avx2 fma\n") == "Haswell"
    assert coretype("flags : fpu sse2\n") is None
    assert coretype("") is None  # not x86, or no /proc/cpuinfo


# In a fresh process: import faiss through the loader (its choice of core type replaced by
# argv[1] when given), then ask the OpenBLAS that the faiss-cpu wheel bundles
# (faiss_cpu.libs/, beside the faiss package) which kernels it runs.
CHILD = """
import ctypes, glob, json, os, sys
from graphbuild.graph import faiss_loader
if len(sys.argv) > 1:
    faiss_loader.coretype = lambda cpuinfo=None: sys.argv[1]
faiss = faiss_loader.load_faiss()
libs = glob.glob(os.path.join(os.path.dirname(faiss.__file__), "..", "faiss_cpu.libs",
                              "libopenblas*"))
core = None
if libs:
    lib = ctypes.CDLL(libs[0])
    lib.openblas_get_corename.restype = ctypes.c_char_p
    core = lib.openblas_get_corename().decode()
print(json.dumps({"libs": libs, "corename": core,
                  "env_after": os.environ.get("OPENBLAS_CORETYPE")}))
"""


def faiss_cpu_wheel() -> bool:
    try:
        metadata.distribution("faiss-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


def test_faiss_blas_uses_the_cpu_kernels():
    want = coretype()
    if want is None:
        pytest.skip("this CPU's flags name no OpenBLAS core type (not x86): nothing to choose")
    if not faiss_cpu_wheel():
        pytest.skip("faiss is not the faiss-cpu wheel (faiss-gpu?): no bundled OpenBLAS")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}

    def kernels(*forced: str) -> str:
        out = json.loads(subprocess.run([sys.executable, "-c", CHILD, *forced],
                                        capture_output=True, text=True, check=True,
                                        env=env).stdout)
        assert out["libs"], ("the faiss-cpu wheel ships no OpenBLAS in faiss_cpu.libs/: what "
                             "graphbuild/graph/faiss_loader.py steers is gone")
        assert out["env_after"] is None  # set for faiss's import only, kept from subprocesses
        return out["corename"].lower()

    assert kernels() == want.lower()
    # OpenBLAS may find the same kernels by itself on this CPU; a choice it would not make
    # (Haswell's, which every CPU with a core type here runs) shows the loader makes it
    assert kernels("Haswell") == "haswell"


def test_without_faiss_no_gpus_and_what_needs_it_names_the_install(monkeypatch):
    from graphbuild.graph.ann import faiss_gpus

    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss were not installed
    assert faiss_if_installed() is None and faiss_gpus() == 0
    with pytest.raises(GraphbuildError, match=r"^an IVF-PQ index needs faiss, which is not "
                       r"installed: pip install 'graphbuild\[faiss-cpu\]', or faiss-gpu-cu12"):
        load_faiss("an IVF-PQ index")
