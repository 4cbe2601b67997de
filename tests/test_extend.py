"""An append's tables built from the new files and the run's own tables (prepare/extend.py).

The promise: the same bytes as the whole-source build of the same append, and as a
from-scratch build over old then new files, with the old source files never read; each bad
new row refused in the same line as the whole-source build; and where the run's tables
cannot say what a from-scratch build would do, the whole-source build, with a log line.
No model is loaded: these call prepare and prepare_append directly.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import polars as pl
import pytest

from graphbuild.errors import GraphbuildError
from graphbuild.prepare.append import prepare_append
from graphbuild.prepare.manifest import load_manifest
from graphbuild.prepare.stage import prepare
from graphbuild.prepare.texts import Layout, build_tables
from graphbuild.rundir.paths import RunDir
from tests.conftest import COCO, write

CAPTIONS = "name: t\nsource: {path: src/*.tsv}\nid_column: caption_id\ntext_column: caption\n"
ROW_NUMBERS = "name: t\nsource: {path: src/*.tsv}\ntext_column: caption\n"
TINY = Layout(block_bytes=256, partitions=3, window_rows=16, flush_rows=7)  # many small steps
HOUR_NS = 3600 * 10**9


def coco_lines(lines: range) -> list[str]:
    rows = COCO.read_text(encoding="utf-8").splitlines()
    return [rows[i] for i in lines]


def tsv(header: str, lines: list[str]) -> str:
    return "\n".join([header, *lines]) + "\n"


def old_run(folder: Path, manifest: str, old: dict[str, str], skip: bool = False) -> RunDir:
    """A run prepared from the `old` files, written an hour ago (so their recorded hashes are
    trusted by size and mtime, as a run's files are after a while)."""
    write(folder / "m.yaml", manifest)
    for name, text in old.items():
        path = write(folder / "src" / name, text)
        os.utime(path, ns=(time.time_ns() - HOUR_NS,) * 2)
    run = RunDir(folder / "run")
    prepare(load_manifest(folder / "m.yaml"), run, skip)
    return run


def append_to(run: RunDir, new: dict[str, str], skip: bool = False, layout: Layout | None = None,
              whole_source: bool = False) -> dict:
    """The `new` files written beside the old ones and appended; the run's figures after."""
    folder = run.root.parent
    for name, text in new.items():
        write(folder / "src" / name, text)
    added = prepare_append(load_manifest(folder / "m.yaml"), run, skip, before=lambda: None,
                           layout=layout, whole_source=whole_source)
    assert [r["name"] for r in added] == list(new)
    return run.read_run()["dataset"]["figures"]


def from_scratch(folder: Path, skip: bool = False) -> tuple[Path, dict]:
    """build_tables over every file of the run folder's source (old, then new)."""
    out = folder / "scratch"
    return out, build_tables(load_manifest(folder / "m.yaml"), out, skip).as_dict()


def table_bytes(folder: Path) -> dict[str, bytes]:
    return {t: (folder / t).read_bytes() for t in ("nodes.parquet", "samples.parquet")}


def both_ways(tmp_path: Path, manifest: str, old: dict, new: dict, skip: bool = False,
              layout: Layout | None = None) -> tuple[RunDir, dict]:
    """The append extended and whole-source, each on its own copy; checks they and a
    from-scratch build agree byte for byte and in figures. The extended run and figures."""
    runs, figures = {}, {}
    for way in ("extended", "whole"):
        runs[way] = old_run(tmp_path / way, manifest, old, skip)
        figures[way] = append_to(runs[way], new, skip, layout, whole_source=way == "whole")
    scratch, want = from_scratch(tmp_path / "whole", skip)
    assert figures["extended"] == figures["whole"] == want
    assert table_bytes(runs["extended"].root) == table_bytes(runs["whole"].root)
    assert table_bytes(runs["extended"].root) == table_bytes(scratch)
    return runs["extended"], figures["extended"]


@pytest.mark.parametrize("layout", [None, TINY], ids=["default", "tiny-steps"])
def test_new_texts_repeating_old_ones_map_to_the_old_nodes(tmp_path, layout):
    """New rows repeat old texts (one with other whitespace), new texts repeat each other:
    the old texts keep their nodes, the others are numbered after the old nodes in
    first-seen order."""
    header, old = "caption_id\timage_id\tcaption", coco_lines(range(1, 201))
    again = [f"9{line}" for line in old[10:13]]  # new ids, old texts
    spaced = "90001\t1\t  " + "  ".join(old[50].split("\t")[2].split()) + " "
    new = coco_lines(range(201, 241))
    rows = [new[0], again[0], spaced, *new[1:20], again[1], f"90002\t1\t{new[3].split(chr(9))[2]}",
            *new[20:], again[2]]
    run, fig = both_ways(tmp_path, CAPTIONS, {"a.tsv": tsv(header, old)},
                         {"b.tsv": tsv(header, rows)}, layout=layout)
    nodes = pl.read_parquet(run.nodes)
    samples = pl.read_parquet(run.samples).tail(len(rows))
    text_of = dict(zip(nodes["node"], nodes["text"]))
    n_old = len({" ".join(line.split("\t")[2].split()) for line in old})
    by_id = dict(zip(samples["sample_id"], samples["node"]))
    for line in (*again, spaced):
        sample_id, _, text = line.split("\t")
        assert by_id[sample_id] < n_old and text_of[by_id[sample_id]] == " ".join(text.split())
    assert by_id["90002"] == by_id[new[3].split("\t")[0]] >= n_old
    new_nodes = samples.filter(pl.col("node") >= n_old)["node"].unique(maintain_order=True)
    assert new_nodes.to_list() == list(range(n_old, fig["nodes"]))  # first-seen order
    assert fig["nodes"] == n_old + len({line.split("\t")[2] for line in new})


def test_the_old_source_files_are_not_read(tmp_path):
    """The old file's bytes are replaced by zeros at the same size and mtime, so its record
    is trusted: the extended append never reads it and gives the tables of a from-scratch
    build over the real files; the whole-source append reads it and stops at its bytes."""
    header = "caption_id\timage_id\tcaption"
    old, new = coco_lines(range(1, 201)), coco_lines(range(201, 241))
    write(tmp_path / "ref" / "m.yaml", CAPTIONS)
    write(tmp_path / "ref" / "src" / "a.tsv", tsv(header, old))
    write(tmp_path / "ref" / "src" / "b.tsv", tsv(header, new))
    want, _ = from_scratch(tmp_path / "ref")
    runs = {way: old_run(tmp_path / way, CAPTIONS, {"a.tsv": tsv(header, old)})
            for way in ("extended", "whole")}
    for run in runs.values():
        src = run.root.parent / "src" / "a.tsv"
        st = src.stat()
        src.write_bytes(bytes(st.st_size))
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    append_to(runs["extended"], {"b.tsv": tsv(header, new)})
    assert table_bytes(runs["extended"].root) == table_bytes(want)
    with pytest.raises(GraphbuildError, match="a.tsv"):
        append_to(runs["whole"], {"b.tsv": tsv(header, new)}, whole_source=True)


def test_refusals_name_the_new_row_as_the_whole_source_build_does(tmp_path):
    header, old = "caption_id\timage_id\tcaption", coco_lines(range(1, 101))
    new = coco_lines(range(101, 111))
    cases = {
        "old id": [new[0], old[5].replace(old[5].split("\t")[2], "a new text"), new[1],
                   new[0].replace(new[0].split("\t")[2], "another new text")],
        "new id": [new[0], new[1], new[0]],
        "empty text": [new[0], new[1].split("\t")[0] + "\t1\t   ", old[3]],
        "missing field": [new[0], new[1].split("\t")[0] + "\t1"],
    }
    for case, rows in cases.items():
        lines = {}
        for way in ("extended", "whole"):
            run = old_run(tmp_path / case / way, CAPTIONS, {"a.tsv": tsv(header, old)})
            with pytest.raises(GraphbuildError) as e:
                append_to(run, {"b.tsv": tsv(header, rows)}, whole_source=way == "whole")
            lines[way] = str(e.value).replace(str(run.root.parent), "<folder>")
            assert not (run.root / ".append-tables").exists()
            assert run.read_run()["dataset"]["figures"]["samples"] == 100
        assert lines["extended"] == lines["whole"], case
        assert "<folder>/src/b.tsv: line" in lines["extended"] and "\n" not in lines["extended"]
    assert "line 3: duplicate sample id" in lines_of(tmp_path, header, old, cases["old id"])


def lines_of(tmp_path: Path, header: str, old: list[str], rows: list[str]) -> str:
    run = old_run(tmp_path / "again", CAPTIONS, {"a.tsv": tsv(header, old)})
    with pytest.raises(GraphbuildError) as e:
        append_to(run, {"b.tsv": tsv(header, rows)})
    return str(e.value)


def test_skipped_new_rows_give_the_from_scratch_tables(tmp_path):
    """Under --skip-bad-rows: new rows repeating an old id (their texts are new: no node for
    them), an empty text, a missing field, a repeated new id are dropped as from scratch."""
    header, old = "caption_id\timage_id\tcaption", coco_lines(range(1, 101))
    new = coco_lines(range(101, 131))
    rows = [new[0], old[5].replace(old[5].split("\t")[2], "a text only a dropped row has"),
            *new[1:10], new[10].split("\t")[0] + "\t1\t ", *new[11:20], "12345678\t1", new[2],
            *new[20:]]
    _, fig = both_ways(tmp_path, CAPTIONS, {"a.tsv": tsv(header, old)},
                       {"b.tsv": tsv(header, rows)}, skip=True, layout=TINY)
    assert (fig["skipped_duplicate_ids"], fig["skipped_empty"], fig["skipped_missing"]) == (2, 1, 1)


def test_row_number_ids_continue_after_the_old_rows_skipped_ones_counted(tmp_path):
    """Without an id column the ids are row numbers over all files, bad rows included: the
    new rows' ids start after every old row, kept or skipped."""
    old = ["caption", "A dog.", "   ", "A cat.", "", "A dog.", "A bird."]
    new = ["caption", "A cat.", "A fish.", "  ", "A fish."]
    both_ways(tmp_path, ROW_NUMBERS, {"a.tsv": "\n".join(old) + "\n"},
              {"b.tsv": "\n".join(new) + "\n"}, skip=True)
    run = RunDir(tmp_path / "extended" / "run")
    samples = pl.read_parquet(run.samples)
    assert samples["sample_id"].to_list() == [0, 2, 4, 5, 6, 7, 9]
    assert samples["node"].to_list() == [0, 1, 0, 2, 1, 3, 3]


def test_label_runs_extend_with_their_class_nodes(tmp_path):
    """A labelled source: the class nodes stay, new samples map to classes by index, key or
    name; duplicates count the classes no sample had before."""
    manifest = ("name: t\nsource: {path: src/*.tsv}\nid_column: id\nlabel_column: label\n"
                "classes: [cat, {name: dog, key: n02084071}, bird, fish]\n")
    old = "id\tlabel\na\tcat\nb\t1\nc\tcat\n"
    new = "id\tlabel\nd\tn02084071\ne\tbird\nf\tzebra\ng\t3\nb\tfish\n"
    _, fig = both_ways(tmp_path, manifest, {"a.tsv": old}, {"b.tsv": new}, skip=True)
    assert (fig["samples"], fig["nodes"], fig["duplicates"]) == (6, 4, 2)


def test_what_the_tables_cannot_tell_falls_back_to_every_file_with_a_log_line(tmp_path, caplog):
    """A run that skipped a row lacking its field, appended to without --skip-bad-rows: the
    from-scratch build names that old row, so the whole-source build runs and does. New
    string ids after integer ones: the from-scratch build reads the old ids as strings, so
    its old rows differ from the run's and the append is refused."""
    header = "caption_id\timage_id\tcaption"
    old = coco_lines(range(1, 21))
    run = old_run(tmp_path / "missing", CAPTIONS, {"a.tsv": tsv(header, [*old, "77\t1"])},
                  skip=True)
    with caplog.at_level(logging.INFO, "graphbuild"), pytest.raises(GraphbuildError) as e:
        append_to(run, {"b.tsv": tsv(header, coco_lines(range(21, 25)))})
    assert "a.tsv: line 22: missing field 'caption'" in str(e.value)
    assert "it skipped 1 bad rows and this append does not give --skip-bad-rows" in caplog.text

    caplog.clear()  # JSON lines keep integer ids integers (CSV and TSV ids are strings)
    manifest = "name: t\nsource: {path: src/*.jsonl}\nid_column: id\ntext_column: caption\n"
    run = old_run(tmp_path / "strings", manifest, {"a.jsonl": '{"id": 1, "caption": "A cat."}\n'})
    with caplog.at_level(logging.INFO, "graphbuild"), pytest.raises(GraphbuildError) as e:
        append_to(run, {"b.jsonl": '{"id": "x1", "caption": "A dog."}\n'})
    assert "make the sample ids String, the run's are Int64" in caplog.text
    assert "do not start with this run's rows" in str(e.value)
