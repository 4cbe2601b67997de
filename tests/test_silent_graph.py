"""Issue #19 on the graph side: nothing wrong in silence.

- knn must not claim a graph that is not on disk (params.json deleted: `knn --k 8` over a
  k=16 graph), nor trust a marker whose part is missing, truncated or short;
- every reader refuses a stale graph (the store re-embedded with other provenance);
- a corrupt chunk is one line of stderr, and a missing chunk file is an error, never zeros.

Runs are copies of the `coco3k` run (3,000 COCO captions, k=16, exact, one shard).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from graphbuild.errors import GraphbuildError
from tests.conftest import graphbuild, one_error

NEW_TEXT = "a purple elephant reading a newspaper on the moon"
MARKER = "_state/knn/shard-00000-of-00001.done"
PARAMS = "_state/knn/params.json"
META = "graph/_meta.json"
PART = "graph/part-00000.parquet"


def copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    out = tmp_path / name
    shutil.copytree(run, out)
    return out


def stored_rows(run: Path) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(str(run / "embeddings.zarr"), mode="r")[:])


def graph_arrays(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids, sims) as (n, k) arrays, read with pyarrow alone."""
    t = pq.read_table(run / PART)
    assert t.column("node").to_numpy().tolist() == list(range(t.num_rows))
    return (np.array(t.column("neighbors").to_pylist()),
            np.array(t.column("sims").to_pylist(), np.float32))


