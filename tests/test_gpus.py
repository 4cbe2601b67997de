"""One shard per visible GPU: the selection logic, on a CPU."""

import pytest

from graphbuild.scale.gpus import (
    device_for_slot,
    gpu_count,
    local_workers,
    visible_gpus,
    worker_device,
)


def test_visible_gpus_follows_cuda_visible_devices():
    assert visible_gpus({}) is None
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": " 1 , 0 "}) == ["1", "0"]
    uuids = "GPU-8f6c0e1a-aaaa,GPU-1b2c3d4e-bbbb"
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": uuids}) == uuids.split(",")
    # CUDA stops at the first invalid entry; SLURM sets NoDevFiles when a job has no GPU
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,1"}) == ["0"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}) == []


def test_gpu_count_is_capped_by_the_visible_list():
    assert gpu_count({}, cuda_devices=8) == 8
    assert gpu_count({"CUDA_VISIBLE_DEVICES": "4,5"}, cuda_devices=2) == 2
    assert gpu_count({"CUDA_VISIBLE_DEVICES": ""}, cuda_devices=8) == 0
    assert gpu_count({"CUDA_VISIBLE_DEVICES": "0,1"}, cuda_devices=0) == 0  # no driver


def test_one_shard_per_gpu():
    # a task holding GPUs 4 and 6 of the node sees them as cuda:0 and cuda:1
    assert [device_for_slot(i, 2) for i in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert device_for_slot(3, 0) == "cpu"
    with pytest.raises(ValueError):
        device_for_slot(-1, 2)


def test_dask_worker_device():
    # our LocalCluster: workers 0..3 share the node's 4 GPUs, one each
    assert [worker_device(i, 4, local_workers=4) for i in range(4)] == [
        "cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    # a worker we did not start (dask-cuda, SLURMCluster) was given its GPU: it sees it first
    assert worker_device("SLURMCluster-3", 1) == "cuda:0"
    assert worker_device(2, 4) == "cuda:0"
    assert worker_device(0, 0, local_workers=2) == "cpu"


def test_local_cluster_shape():
    assert local_workers(cpus=2, n_gpus=0) == (2, 1)
    assert local_workers(cpus=32, n_gpus=8) == (8, 4)
    assert local_workers(cpus=4, n_gpus=8) == (8, 1)


def test_dask_worker_with_explicit_cuda_takes_its_own_gpu(monkeypatch):
    """--device cuda on a LocalCluster of ours with 2 GPUs: worker 1 takes cuda:1 and makes it
    torch's current device; cuda:N and cpu stay as asked; auto without GPUs stays auto."""
    import types

    import distributed
    import torch

    from graphbuild.scale import engine

    current = []
    monkeypatch.setattr(engine, "_local_gpus", lambda: 2)
    monkeypatch.setattr(distributed, "get_worker", lambda: types.SimpleNamespace(name=1))
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv(engine.LOCAL_SLOTS_ENV, "2")
    assert engine._device("cuda") == "cuda:1"
    assert engine._device("auto") == "cuda:1"
    assert current == [1, 1]
    assert engine._device("cuda:0") == "cuda:0" and engine._device("cpu") == "cpu"
    # a worker someone else started with its own CUDA_VISIBLE_DEVICES sees its GPU as 0
    monkeypatch.delenv(engine.LOCAL_SLOTS_ENV)
    monkeypatch.setattr(distributed, "get_worker",
                        lambda: types.SimpleNamespace(name="tcp://10.0.0.5:4001"))
    assert engine._device("cuda") == "cuda:0"
    monkeypatch.setattr(engine, "_local_gpus", lambda: 0)
    assert engine._device("auto") == "auto" and engine._device("cuda") == "cuda"


def test_local_gpus_follow_cuda_visible_devices(monkeypatch):
    """A LocalCluster gets one worker per GPU this process may use: CUDA_VISIBLE_DEVICES caps
    what the driver reports."""
    import torch

    from graphbuild.scale import engine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert engine._local_gpus() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert engine._local_gpus() == 0
