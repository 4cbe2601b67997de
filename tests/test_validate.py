"""graphbuild validate: a sound run passes; every check catches a run broken on purpose."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import cli_in_process, graphbuild

PART = "graph/part-00000.parquet"
MOMENTS_PART = "graph/_moments/part-00000.parquet"


@pytest.fixture
def run(coco3k):
    return coco3k


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    return cli_in_process(monkeypatch, capsys, *args)


def n_nodes(run: Path) -> int:
    return pq.read_metadata(run / "nodes.parquet").num_rows


def test_a_sound_run_passes(run):
    n = n_nodes(run)
    r = graphbuild("validate", run)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines() == [
        (f"ok: {run}: all 20 checks passed on {n:,} nodes (3 chunks) and {16 * n:,} edges "
         "(1 part)")]


# ------------------------------------------------------------------ ways to break a run


def edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def edit_rows(run: Path, change) -> None:
    """Rewrite the graph part after `change(rows)` edits its rows (dicts), schema kept."""
    path = run / PART
    table = pq.read_table(path)
    rows = table.to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def edit_store(run: Path, change) -> None:
    """Change stored rows through zarr, so the chunks' crc32c stay valid."""
    import zarr

    arr = zarr.open_array(str(run / "embeddings.zarr"), mode="r+")
    change(arr)


def set_row(arr, i: int, value) -> None:
    arr[i] = value(np.asarray(arr[i]))


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x40
    path.write_bytes(bytes(data))


def rewrite_samples(run: Path) -> None:
    path = run / "samples.parquet"
    t = pq.read_table(path)
    node = t.column("node").to_numpy().copy()
    node[17] = 10 ** 6
    pq.write_table(t.set_column(t.schema.get_field_index("node"), "node", pa.array(node)), path)


def float64_sims(run: Path) -> None:
    path = run / PART
    t = pq.read_table(path)
    sims = t.column("sims").cast(pa.list_(pa.float64()))
    pq.write_table(t.set_column(2, "sims", sims), path)


def corrupt_pages(path: Path) -> None:
    """Bytes flipped inside the column data: the footer still reads."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 100):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def swap_rows(rows: list[dict]) -> None:
    rows[10], rows[11] = rows[11], rows[10]


def put(rows: list[dict], row: int, key: str, pos: int, value) -> None:
    rows[row][key][pos] = value


# check -> (how to break a copy of the run, the file its line must name)
BREAK = {
    "run-files": (lambda r: (r / "nodes.parquet").unlink(), "nodes.parquet"),
    "tables": (rewrite_samples, "samples.parquet"),
    "embed-done": (lambda r: (r / "_state/embed/chunks/000001.done").unlink(),
                   "_state/embed/chunks"),
    "knn-done": (lambda r: (r / "_state/knn/shard-00000-of-00001.done").unlink(), "_state/knn"),
    "emb-shape": (lambda r: edit_json(r / "embeddings.zarr/zarr.json",
                                      lambda m: m["shape"].__setitem__(0, 2900)),
                  "embeddings.zarr/zarr.json"),
    "emb-chunks": (lambda r: flip_byte(r / "embeddings.zarr/c/1/0"), "embeddings.zarr/c/1/0"),
    "emb-finite": (lambda r: edit_store(r, lambda a: set_row(a, 1500, lambda x: x * np.nan)),
                   "embeddings.zarr/c/1/0"),
    "emb-norms": (lambda r: edit_store(r, lambda a: set_row(a, 2500, lambda x: x * 1.5)),
                  "embeddings.zarr/c/2/0"),
    "provenance": (lambda r: edit_json(r / "graph/_meta.json", lambda m: m["provenance"].update(
        model_revision="sha256:another")), "graph/_meta.json"),
    "graph-meta": (lambda r: edit_json(r / "graph/_meta.json", lambda m: m.update(
        edges=m["edges"] - 1)), "graph/_meta.json"),
    "graph-schema": (float64_sims, PART),
    "rows-sorted": (lambda r: edit_rows(r, swap_rows), PART),
    "row-length": (lambda r: edit_rows(r, lambda rows: (rows[7]["neighbors"].pop(),
                                                        rows[7]["sims"].pop())), PART),
    "ids-in-range": (lambda r: edit_rows(r, lambda rows: put(rows, 3, "neighbors", 0,
                                                             len(rows))), PART),
    "no-self-edges": (lambda r: edit_rows(r, lambda rows: put(rows, 4, "neighbors", -1, 4)),
                      PART),
    "unique-neighbours": (lambda r: edit_rows(r, lambda rows: put(
        rows, 5, "neighbors", -1, rows[5]["neighbors"][0])), PART),
    "sims-range": (lambda r: edit_rows(r, lambda rows: put(rows, 6, "sims", 0, float("nan"))),
                   PART),
    "sims-descending": (lambda r: edit_rows(r, lambda rows: rows[8]["sims"].reverse()), PART),
    "sims-match": (lambda r: edit_rows(r, lambda rows: [
        row.update(sims=[s * 0.9 for s in row["sims"]]) for row in rows]), PART),
    "moments": (lambda r: corrupt_pages(r / MOMENTS_PART), MOMENTS_PART),
}


def test_every_check_has_a_case():
    from graphbuild.inspect.validate import CHECKS

    assert list(BREAK) == list(CHECKS)


@pytest.mark.parametrize("check", list(BREAK))
def test_each_check_catches_its_breakage(run, tmp_path, check, monkeypatch, capsys):
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    damage, file = BREAK[check]
    damage(broken)
    code, out, err = cli(monkeypatch, capsys, "validate", broken)
    assert code == 1, out + err
    lines = out.strip().splitlines()
    assert any(line.startswith(f"{check}: {broken / file}") for line in lines), lines
    assert "Traceback" not in out + err and not any(line.startswith("ok:") for line in lines)
    assert err.strip() == f"{broken}: {len(lines)} problem(s)"


def test_a_corrupt_chunk_is_named_in_a_new_process(run, tmp_path):
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    flip_byte(broken / "embeddings.zarr/c/2/0")
    r = graphbuild("validate", broken)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stdout.strip().splitlines() == [
        (f"emb-chunks: {broken}/embeddings.zarr/c/2/0: chunk 2 (rows 2048-{n_nodes(run) - 1}) "
         "fails its crc32c check, it is corrupt; rerun `graphbuild embed` to redo it")]


def test_not_a_run_is_exit_2(tmp_path, monkeypatch, capsys):
    for path, words in ((tmp_path / "nope", "no such run directory"),
                        (tmp_path, "not a graphbuild run (no run.json)")):
        code, out, err = cli(monkeypatch, capsys, "validate", path)
        assert code == 2 and out == "" and err.strip() == f"error: {path}: {words}"
