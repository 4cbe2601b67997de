"""Inputs and stored data that used to pass without a word (issue #19).

1. What the tables depend on is fingerprinted, by content: the source files, the settings
   that read them, the class list. Nothing else (examples, templates, the manifest's path).
4. Empty templates or classes are manifest errors; no chunk is marked done with a non-finite
   or non-unit row.
6. Class lists: WordNet keys are n + 8 digits; duplicate names warn; numbers that spell
   another class's index are refused.
8. A marker whose data is missing or unreadable is not trusted: the rerun redoes that work.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import zarr

from graphbuild.embedding import stage as embed_module
from graphbuild.embedding.stage import EmbedConfig, embed_shard, embeddings_status
from graphbuild.errors import GraphbuildError
from graphbuild.prepare import manifest as manifest_module
from graphbuild.prepare import stage as prepare_stage
from graphbuild.prepare.manifest import load_manifest
from graphbuild.prepare.stage import prepare
from graphbuild.prepare.texts import build_tables
from graphbuild.rundir.files import read_json, write_json
from graphbuild.rundir.paths import RunDir
from graphbuild.rundir.store import StoredRows
from tests.conftest import REPO, caption_manifest, coco_subset, graphbuild, one_error, write

CHUNK_ROWS = 128  # 300 captions, 300 nodes: chunks 0, 1 and 2 (the last one short)


def store_bytes(out: Path) -> dict[str, bytes]:
    root = out / "embeddings.zarr" / "c"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def built300(tmp_path_factory) -> Path:
    """A folder with coco.tsv (300 captions), coco.yaml (source: coco.tsv) and run/, embedded
    through the CLI. Read-only: tests work on copies (`work`)."""
    base = tmp_path_factory.mktemp("silent300")
    coco_subset(base, 300)
    write(base / "coco.yaml", "name: coco\nsource: {path: coco.tsv, format: tsv}\n"
          "id_column: caption_id\ntext_column: caption\n")
    r = embed_cli(base)
    assert r.returncode == 0, r.stderr
    return base


def embed_cli(folder: Path, *more: str) -> subprocess.CompletedProcess:
    return graphbuild("embed", folder / "coco.yaml", "--out", folder / "run", "--chunk-rows",
                      str(CHUNK_ROWS), "--precision", "bf16", "-q", *more)


def work(built300: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built300, tmp_path / "w"))


# 1. Fingerprints: the data's inputs, by content; nothing else.

def sort_rows(src: Path) -> None:
    header, *rows = src.read_text(encoding="utf-8").splitlines(keepends=True)
    src.write_text(header + "".join(sorted(rows)), encoding="utf-8")


def sed_motorcycle(src: Path) -> None:
    subprocess.run(["sed", "-i", "s/motorcycle/helicopter/", str(src)], check=True)


@pytest.mark.parametrize("edit", [sort_rows, sed_motorcycle])
def test_same_size_edit_in_place_is_refused(built300, tmp_path, edit):
    w = work(built300, tmp_path)
    src = w / "coco.tsv"
    size, before = src.stat().st_size, src.read_bytes()
    edit(src)
    assert src.stat().st_size == size and src.read_bytes() != before
    samples = (w / "run" / "samples.parquet").read_bytes()

    err = one_error(embed_cli(w))
    assert f"{src}: changed since" in err and "sha256" in err
    assert (w / "run" / "samples.parquet").read_bytes() == samples


def test_adding_examples_is_not_another_input(built300, tmp_path):
    w = work(built300, tmp_path)
    with open(w / "coco.yaml", "a") as f:
        f.write("examples: [A man riding a motorcycle.]\n")
    r = embed_cli(w)
    assert r.returncode == 0, r.stderr
    assert "3 chunks already done; embeddings complete" in r.stderr


def test_staged_copy_with_other_mtimes_is_accepted(built300, tmp_path):
    w = work(built300, tmp_path)
    stage = tmp_path / "node17" / "coco.tsv"
    stage.parent.mkdir()
    shutil.copyfile(w / "coco.tsv", stage)  # same bytes, a new mtime
    r = embed_cli(w, "--source", str(stage))
    assert r.returncode == 0, r.stderr
    assert "3 chunks already done; embeddings complete" in r.stderr
    record = read_json(w / "run" / "run.json")["dataset"]["source_files"]
    assert [(f["name"], f["mtime_ns"]) for f in record] == [("coco.tsv", stage.stat().st_mtime_ns)]


def count_hashes(monkeypatch) -> list[Path]:
    hashed: list[Path] = []
    real = manifest_module.hash_file

    def counting(path: Path) -> str:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(manifest_module, "hash_file", counting)
    return hashed


def set_mtime(path: Path, seconds_ago: float) -> None:
    ns = time.time_ns() - int(seconds_ago * 1e9)
    os.utime(path, ns=(ns, ns))


def test_unchanged_size_and_mtime_trust_the_recorded_hash(tmp_path, monkeypatch):
    src = coco_subset(tmp_path, 300)
    m = caption_manifest(tmp_path, src)
    run = RunDir(tmp_path / "run")
    set_mtime(src, 3600)
    hashed = count_hashes(monkeypatch)
    prepare(load_manifest(m), run)
    assert hashed == [src]
    record = read_json(run.run_json)["dataset"]["source_files"][0]
    assert record["sha256"] == manifest_module.hashlib.sha256(src.read_bytes()).hexdigest()
    assert record["bytes"] == src.stat().st_size

    prepare(load_manifest(m), run)  # size and mtime as recorded: no read of the source
    assert hashed == [src]
    set_mtime(src, 1800)  # same bytes, another mtime: hashed again, accepted, recorded
    prepare(load_manifest(m), run)
    prepare(load_manifest(m), run)
    assert hashed == [src, src]
    set_mtime(src, 0.5)  # written just before its hash: the same mtime may hide a later write
    prepare(load_manifest(m), run)
    prepare(load_manifest(m), run)
    assert hashed == [src, src, src, src]


def test_a_source_written_just_before_is_settled_by_the_first_build(tmp_path, monkeypatch):
    """An array task that hashes a file within RACY_NS of its last write hashes it again once
    its (long) build has outlasted that window, so the other tasks can trust the record."""
    monkeypatch.setattr(manifest_module, "RACY_NS", 300_000_000)
    src = coco_subset(tmp_path, 50)
    m = caption_manifest(tmp_path, src)

    def slow_build(ds, out, skip=False, layout=None):
        time.sleep(0.4)
        return build_tables(ds, out, skip, layout)

    monkeypatch.setattr(prepare_stage, "build_tables", slow_build)
    hashed = count_hashes(monkeypatch)
    run = RunDir(tmp_path / "run")
    prepare(load_manifest(m), run)
    record = read_json(run.run_json)["dataset"]["source_files"][0]
    assert hashed == [src, src]
    assert record["hashed_ns"] > record["mtime_ns"] + manifest_module.RACY_NS
    prepare(load_manifest(m), run)  # another task: trusts the record
    assert hashed == [src, src]


def test_classes_file_contents_are_fingerprinted(tmp_path):
    names = write(tmp_path / "names.txt", "tabby cat\nschool bus\n")
    m = write(tmp_path / "m.yaml", "name: t\nclasses_file: names.txt\n")
    run = RunDir(tmp_path / "run")
    prepare(load_manifest(m), run)
    names.write_text("school bus\ntabby cat\n")
    with pytest.raises(GraphbuildError, match=r"built from another class list \(2 classes, "
                                              r"sha256 \w+\), not this one \(2 classes from "
                                              r"classes_file .*names\.txt"):
        prepare(load_manifest(m), run)


def test_reading_settings_are_fingerprinted_templates_and_paths_are_not(tmp_path):
    src = coco_subset(tmp_path, 50)
    m = caption_manifest(tmp_path, src)
    run = RunDir(tmp_path / "run")
    figures = prepare(load_manifest(m), run)
    nodes = run.nodes.read_bytes()

    moved = write(tmp_path / "elsewhere" / "moved.yaml", m.read_text().replace(
        "text_column: caption\n", "text_column: caption\ntemplates: ['a photo of {}.']\n"))
    assert prepare(load_manifest(moved), run) == figures
    assert run.nodes.read_bytes() == nodes

    other_ids = write(tmp_path / "ids.yaml", m.read_text().replace("caption_id", "image_id"))
    with pytest.raises(GraphbuildError, match="built with id_column='caption_id', the manifest "
                                              "now gives id_column='image_id'"):
        prepare(load_manifest(other_ids), run)


def test_a_source_file_added_or_gone_is_named(tmp_path):
    write(tmp_path / "a.tsv", "id\tcaption\n1\tx\n")
    m = write(tmp_path / "m.yaml", "name: t\nsource: {path: '*.tsv'}\nid_column: id\n"
              "text_column: caption\n")
    run = RunDir(tmp_path / "run")
    prepare(load_manifest(m), run)
    write(tmp_path / "b.tsv", "id\tcaption\n2\ty\n")
    with pytest.raises(GraphbuildError, match=r"b\.tsv: a source file this run was not built "
                                              "from"):
        prepare(load_manifest(m), run)


def test_skipped_rows_are_part_of_the_inputs(tmp_path):
    write(tmp_path / "c.tsv", "id\tcaption\n1\tx\n2\t \n")
    m = write(tmp_path / "m.yaml", "name: t\nsource: {path: c.tsv}\nid_column: id\n"
              "text_column: caption\n")
    run = RunDir(tmp_path / "run")
    prepare(load_manifest(m), run, skip_bad_rows=True)
    with pytest.raises(GraphbuildError, match="dropped 1 bad rows under --skip-bad-rows"):
        prepare(load_manifest(m), run)


def test_a_source_changed_while_read_is_not_recorded(tmp_path, monkeypatch):
    src = coco_subset(tmp_path, 50)
    m = caption_manifest(tmp_path, src)

    def append_then_build(ds, out, skip=False, layout=None):
        with open(src, "a") as f:
            f.write("999999\t1\tA line written while prepare reads.\n")
        return build_tables(ds, out, skip, layout)

    monkeypatch.setattr(prepare_stage, "build_tables", append_then_build)
    run = RunDir(tmp_path / "run")
    with pytest.raises(GraphbuildError, match=f"{src}: changed while it was read"):
        prepare(load_manifest(m), run)
    assert "dataset" not in run.read_run()


def as_made_before_content_fingerprints(run: RunDir) -> None:
    """run.json's dataset entry as graphbuild wrote it before per-file content hashes."""
    info = run.read_run()
    d = info["dataset"]
    info["dataset"] = {"name": d["name"], "manifest": d["manifest"], "figures": d["figures"],
                       "fingerprint": "0123456789abcdef", "templates": d["templates"],
                       "source_files": [f["path"] for f in d["source_files"]]}
    write_json(run.run_json, info)


