"""A faiss IVF index moved to the GPU that the shard chose, within faiss-gpu's limits.

faiss-gpu refuses what a CPU index accepts:

- IVF-PQ keeps a lookup table of (sub-quantizers x 256 codes) entries in the shared memory
  of one thread block, 48 KiB (faiss checks `table bytes <= sharedMemPerBlock`). At d=384
  the index has d/4 = 96 sub-quantizers (ann.pq_subquantizers): 98,304 bytes with fp32
  entries, refused. We pass fp16 lookup tables (GpuClonerOptions.useFloat16, which sets
  useFloat16LookupTables for IVF-PQ): 49,152 bytes, which fits. Not 48 sub-quantizers
  instead: the codes are the index's whole memory of each vector, halving them loses far
  more recall than rounding the per-query table of distances to fp16 (11 bits, against
  codes that already miss by the quantization error), and the saved index stays the one a
  CPU builds and searches. Where d/4 exceeds 96 (d > 384), `gpu_subquantizers` gives the
  most that fit in fp16 (96) and that faiss-gpu supports.
- A search returns at most 2048 neighbours a query and probes at most 2048 lists
  (GPU_MAX_K, GPU_MAX_NPROBE). knn asks for k + 1 (the row itself is dropped), so k above
  2047 is refused before work starts (`check_k`). nprobe is tuned by doubling up to nlist,
  which passes 2048 above about 1.05M rows: `OnGpu.max_nprobe` stops the tuning there, and
  the rare query whose probed lists hold fewer than k rows, searched again with more lists
  (ann.search), is searched beyond 2048 lists by the CPU index.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable

from graphbuild.errors import GraphbuildError

log = logging.getLogger(__name__)

GPU_MAX_K = 2048
GPU_MAX_NPROBE = 2048
SHARED_MEMORY_BYTES = 48 * 1024  # per thread block, what faiss-gpu checks tables against
PQ_CODES = 256  # 8-bit codes
# Sub-quantizer counts, and dimensions per sub-quantizer (without precomputed tables), that
# faiss-gpu's IVF-PQ kernels are compiled for (IVFPQ::isSupportedPQCodeLength and
# isSupportedNoPrecomputedSubDimSize)
GPU_SUBQUANTIZERS = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
GPU_SUBQUANTIZER_DIMS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32)
LOOKUP_TABLE_BYTES = {"fp32": 4, "fp16": 2}


def lookup_table_bytes(subquantizers: int, entry: str) -> int:
    """Shared memory of an IVF-PQ search's lookup table: sub-quantizers x 256 x entry bytes."""
    return subquantizers * PQ_CODES * LOOKUP_TABLE_BYTES[entry]


def gpu_subquantizers(d: int) -> int:
    """Sub-quantizers of an IVF-PQ index searched on a GPU: as on a CPU (d/4, or the largest
    divisor of d below it), capped to what faiss-gpu supports (the counts, the dimensions
    each, an fp16 table that fits); none there, one line saying so."""
    from graphbuild.graph.ann import pq_subquantizers

    cpu = pq_subquantizers(d)
    fits = [m for m in GPU_SUBQUANTIZERS
            if m <= cpu and d % m == 0 and d // m in GPU_SUBQUANTIZER_DIMS
            and lookup_table_bytes(m, "fp16") <= SHARED_MEMORY_BYTES]
    if not fits:
        raise GraphbuildError(f"an IVF-PQ index of {d}-dimensional rows cannot be searched by "
                              "faiss-gpu (no sub-quantizer count it supports divides d); use "
                              "--device cpu")
    return max(fits)


def cloner_options(faiss):
    """The GpuClonerOptions of every index we move to a GPU: fp16 lookup tables (IVF-PQ)."""
    co = faiss.GpuClonerOptions()
    co.useFloat16 = True  # IVF-PQ: useFloat16LookupTables; IVF-SQ keeps its fp16 codes
    return co


