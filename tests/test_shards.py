import pytest

from graphbuild.errors import GraphbuildError
from graphbuild.shards import id_ranges, resolve_shard, shard_range


def test_flags_win_and_default_is_one_shard():
    assert resolve_shard(None, None, {}) == (0, 1)
    assert resolve_shard(3, 64, {"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "10"}) == (3, 64)


def test_slurm_array_starting_at_one():
    env = {"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8"}
    assert resolve_shard(None, None, env) == (7, 8)
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_MAX": "9"}
    assert resolve_shard(None, None, env) == (0, 5)


def test_non_contiguous_arrays_and_bad_flags_are_refused():
    with pytest.raises(GraphbuildError, match="not a contiguous"):
        resolve_shard(None, None, {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0",
                                   "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_STEP": "2"})
    with pytest.raises(GraphbuildError, match="--shard must be in 0..3"):
        resolve_shard(4, 4, {})
    with pytest.raises(GraphbuildError, match="--num-shards needs --shard"):
        resolve_shard(None, 4, {})


@pytest.mark.parametrize("n, shards", [(0, 3), (5, 8), (100, 7), (8192, 64)])
def test_ranges_tile_the_items_exactly(n, shards):
    covered = [i for s in range(shards) for i in shard_range(n, s, shards)]
    assert covered == list(range(n))
    sizes = [len(shard_range(n, s, shards)) for s in range(shards)]
    assert max(sizes) - min(sizes) <= 1


def test_id_ranges_join_runs_of_consecutive_ids():
    assert id_ranges([1, 2, 3, 7]) == "1-3, 7"
    assert id_ranges([8, 0, 1, 2, 5, 7], ",") == "0-2,5,7-8"  # sorted first
    assert id_ranges([4]) == "4"
    assert id_ranges([]) == ""