def test_runs_made_before_content_fingerprints_are_verified_once(tmp_path):
    src = coco_subset(tmp_path, 50)
    m = caption_manifest(tmp_path, src)
    run = RunDir(tmp_path / "run")
    figures = prepare(load_manifest(m), run)
    as_made_before_content_fingerprints(run)
    assert prepare(load_manifest(m), run) == figures  # rebuilt aside, equal: adopted
    assert read_json(run.run_json)["dataset"]["source_files"][0]["name"] == "coco.tsv"
    assert not (run.root / ".verify-tables").exists()

    as_made_before_content_fingerprints(run)
    sort_rows(src)
    with pytest.raises(GraphbuildError, match=r"run/nodes\.parquet: differs from a rebuild"):
        prepare(load_manifest(m), run)
    assert isinstance(read_json(run.run_json)["dataset"]["fingerprint"], str)


# 4. Empty templates or classes; rows that are not finite unit vectors.

def test_empty_templates_are_a_manifest_error(tmp_path):
    m = write(tmp_path / "m.yaml", "name: t\nclasses: [tabby cat, school bus]\ntemplates: []\n")
    err = one_error(graphbuild("embed", m, "--out", tmp_path / "run", "-q"))
    assert f"{m}: templates: " in err and "at least one" in err
    assert not (tmp_path / "run").exists()


