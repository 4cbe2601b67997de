"""knn on Dask runs at most as many tasks at once on a worker as its memory holds, and says
the rule; a task that fits no worker is one error line before any task starts. A
LocalCluster that graphbuild starts is sized to the need.

The workers declare memory limits of a few GiB while using far less, and the tests pass the
need in (`task_memory`), so nothing needs GiBs of real memory. How many knn tasks a worker
ran at once is replayed from its own state machine's log (Dask's task stream shifts its
times by a clock offset that changes between tasks, so it cannot order back-to-back tasks);
that no task started, from the task stream."""

from __future__ import annotations

import logging
import shutil
from collections import defaultdict

import pytest

from tests.conftest import caption_manifest, coco_subset

distributed = pytest.importorskip("distributed")

from graphbuild.errors import GraphbuildError
from graphbuild.scale import engine
from graphbuild.scale.dask_memory import WORKER_BASE, terminate_fraction

GiB = 2**30
SHARDS = 4
K = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """300 COCO captions embedded, and the local engine's graph of them in 4 shards."""
    from graphbuild.embedding.stage import EmbedConfig, embed_shard
    from graphbuild.graph.stage import knn_shard
    from graphbuild.prepare.manifest import load_manifest

    tmp = tmp_path_factory.mktemp("dask-memory")
    run = tmp / "run"
    m = caption_manifest(tmp, coco_subset(tmp, 300))
    embed_shard(load_manifest(m), run, 0, 1, EmbedConfig(precision="bf16", chunk_rows=64))
    ref = tmp / "ref"
    shutil.copytree(run, ref)
    for s in range(SHARDS):
        knn_shard(ref, K, "exact", s, SHARDS)
    return run, ref


@pytest.fixture(scope="module")
def cluster():
    """Two workers of two threads, each declaring a memory_limit of 3 GiB."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, memory_limit="3GiB",
                      dashboard_address=":0") as c, Client(c) as client:
        yield c, client


def knn_spans(stream) -> dict[str, list[tuple[float, float]]]:
    """(start, stop) of each knn task's computation, by worker, from Dask's task stream."""
    spans = defaultdict(list)
    for task in stream.data:
        if str(task["key"]).startswith("graphbuild-knn-"):
            for ss in task["startstops"]:
                if ss["action"] == "compute":
                    spans[task["worker"]].append((ss["start"], ss["stop"]))
    return spans


def _replay(dask_worker) -> tuple[int, int]:
    """(knn tasks run, the most run at once) by this worker, replaying its state machine's
    log of transitions in order: (key, start, recommended, final, ...) entries."""
    running, ran, most = set(), set(), 0
    for entry in dask_worker.state.log:
        if len(entry) != 7 or not str(entry[0]).startswith("graphbuild-knn-"):
            continue
        key, start, _, final = entry[:4]
        if final == "executing":
            running.add(key)
            ran.add(key)
        elif start == "executing":
            running.discard(key)
        most = max(most, len(running))
    return len(ran), most


def same_parts(out, ref) -> bool:
    names = [f"part-{s:05d}.parquet" for s in range(SHARDS)]
    return all((out / "graph" / p).read_bytes() == (ref / "graph" / p).read_bytes()
               for p in names)


def test_a_worker_runs_only_the_knn_tasks_its_memory_holds(runs, cluster, tmp_path, caplog):
    """Each worker offers 3 GiB x 0.95 - 0.75 GiB = 2.1 GiB: one task of 1.5 GiB at a time,
    though it has two threads (and floor(3 GiB / 1.5 GiB) would be two)."""
    run, ref = runs
    _, client = cluster
    out = tmp_path / "run"
    shutil.copytree(run, out)
    offer = 3 * GiB * terminate_fraction() - WORKER_BASE
    need = 3 * GiB // 2
    assert need <= offer < 2 * need
    with caplog.at_level(logging.INFO, "graphbuild"):
        results = engine.knn(client, out, K, "exact", SHARDS, task_memory=need)
    assert [r.shard for r in results] == list(range(SHARDS)) and any(r.complete for r in results)
    by_worker = client.run(_replay)
    assert sum(ran for ran, _ in by_worker.values()) == SHARDS, by_worker
    assert all(most == 1 for _, most in by_worker.values()), by_worker
    rule = [r.getMessage() for r in caplog.records if "a worker runs floor(" in r.getMessage()]
    assert rule == [("knn on dask: exact needs 1.50 GiB a task (as given); a worker runs "
                     "floor((memory_limit x 0.95 - 0.75 GiB for itself) / need) knn tasks at "
                     "once, at most one a thread: 2 workers of 3.00 GiB and 2 threads: 1 at "
                     "once; 2 in all")], caplog.text
    assert same_parts(out, ref)


def test_a_task_that_fits_no_worker_is_one_error_before_any_task(runs, cluster, tmp_path):
    """On the same workers, a task that needs 4 GiB (given, as a large run would need it)
    fits none of them: one error naming the need, the largest worker and what to change,
    before any task starts."""
    from distributed import get_task_stream

    run, _ = runs
    _, client = cluster
    out = tmp_path / "run"
    shutil.copytree(run, out)
    with get_task_stream(client) as stream, pytest.raises(GraphbuildError) as e:
        engine.knn(client, out, K, "exact", SHARDS, task_memory=4 * GiB)
    error = str(e.value)
    assert "\n" not in error
    assert error.startswith("knn on dask: exact needs 4.00 GiB a task (as given), more than "
                            "any worker gives: the largest, tcp://"), error
    assert "has memory_limit 3.00 GiB and gives tasks 2.10 GiB" in error
    assert "start workers with a larger memory_limit" in error
    assert "or use --method approximate (about " in error
    assert not knn_spans(stream) and not (out / "_state" / "knn").exists()
    assert not (out / "graph").exists()


def test_a_local_cluster_we_start_is_sized_to_the_need(runs, tmp_path, caplog):
    """dask_client's LocalCluster of 2 workers sharing 6 GiB: a task of 3 GiB needs a worker
    of (3 + 0.75) / 0.95 = 3.95 GiB, so knn resizes it to one worker of 6 GiB."""
    run, ref = runs
    out = tmp_path / "run"
    shutil.copytree(run, out)
    with (caplog.at_level(logging.INFO, "graphbuild"),
          engine.dask_client(workers=2, memory=6 * GiB) as client):
        engine.knn(client, out, K, "exact", SHARDS, task_memory=3 * GiB)
        limits = [w["memory_limit"] for w in client.scheduler_info()["workers"].values()]
        assert limits == [6 * GiB]
        with pytest.raises(GraphbuildError) as e:
            engine.knn(client, out, K, "exact", SHARDS, task_memory=6 * GiB)
    assert ("dask: resizing the LocalCluster for knn, 1 workers of 6.00 GiB each (was 2 of "
            "3.00 GiB): min(2, 6.00 GiB available // 3.95 GiB a worker needs)") in caplog.text
    assert "1 worker of 6.00 GiB and 1 thread: 1 at once; 1 in all" in caplog.text
    assert same_parts(out, ref)
    assert str(e.value).startswith("knn on dask: exact needs 6.00 GiB a task (as given), so a "
                                   "worker needs 7.11 GiB (with its own 0.75 GiB, under Dask's "
                                   "kill threshold of 0.95 x its memory_limit)")
    assert "this machine has 6.00 GiB for its workers; use --method approximate" in str(e.value)
