"""Which part of the work is ours: shard numbers from flags or a SLURM job array, and lists
of shard or chunk numbers written as ranges."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from graphbuild.errors import GraphbuildError


def resolve_shard(shard: int | None, num_shards: int | None,
                  env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """Return (shard, num_shards), 0-based.

    Flags win. Otherwise a SLURM job array decides: task ids need not start at 0
    (`--array=1-8` sets SLURM_ARRAY_TASK_MIN=1), so the shard is ID - MIN.
    """
    if shard is None and num_shards is None and "SLURM_ARRAY_TASK_ID" in env:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        lo = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        if "SLURM_ARRAY_TASK_COUNT" in env:
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
        else:
            count = int(env.get("SLURM_ARRAY_TASK_MAX", str(task))) - lo + 1
        step = int(env.get("SLURM_ARRAY_TASK_STEP", "1"))
        if step != 1 or not 0 <= task - lo < count:
            raise GraphbuildError(
                f"SLURM array task {task} (min {lo}, count {count}, step {step}) is not a "
                "contiguous 0..N-1 range; pass --shard and --num-shards")
        return task - lo, count
    if num_shards is None:
        num_shards = 1
    if shard is None:
        if num_shards != 1:
            raise GraphbuildError("--num-shards needs --shard (or a SLURM job array)")
        shard = 0
    if num_shards < 1:
        raise GraphbuildError(f"--num-shards must be >= 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise GraphbuildError(f"--shard must be in 0..{num_shards - 1}, got {shard}")
    return shard, num_shards


def shard_range(n_items: int, shard: int, num_shards: int) -> range:
    """The contiguous slice of range(n_items) that a shard owns; sizes differ by at most one."""
    return range(n_items * shard // num_shards, n_items * (shard + 1) // num_shards)


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}"


def id_ranges(ids: Iterable[int], sep: str = ", ") -> str:
    """Sorted ids as runs of consecutive ones: [0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'; with
    sep="," the form of a SLURM --array list."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return sep.join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in runs)