def test_empty_classes_are_a_manifest_error(tmp_path):
    m = write(tmp_path / "m.yaml", "name: t\nclasses: []\n")
    err = one_error(graphbuild("embed", m, "--out", tmp_path / "run", "-q"))
    assert f"{m}: classes: " in err and "at least one" in err
    assert not (tmp_path / "run").exists()
    write(tmp_path / "empty.txt", "\n  \n")
    with pytest.raises(GraphbuildError, match=r"empty\.txt: holds no class names"):
        load_manifest(write(tmp_path / "f.yaml", "name: t\nclasses_file: empty.txt\n"))


CLASSES = ["tabby cat", "school bus", "espresso", "goldfish", "sports car", "tench"]


@pytest.mark.parametrize("spoil, what", [
    (lambda row: row * np.nan, "non-finite values"),
    (lambda row: row * 0.95, "norm 0.95"),
])
def test_no_chunk_is_marked_with_a_bad_row(tmp_path, monkeypatch, spoil, what):
    m = write(tmp_path / "m.yaml", f"name: t\nclasses: [{', '.join(CLASSES)}]\n")
    real = embed_module._embed_rows

    def spoiled(encoder, texts, templates, on_batch):
        rows = real(encoder, texts, templates, on_batch)
        if "goldfish" in texts:
            rows[texts.index("goldfish")] = spoil(rows[texts.index("goldfish")])
        return rows

    monkeypatch.setattr(embed_module, "_embed_rows", spoiled)
    out = tmp_path / "run"
    with pytest.raises(GraphbuildError) as e:
        embed_shard(load_manifest(m), out, config=EmbedConfig(precision="fp32", chunk_rows=2))
    msg = str(e.value)
    assert "chunk 1: node 3 ('goldfish')" in msg and what in msg and "\n" not in msg
    marks = out / "_state" / "embed" / "chunks"
    assert (marks / "000000.done").exists() and not (marks / "000001.done").exists()
    assert not (out / "embeddings.zarr" / "c" / "1" / "0").exists()


