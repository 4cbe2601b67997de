"""Issue #19, the source-reading cases: each ends in the right tables or in one error line that
names the file, the line, row or column, raised in prepare (before the model loads) with
nothing written. The CLI cases run `graphbuild embed`, which fails before any embedding."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from graphbuild.errors import GraphbuildError
from graphbuild.prepare import sources
from graphbuild.prepare.manifest import load_manifest
from graphbuild.prepare.texts import Layout, build_tables
from tests.conftest import COCO, graphbuild, one_error, write


def manifest(tmp: Path, src: str, fmt: str | None = None, text: str = "caption",
             ident: str | None = "id", extra: str = "") -> Path:
    source = f"{{path: {src}" + (f", format: {fmt}" if fmt else "") + "}"
    return write(tmp / "m.yaml", f"name: t\nsource: {source}\n"
                 + (f"id_column: {ident}\n" if ident else "") + f"text_column: {text}\n" + extra)


def embed_error(tmp: Path, m: Path, *more: str) -> str:
    """The error line of `graphbuild embed`, after checking the run holds nothing."""
    out = tmp / "out"
    line = one_error(graphbuild("embed", m, "--out", out, "-q", *more))
    assert not out.exists() or [p.name for p in out.iterdir()] == [".lock"]
    return line


def tables(m: Path, out: Path, skip: bool = False, layout: Layout | None = None):
    fig = build_tables(load_manifest(m), out, skip, layout)
    return pl.read_parquet(out / "nodes.parquet"), pl.read_parquet(out / "samples.parquet"), fig


def coco_rows(n: int = 3000) -> list[tuple[str, str]]:
    """(caption_id, caption) of the first n COCO captions."""
    lines = COCO.read_text(encoding="utf-8").splitlines()[1: n + 1]
    return [(c[0], c[2]) for c in (line.split("\t") for line in lines)]


# --- 1. column types -----------------------------------------------------------------------

def test_parquet_list_of_strings_text_column_is_one_line(tmp_path):
    pl.DataFrame({"id": [1, 2], "caption": [["a dog", "a cat"], ["a cow"]]}).write_parquet(
        tmp_path / "c.parquet")
    line = embed_error(tmp_path, manifest(tmp_path, "c.parquet"))
    assert re.fullmatch(r"error: \S+/c\.parquet: column 'caption' has type List\(String\), not "
                        r"string; one text per row: explode the lists into rows first", line)


TEXTS = ["a dog", "a cat", "a dog"]
REFUSED = {  # (column, values, dtype) -> what the error says
    "struct text": ("caption", [{"t": x} for x in TEXTS], None, r"Struct.*not string"),
    "binary text": ("caption", [x.encode() for x in TEXTS], None,
                    r"Binary, not string; write the texts as UTF-8"),
    "integer text": ("caption", [1, 2, 1], None, r"Int64, not string; numbers are not texts"),
    "float text": ("caption", [1.5, 2.0, 1.5], None, r"Float64, not string; numbers"),
    "boolean text": ("caption", [True, False, True], None, r"Boolean, not string"),
    "float id": ("id", [1.0, 2.0, 3.0], None, r"Float64; sample ids are strings or integers"),
    "list id": ("id", [[1], [2], [3]], None, r"List\(Int64\); sample ids are"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_parquet_column_types_refused(tmp_path, case):
    column, values, dtype, message = REFUSED[case]
    df = pl.DataFrame({"id": [1, 2, 3], "caption": TEXTS}).with_columns(
        pl.Series(column, values, dtype=dtype))
    df.write_parquet(tmp_path / "c.parquet")
    with pytest.raises(GraphbuildError, match=rf"c\.parquet: column '{column}' has type {message}"):
        tables(manifest(tmp_path, "c.parquet"), tmp_path / "run")
    assert not (tmp_path / "run" / "nodes.parquet").exists()


def test_parquet_types_that_are_fine(tmp_path):
    """Integer ids, categorical (dictionary) texts, large strings: the same tables as plain
    strings, ids as written."""
    pl.DataFrame({"id": [7, 3, 9], "caption": TEXTS}).write_parquet(tmp_path / "plain.parquet")
    ref_nodes, ref_samples, _ = tables(manifest(tmp_path, "plain.parquet"), tmp_path / "ref")
    assert ref_samples["sample_id"].to_list() == [7, 3, 9]
    assert ref_samples.schema["sample_id"] == pl.Int64
    cat = pa.table({"id": pa.array([7, 3, 9], pa.int32()),
                    "caption": pa.array(TEXTS).dictionary_encode()})
    big = pa.table({"id": pa.array([7, 3, 9]), "caption": pa.array(TEXTS, pa.large_string())})
    for name, table in (("cat", cat), ("big", big)):
        pq.write_table(table, tmp_path / f"{name}.parquet")
        nodes, samples, _ = tables(manifest(tmp_path, f"{name}.parquet"), tmp_path / name)
        assert nodes.equals(ref_nodes), name
        assert samples["node"].to_list() == ref_samples["node"].to_list()
        assert samples["sample_id"].to_list() == [7, 3, 9]


def test_integer_labels_are_fine_float_labels_refused(tmp_path):
    classes = "classes: [tench, goldfish]\n"
    m = write(tmp_path / "m.yaml", "name: t\nsource: {path: l.parquet}\nid_column: id\n"
                                   "label_column: label\n" + classes)
    pl.DataFrame({"id": ["a", "b", "c"], "label": [1, 0, 1]}).write_parquet(tmp_path / "l.parquet")
    _, samples, _ = tables(m, tmp_path / "run")
    assert samples["node"].to_list() == [1, 0, 1]
    pl.DataFrame({"id": ["a", "b"], "label": [1.0, 0.0]}).write_parquet(tmp_path / "l.parquet")
    with pytest.raises(GraphbuildError, match=r"l\.parquet: column 'label' has type Float64; "
                                              r"labels are class indices"):
        tables(m, tmp_path / "run2")


def test_jsonl_list_column_and_non_string_values(tmp_path):
    write(tmp_path / "c.jsonl", '{"id": 1, "caption": ["a dog"]}\n{"id": 2, "caption": ["x"]}\n')
    with pytest.raises(GraphbuildError, match=r"c\.jsonl: column 'caption' has type "
                                              r"List\(String\), not string"):
        tables(manifest(tmp_path, "c.jsonl"), tmp_path / "run")
    # a number, a list or an object among strings: polars would read them as their JSON text
    for value, kind in (("17", "int"), ('["a", "b"]', "list"), ('{"t": "a"}', "dict"),
                        ("true", "bool")):
        write(tmp_path / "c.jsonl", '{"id": 1, "caption": "3 dogs"}\n\n{"id": 2, "caption": '
              f'{value}}}\n{{"id": 3, "caption": "a cat"}}\n')
        for block in (8, 1 << 20):
            with pytest.raises(GraphbuildError, match=rf"c\.jsonl: line 3: field 'caption' is "
                                                      rf"a JSON {kind}, not a string"):
                tables(manifest(tmp_path, "c.jsonl"), tmp_path / "run",
                       layout=Layout(block_bytes=block))


# --- 2. compressed text sources ------------------------------------------------------------

def repeated_coco(copies: int) -> bytes:
    """The COCO fixture `copies` times, each copy's ids and captions suffixed with its number."""
    body = "".join(f"{i}-{r}\t{r}\t{t} {r}\n" for r in range(copies) for i, t in coco_rows())
    return ("caption_id\timage_id\tcaption\n" + body).encode()


