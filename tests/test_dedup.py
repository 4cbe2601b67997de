"""The tables prepare writes through partitions on disk equal a plain in-memory computation
(dicts and lists), on real captions spread over several files, with repeated texts, empty
texts and repeated ids; and their bytes do not depend on the partition and window sizes."""

from __future__ import annotations

import random
import re

import polars as pl
import pytest

from graphbuild.errors import GraphbuildError
from graphbuild.prepare.manifest import load_manifest
from graphbuild.prepare.texts import TMP, Layout, build_tables
from tests.conftest import COCO, write

# Many tiny partitions, windows, blocks and batches, so every boundary is crossed often.
TINY = Layout(block_bytes=4096, batch_rows=97, partitions=13, window_rows=101, flush_rows=500)


def clean(text: str | None) -> str:
    return re.sub(r"\s+", " ", text or "").strip()


def reference(files: list[list[tuple[str, str]]], skip: bool):
    """nodes, samples and counts of (id, text) rows, file after file, in plain Python."""
    rows = [(f, line, i, clean(t)) for f, file in enumerate(files)
            for line, (i, t) in enumerate(file, start=2)]  # line 1 is the header
    empty = [r for r in rows if not r[3]]
    kept, seen, repeated = [], set(), []
    for r in rows:
        if r[3]:
            (repeated if r[2] in seen else kept).append(r)
            seen.add(r[2])
    for bad, what in ((empty, "empty text in column 'caption'"),
                      (repeated, "duplicate sample id in column 'id'")):
        if bad and not skip:
            f, line = bad[0][:2]
            return f"part-{f}.tsv: line {line}: {what} ({len(bad)} such rows; --skip-bad-rows drops them)"
    node_of: dict[str, int] = {}
    for r in kept:
        node_of.setdefault(r[3], len(node_of))
    samples = [(k, r[2], node_of[r[3]]) for k, r in enumerate(kept)]
    return list(node_of), samples, (len(kept), len(node_of), len(empty), len(repeated))


def caption_files() -> list[list[tuple[str, str]]]:
    """Three files of (id, caption) from the COCO fixture's two halves, the third built to break things:
    texts repeated from the others with other whitespace, empty texts, repeated ids (one of
    them the first row of a new text, one after an empty row with that id)."""
    coco = [line.split("\t") for line in COCO.read_text(encoding="utf-8").splitlines()[1:3001]]
    first = [(c[0], c[2]) for c in coco[:1500]]
    second = [(f"b{c[0]}", c[2]) for c in coco[1500:]]
    rnd = random.Random(7)
    third = []
    for k in range(1500):
        i, t = rnd.choice(first + second)
        kind = k % 10
        if kind < 5:  # a text seen before, respelled
            third.append((f"x{k}", "  " + t.replace(" ", " \u00a0  ", 1) + " "))
        elif kind == 5:
            third.append((f"x{k}", rnd.choice(["", "   ", "\u00a0"])))
        elif kind == 6:  # an id seen before
            third.append((i, t))
        elif kind == 7:  # a new text first on a repeated id, then on a fresh one
            third += [(i, f"new text {k}"), (f"x{k}", f"new text {k}")]
        elif kind == 8:  # an empty row, then a row reusing its id: not a repeat
            third += [(f"e{k}", " "), (f"e{k}", f"late text {k}")]
        else:
            third.append((f"x{k}", f"fresh text {k % 300}"))
    return [first, second, third]


def write_sources(tmp, files, fmt: str):
    for f, rows in enumerate(files):
        if fmt == "tsv":
            write(tmp / f"part-{f}.tsv", "id\tcaption\n" + "".join(f"{i}\t{t}\n" for i, t in rows))
        else:
            pl.DataFrame({"id": [i for i, _ in rows], "caption": [t for _, t in rows]}).write_parquet(
                tmp / f"part-{f}.parquet", row_group_size=500)
    return load_manifest(write(tmp / "m.yaml", f"name: t\nsource: {{path: 'part-*.{fmt}'}}\n"
                                               "id_column: id\ntext_column: caption\n"))


