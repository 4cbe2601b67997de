"""Import faiss with its bundled BLAS told which kernels this CPU runs.

The faiss-cpu wheels bundle an OpenBLAS (0.3.15 in faiss-cpu 1.15.1) older than the CPUs it
now runs on. On this project's Sapphire Rapids machines it takes the CPU for a "Prescott" and
uses generic kernels, several times slower for IndexFlatIP than its AVX-512 ("SkylakeX")
kernels (benchmarks/results/graph_choices.txt), and k-means, which IVF training runs, slows
alike. OpenBLAS reads OPENBLAS_CORETYPE once, when it loads, so `load_faiss` sets it for that
moment, to the best kernel set the CPU's flags allow, unless the user set it; numpy's and
torch's BLAS are not affected (they are loaded already, or are not OpenBLAS).

faiss is an extra (pyproject.toml): approximate search on a CPU runs without it
(ivf_scan.py). Not installed, it has no GPUs (`faiss_if_installed` is None), and a step that
truly needs it (an IVF-PQ index, a faiss index on a GPU) is one line naming what to install.
"""

from __future__ import annotations

import os
import sys

from graphbuild.cpu import cpu_flags
from graphbuild.errors import GraphbuildError

INSTALL_FAISS = "pip install 'graphbuild[faiss-cpu]', or faiss-gpu-cu12 on a GPU machine"

# OpenBLAS kernel sets, best first, with the CPU flags each needs.
CORETYPES = (("SkylakeX", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}),
             ("Haswell", {"avx2", "fma"}))


def coretype(cpuinfo: str | None = None) -> str | None:
    """The OpenBLAS core type for this x86 CPU's flags (`cpu_flags(cpuinfo)`), or None when
    unknown."""
    flags = cpu_flags(cpuinfo)
    return next((name for name, need in CORETYPES if need <= flags), None)


def load_faiss(needed_for: str = "this step"):
    """`import faiss` (see `faiss_if_installed`); not installed, a GraphbuildError saying that
    `needed_for` needs it and how to install it."""
    faiss = faiss_if_installed()
    if faiss is None:
        raise GraphbuildError(f"{needed_for} needs faiss, which is not installed: {INSTALL_FAISS}")
    return faiss


def faiss_if_installed():
    """`import faiss`, with OPENBLAS_CORETYPE set for the import when it is not set; None when
    faiss is not installed. A faiss that is installed but fails to load still raises."""
    try:
        return _import_faiss()
    except ModuleNotFoundError as e:
        if e.name != "faiss":
            raise
        return None


def _import_faiss():
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