# 6. Class lists.

def test_a_classes_file_line_is_a_wordnet_key_only_as_n_and_8_digits(tmp_path):
    write(tmp_path / "c.txt", "n95 respirator\nn01440764 tench, Tinca tinca\nn123 x\n")
    entries = load_manifest(write(tmp_path / "m.yaml", "name: t\nclasses_file: c.txt\n")
                            ).class_entries()
    assert [(e.key, e.name) for e in entries] == [(None, "n95 respirator"),
                                                  ("n01440764", "tench"), (None, "n123 x")]


def test_duplicate_names_warn_and_labels_still_map(tmp_path, caplog):
    write(tmp_path / "l.tsv", "path\tlabel\na.jpg\t0\nb.jpg\tcat\nc.jpg\t2\nd.jpg\tdog\n")
    m = write(tmp_path / "m.yaml", "name: t\nsource: {path: l.tsv}\nid_column: path\n"
              "label_column: label\nclasses: [cat, dog, cat]\n")
    with caplog.at_level(logging.WARNING, logger="graphbuild.prepare.manifest"):
        ds = load_manifest(m)
    assert "'cat' (classes 0, 2)" in caplog.text and "maps to the first class listed" in caplog.text
    build_tables(ds, tmp_path / "run")
    assert pl.read_parquet(tmp_path / "run" / "nodes.parquet")["text"].to_list() == [
        "cat", "dog", "cat"]
    assert pl.read_parquet(tmp_path / "run" / "samples.parquet")["node"].to_list() == [0, 0, 2, 1]


def test_imagenet_default_names_its_duplicates_and_keeps_its_keys(caplog):
    with caplog.at_level(logging.WARNING, logger="graphbuild.prepare.manifest"):
        entries = load_manifest(REPO / "data_manifests" / "imagenet1k.yaml").class_entries()
    assert "'missile' (classes 657, 744)" in caplog.text
    assert "'sunglasses' (classes 836, 837)" in caplog.text
    assert (entries[744].key, entries[744].name) == ("n04008634", "missile")


@pytest.mark.parametrize("classes, expected", [
    ("['1', '2', '3']", r"classes\[0\]: class name '1' spells the index of class 1 \('2'\)"),
    ("[{key: '2', name: a}, b, c]", r"classes\[0\]: key '2' spells the index of class 2 \('c'\)"),
    ("[{key: k, name: a}, {key: k, name: b}]", r"classes\[1\]: key 'k' is also the key of class 0"),
    ("[{key: b, name: a}, b]", r"classes\[0\]: key 'b' is also the name of class 1"),
])
def test_ambiguous_label_spellings_are_refused(tmp_path, classes, expected):
    m = write(tmp_path / "m.yaml", f"name: t\nclasses: {classes}\n")
    with pytest.raises(GraphbuildError, match=expected):
        load_manifest(m)


