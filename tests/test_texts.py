import polars as pl
import pytest

from graphbuild.errors import GraphbuildError
from graphbuild.prepare.manifest import load_manifest
from graphbuild.prepare.texts import build_tables
from tests.conftest import COCO, write


def built(ds, out, skip=False, layout=None):
    """build_tables into `out`, and the two tables read back."""
    fig = build_tables(ds, out, skip, layout)
    return pl.read_parquet(out / "nodes.parquet"), pl.read_parquet(out / "samples.parquet"), fig


def tables(tmp_path, manifest_text, files=None, skip=False):
    for name, content in (files or {}).items():
        p = tmp_path / name
        p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    return built(load_manifest(write(tmp_path / "m.yaml", manifest_text)), tmp_path / "run", skip)


CAPTIONS = "name: t\nsource: {path: c.tsv}\nid_column: id\ntext_column: caption\n"


def test_dedup_normalises_whitespace_and_keeps_first_seen_order(tmp_path):
    nodes, samples, fig = tables(tmp_path, CAPTIONS, {
        "c.tsv": "id\tcaption\na\tA dog  runs.\nb\tA cat.\nc\t  A dog runs. \nd\tA cat.\n"})
    assert nodes["text"].to_list() == ["A dog runs.", "A cat."]
    assert samples["node"].to_list() == [0, 1, 0, 1]
    assert samples["sample_id"].to_list() == ["a", "b", "c", "d"]
    assert (fig.samples, fig.nodes, fig.duplicates) == (4, 2, 2)


def test_headerless_tsv_uses_row_numbers_across_files_in_name_order(tmp_path):
    m = ("name: t\nsource: {path: 'part-*.tsv', has_header: false, columns: [caption, url]}\n"
         "text_column: caption\n")
    _, samples, _ = tables(tmp_path, m, {"part-1.tsv": "c\tu3\n", "part-0.tsv": "a\tu1\nb\tu2\n"})
    assert samples["sample_id"].to_list() == [0, 1, 2]


def test_quotes_in_tsv_are_text(tmp_path):
    nodes, _, _ = tables(tmp_path, CAPTIONS, {"c.tsv": 'id\tcaption\n1\tsay "hi\n2\tok\n'})
    assert nodes["text"].to_list() == ['say "hi', "ok"]


def test_empty_text_names_file_and_line(tmp_path):
    with pytest.raises(GraphbuildError, match=r"c\.tsv: line 3: empty text in column 'caption'"):
        tables(tmp_path, CAPTIONS, {"c.tsv": "id\tcaption\n1\tok\n2\t   \n3\tfine\n"})


def test_duplicate_ids_fail_or_are_skipped(tmp_path):
    files = {"c.tsv": "id\tcaption\n1\tone\n2\ttwo\n1\tagain\n"}
    with pytest.raises(GraphbuildError, match=r"line 4: duplicate sample id in column 'id'"):
        tables(tmp_path, CAPTIONS, files)
    _nodes, samples, fig = tables(tmp_path, CAPTIONS, files, skip=True)
    assert samples.height == 2 and fig.skipped_duplicate_ids == 1


def test_skip_bad_rows_drops_empty_texts(tmp_path):
    _, samples, fig = tables(tmp_path, CAPTIONS, {"c.tsv": "id\tcaption\n1\tok\n2\t\n"}, skip=True)
    assert samples["sample_id"].to_list() == ["1"] and fig.skipped_empty == 1


def test_unknown_column_lists_the_columns(tmp_path):
    with pytest.raises(GraphbuildError, match=r"c\.tsv: no column 'caption' \(columns: id, text\)"):
        tables(tmp_path, CAPTIONS, {"c.tsv": "id\ttext\n1\tx\n"})


def test_non_utf8_names_the_file(tmp_path):
    with pytest.raises(GraphbuildError, match=r"c\.tsv: line 2: not UTF-8 text \(byte 0xe9\)"):
        tables(tmp_path, CAPTIONS, {"c.tsv": b"id\tcaption\n1\tcaf\xe9\n"})


def test_truncated_parquet_names_the_file(tmp_path):
    pl.DataFrame({"id": ["1", "2"], "caption": ["a", "b"]}).write_parquet(tmp_path / "c.parquet")
    data = (tmp_path / "c.parquet").read_bytes()
    (tmp_path / "c.parquet").write_bytes(data[: len(data) // 2])
    m = "name: t\nsource: {path: c.parquet}\nid_column: id\ntext_column: caption\n"
    with pytest.raises(GraphbuildError, match=r"c\.parquet: cannot read as parquet"):
        tables(tmp_path, m)


def test_jsonl_and_csv_sources(tmp_path):
    m = "name: t\nsource: {path: c.jsonl}\nid_column: id\ntext_column: text\n"
    nodes, _, _ = tables(tmp_path, m, {"c.jsonl": '{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}\n'})
    assert nodes["text"].to_list() == ["a", "b"]
    m = "name: t\nsource: {path: c.csv}\nid_column: id\ntext_column: text\n"
    nodes, _, _ = tables(tmp_path, m, {"c.csv": 'id,text\n1,"a, b"\n2,c\n'})
    assert nodes["text"].to_list() == ["a, b", "c"]


LABELS = ("name: t\nsource: {path: l.tsv}\nid_column: path\nlabel_column: label\n"
          "classes: [{key: n1, name: tench}, {key: n2, name: goldfish}, shark]\n")


def test_labels_map_by_index_key_or_name(tmp_path):
    nodes, samples, fig = tables(tmp_path, LABELS, {
        "l.tsv": "path\tlabel\na.jpg\t0\nb.jpg\tn2\nc.jpg\tshark\nd.jpg\tgoldfish\n"})
    assert nodes["text"].to_list() == ["tench", "goldfish", "shark"]
    assert samples["node"].to_list() == [0, 1, 2, 1]
    assert fig.nodes == 3


def test_label_outside_the_class_list(tmp_path):
    with pytest.raises(GraphbuildError, match=r"l\.tsv: line 3: label '\S+' in column 'label' is not in the class list"):
        tables(tmp_path, LABELS, {"l.tsv": "path\tlabel\na.jpg\t0\nb.jpg\twhale\n"})


def test_classes_without_source_are_their_own_samples(tmp_path):
    _nodes, samples, _ = tables(tmp_path, "name: t\nclasses: [{key: n1, name: a}, b]\n")
    assert samples["sample_id"].to_list() == ["n1", "1"]
    assert samples["node"].to_list() == [0, 1]


def test_real_coco_numbering_is_deterministic(tmp_path):
    m = write(tmp_path / "m.yaml", f"name: coco\nsource: {{path: {COCO}}}\n"
              "id_column: caption_id\ntext_column: caption\n")
    n1, s1, fig = built(load_manifest(m), tmp_path / "a")
    n2, s2, _ = built(load_manifest(m), tmp_path / "b")
    assert n1.equals(n2) and s1.equals(s2)
    for name in ("nodes.parquet", "samples.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert fig.samples == 3_000 and 0 < fig.duplicates < 100
    # every sample's node holds its (normalised) caption
    raw = pl.read_csv(COCO, separator="\t", quote_char=None, infer_schema=False)
    joined = s1.join(n1, on="node").sort("sample")
    norm = raw["caption"].str.replace_all(r"\s+", " ").str.strip_chars()
    assert joined["text"].to_list() == norm.to_list()
