"""`graphbuild status`: shards done / pending / failed, rates and ETA, from markers and logs.

The run directories here are written by hand, in the layout the stages and the SLURM
scripts leave (the real SLURM test checks status on a real killed task as well).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from graphbuild.rundir.files import write_json
from graphbuild.scale.status import log_state, run_status
from tests.conftest import graphbuild, write


def _touch(path: Path, stats: dict | None = None, age: float = 0.0) -> None:
    write_json(path, stats or {})
    t = time.time() - age
    os.utime(path, (t, t))


def write_chunk_file(root: Path, c: int, size: int) -> None:
    """A stored chunk as embed leaves it, by its size: fp16 rows + crc32c."""
    chunk = root / "embeddings.zarr" / "c" / str(c) / "0"
    chunk.parent.mkdir(parents=True)
    chunk.write_bytes(bytes(size))


def write_graph_part(root: Path, shard: int, rows: range, n_nodes: int, k: int) -> None:
    """A graph part as knn writes it (the neighbours themselves do not matter to status)."""
    import numpy as np

    from graphbuild.rundir.graph import write_part

    ids = (np.arange(len(rows))[:, None] + np.arange(1, k + 1)[None, :]) % n_nodes
    write_part(root, shard, rows, n_nodes,
               [(rows.start, ids.astype(np.int32), np.zeros(ids.shape, np.float32))])


def write_moments_part(root: Path, shard: int, rows: range, rank: int = 16,
                       num_shards: int = 2) -> None:
    """A row moments part and its marker as knn writes them (the values do not matter)."""
    import numpy as np

    from graphbuild.rundir.moments import RowMoments, write_moments_part
    from graphbuild.shards import shard_name

    n = len(rows)
    write_moments_part(root, shard, rows.start,
                       RowMoments(np.zeros((n, rank)), np.zeros(n), np.zeros(n)))
    _touch(root / "_state" / "knn" / f"moments-{shard_name(shard, num_shards)}.done",
           {"first": rows.start, "stop": rows.stop, "rank": rank})


def half_finished(root: Path) -> Path:
    """600 nodes in chunks of 100; embed as 3 shards: 0 done, 1 killed, 2 running; knn not
    started. Chunks finished 10 s apart, the last one 5 s ago."""
    write_json(root / "run.json", {"dataset": {"name": "coco", "figures": {
        "nodes": 600, "samples": 610}}})
    write_json(root / "embeddings.zarr" / "zarr.json", {
        "shape": [600, 384], "chunk_grid": {"configuration": {"chunk_shape": [100, 384]}}})
    chunks = root / "_state" / "embed" / "chunks"
    for c, age in ((0, 35), (1, 25), (2, 15), (4, 5)):
        write_chunk_file(root, c, 100 * 384 * 2 + 4)
        _touch(chunks / f"{c:06d}.done", age=age)
    _touch(root / "_state" / "embed" / "shard-00000-of-00003.done",
           {"seconds": 20.0, "texts_encoded": 200, "texts_per_s": 10.0}, age=25)
    logs = root / "logs"
    write(logs / "embed-41_0.out", "graphbuild: start embed shard 0 of 3\n"
          "graphbuild: exit 0 embed shard 0\n")
    write(logs / "embed-41_1.out", "graphbuild: start embed shard 1 of 3\n"
          "graphbuild: exit 137 embed shard 1\n")
    write(logs / "embed-41_2.out", "graphbuild: start embed shard 2 of 3\n")
    write_json(root / "slurm" / "submitted.json", {"jobs": {
        "embed": {"job_id": "41", "num_shards": 3, "shards": [0, 1, 2]},
        "knn": {"job_id": "42", "num_shards": 2, "shards": [0, 1]}}})
    return root


def test_half_finished_run(tmp_path):
    st = run_status(half_finished(tmp_path / "run"))
    e, k = st["stages"]["embed"], st["stages"]["knn"]
    assert (e["num_shards"], e["done"], e["pending"], e["running"]) == (3, 1, [], [2])
    assert [(f["shard"], f["reason"]) for f in e["failed"]] == [
        (1, "graphbuild: exit 137 embed shard 1")]
    assert e["failed"][0]["log"].endswith("logs/embed-41_1.out")
    assert (e["units_done"], e["units_total"], e["chunks_done"], e["chunks_total"]) == (
        400, 600, 4, 6)
    assert e["rate_per_task"] == 10.0
    # 400 texts from the first chunk's estimated start (35 s + 10 s ago) to the last (5 s ago)
    assert e["rate"] == 10.0 and e["eta_seconds"] == 20.0
    assert (k["num_shards"], k["done"], k["pending"], k["failed"]) == (2, 0, [0, 1], [])
    assert k["eta_seconds"] is None and not k["complete"]


def test_a_marked_chunk_whose_file_is_gone_is_not_done(tmp_path):
    """A marker vouches for nothing once its chunk file is deleted: embed redoes that chunk,
    so status (and submit slurm, which resubmits what status calls unfinished) count it."""
    from graphbuild.scale.status import unfinished_embed_shards

    root = half_finished(tmp_path / "run")
    assert unfinished_embed_shards(root, 3) == [1, 2]
    (root / "embeddings.zarr" / "c" / "0" / "0").unlink()
    st = run_status(root)
    assert st["stages"]["embed"]["chunks_done"] == 3
    assert unfinished_embed_shards(root, 3) == [0, 1, 2]


def test_a_knn_marker_without_its_part_is_not_done(tmp_path):
    """knn redoes a shard whose part is missing or is not what its marker records, so status
    and submit slurm count it as still to do."""
    from graphbuild.rundir.graph import part_path
    from graphbuild.rundir.moments import moments_part_path
    from graphbuild.scale.status import unfinished_knn_shards

    root = tmp_path / "run"
    test_a_finished_dask_run_has_no_logs(tmp_path)
    assert unfinished_knn_shards(root, 2) == []
    moments = moments_part_path(root, 0)
    kept = moments.read_bytes()
    moments.write_bytes(kept[:100])  # a shard whose row moments are not whole: knn adds them
    assert unfinished_knn_shards(root, 2) == [0]
    moments.write_bytes(kept)
    part_path(root, 1).write_bytes(part_path(root, 1).read_bytes()[:100])  # truncated
    assert unfinished_knn_shards(root, 2) == [1]
    part_path(root, 0).unlink()
    assert unfinished_knn_shards(root, 2) == [0, 1]
    assert run_status(root)["stages"]["knn"]["pending"] == [0, 1]


def test_cli_prints_a_table_and_json(tmp_path):
    run = half_finished(tmp_path / "run")
    r = graphbuild("status", run)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    lines = r.stdout.splitlines()
    assert lines[0] == f"run {run} (coco: 610 samples, 600 nodes)"
    assert lines[2].split()[:6] == ["embed", "3", "1", "0", "1", "1"]
    assert "400/600 texts" in lines[2] and lines[2].endswith("  20s")
    assert lines[3].split()[:6] == ["knn", "2", "0", "2", "0", "0"]
    assert f"failed: embed shard 1: graphbuild: exit 137 embed shard 1  ({run}/logs/" \
           "embed-41_1.out)" in lines
    j = json.loads(graphbuild("status", run, "--json").stdout)
    assert j["stages"]["embed"]["failed"][0]["shard"] == 1
    missing = graphbuild("status", tmp_path / "nope")
    assert missing.returncode == 2 and "no such run directory" in missing.stderr


def test_log_rules(tmp_path):
    def state(text: str) -> str:
        return log_state(write(tmp_path / "x.out", text))[0]

    assert state("graphbuild: start embed shard 1\n") == "running"
    assert state("graphbuild: start x\nslurmstepd: error: *** JOB 7 ON n1 CANCELLED AT "
                 "2026-01-01T00:00:00 DUE TO TIME LIMIT ***\n") == "failed"
    assert state("graphbuild: start x\nerror: embeddings.zarr: was embedded with ...\n"
                 "graphbuild: exit 2 x\n") == "failed"
    # requeued after preemption (--open-mode=append): the last attempt decides
    assert state("graphbuild: start x\ngraphbuild: exit 143 x\ngraphbuild: start x\n") == "running"
    assert state("graphbuild: start x\nslurmstepd: error: *** JOB 7 CANCELLED ***\n"
                 "graphbuild: start x\ngraphbuild: exit 0 x\n") == "exited"


def test_a_finished_dask_run_has_no_logs(tmp_path):
    root = tmp_path / "run"
    write_json(root / "run.json", {"dataset": {"name": "c", "figures": {"nodes": 10,
                                                                         "samples": 10}},
                                   "stages": {"knn": {"k": 3, "method": "exact"}}})
    write_json(root / "embeddings.zarr" / "zarr.json", {
        "shape": [10, 384], "chunk_grid": {"configuration": {"chunk_shape": [10, 384]}}})
    write_chunk_file(root, 0, 10 * 384 * 2 + 4)
    _touch(root / "_state" / "embed" / "chunks" / "000000.done")
    _touch(root / "_state" / "embed" / "shard-00000-of-00002.done",
           {"seconds": 1.0, "texts_encoded": 0})
    _touch(root / "_state" / "embed" / "shard-00001-of-00002.done",
           {"seconds": 2.0, "texts_encoded": 10})
    write_json(root / "_state" / "knn" / "params.json", {"num_shards": 2, "k": 3})
    for s in (0, 1):
        write_graph_part(root, s, range(5 * s, 5 * s + 5), n_nodes=10, k=3)
        _touch(root / "_state" / "knn" / f"shard-0000{s}-of-00002.done",
               {"seconds": 0.5, "rows": 5, "first": 5 * s, "stop": 5 * s + 5, "edges": 15})
        write_moments_part(root, s, range(5 * s, 5 * s + 5))
    write_json(root / "graph" / "_meta.json", {"k": 3})
    write_json(root / "graph" / "_moments" / "_meta.json", {"n_nodes": 10})
    st = run_status(root)
    for stage in ("embed", "knn"):
        s = st["stages"][stage]
        assert (s["done"], s["pending"], s["failed"], s["eta_seconds"]) == (2, [], [], 0.0)
    assert st["stages"]["knn"]["complete"] and st["stages"]["knn"]["rate_per_task"] == 10.0
