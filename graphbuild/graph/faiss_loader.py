"""Import faiss with its bundled BLAS told which kernels this CPU runs.

The faiss-cpu wheels bundle an OpenBLAS (0.3.15 in faiss-cpu 1.15.1) older than the CPUs it
now runs on. On this project's Sapphire Rapids machines it takes the CPU for a "Prescott" and
uses generic kernels, several times slower for IndexFlatIP than its AVX-512 ("SkylakeX")
kernels (benchmarks/results/graph_choices.txt), and k-means, which IVF training runs, slows
alike. OpenBLAS reads OPENBLAS_CORETYPE once, when it loads, so `load_faiss` sets it for that
moment, to the best kernel set the CPU's flags allow, unless the user set it; numpy's and
torch's BLAS are not affected (they are loaded already, or are not OpenBLAS).
"""

from __future__ import annotations

import os
import sys

from graphbuild.cpu import cpu_flags

# OpenBLAS kernel sets, best first, with the CPU flags each needs.
CORETYPES = (("SkylakeX", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}),
             ("Haswell", {"avx2", "fma"}))


def coretype(cpuinfo: str | None = None) -> str | None:
    """The OpenBLAS core type for this x86 CPU's flags (`cpu_flags(cpuinfo)`), or None when
    unknown."""
    flags = cpu_flags(cpuinfo)
    return next((name for name, need in CORETYPES if need <= flags), None)


def load_faiss():
    """`import faiss`, with OPENBLAS_CORETYPE set for the import when it is not set."""
    if "faiss" in sys.modules or "OPENBLAS_CORETYPE" in os.environ:
        import faiss

        return faiss
    core = coretype()
    if core:
        os.environ["OPENBLAS_CORETYPE"] = core
    try:
        import faiss
    finally:
        os.environ.pop("OPENBLAS_CORETYPE", None)  # read at load; keep it from subprocesses
    return faiss
