"""faiss on a GPU, emulated on the CPU: graph/faiss_gpu.py against a faiss-gpu stand-in that
keeps faiss-gpu's rules (48 KiB of shared memory for an IVF-PQ lookup table, at most 2048
neighbours and 2048 probed lists, GPUs numbered 0..G-1) and searches with faiss-cpu.
What it cannot show (faiss-gpu's kernels themselves) benchmarks/gpu_check.py checks on a GPU.
"""

from __future__ import annotations

import logging
import shutil
import types

import numpy as np
import pytest

from graphbuild.errors import GraphbuildError
from graphbuild.graph import faiss_gpu
from graphbuild.graph.ann import pq_subquantizers


class ClonerOptions:
    """faiss.GpuClonerOptions' defaults (faiss-cpu does not have the class)."""

    def __init__(self):
        self.useFloat16 = False
        self.usePrecomputed = False


class EmulatedGpuIndex:
    """An index on GPU `device`: faiss-gpu's checks, then faiss-cpu's search."""

    def __init__(self, faiss, device: int, index, options: ClonerOptions):
        if isinstance(index, faiss.IndexIVFPQ):
            entry = 2 if options.useFloat16 else 4
            need = entry * index.pq.M * 2 ** index.pq.nbits
            if need > 48 * 1024:  # faiss-gpu's GpuIndexIVFPQ::verifyPQSettings_
                raise RuntimeError(f"Device {device} has 49152 bytes of shared memory, while "
                                   f"8 bits per code and {index.pq.M} sub-quantizers requires "
                                   f"{need} bytes. Consider useFloat16LookupTables")
        self.device, self.use_float16 = device, options.useFloat16
        self.cpu = faiss.clone_index(index)
        self.nlist, self.ntotal, self.nprobe = index.nlist, index.ntotal, 1
        self.searched_nprobes = []

    def search(self, xq, k):
        if k > 2048 or self.nprobe > 2048:
            raise RuntimeError(f"k {k} and nprobe {self.nprobe} must be <= 2048 on the GPU")
        self.searched_nprobes.append(self.nprobe)
        self.cpu.nprobe = self.nprobe
        return self.cpu.search(xq, k)


def emulated_faiss_gpu(monkeypatch, gpus: int = 2) -> list[EmulatedGpuIndex]:
    """faiss-cpu dressed as faiss-gpu with `gpus` GPUs, loaded by faiss_loader, and torch
    told it has as many; returns the list every index moved to a GPU is appended to."""
    import faiss
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)

    moved: list[EmulatedGpuIndex] = []

    def index_cpu_to_gpu(resources, device, index, options=None):
        assert 0 <= device < gpus, f"faiss-gpu has no GPU {device}"
        moved.append(EmulatedGpuIndex(faiss, device, index, options or ClonerOptions()))
        return moved[-1]

    fake = types.SimpleNamespace(**{name: getattr(faiss, name) for name in dir(faiss)
                                    if not name.startswith("__")})
    fake.get_num_gpus = lambda: gpus
    fake.StandardGpuResources = object
    fake.GpuClonerOptions = ClonerOptions
    fake.index_cpu_to_gpu = index_cpu_to_gpu
    monkeypatch.setattr("graphbuild.graph.faiss_loader._import_faiss", lambda: fake)
    monkeypatch.setattr(faiss_gpu, "gpu_device_nodes",
                        lambda: [f"/dev/nvidia{i}" for i in range(gpus)])
    return moved


