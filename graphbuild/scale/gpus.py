"""Which GPU a shard runs on: one shard per visible GPU. Pure functions, testable on a CPU.

CUDA numbers the devices a process may use 0..G-1 in the order CUDA_VISIBLE_DEVICES lists
them, whatever their physical ids or UUIDs. So a process that runs several shards at once
(a Dask LocalCluster started inside one SLURM task that holds G GPUs, one worker per GPU)
gives its i-th worker `cuda:i`. A worker that was given a GPU of its own by whoever started
it (dask-cuda, or one SLURM task per GPU) sees that GPU first, so it uses `cuda:0`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def visible_gpus(env: Mapping[str, str] = os.environ) -> list[str] | None:
    """The entries of CUDA_VISIBLE_DEVICES (ids or UUIDs), [] when it hides every GPU, or
    None when it is unset (then every GPU of the machine is visible)."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    entries = [v.strip() for v in value.split(",") if v.strip()]
    # CUDA stops at the first invalid entry, such as -1 or NoDevFiles (SLURM without GPUs).
    out = []
    for v in entries:
        if v.startswith("-") or v == "NoDevFiles":
            break
        out.append(v)
    return out


def gpu_count(env: Mapping[str, str] = os.environ, cuda_devices: int = 0) -> int:
    """GPUs this process can use: what CUDA reports, capped by CUDA_VISIBLE_DEVICES."""
    visible = visible_gpus(env)
    return cuda_devices if visible is None else min(len(visible), cuda_devices)


def device_for_slot(slot: int, n_gpus: int) -> str:
    """The device of the slot-th concurrent shard (worker) on a node with n_gpus GPUs."""
    if slot < 0:
        raise ValueError(f"slot must be >= 0, got {slot}")
    return f"cuda:{slot % n_gpus}" if n_gpus > 0 else "cpu"


def worker_device(worker_name, n_gpus: int, local_workers: int | None = None) -> str:
    """The device of a Dask worker.

    A LocalCluster names its workers 0..W-1 and all of them see the same GPUs, so worker i
    takes GPU i (local_workers = W). Any other worker (a name that is not a small integer,
    or a cluster we did not start) is taken to have been given its own GPU: cuda:0.
    """
    if n_gpus <= 0:
        return "cpu"
    if local_workers is not None and isinstance(worker_name, int) and 0 <= worker_name:
        return device_for_slot(worker_name, n_gpus)
    return "cuda:0"


def local_workers(cpus: int, n_gpus: int) -> tuple[int, int]:
    """(workers, torch threads per worker) of a LocalCluster on this node: one worker per
    GPU, with the cores shared among them; without GPUs, one single-threaded worker per core.
    Each worker runs one shard at a time."""
    cpus = max(1, cpus)
    if n_gpus > 0:
        return n_gpus, max(1, cpus // n_gpus)
    return cpus, 1