def zstd(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as w:
        w.write(data)
    return sink.getvalue().to_pybytes()


def in_two(pack, data: bytes) -> bytes:
    """Two concatenated members (frames, streams), split inside a row, as pigz or a parallel
    compressor may write."""
    cut = len(data) // 3 + 5
    return pack(data[:cut]) + pack(data[cut:])


PACKERS = {".gz": lambda d: in_two(gzip.compress, d), ".bz2": bz2.compress,
           ".xz": lambda d: lzma.compress(d, preset=1), ".zst": lambda d: in_two(zstd, d)}


def test_compressed_tsv_gives_the_plain_files_tables(tmp_path):
    raw = repeated_coco(20)
    (tmp_path / "plain.tsv").write_bytes(raw)
    ref = tmp_path / "ref"
    tables(manifest(tmp_path, "plain.tsv", ident="caption_id"), ref)
    for suffix, pack in PACKERS.items():
        packed = tmp_path / f"coco.tsv{suffix}"
        packed.write_bytes(pack(raw))
        if suffix == ".gz":  # the case as reported: above 1 MiB, under format: tsv
            assert packed.stat().st_size > 1 << 20
            m = manifest(tmp_path, packed.name, fmt="tsv", ident="caption_id")
        else:  # the format from the suffix before the compression's
            m = manifest(tmp_path, packed.name, ident="caption_id")
        ds = load_manifest(m)
        assert ds.source_format(packed) == "tsv"
        out = tmp_path / suffix[1:]
        _, _, fig = tables(m, out)
        assert fig.samples == 60_000
        for table in ("nodes.parquet", "samples.parquet"):
            assert (out / table).read_bytes() == (ref / table).read_bytes(), (suffix, table)
        estimate = sources.data_bytes(ds, packed)
        assert abs(estimate - len(raw)) <= 0.25 * len(raw), (suffix, estimate, len(raw))


def test_compressed_blocks_stay_bounded(tmp_path):
    raw = repeated_coco(5)
    (tmp_path / "c.tsv.gz").write_bytes(gzip.compress(raw))
    longest = max(len(line) for line in raw.splitlines(keepends=True))
    blocks = list(sources._blocks(tmp_path / "c.tsv.gz", 1 << 18, None))
    assert b"".join(blocks) == raw and len(blocks) >= 4
    assert max(len(b) for b in blocks) <= (1 << 18) + longest


def test_truncated_gzip_is_one_line(tmp_path):
    packed = gzip.compress(repeated_coco(10))
    (tmp_path / "c.tsv.gz").write_bytes(packed[: len(packed) - 1000])
    line = embed_error(tmp_path, manifest(tmp_path, "c.tsv.gz", ident="caption_id"))
    assert re.fullmatch(r"error: \S+/c\.tsv\.gz: cannot read as tsv: Compressed file ended "
                        r"before the end-of-stream marker was reached", line)


def test_compressed_parquet_is_refused_by_name(tmp_path):
    pl.DataFrame({"id": [1], "caption": ["a"]}).write_parquet(tmp_path / "c.parquet")
    (tmp_path / "c.parquet.gz").write_bytes(gzip.compress((tmp_path / "c.parquet").read_bytes()))
    with pytest.raises(GraphbuildError, match=r"c\.parquet\.gz: a compressed Parquet file; "
                                              r"unpack it first"):
        tables(manifest(tmp_path, "c.parquet.gz"), tmp_path / "run")


# --- 3. a text format over a file that is not text -----------------------------------------

def test_parquet_under_format_tsv_is_one_line(tmp_path):
    pl.DataFrame({"id": [1, 2], "caption": ["a dog", "a cat"]}).write_parquet(tmp_path / "x.parquet")
    write(tmp_path / "c.tsv", "id\tcaption\n1\ta dog\n")
    line = embed_error(tmp_path, manifest(tmp_path, "c.tsv", fmt="tsv"),
                       "--source", tmp_path / "x.parquet")
    assert re.fullmatch(r"error: \S+/x\.parquet: looks like a Parquet file, not tsv text "
                        r"\(a Parquet source needs format: parquet\)", line)


TSV_TEXT = "id\tcaption\n1\ta dog\n2\ta cat\n"
NOT_TEXT = {  # name: (bytes, what the error says)
    "gzip": (gzip.compress(TSV_TEXT.encode()),
             r"looks like gzip-compressed data, not tsv text \(name it c\.tsv\.gz to have it unpacked\)"),
    "bzip2": (bz2.compress(TSV_TEXT.encode()), r"looks like bzip2-compressed data"),
    "xz": (lzma.compress(TSV_TEXT.encode()), r"looks like xz-compressed data"),
    "zstd": (zstd(TSV_TEXT.encode()), r"looks like zstd-compressed data"),
    "zip": (b"PK\x03\x04\x14\x00" + bytes(40), r"looks like a zip archive"),
    "utf-16": (TSV_TEXT.encode("utf-16"), r"looks like UTF-16 text"),
    "binary": (b"id\tcaption\n1\ta\x00b\n",
               r"looks like binary data, not tsv text \(a NUL byte on line 2\)"),
    "latin-1": ("id\tcaption\n1\ta dog\n2\tcafé\n".encode("latin-1"),
                r"line 3: not UTF-8 text \(byte 0xe9\)"),
    "latin-1 past the head": (
        ("id\tcaption\n" + "".join(f"{i}\tcaption {i}\n" for i in range(8000)) + "x\tcafé\n"
         ).encode("latin-1"), r"line 8002: not UTF-8 text \(byte 0xe9\)"),
}


@pytest.mark.parametrize("case", NOT_TEXT)
def test_not_text_is_named(tmp_path, case):
    data, message = NOT_TEXT[case]
    assert case != "latin-1 past the head" or data.index(b"\xe9") > sources.HEAD_BYTES
    (tmp_path / "c.tsv").write_bytes(data)
    with pytest.raises(GraphbuildError, match=rf"c\.tsv: {message}"):
        tables(manifest(tmp_path, "c.tsv"), tmp_path / "run")


# --- 4. the line of a bad row --------------------------------------------------------------

def physical(rows: list[str], first_line: int) -> list[int]:
    """The line each of the rows (written one after another) starts on."""
    lines, at = [], first_line
    for row in rows:
        lines.append(at)
        at += row.count("\n")
    return lines


def tricky_file(fmt: str, header: bool, bad: str) -> tuple[str, int]:
    """COCO captions in `fmt` with rows spanning lines (CSV), blank lines (JSON lines) and
    CRLF endings before one bad row; the file's text and the line the bad row starts on."""
    rows, bad_at = [], 150
    for k, (i, t) in enumerate(coco_rows(200)):
        if k == bad_at:
            rows.append({"tsv": f"{i}\t\n", "csv": f'{i},""\n', "jsonl": f'{{"id": "{i}", '
                         '"caption": " "}\n'}[fmt] if bad == "empty" else
                        {"tsv": f"{i}\n", "csv": f"{i}\n", "jsonl": f'{{"id": "{i}"}}\n'}[fmt])
        elif fmt == "csv":
            t = t.replace('"', '""')
            rows.append(f'{i},"{t}\nsaid ""twice"",\n{t}"\n' if k % 7 == 0 else f'{i},"{t}"\r\n')
        elif fmt == "tsv":
            rows.append(f"{i}\t{t}\r\n" if k % 3 else f"{i}\t{t}\n")
        else:
            rows.append(json.dumps({"id": i, "caption": t}) + "\n" + ("\n  \n" if k % 5 == 0 else ""))
    head = {"tsv": "id\tcaption\n", "csv": "id,caption\n", "jsonl": ""}[fmt] if header else ""
    return head + "".join(rows), physical(rows, 1 + head.count("\n"))[bad_at]


CASES = [(f, h, b) for f in ("tsv", "csv", "jsonl") for h in (True, False) for b in
         ("empty", "missing") if f != "jsonl" or h]


@pytest.mark.parametrize("fmt,header,bad", CASES)
def test_bad_row_names_its_physical_line(tmp_path, fmt, header, bad):
    text, line = tricky_file(fmt, header, bad)
    write(tmp_path / f"c.{fmt}", text)
    columns = "" if header else ", has_header: false, columns: [id, caption]"
    m = write(tmp_path / "m.yaml", f"name: t\nsource: {{path: c.{fmt}{columns}}}\n"
                                   "id_column: id\ntext_column: caption\n")
    what = "empty text in column 'caption'" if bad == "empty" else "missing field 'caption'"
    for block in (1, 97, 4096, 1 << 20):
        with pytest.raises(GraphbuildError) as e:
            tables(m, tmp_path / "run", layout=Layout(block_bytes=block))
        assert str(e.value) == (f"{tmp_path / f'c.{fmt}'}: line {line}: {what} (1 such rows; "
                                "--skip-bad-rows drops them)"), block
    _, samples, fig = tables(m, tmp_path / "run", skip=True, layout=Layout(block_bytes=97))
    assert samples.height == 199
    assert (fig.skipped_empty, fig.skipped_missing) == ((1, 0) if bad == "empty" else (0, 1))


@pytest.mark.parametrize("name,text,line", [
    ("c.jsonl", '{"id": 1, "caption": "a dog"}\n\n{"id": 2, "caption": ""}\n', 3),
    ("c.csv", 'id,caption\n1,"a dog\non two lines"\n2,\n', 4),
])
def test_line_after_a_blank_jsonl_line_or_a_csv_newline(tmp_path, name, text, line):
    write(tmp_path / name, text)
    error = embed_error(tmp_path, manifest(tmp_path, name))
    assert error.endswith(f"/{name}: line {line}: empty text in column 'caption' (1 such rows; "
                          "--skip-bad-rows drops them)")


def test_a_lone_carriage_return_is_data(tmp_path):
    """polars reads a CR not before a LF as part of the field; so does the line count."""
    write(tmp_path / "c.tsv", "id\tcaption\n1\ta\rdog\n2\t\n")
    with pytest.raises(GraphbuildError, match=r"c\.tsv: line 3: empty text in column 'caption'"):
        tables(manifest(tmp_path, "c.tsv"), tmp_path / "run")


def test_rows_read_otherwise_by_python_name_no_line(tmp_path, monkeypatch):
    """Where Python's csv module cannot read a block as polars did, the error names the data
    row, not a line that might be wrong, and every null counts as a missing field."""
    monkeypatch.setattr(sources, "_csv_rows", lambda *args: None)
    write(tmp_path / "c.tsv", "id\tcaption\n1\ta dog\n2\t\n")
    with pytest.raises(GraphbuildError, match=r"c\.tsv: data row 2: missing field 'caption'"):
        tables(manifest(tmp_path, "c.tsv"), tmp_path / "run")


def test_leading_blank_lines_before_a_header(tmp_path):
    """polars skips blank lines before a header: every block must, too."""
    rows = coco_rows(300)
    write(tmp_path / "c.tsv", "\n\r\nid\tcaption\n" + "".join(f"{i}\t{t}\n" for i, t in rows))
    ref = pl.read_csv(tmp_path / "c.tsv", separator="\t", quote_char=None, infer_schema=False)
    assert ref.height == 300
    for block in (1, 97, 1 << 20):
        _, samples, _ = tables(manifest(tmp_path, "c.tsv"), tmp_path / "run",
                               layout=Layout(block_bytes=block))
        assert samples["sample_id"].to_list() == ref["id"].to_list()


# --- 5. a missing field is not an empty text -----------------------------------------------

MISSING = {  # name: (file name, bytes or a frame, the line or row named)
    "tsv too few fields": ("c.tsv", b"id\tcaption\n1\ta dog\n2\n3\ta cat\n", "line 3"),
    "tsv blank line": ("c.tsv", b"id\tcaption\n1\ta dog\n\n3\ta cat\n", "line 3"),
    "csv too few fields": ("c.csv", b'id,caption\n1,"a\ndog"\n2\n', "line 4"),
    "jsonl key absent": ("c.jsonl", b'{"id": 1, "caption": "a dog"}\n\n{"id": 2}\n', "line 3"),
    "jsonl null": ("c.jsonl", b'{"id": 1, "caption": "a dog"}\n{"id": 2, "caption": null}\n',
                   "line 2"),
    "parquet null": ("c.parquet", pl.DataFrame({"id": [1, 2, 3], "caption": ["a", None, "b"]}),
                     "row 1"),
}


@pytest.mark.parametrize("case", ["tsv too few fields", "jsonl key absent", "parquet null"])
def test_missing_field_through_the_cli(tmp_path, case):
    name, content, place = MISSING[case]
    if isinstance(content, pl.DataFrame):
        content.write_parquet(tmp_path / name)
    else:
        (tmp_path / name).write_bytes(content)
    error = embed_error(tmp_path, manifest(tmp_path, name))
    assert error.endswith(f"/{name}: {place}: missing field 'caption' (1 such rows; "
                          "--skip-bad-rows drops them)")


@pytest.mark.parametrize("case", MISSING)
def test_missing_and_empty_are_told_apart_and_counted(tmp_path, case):
    name, content, place = MISSING[case]
    if isinstance(content, pl.DataFrame):  # an empty text too, after the missing one
        content = content.vstack(pl.DataFrame({"id": [4], "caption": ["  "]}))
        content.write_parquet(tmp_path / name)
    else:
        empty = {"c.tsv": b"4\t \n", "c.csv": b'4,""\n', "c.jsonl": b'{"id": 4, "caption": ""}\n'}
        (tmp_path / name).write_bytes(content + empty[name])
    m = manifest(tmp_path, name)
    with pytest.raises(GraphbuildError, match=rf"{name}: {place}: missing field 'caption' \(1 "):
        tables(m, tmp_path / "run")
    nodes, samples, fig = tables(m, tmp_path / "run", skip=True)
    assert (fig.skipped_missing, fig.skipped_empty, fig.samples) == (1, 1, samples.height)
    assert "" not in nodes["text"].to_list() and samples.height >= 1


def test_missing_label_is_not_an_unknown_label(tmp_path):
    write(tmp_path / "l.tsv", "id\tlabel\na\t0\nb\nc\twhale\nd\t1\n")
    m = write(tmp_path / "m.yaml", "name: t\nsource: {path: l.tsv}\nid_column: id\n"
                                   "label_column: label\nclasses: [tench, goldfish]\n")
    with pytest.raises(GraphbuildError, match=r"l\.tsv: line 3: missing field 'label' \(1 such"):
        tables(m, tmp_path / "run")
    _, samples, fig = tables(m, tmp_path / "run", skip=True)
    assert samples["sample_id"].to_list() == ["a", "d"]
    assert (fig.skipped_missing, fig.skipped_empty) == (1, 1)  # skipped_empty: unknown labels


def test_missing_and_empty_sample_ids(tmp_path):
    write(tmp_path / "c.tsv", "id\tcaption\n1\ta dog\n\ta cat\n3\ta cow\n")
    with pytest.raises(GraphbuildError, match=r"c\.tsv: line 3: missing sample id in column 'id'"):
        tables(manifest(tmp_path, "c.tsv"), tmp_path / "run")
    pl.DataFrame({"id": [1, None, 3], "caption": ["a", "b", "c"]}).write_parquet(
        tmp_path / "c.parquet")
    with pytest.raises(GraphbuildError, match=r"c\.parquet: row 1: missing sample id"):
        tables(manifest(tmp_path, "c.parquet"), tmp_path / "run")
    _, samples, fig = tables(manifest(tmp_path, "c.parquet"), tmp_path / "run", skip=True)
    assert samples["sample_id"].to_list() == [1, 3] and fig.skipped_missing == 1