def run_without_graph(coco3k, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(coco3k, run)
    shutil.rmtree(run / "graph")
    shutil.rmtree(run / "_state" / "knn")
    return run


def test_pq_lookup_table_fits_shared_memory_only_in_fp16():
    """At d=384 the index has 96 sub-quantizers: 96 x 256 x 4 bytes = 98,304 > 48 KiB in
    fp32, 96 x 256 x 2 = 49,152 = 48 KiB in fp16, which faiss-gpu accepts (<=)."""
    import faiss

    assert pq_subquantizers(384) == 96
    assert faiss_gpu.lookup_table_bytes(96, "fp32") == 98_304 > 48 * 1024
    assert faiss_gpu.lookup_table_bytes(96, "fp16") == 49_152 == faiss_gpu.SHARED_MEMORY_BYTES
    assert faiss_gpu.gpu_subquantizers(384) == 96  # the CPU's index, unchanged
    # d=768: d/4 = 192 would need 98,304 bytes even in fp16; 96 (8 dims each) fits
    assert faiss_gpu.gpu_subquantizers(768) == 96
    assert faiss_gpu.gpu_subquantizers(1024) == 64  # 96 does not divide 1024
    with pytest.raises(GraphbuildError, match="300-dimensional rows cannot be searched"):
        faiss_gpu.gpu_subquantizers(300)  # 75 x 4, 50 x 6, 30 x 10: none faiss-gpu has
    fake = types.SimpleNamespace(GpuClonerOptions=ClonerOptions)
    assert faiss_gpu.cloner_options(fake).useFloat16 is True
    assert hasattr(faiss, "IndexIVFPQ")


def test_faiss_device_follows_the_shards_device(monkeypatch):
    import faiss

    gpu2 = types.SimpleNamespace(get_num_gpus=lambda: 2)
    assert faiss_gpu.faiss_device("cuda:1", gpu2) == 1
    assert faiss_gpu.faiss_device("cuda", gpu2) == 0
    assert faiss_gpu.faiss_device(None, gpu2) == 0
    assert faiss_gpu.faiss_device("cpu", gpu2) is None
    assert faiss_gpu.faiss_device("cuda:1", faiss) is None  # faiss-cpu: no GPUs
    assert faiss_gpu.faiss_device("cuda:1", None) is None   # no faiss
    with pytest.raises(GraphbuildError, match=r"--device cuda:2: faiss sees 2 GPU"):
        faiss_gpu.faiss_device("cuda:2", gpu2)


def test_approximate_knn_searches_on_the_shards_gpu(coco3k, tmp_path, monkeypatch):
    """The index goes to GPU 1 when the shard's device is cuda:1, with fp16 lookup tables,
    and the shard's graph comes from it."""
    from graphbuild.graph.stage import knn_shard
    from graphbuild.rundir.graph import read_graph_csr

    moved = emulated_faiss_gpu(monkeypatch)
    run = run_without_graph(coco3k, tmp_path)
    r = knn_shard(run, 10, "approximate", device="cuda:1")
    assert [(m.device, m.use_float16) for m in moved] == [(1, True)]
    assert moved[0].searched_nprobes  # the tuning and the search ran on the "GPU"
    assert (run / "graph" / "_index" / "ivf-sq16.index").exists()
    assert r.recall >= 0.95 and r.complete
    _, ind, _ = read_graph_csr(run)
    assert len(ind) == r.rows * 10 and r.rows > 2900


def test_ivf_pq_at_d384_moves_to_a_gpu_only_with_fp16_tables(monkeypatch):
    """The index `auto` picks when fp16 codes exceed half the memory: 96 sub-quantizers at
    d=384. The stand-in refuses it with faiss's default (fp32) tables, as faiss-gpu does, and
    on_gpu's options pass."""
    import faiss

    moved = emulated_faiss_gpu(monkeypatch)
    x = np.random.default_rng(0).standard_normal((300, 384)).astype(np.float32)
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(384), 384, 1, pq_subquantizers(384), 8,
                             faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = index.pq.cp.niter = 2
    index.train(x)
    with pytest.raises(RuntimeError, match="96 sub-quantizers requires 98304 bytes"):
        EmulatedGpuIndex(faiss, 0, index, ClonerOptions())
    searcher = faiss_gpu.on_gpu(index, "cuda:1", lambda: index)
    assert moved[0].use_float16 and moved[0].device == 1 and searcher.nlist == 1


def test_device_cpu_keeps_faiss_off_the_gpus(coco3k, tmp_path, monkeypatch):
    """`run --device cpu` / `knn --device cpu`: no index on a GPU, the CPU's own lists."""
    from graphbuild.graph.stage import knn_shard

    moved = emulated_faiss_gpu(monkeypatch)
    run = run_without_graph(coco3k, tmp_path)
    knn_shard(run, 10, "approximate", device="cpu")
    assert moved == []
    assert (run / "graph" / "_index" / "lists.npz").exists()


def test_k_above_faiss_gpu_limit_is_refused_before_work(coco3k, tmp_path, monkeypatch):
    from graphbuild.graph.stage import knn_shard

    emulated_faiss_gpu(monkeypatch)
    run = run_without_graph(coco3k, tmp_path)
    with pytest.raises(GraphbuildError, match=r"^--k 2048: faiss-gpu returns at most 2048 "
                                              r".*--k 2047 or less"):
        knn_shard(run, 2048, "approximate", device="cuda:0")
    assert not (run / "_state" / "knn" / "params.json").exists()  # refused before the claim
    knn_shard(run, 2047, "approximate", device="cpu", recall_target=0.5)  # the CPU has no limit


def test_nprobe_tuning_stops_at_the_gpu_limit(coco3k, tmp_path, monkeypatch, caplog):
    """With the limit lowered to 4 of the index's 76 lists, tuning to an unreachable recall
    stops at 4 and says so; queries whose lists are short go past it on the CPU index."""
    from graphbuild.graph.stage import knn_shard

    monkeypatch.setattr(faiss_gpu, "GPU_MAX_NPROBE", 4)
    moved = emulated_faiss_gpu(monkeypatch)
    run = run_without_graph(coco3k, tmp_path)
    with caplog.at_level(logging.INFO):
        r = knn_shard(run, 10, "approximate", device="cuda:0", recall_target=1.0)
    assert r.nprobe == 4
    assert "nprobe stops at 4 of 76 lists, faiss-gpu's limit" in caplog.text
    assert max(n for m in moved for n in m.searched_nprobes) <= 4


def test_on_gpu_searches_beyond_the_limit_on_the_cpu(monkeypatch):
    """ann.search doubles nprobe for queries with short lists: past 2048 the CPU index
    answers, loaded only then."""
    import faiss

    emulated_faiss_gpu(monkeypatch)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(16), 16, 8, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    loads = []
    searcher = faiss_gpu.on_gpu(index, "cuda:0", lambda: loads.append(1) or index)
    assert isinstance(searcher, faiss_gpu.OnGpu) and searcher.max_nprobe == 8
    monkeypatch.setattr(faiss_gpu, "GPU_MAX_NPROBE", 2)
    searcher.nprobe = 2
    searcher.search(x[:5], 3)
    assert loads == []
    searcher.nprobe = 4
    _, i = searcher.search(x[:5], 3)
    index.nprobe = 4
    assert loads == [1] and (i == index.search(x[:5], 3)[1]).all()
    with pytest.raises(ValueError, match="at most 2048"):
        searcher.search(x[:5], 2049)


def test_no_gpu_no_faiss_import(monkeypatch):
    """Without a GPU device node, or on --device cpu, the shard's faiss GPU is None and faiss
    is not imported to say so."""
    def no_import():
        raise AssertionError("faiss imported")

    monkeypatch.setattr("graphbuild.graph.faiss_loader._import_faiss", no_import)
    monkeypatch.setattr(faiss_gpu, "gpu_device_nodes", list)
    assert faiss_gpu.shard_faiss_gpu(None) is None
    assert faiss_gpu.shard_faiss_gpu("cuda:0") is None
    monkeypatch.setattr(faiss_gpu, "gpu_device_nodes", lambda: ["/dev/nvidia0"])
    assert faiss_gpu.shard_faiss_gpu("cpu") is None