def check_k(k: int) -> None:
    """A faiss search on a GPU returns at most GPU_MAX_K neighbours; knn asks for k + 1."""
    if k + 1 > GPU_MAX_K:
        raise GraphbuildError(
            f"--k {k}: faiss-gpu returns at most {GPU_MAX_K} neighbours a query (k + 1: the row "
            f"itself is one); use --k {GPU_MAX_K - 1} or less, --method exact, or --device cpu")


def shard_faiss_gpu(device: str | None) -> int | None:
    """`faiss_device` of the shard's device, without importing faiss where no GPU
    can be its answer: device "cpu", or no GPU device node on this machine (CUDA opens
    /dev/nvidiaN, or /dev/dxg under WSL2; CUDA_VISIBLE_DEVICES only hides some of them)."""
    if device == "cpu" or not gpu_device_nodes():
        return None
    from graphbuild.graph.faiss_loader import faiss_if_installed

    return faiss_device(device, faiss_if_installed())


def gpu_device_nodes() -> list[str]:
    """The device nodes CUDA reaches GPUs through (/dev/nvidia0, ..., or WSL2's /dev/dxg):
    none, no CUDA GPU."""
    return glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/dxg")


def faiss_device(device: str | None, faiss) -> int | None:
    """The faiss GPU number for a shard's device: None for the CPU (device "cpu", or faiss
    without GPUs), N for "cuda:N", and for "cuda" or None (auto) GPU 0, the first one
    CUDA_VISIBLE_DEVICES lets this process see (faiss numbers GPUs as torch does)."""
    gpus = 0 if faiss is None else getattr(faiss, "get_num_gpus", lambda: 0)()
    if device == "cpu" or gpus == 0:
        return None
    number = int(device.split(":")[1]) if device and ":" in device else 0
    if number >= gpus:
        raise GraphbuildError(f"--device {device}: faiss sees {gpus} GPU(s) (0..{gpus - 1})")
    return number


class OnGpu:
    """A faiss IVF index on GPU `number`: `search` and `nprobe` as on the CPU index. Probing
    more than GPU_MAX_NPROBE lists, it searches the CPU index (`cpu_index()` loads it)."""

    def __init__(self, faiss, index, number: int, cpu_index: Callable[[], object]):
        self.resources = faiss.StandardGpuResources()
        self.options = cloner_options(faiss)
        self.gpu = faiss.index_cpu_to_gpu(self.resources, number, index, self.options)
        self.number = number
        self.nlist, self.ntotal = index.nlist, index.ntotal
        self.max_nprobe = min(self.nlist, GPU_MAX_NPROBE)
        self.nprobe = 1
        self._cpu_index, self._cpu = cpu_index, None

    def search(self, xq, k: int):
        if k > GPU_MAX_K:
            raise ValueError(f"faiss-gpu returns at most {GPU_MAX_K} neighbours, asked {k}")
        if self.nprobe <= GPU_MAX_NPROBE:
            self.gpu.nprobe = self.nprobe
            return self.gpu.search(xq, k)
        if self._cpu is None:
            log.info("%d queries need nprobe %d, above faiss-gpu's %d: searching them on the "
                     "CPU", len(xq), self.nprobe, GPU_MAX_NPROBE)
            self._cpu = self._cpu_index()
        self._cpu.nprobe = self.nprobe
        return self._cpu.search(xq, k)


def on_gpu(index, device: str | None, cpu_index: Callable[[], object]):
    """`index` on the GPU of `device` (`faiss_device`) as an OnGpu, or unchanged where faiss
    has no GPU or the device is the CPU."""
    number = shard_faiss_gpu(device)
    if number is None:
        return index
    from graphbuild.graph.faiss_loader import faiss_if_installed

    faiss = faiss_if_installed()
    log.info("searching on faiss GPU %d (%d visible), fp16 lookup tables", number,
             faiss.get_num_gpus())
    return OnGpu(faiss, index, number, cpu_index)
