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
