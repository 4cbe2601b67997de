"""`graphbuild export`: a sidecar per WebDataset tar, on a real WebDataset of the digits
(tests/wds_digits.py): keys as webdataset reads them, rows from the store, resume, shards,
and bad input as one line before any work."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, cli_in_process, graphbuild
from tests.wds_digits import digits_export

wds = pytest.importorskip("webdataset")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return digits_export(tmp_path_factory.mktemp("wds"))


def sidecar_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.parquet"))}


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def webdataset_keys(tar: Path) -> list[str]:
    return [s["__key__"] for s in wds.WebDataset(str(tar), shardshuffle=False)]


def test_tar_keys_are_the_keys_webdataset_reads(digits, tmp_path):
    from graphbuild.sidecars.tars import tar_keys

    shards, _run, _side = digits
    for tar in sorted(shards.glob("*.tar")):
        assert tar_keys(tar) == webdataset_keys(tar)
    odd = write_tar(tmp_path / "odd.tar", [
        ("__meta__", b"x"), ("a/001.jpg", b"1"), ("a/001.txt", b"t"), ("README", b"no dot"),
        ("002.seg.png", b"2"), ("__skip__/003.txt", b"s"), ("004.txt", b"4")])
    assert tar_keys(odd) == webdataset_keys(odd) == ["a/001", "002", "004"]
    assert tar_keys(odd, limit=2) == ["a/001", "002"]


def test_sidecar_rows_are_the_tars_samples_with_their_stored_rows(digits):
    from graphbuild.rundir.samples import read_samples
    from graphbuild.rundir.store import StoredRows

    shards, run, side = digits
    nodes, ids = read_samples(run, ids=True)
    node_of = dict(zip(ids.to_pylist(), nodes.tolist()))
    store = StoredRows(run / "embeddings.zarr")
    for tar in sorted(shards.glob("*.tar")):
        t = pq.read_table(side / (tar.stem + ".parquet"), page_checksum_verification=True)
        keys = t.column("key").to_pylist()
        assert keys == webdataset_keys(tar)
        got = t.column("node").to_numpy()
        assert got.tolist() == [node_of[k] for k in keys]
        rows = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float16)
        assert rows.tobytes() == store.gather(got).tobytes()  # bit for bit
        assert pq.ParquetFile(side / (tar.stem + ".parquet")).metadata.num_row_groups == 1


def test_keys_the_run_lacks_get_null_rows_and_are_counted(digits, tmp_path):
    import graphbuild
    from graphbuild.rundir.samples import read_samples

    shards, run, _side = digits
    like = tmp_path / "like"
    like.mkdir()
    shutil.copy(shards / "digits-0000.tar", like)
    write_tar(like / "mixed.tar", [("00007.txt", b"seven"), ("x1.txt", b"?"),
                                   ("00011.txt", b"one"), ("x2.txt", b"?")])
    r = graphbuild.export(run, like, tmp_path / "out", payload="fp16")
    assert (r.tars_exported, r.samples, r.missing, r.complete) == (2, 404, 2, True)
    t = pq.read_table(tmp_path / "out" / "mixed.parquet")
    nodes, ids = read_samples(run, ids=True)
    node_of = dict(zip(ids.to_pylist(), nodes.tolist()))
    assert t.column("key").to_pylist() == ["00007", "x1", "00011", "x2"]
    assert t.column("node").to_pylist() == [node_of["00007"], None, node_of["00011"], None]
    assert t.column("embedding").null_count == 2
    again = graphbuild.export(run, like, tmp_path / "out", payload="fp16")
    assert (again.tars_exported, again.tars_skipped) == (0, 2)


def test_rows_the_run_skipped_are_null_counted_and_shift_nothing(digits, tmp_path, monkeypatch,
                                                                  capsys):
    import graphbuild

    shards, run, side = digits
    blank = {"00005", "00398", "00400"}  # in the first tar, at its end, first of the second
    lines = (run.parent / "captions.tsv").read_text().splitlines()
    tsv = tmp_path / "c.tsv"
    tsv.write_text("\n".join(f"{line.split(chr(9))[0]}\t " if line.split("\t")[0] in blank
                             else line for line in lines) + "\n")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: digits-captions\nsource: {{path: {tsv}, format: tsv}}\n"
                        "id_column: key\ntext_column: caption\n"
                        "templates: ['a photo of the digit {}.']\n")
    graphbuild.embed(manifest, tmp_path / "run", precision="fp32", skip_bad_rows=True)
    figures = json.loads((tmp_path / "run" / "run.json").read_text())["dataset"]["figures"]
    assert (figures["samples"], figures["skipped_empty"]) == (1794, 3)
    code, _out, err = cli_in_process(monkeypatch, capsys, "export", str(tmp_path / "run"),
                                     "--like", str(shards), "--out", str(tmp_path / "out"),
                                     "--payload", "fp16", "-q")
    assert code == 0 and "(1797 samples, 3 without a sample in the run," in err, err
    for name in ("digits-0000.parquet", "digits-0001.parquet"):
        got, ref = pq.read_table(tmp_path / "out" / name), pq.read_table(side / name)
        keys = got.column("key").to_pylist()
        assert keys == ref.column("key").to_pylist()
        gaps = [i for i, k in enumerate(keys) if k in blank]
        assert [got.column("node")[i].as_py() for i in gaps] == [None] * len(gaps)
        assert [got.column("embedding")[i].as_py() for i in gaps] == [None] * len(gaps)
        kept = pa.array([k not in blank for k in keys])
        # every other row holds the row of its own key (the captions' rows are the same)
        assert got.column("embedding").filter(kept).equals(ref.column("embedding").filter(kept))


def test_int8_and_pca_payloads_hold_what_they_say(digits, tmp_path):
    import graphbuild
    from graphbuild.rundir.sidecar import read_dir_meta
    from graphbuild.rundir.store import StoredRows

    shards, run, _side = digits
    store = StoredRows(run / "embeddings.zarr").load().astype(np.float32)
    graphbuild.export(run, shards, tmp_path / "int8", payload="int8")
    t = pq.read_table(tmp_path / "int8" / "digits-0000.parquet")
    assert t.schema.field("embedding_int8").type == pa.binary(384)  # d int8 values, raw
    q = np.stack([np.frombuffer(b, np.int8) for b in t.column("embedding_int8").to_pylist()])
    q = q.astype(np.float32)
    scale = t.column("scale").to_numpy()
    x = store[t.column("node").to_numpy()]
    assert np.abs(q).max() == 127
    assert (np.abs(q * scale[:, None] - x) <= scale[:, None] / 2 * (1 + 1e-6)).all()
    graphbuild.export(run, shards, tmp_path / "pca", payload="pca-8")
    meta = read_dir_meta(tmp_path / "pca")
    basis = np.load(tmp_path / "pca" / "_pca.npy")
    assert (meta["payload"], meta["dim"], basis.shape) == ("pca-8", 8, (384, 8))
    assert np.allclose(basis.T @ basis, np.eye(8), atol=1e-5)
    t = pq.read_table(tmp_path / "pca" / "digits-0000.parquet")
    got = np.stack(t.column("embedding_pca").to_numpy(zero_copy_only=False))
    want = (store[t.column("node").to_numpy()] @ basis).astype(np.float16)
    assert got.astype(np.float16).tobytes() == want.tobytes()


def test_shards_and_a_killed_export_give_the_same_bytes(digits, tmp_path):
    shards, run, side = digits
    ref = sidecar_files(side)
    args = ["export", run, "--like", shards, "--payload", "fp16", "-q"]
    for s in range(3):
        assert graphbuild(*args, "--out", tmp_path / "sharded", "--shard", s,
                          "--num-shards", 3).returncode == 0
    assert sidecar_files(tmp_path / "sharded") == ref
    env = {**os.environ, "GRAPHBUILD_KILL_AT": "export.sidecar_written@2"}
    killed = subprocess.run([sys.executable, "-m", "graphbuild", *map(str, args), "--out",
                             tmp_path / "killed"], env=env, cwd=REPO, capture_output=True,
                            check=False, timeout=300)
    assert killed.returncode == -9
    assert len(list((tmp_path / "killed" / "_state" / "export").glob("*.done"))) == 1
    done = graphbuild(*args, "--out", tmp_path / "killed")
    assert done.returncode == 0, done.stderr
    assert "1 already done" in done.stderr and "complete" in done.stderr
    assert sidecar_files(tmp_path / "killed") == ref


def test_a_tar_replaced_since_is_exported_again(digits, tmp_path):
    import graphbuild

    shards, run, _side = digits
    like = tmp_path / "like"
    shutil.copytree(shards, like)
    graphbuild.export(run, like, tmp_path / "out", payload="fp16")
    write_tar(like / "digits-0004.tar", [("00003.txt", b"three")])
    r = graphbuild.export(run, like, tmp_path / "out", payload="fp16")
    assert (r.tars_exported, r.tars_skipped, r.samples) == (1, 4, 1)
    assert pq.read_table(tmp_path / "out" / "digits-0004.parquet").column(
        "key").to_pylist() == ["00003"]


@pytest.mark.parametrize("integer_ids", [False, True])
def test_the_samples_index_sorts_out_of_core_as_in_memory(tmp_path, integer_ids):
    from graphbuild.sidecars.index import SamplesIndex, _build

    rng = np.random.default_rng(0)
    n = 5000
    values = rng.permutation(n * 3)[:n]
    ids = pa.array(values) if integer_ids else pa.array([f"{v:07d}" for v in values])
    samples = tmp_path / "samples.parquet"
    pq.write_table(pa.table({"sample": np.arange(n), "sample_id": ids,
                             "node": rng.integers(0, 100, n)}), samples, row_group_size=700)
    _build(samples, tmp_path / "one.parquet", partition_rows=n)
    _build(samples, tmp_path / "many.parquet", partition_rows=400)
    one, many = pq.read_table(tmp_path / "one.parquet"), pq.read_table(tmp_path / "many.parquet")
    assert one.equals(many)
    assert one.column("sample_id").to_pylist() == sorted(ids.to_pylist())
    index = SamplesIndex(tmp_path / "many.parquet")
    node_of = dict(zip(ids.to_pylist(), pq.read_table(samples).column("node").to_pylist()))
    keys = [f"{v:07d}" for v in values[100:140]] + ["nope", "0000000" if 0 not in values
                                                    else "9999999"]
    want = [node_of[v if integer_ids else f"{v:07d}"] for v in values[100:140]] + [-1, -1]
    assert index.nodes(keys).tolist() == want


def test_bad_input_is_one_line_before_any_work(digits, tmp_path, monkeypatch, capsys):
    shards, run, side = digits
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"

    def error(*args) -> str:
        code, _out, err = cli_in_process(monkeypatch, capsys, "export", *map(str, args), "-q")
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1, err
        return lines[0]

    assert "holds no .tar files" in error(run, "--like", empty, "--out", out)
    assert "is --like" in error(run, "--like", shards, "--out", shards)
    foreign = tmp_path / "foreign"
    write_tar(foreign / "a.tar", [(f"img{i}.txt", b"x") for i in range(5)])
    msg = error(run, "--like", foreign, "--out", out)
    assert "none of its first 5 keys" in msg and "id_column" in msg
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(shards / "digits-0000.tar", mixed)
    write_tar(mixed / "other.tar", [(f"img{i}.txt", b"x") for i in range(3)])
    msg = error(run, "--like", mixed, "--out", out)
    assert "other.tar: none of its first 3 keys (e.g. 'img0')" in msg and "move it out" in msg
    assert not list(out.glob("*.parquet"))  # refused before any tar's sidecar
    shutil.rmtree(out)
    for bad in ("fp8", "pca-0", "pca"):
        assert "--payload must be fp16, int8 or pca-N" in error(
            run, "--like", shards, "--out", out, "--payload", bad)
    assert "N must be below the store's dim 384" in error(
        run, "--like", shards, "--out", out, "--payload", "pca-384")
    assert not out.exists()  # refused before the directory was made
    msg = error(run, "--like", shards, "--out", side, "--payload", "int8")
    assert "holds payload fp16 (dim 384), not int8 (dim 384)" in msg and "--overwrite" in msg


def test_an_export_directory_of_another_run_is_refused(digits, tmp_path):
    import graphbuild
    from graphbuild.errors import GraphbuildError

    shards, run, side = digits
    out = tmp_path / "out"
    shutil.copytree(side, out)
    tsv = tmp_path / "c.tsv"
    # the same captions but for spaces: the same nodes and rows, from another source file
    tsv.write_text((run.parent / "captions.tsv").read_text().replace("\tnine", "\tnine "))

    def embed(name: str, template: str) -> Path:
        manifest = tmp_path / f"{name}.yaml"
        manifest.write_text(f"name: digits-captions\nsource: {{path: {tsv}, format: tsv}}\n"
                            f"id_column: key\ntext_column: caption\ntemplates: [{template!r}]\n")
        graphbuild.embed(manifest, tmp_path / name, precision="fp32")
        return tmp_path / name

    plain = embed("plain", "{}")
    with pytest.raises(GraphbuildError, match=r"_meta.json: exported from embeddings with "
                       r"templates=\['a photo of the digit \{\}.'\], the run has "
                       r"templates=\['\{\}'\]; choose another --out, or --overwrite"):
        graphbuild.export(plain, shards, out, payload="fp16")
    same = embed("same", "a photo of the digit {}.")
    with pytest.raises(GraphbuildError, match="exported from run .*, not .* [(]another run[)]"):
        graphbuild.export(same, shards, out, payload="fp16")
    r = graphbuild.export(same, shards, out, payload="fp16", overwrite=True)
    assert r.complete and r.tars_exported == 5
