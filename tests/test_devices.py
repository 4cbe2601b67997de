"""graphbuild/devices.py and its uses: auto's method choice from a CUDA device's memory and
rate, and a CUDA out-of-memory error as one line that Dask does not retry. torch.cuda is
emulated (no GPU here)."""

from __future__ import annotations

import shutil
import types

import pytest

from graphbuild import devices
from graphbuild.errors import GraphbuildError

H100 = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0,
                             multi_processor_count=132, clock_rate=1_980_000)


def emulate_cuda(monkeypatch, props=H100, free=70 * 2**30):
    import torch

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda i: asked.append(i) or (free, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    return asked


def test_cuda_device_reads_the_chosen_gpu(monkeypatch):
    asked = emulate_cuda(monkeypatch)
    gpu = devices.cuda_device("cuda:1")
    assert asked == [1] and gpu.name == "cuda:1 (NVIDIA H100 80GB HBM3)"
    assert gpu.free_bytes == 70 * 2**30
    # 132 SMs x 4,096 x 1.98 GHz x the assumed efficiency of 0.2
    assert gpu.half_flops == pytest.approx(132 * 4096 * 1.98e9 * devices.EXACT_EFFICIENCY)
    no_clock = types.SimpleNamespace(**{**vars(H100), "clock_rate": 0})
    emulate_cuda(monkeypatch, no_clock)
    assert devices.cuda_device("cuda").half_flops == pytest.approx(
        132 * 4096 * devices.DEFAULT_CLOCK_HZ * devices.EXACT_EFFICIENCY)


def test_auto_on_cuda_chooses_from_the_devices_memory_and_rate(monkeypatch):
    """4M rows: a CPU (300 GFLOP/s) takes hours, so approximate; an H100 takes minutes, so
    exact, as long as the GPU's free memory holds the search and the host the rows."""
    from graphbuild.graph.stage import _exact_gpu, choose_method

    emulate_cuda(monkeypatch)
    n, host = 4_000_000, 2**36
    assert choose_method(n, 384, 32, host)[0] == "approximate"
    method, reason = choose_method(n, 384, 32, host, gpu=_exact_gpu("cuda:0"))
    assert method == "exact" and "on cuda:0 (NVIDIA H100" in reason, reason
    small = devices.Device("cuda:0 (small)", 2 * 2**30, 1e15)
    method, reason = choose_method(n, 384, 32, host, gpu=small)
    assert method == "approximate" and "> 2.0 GiB free there" in reason, reason
    method, reason = choose_method(n, 384, 32, 2**30, gpu=_exact_gpu("cuda:0"))
    assert method == "approximate" and "the host 2.9 GiB for the rows" in reason, reason
    assert _exact_gpu("cpu") is None


def test_is_cuda_oom():
    import torch

    assert devices.is_cuda_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to "
                                                           "allocate 2.00 GiB"))
    assert devices.is_cuda_oom(RuntimeError("Error in virtual void* faiss::gpu::StandardGpu"
                                            "ResourcesImpl::allocMemory: cudaMalloc error 2"))
    assert not devices.is_cuda_oom(RuntimeError("shape mismatch"))
    assert not devices.is_cuda_oom(MemoryError())


def oom(*args, **kwargs):
    import torch

    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore")


def test_cuda_oom_in_knn_is_one_line_naming_the_flags(coco3k, tmp_path, monkeypatch):
    from graphbuild.graph import stage

    run = tmp_path / "run"
    shutil.copytree(coco3k, run)
    monkeypatch.setattr(stage, "_exact_part", oom)
    with pytest.raises(GraphbuildError) as e:
        stage.knn_shard(run, 16, "exact", shard=1, num_shards=2, block_rows=1024,
                        overwrite=True)
    text = str(e.value)
    assert "\n" not in text and text.startswith(
        "knn shard-00001-of-00002 (exact): out of GPU memory (CUDA out of memory. Tried")
    assert "--block-rows (now 1024)" in text and "--num-shards (now 2)" in text


def test_cuda_oom_on_dask_is_returned_not_retried(coco3k, tmp_path, monkeypatch):
    """knn_task hands a GraphbuildError back as a value (Failed): Dask's retries are for
    lost workers, and the same shard would run out of memory again."""
    from graphbuild.graph import stage
    from graphbuild.scale import engine

    run = tmp_path / "run"
    shutil.copytree(coco3k, run)
    monkeypatch.setattr(stage, "_exact_part", oom)
    r = engine.knn_task(str(run), 8, "exact", 2048, 0.95, True, 2**34, "cpu", 0, 1)
    assert isinstance(r, engine.Failed) and "out of GPU memory" in r.message


def test_other_errors_pass_through():
    with pytest.raises(ValueError), devices.cuda_oom_as_error("x", "y"):
        raise ValueError("not memory")


def test_knn_on_a_cuda_device_this_machine_lacks_is_one_line(coco3k, monkeypatch):
    import torch

    from graphbuild.graph.stage import knn_shard

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GraphbuildError, match=r"^--device cuda: CUDA is not available"):
        knn_shard(coco3k, 16, "exact", device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(GraphbuildError, match=r"^--device cuda:2: this process sees 2 CUDA"):
        knn_shard(coco3k, 16, "exact", device="cuda:2")


def test_dask_auto_chooses_from_a_workers_gpu(monkeypatch):
    """On Dask, auto is resolved before the tasks start (dask_memory.knn_need): with a
    worker's GPU, from its memory and rate, as knn_shard does locally."""
    from graphbuild.scale import dask_memory, engine

    shape = dask_memory.KnnShape.of(4_000_000, 384, 32, 8, 2048)
    assert dask_memory.knn_need(shape, "auto", 2**36).method == "approximate"
    emulate_cuda(monkeypatch)
    monkeypatch.setattr(engine, "_device", lambda requested: "cuda:0")
    gpu = engine._worker_gpu(None)
    need = dask_memory.knn_need(shape, "auto", 2**36, gpu=gpu)
    assert need.method == "exact" and "NVIDIA H100" in need.reason