@pytest.mark.parametrize("fmt", ["tsv", "parquet"])
def test_partitioned_tables_equal_an_in_memory_reference(tmp_path, fmt):
    files = caption_files()
    ds = write_sources(tmp_path, files, fmt)
    nodes, samples, counts = reference(files, skip=True)
    for name, layout in (("tiny", TINY), ("default", None)):
        out = tmp_path / name
        fig = build_tables(ds, out, skip_bad_rows=True, layout=layout)
        assert (fig.samples, fig.nodes, fig.skipped_empty, fig.skipped_duplicate_ids) == counts
        assert fig.duplicates == fig.samples - fig.nodes > 500
        n = pl.read_parquet(out / "nodes.parquet")
        s = pl.read_parquet(out / "samples.parquet")
        assert n["node"].to_list() == list(range(len(nodes))) and n["text"].to_list() == nodes
        assert s.rows() == samples
        assert n.schema == {"node": pl.Int64, "text": pl.String}
        assert s.schema == {"sample": pl.Int64, "sample_id": pl.String, "node": pl.Int64}
        assert not (out / TMP).exists()
    for table in ("nodes.parquet", "samples.parquet"):
        assert (tmp_path / "tiny" / table).read_bytes() == (tmp_path / "default" / table).read_bytes()


def test_first_bad_row_is_named_as_in_memory(tmp_path):
    files = caption_files()
    ds = write_sources(tmp_path, files, "tsv")
    with pytest.raises(GraphbuildError) as e:
        build_tables(ds, tmp_path / "run", layout=TINY)
    assert str(e.value).endswith(reference(files, skip=False))
    no_empty = [[(i, t) for i, t in rows if clean(t)] for rows in files]
    ds = write_sources(tmp_path, no_empty, "tsv")
    with pytest.raises(GraphbuildError) as e:
        build_tables(ds, tmp_path / "run", layout=TINY)
    assert str(e.value).endswith(reference(no_empty, skip=False))
    assert "duplicate sample id" in str(e.value)
    assert not (tmp_path / "run" / "nodes.parquet").exists() and not (tmp_path / "run" / TMP).exists()


def test_labels_through_partitions_equal_an_in_memory_reference(tmp_path):
    classes = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead"]
    rnd = random.Random(3)
    rows = []
    for k in range(3000):
        c = rnd.randrange(len(classes))
        label = rnd.choice([str(c), classes[c], f"n{c:08d}", "whale"])
        rows.append((f"img{rnd.randrange(2600)}.jpg", label))
    write(tmp_path / "l.tsv", "path\tlabel\n" + "".join(f"{i}\t{x}\n" for i, x in rows))
    entries = "".join(f"  - {{key: n{c:08d}, name: {n}}}\n" for c, n in enumerate(classes))
    ds = load_manifest(write(tmp_path / "m.yaml", "name: t\nsource: {path: l.tsv}\nid_column: path\n"
                                                  f"label_column: label\nclasses:\n{entries}"))
    lookup = {**{str(c): c for c in range(5)}, **{f"n{c:08d}": c for c in range(5)},
              **{n: c for c, n in enumerate(classes)}}
    known = [(i, lookup[x]) for i, x in rows if x in lookup]
    seen, samples = set(), []
    for i, c in known:
        if i not in seen:
            samples.append((len(samples), i, c))
        seen.add(i)
    fig = build_tables(ds, tmp_path / "run", skip_bad_rows=True, layout=TINY)
    s = pl.read_parquet(tmp_path / "run" / "samples.parquet")
    assert s.rows() == samples
    assert (fig.samples, fig.skipped_empty, fig.skipped_duplicate_ids) == (
        len(samples), len(rows) - len(known), len(known) - len(samples))
    assert fig.duplicates == len(samples) - len({c for _, _, c in samples})
    assert pl.read_parquet(tmp_path / "run" / "nodes.parquet")["text"].to_list() == classes


def test_a_killed_runs_partitions_are_removed(tmp_path):
    write(tmp_path / "c.tsv", "id\tcaption\n1\ta dog\n2\ta cat\n3\ta dog\n")
    ds = load_manifest(write(tmp_path / "m.yaml", "name: t\nsource: {path: c.tsv}\nid_column: id\n"
                                                  "text_column: caption\n"))
    stale = write(tmp_path / "run" / TMP / "texts" / "00000.arrow", "left by a SIGKILL")
    fig = build_tables(ds, tmp_path / "run")
    assert not stale.exists() and (fig.nodes, fig.samples) == (2, 3)