def brute_force(x16: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of every stored row: fp64 dot products of the fp16 values rounded to fp32,
    self excluded, equal sims by smaller id."""
    x = x16.astype(np.float64)
    s = (x @ x.T).astype(np.float32)
    np.fill_diagonal(s, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(x)), s.shape), -s), axis=1)[:, :k]
    return order, np.take_along_axis(s, order, 1)


def snapshot(run: Path, *names: str) -> dict[str, bytes | None]:
    return {name: (run / name).read_bytes() if (run / name).exists() else None
            for name in names}


def knn_stage(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())["stages"]["knn"]


# ------------------------------------------------------------------ 7: what the graph is


@pytest.mark.parametrize("missing", [(PARAMS,), (PARAMS, META), (META,), (MARKER,),
                                     (PARAMS, MARKER)])
def test_knn_refuses_another_k_whatever_file_is_missing(coco3k, tmp_path, missing):
    """`knn --k 8` over a k=16 graph: one line, exit 2, and nothing rewritten to say k=8."""
    run = copy(coco3k, tmp_path)
    for name in missing:
        (run / name).unlink()
    kept = snapshot(run, PARAMS, META, MARKER, PART, "run.json")
    line = one_error(graphbuild("knn", run, "--k", "8"))
    assert "k=16 (now 8)" in line and "--overwrite" in line
    assert line.split(": ", 1)[1].startswith(str(run)), line  # names the file
    assert snapshot(run, PARAMS, META, MARKER, PART, "run.json") == kept
    assert knn_stage(run)["k"] == 16


def test_knn_rerun_without_params_json_restores_it_truthfully(coco3k, tmp_path):
    run = copy(coco3k, tmp_path)
    original = (run / PARAMS).read_bytes()
    (run / PARAMS).unlink()
    r = graphbuild("knn", run, "--k", "16", "-q")
    assert r.returncode == 0 and "already done; graph complete" in r.stderr, r.stderr
    assert (run / PARAMS).read_bytes() == original


def test_overwrite_replaces_the_graph(coco3k, tmp_path):
    run = copy(coco3k, tmp_path)
    (run / PARAMS).unlink()
    before, _ = graph_arrays(run)
    r = graphbuild("knn", run, "--k", "8", "--overwrite", "-q")
    assert r.returncode == 0, r.stderr
    ids, sims = graph_arrays(run)
    assert json.loads((run / META).read_text())["k"] == 8 and knn_stage(run)["k"] == 8
    assert json.loads((run / PARAMS).read_text())["k"] == 8
    want_ids, want_sims = brute_force(stored_rows(run), 8)
    assert np.array_equal(ids, want_ids) and np.array_equal(sims, want_sims)
    assert np.array_equal(ids, before[:, :8])  # exact top-8 is the top-16's head


# ------------------------------------------------------------------ 8: markers and their parts


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def keep_first_rows(path: Path) -> None:
    """A valid Parquet file, but holding only the part's first 100 rows."""
    pq.write_table(pq.read_table(path).slice(0, 100), path)


@pytest.mark.parametrize("damage", [truncate, keep_first_rows, Path.unlink],
                         ids=["truncated", "short", "missing"])
def test_knn_redoes_a_shard_whose_part_the_marker_does_not_vouch_for(coco3k, tmp_path, damage):
    run = copy(coco3k, tmp_path)
    want = snapshot(run, PART, META)
    damage(run / PART)
    r = graphbuild("knn", run, "--k", "16")
    assert r.returncode == 0, r.stderr
    assert "already done" not in r.stderr and "doing the shard again" in r.stderr, r.stderr
    assert "2993 queries" in r.stderr and "graph complete" in r.stderr
    assert snapshot(run, PART, META) == want  # the same bytes as the uninterrupted run


def test_meta_goes_until_every_shard_is_done_again(coco3k, tmp_path):
    """Three shards; shard 1's part truncated. Rerunning shard 0 finds it done, but not
    shard 1, so _meta.json goes (readers then say the graph is not complete); shard 1's rerun
    redoes it and writes _meta.json again, as it was."""
    from graphbuild.graph.stage import knn_shard
    from graphbuild.rundir.graph import read_graph_csr

    run = copy(coco3k, tmp_path)
    for s in range(3):
        r = knn_shard(run, 16, "exact", s, 3, overwrite=True)
    assert r.complete
    parts = snapshot(run, META, *(f"graph/part-{s:05d}.parquet" for s in range(3)))
    truncate(run / "graph/part-00001.parquet")
    r = knn_shard(run, 16, "exact", 0, 3)
    assert r.skipped and not r.complete and r.missing_shards == [1]
    assert not (run / META).exists() and knn_stage(run)["status"] == "partial"
    with pytest.raises(GraphbuildError, match="_meta.json: missing; the graph is not complete"):
        read_graph_csr(run)
    r = knn_shard(run, 16, "exact", 1, 3)
    assert not r.skipped and r.complete
    assert snapshot(run, *parts) == parts and knn_stage(run)["status"] == "done"


def corrupt_pages(path: Path) -> None:
    """Bytes flipped inside the column data: the footer still reads."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 100):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, corrupt_pages], ids=["truncated", "corrupt"])
@pytest.mark.parametrize("command", [("stats",), ("neighbors", "--node", "5"), ("report",)])
def test_readers_of_a_damaged_part_give_one_line(coco3k, tmp_path, damage, command):
    run = copy(coco3k, tmp_path)
    damage(run / PART)
    args = [*command, run] if command[0] != "neighbors" else [command[0], run, *command[1:]]
    if command[0] == "report":
        args += ["--out", tmp_path / "report.html", "--batches", "1"]
    line = one_error(graphbuild(*args))
    assert line.startswith(f"error: {run / PART}: cannot read graph part"), line


@pytest.mark.parametrize("damage", [truncate, corrupt_pages], ids=["truncated", "corrupt"])
def test_the_trainers_graph_readers_refuse_a_damaged_part(coco3k, tmp_path, damage):
    """GraphRows streams parts in a DataLoader; Graph (SoftTargets' graph mode, the sampler)
    builds the CSR: both check the parts' page checksums."""
    from graphbuild.xclr import Graph, GraphRows

    run = copy(coco3k, tmp_path)
    damage(run / PART)
    with pytest.raises(GraphbuildError, match="cannot read graph part"):
        list(GraphRows(run, rank=0, world_size=1))
    with pytest.raises(GraphbuildError, match="cannot read graph part"):
        _ = Graph(run).csr


# ------------------------------------------------------------------ 9: a stale graph


@pytest.fixture(scope="module")
def stale(coco3k, tmp_path_factory) -> Path:
    """coco3k's graph over a store embedded again with other provenance (fp32, not bf16)."""
    from graphbuild.embedding.stage import EmbedConfig, embed_shard
    from graphbuild.prepare.manifest import load_manifest

    run = copy(coco3k, tmp_path_factory.mktemp("stale"))
    shutil.rmtree(run / "embeddings.zarr")
    shutil.rmtree(run / "_state" / "embed")
    embed_shard(load_manifest(coco3k.parent / "coco.yaml"), run, 0, 1,
                EmbedConfig(precision="fp32", chunk_rows=1024))
    return run


STALE = "precision='bf16', but {run}/embeddings.zarr now has precision='fp32'"


@pytest.mark.parametrize("command", [
    ("neighbors", "--node", "3"), ("neighbors", "A small closed toilet in a cramped space."),
    ("neighbors", NEW_TEXT), ("stats",), ("report",), ("knn", "--k", "16")])
def test_every_reader_refuses_a_stale_graph(stale, tmp_path, command):
    args = [command[0], stale, *command[1:]]
    if command[0] == "report":
        args += ["--out", tmp_path / "report.html"]
    line = one_error(graphbuild(*args))
    assert line.startswith(f"error: {stale / META}: ") and STALE.format(run=stale) in line, line
    assert "stale" in line and "--overwrite" in line


def test_run_command_refuses_a_stale_graph(coco3k, stale, tmp_path):
    run = copy(stale, tmp_path)
    line = one_error(graphbuild("run", coco3k.parent / "coco.yaml", "--out", run, "--precision",
                                "fp32", "--k", "16", "--method", "exact", "-q"))
    assert STALE.format(run=run) in line and "stale" in line, line
    assert not (run / "report.html").exists()


def test_validate_names_a_stale_graph(stale):
    r = graphbuild("validate", stale)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert (f"provenance: {stale / META}: precision='bf16' but "
            f"{stale}/embeddings.zarr/zarr.json has precision='fp32'") in r.stdout.splitlines()


@pytest.mark.parametrize("missing", [(PARAMS,), (PARAMS, META)])
def test_knn_refuses_a_stale_graph_whatever_file_is_missing(stale, tmp_path, missing):
    """Without params.json (and _meta.json), the shard marker still says what store the part
    came from: knn neither says 'already done' nor writes _meta.json for the new store."""
    run = copy(stale, tmp_path)
    for name in missing:
        (run / name).unlink()
    kept = snapshot(run, PARAMS, META, MARKER, "run.json")
    line = one_error(graphbuild("knn", run, "--k", "16"))
    where = run / (MARKER if META in missing else META)
    assert line.startswith(f"error: {where}: ") and STALE.format(run=run) in line, line
    assert snapshot(run, PARAMS, META, MARKER, "run.json") == kept


def test_overwrite_rebuilds_a_stale_graph_from_the_store(stale, tmp_path):
    run = copy(stale, tmp_path)
    (run / PARAMS).unlink()
    (run / META).unlink()
    r = graphbuild("knn", run, "--k", "16", "--overwrite", "-q")
    assert r.returncode == 0, r.stderr
    ids, sims = graph_arrays(run)
    want_ids, want_sims = brute_force(stored_rows(run), 16)
    assert np.array_equal(ids, want_ids) and np.array_equal(sims, want_sims)
    meta = json.loads((run / META).read_text())
    assert meta["provenance"]["precision"] == "fp32"
    assert graphbuild("neighbors", run, "--node", "3").returncode == 0


def test_provenance_absent_on_both_sides_is_not_a_match(coco3k, tmp_path):
    """A key missing from the graph's provenance and from the store's attributes cannot vouch
    that the two agree."""
    from graphbuild.rundir.graph import read_graph_csr

    run = copy(coco3k, tmp_path)
    for path, provenance in ((run / META, lambda m: m["provenance"]),
                             (run / "embeddings.zarr/zarr.json", lambda m: m["attributes"])):
        obj = json.loads(path.read_text())
        del provenance(obj)["templates"]
        path.write_text(json.dumps(obj))
    with pytest.raises(GraphbuildError, match=r"_meta.json: provenance lacks templates"):
        read_graph_csr(run)


def test_validate_names_a_marker_that_records_another_graph(coco3k, tmp_path):
    run = copy(coco3k, tmp_path)
    stats = json.loads((run / MARKER).read_text())
    (run / MARKER).write_text(json.dumps({**stats, "k": 8}))
    r = graphbuild("validate", run)
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        f"knn-done: {run / MARKER}: records k=8, _meta.json says 16"], r.stdout


# ------------------------------------------------------------------ stored rows


def many_chunks(run: Path, out: Path, rows: int = 2) -> Path:
    """The run with its store rewritten in chunks of `rows` rows (as `graphbuild embed
    --chunk-rows 2` would lay it out: same values and attributes, a marker per chunk)."""
    import zarr
    from zarr.codecs import Crc32cCodec

    shutil.copytree(run, out)
    old = zarr.open_array(str(run / "embeddings.zarr"), mode="r")
    x, attrs = np.asarray(old[:]), dict(old.attrs)
    shutil.rmtree(out / "embeddings.zarr")
    shutil.rmtree(out / "_state/embed/chunks")
    new = zarr.create_array(store=str(out / "embeddings.zarr"), shape=x.shape,
                            chunks=(rows, x.shape[1]), dtype="float16",
                            compressors=[Crc32cCodec()], fill_value=0,
                            attributes={**attrs, "chunk_rows": rows})
    new[:] = x
    (out / "_state/embed/chunks").mkdir()
    for c in range(-(-len(x) // rows)):
        (out / f"_state/embed/chunks/{c:06d}.done").write_text("{}\n")
    return out


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[100] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_corrupt_chunk_is_one_line_of_stderr(coco3k, tmp_path):
    """zarr reads the chunks of one call concurrently; when the first fails, the others were
    left pending and asyncio reported each at exit ('Task was destroyed but it is pending')."""
    run = many_chunks(coco3k, tmp_path / "run")
    flip_byte(run / "embeddings.zarr/c/0/0")
    r = graphbuild("neighbors", run, NEW_TEXT)
    one_error(r)
    assert r.stderr.splitlines() == [
        (f"error: {run}/embeddings.zarr/c/0/0: chunk 0 (rows 0-1) fails its crc32c check, it is "
         "corrupt; rerun `graphbuild embed` to redo it")]
    shutil.rmtree(run / "graph")
    shutil.rmtree(run / "_state/knn")
    r = graphbuild("knn", run, "--k", "5", "-q")
    one_error(r)
    assert r.stderr.splitlines() == [
        (f"error: {run}/embeddings.zarr/c/0/0: chunk 0 (rows 0-1) fails its crc32c check, it is "
         "corrupt; rerun `graphbuild embed` to redo it")]


def test_a_missing_chunk_file_is_an_error_not_zeros(coco3k, tmp_path):
    """zarr reads a chunk whose file is gone as its fill value: rows of zeros, which exact
    search would rank and the entropy would turn into NaN."""
    from graphbuild.inspect.neighbors import exact_search
    from graphbuild.rundir.store import StoredRows

    run = copy(coco3k, tmp_path)
    vector = stored_rows(run)[1500]
    (run / "embeddings.zarr/c/1/0").unlink()
    chunk = re.escape(f"{run}/embeddings.zarr/c/1/0: chunk 1 (rows 1024-2047) is missing")
    with pytest.raises(GraphbuildError, match=chunk):
        exact_search(run, vector, 5)
    with pytest.raises(GraphbuildError, match=chunk):
        StoredRows(run / "embeddings.zarr").gather(np.array([3, 1500]))
    for args in (("neighbors", run, NEW_TEXT), ("stats", run)):
        line = one_error(graphbuild(*args))
        assert "embeddings.zarr" in line and "chunk" in line, line
