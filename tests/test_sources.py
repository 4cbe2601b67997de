"""Reading a source a block at a time gives exactly what polars gives reading it whole."""

from __future__ import annotations

import polars as pl
import pytest

from graphbuild.errors import GraphbuildError
from graphbuild.prepare import sources
from graphbuild.prepare.manifest import load_manifest
from tests.conftest import SHARED, write

TSV = "name: t\nsource: {path: c.tsv}\nid_column: id\ntext_column: caption\n"
CSV = "name: t\nsource: {path: c.csv}\nid_column: id\ntext_column: caption\n"
HEADERLESS = ("name: t\nsource: {path: c.tsv, has_header: false, columns: [caption, url]}\n"
              "text_column: caption\n")
JSONL = "name: t\nsource: {path: c.jsonl}\nid_column: id\ntext_column: text\n"
BLOCKS = (1, 2, 7, 64, 1 << 20)  # 1 byte: every row is cut at its end, or grows a block

CASES = {  # name: (manifest, file name, bytes)
    "blank lines": (TSV, "c.tsv", b"id\tcaption\n1\ta\n\n2\tb\n"),
    "crlf": (TSV, "c.tsv", b"id\tcaption\r\n1\ta\r\n2\tb\r\n"),
    "no final newline": (TSV, "c.tsv", b"id\tcaption\n1\ta\n2\tb"),
    "short rows": (TSV, "c.tsv", b"id\tcaption\n1\n2\tb\n3\n"),
    "quotes are text in tsv": (TSV, "c.tsv", b'id\tcaption\n1\tsay "hi\n2\tok "x\n'),
    "header only": (TSV, "c.tsv", b"id\tcaption\n"),
    "byte order mark": (TSV, "c.tsv", b"\xef\xbb\xbfid\tcaption\n1\ta\n2\tb\n"),
    "blank lines before the header": (TSV, "c.tsv", b"\n\r\nid\tcaption\n1\ta\n2\tb\n"),
    "lone carriage return": (TSV, "c.tsv", b"id\tcaption\n1\ta\rb\n2\n"),
    "headerless": (HEADERLESS, "c.tsv", b"a\tu1\nb\tu2\nc\n"),
    "csv quoted newlines": (CSV, "c.csv", (b'id,caption\n1,"a, b"\n2,"two\nlines ""q"" x"\n'
                                           b'3,c\n4,"x\n\ny"\n')),
    "jsonl types merge": (JSONL, "c.jsonl", (b'{"id": 1, "text": "a"}\n\n{"id": "x", "text": "b"}\n'
                                             b'{"id": 3}\n')),
    "jsonl column late": (JSONL, "c.jsonl", b'{"id": 1}\n{"id": 2}\n{"id": 3, "text": "c"}\n'),
}


def whole(ds, file, wanted: list[str]) -> pl.DataFrame:
    fmt = ds.source_format(file)
    if fmt == "jsonl":
        return pl.scan_ndjson(file, infer_schema_length=None).select(wanted).collect()
    return sources._scan_csv(ds, file, fmt).select(wanted).collect()


def blockwise(ds, file, wanted: list[str], block: int) -> pl.DataFrame:
    types = sources.column_types(ds, file, wanted, block)
    parts = list(sources.batches(ds, file, types, block))
    return pl.concat(parts) if parts else pl.DataFrame(schema=types)


@pytest.mark.parametrize("case", CASES)
def test_blocks_read_as_the_whole_file(tmp_path, case):
    manifest, name, data = CASES[case]
    (tmp_path / name).write_bytes(data)
    ds = load_manifest(write(tmp_path / "m.yaml", manifest))
    file = ds.source_files()[0]
    wanted = [ds.manifest.text_column] + ([ds.manifest.id_column] if ds.manifest.id_column else [])
    ref = whole(ds, file, wanted)
    for block in BLOCKS:
        assert blockwise(ds, file, wanted, block).equals(ref), (case, block)


@pytest.mark.parametrize("manifest,name,data,message", [
    (TSV, "c.tsv", b"id\tcaption\n1\tcaf\xe9\n", r"c\.tsv: line 2: not UTF-8 text \(byte 0xe9\)"),
    (TSV, "c.tsv", b"id\tcaption\n1\ta\n2\ta\tx\n",
     r"c\.tsv: line 3: cannot read as tsv: 3 fields, more than the 2 columns"),
    (TSV, "c.tsv", b"id\ttext\n1\ta\n", r"c\.tsv: no column 'caption' \(columns: id, text\)"),
    (JSONL, "c.jsonl", b'{"id": 1}\n', r"c\.jsonl: no column 'text' \(columns: id\)"),
    (JSONL, "c.jsonl", b'{"id": 1, "text": "a"}\n{"id": 2, "te\n', r"c\.jsonl: line 2: cannot read as jsonl"),
])
def test_unreadable_rows_are_one_line(tmp_path, manifest, name, data, message):
    (tmp_path / name).write_bytes(data)
    ds = load_manifest(write(tmp_path / "m.yaml", manifest))
    wanted = [ds.manifest.text_column, ds.manifest.id_column]
    for block in (3, 1 << 20):
        with pytest.raises(GraphbuildError, match=message):
            blockwise(ds, ds.source_files()[0], wanted, block)


def test_parquet_in_batches(tmp_path):
    df = pl.DataFrame({"id": list(range(1000)), "caption": [f"text {i % 37}" for i in range(1000)]})
    df.write_parquet(tmp_path / "c.parquet", row_group_size=64)
    ds = load_manifest(write(tmp_path / "m.yaml", TSV.replace("c.tsv", "c.parquet")))
    file = ds.source_files()[0]
    types = sources.column_types(ds, file, ["caption", "id"])
    assert types == {"caption": pl.String, "id": pl.Int64}
    assert pl.concat(sources.batches(ds, file, types, batch_rows=100)).equals(df.select("caption", "id"))


REAL = [  # manifests over the real caption files, with the columns an embed reads
    ("captions/coco_val2017_captions.tsv", "id_column: caption_id\ntext_column: caption", {}),
    ("captions/Flickr8k.token.txt", "id_column: img\ntext_column: caption",
     {"has_header": "false", "columns": "[img, caption]"}),
    ("captions/cc3m_Validation_GCC-1.1.0-Validation.tsv", "text_column: caption",
     {"has_header": "false", "columns": "[caption, url]"}),
    ("captions/img2dataset_laion_style_10000.tsv", "id_column: row\ntext_column: text", {}),
    ("sts/stsb_sts-test.csv", "text_column: column_6", {"format": "tsv", "has_header": "false"}),
]


@pytest.mark.parametrize("path,columns,options", REAL, ids=[r[0].split("/")[1] for r in REAL])
def test_real_files_read_as_whole(tmp_path, path, columns, options):
    if not (SHARED / path).exists():
        pytest.skip(f"no ../shared: {SHARED / path} is not present")
    extra = "".join(f", {k}: {v}" for k, v in options.items())
    ds = load_manifest(write(tmp_path / "m.yaml",
                             f"name: t\nsource: {{path: {SHARED / path}{extra}}}\n{columns}\n"))
    m = ds.manifest
    wanted = [m.text_column] + ([m.id_column] if m.id_column else [])
    file = ds.source_files()[0]
    ref = whole(ds, file, wanted)
    for block in (997, 1 << 16):
        assert blockwise(ds, file, wanted, block).equals(ref), block