def test_numbers_that_are_their_own_index_are_fine(tmp_path):
    write(tmp_path / "l.tsv", "path\tlabel\na.jpg\t1\nb.jpg\t10\n")
    m = write(tmp_path / "m.yaml", "name: t\nsource: {path: l.tsv}\nid_column: path\n"
              "label_column: label\nclasses: ['0', '1', '10']\n")
    build_tables(load_manifest(m), tmp_path / "run")
    assert pl.read_parquet(tmp_path / "run" / "samples.parquet")["node"].to_list() == [1, 2]


# 8. Markers whose data is missing or unreadable.

def test_deleted_chunk_file_is_missing_for_knn_and_redone_by_embed(built300, tmp_path):
    w = work(built300, tmp_path)
    run = w / "run"
    original = store_bytes(run)
    (run / "embeddings.zarr" / "c" / "1" / "0").unlink()

    err = one_error(graphbuild("knn", run, "--k", "8", "-q"))
    assert "1 chunks missing (chunks 1" in err and "finish `graphbuild embed`" in err
    r = embed_cli(w)
    assert r.returncode == 0, r.stderr
    assert "2 chunks already done; embeddings complete" in r.stderr
    assert store_bytes(run) == original
    r = graphbuild("knn", run, "--k", "8", "-q")
    assert r.returncode == 0, r.stderr


def test_truncated_chunk_file_counts_as_missing(built300, tmp_path):
    run = work(built300, tmp_path) / "run"
    chunk = run / "embeddings.zarr" / "c" / "2" / "0"
    chunk.write_bytes(chunk.read_bytes()[:1000])
    assert embeddings_status(run)[1] == [2]
    with pytest.raises(GraphbuildError, match=r"c/2/0: chunk 2 \(rows 256-299\) is 1000 bytes, "
                                              r"a chunk is 98308"):
        StoredRows(run / "embeddings.zarr")[200:300]


def test_checked_store_refuses_a_missing_chunk_instead_of_zeros(built300, tmp_path):
    run = work(built300, tmp_path) / "run"
    (run / "embeddings.zarr" / "c" / "1" / "0").unlink()
    assert not np.asarray(zarr.open_array(str(run / "embeddings.zarr"), mode="r")[128:256]).any()
    store = StoredRows(run / "embeddings.zarr")
    assert store[0:128].shape == (128, 384)
    with pytest.raises(GraphbuildError, match=r"c/1/0: chunk 1 \(rows 128-255\) is missing"):
        store[100:200]


def test_corrupt_chunk_is_redone_by_the_rerun(built300, tmp_path):
    w = work(built300, tmp_path)
    run = w / "run"
    original = store_bytes(run)
    chunk = run / "embeddings.zarr" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[5000] ^= 0x40  # same size, fails its crc32c
    chunk.write_bytes(bytes(data))
    r = embed_shard(load_manifest(w / "coco.yaml"), run,
                    config=EmbedConfig(precision="bf16", chunk_rows=CHUNK_ROWS))
    assert r.texts_encoded == CHUNK_ROWS and r.chunks_skipped == 2 and r.complete
    assert store_bytes(run) == original


def test_deleted_nodes_table_is_rebuilt_by_embed(built300, tmp_path):
    w = work(built300, tmp_path)
    run = w / "run"
    nodes = (run / "nodes.parquet").read_bytes()
    (run / "nodes.parquet").unlink()
    r = embed_cli(w)
    assert r.returncode == 0, r.stderr
    assert "embeddings complete" in r.stderr
    assert (run / "nodes.parquet").read_bytes() == nodes
    r = graphbuild("knn", run, "--k", "8", "-q")
    assert r.returncode == 0, r.stderr


def test_unreadable_samples_table_is_rebuilt(tmp_path):
    m = caption_manifest(tmp_path, coco_subset(tmp_path, 50))
    run = RunDir(tmp_path / "run")
    prepare(load_manifest(m), run)
    samples = run.samples.read_bytes()
    run.samples.write_bytes(samples[:-20])  # its footer cut off
    prepare(load_manifest(m), run)
    assert run.samples.read_bytes() == samples
