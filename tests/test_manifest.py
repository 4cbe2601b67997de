from pathlib import Path

import pytest

from graphbuild.errors import GraphbuildError
from graphbuild.prepare.manifest import load_manifest
from tests.conftest import REPO, write


def test_shipped_manifests_validate():
    for path in sorted((REPO / "data_manifests").glob("*.yaml")):
        ds = load_manifest(path)
        assert ds.name
    in1k = load_manifest(REPO / "data_manifests" / "imagenet1k.yaml")
    entries = in1k.class_entries()
    assert len(entries) == 1000 and entries[281].name == "tabby cat"
    assert entries[0].key == "n01440764"


def test_paths_resolve_relative_to_the_manifest(tmp_path):
    data = write(tmp_path / "data" / "a.tsv", "id\tcaption\n1\tx\n")
    m = write(tmp_path / "manifests" / "m.yaml",
              "name: t\nsource: {path: ../data/*.tsv}\nid_column: id\ntext_column: caption\n")
    ds = load_manifest(m)
    assert ds.source_files() == [data]
    assert ds.source_format(data) == "tsv"


def test_source_override_replaces_path(tmp_path):
    other = write(tmp_path / "elsewhere.tsv", "id\tcaption\n1\tx\n")
    m = write(tmp_path / "m.yaml", "name: t\nsource: {path: missing/*.tsv}\ntext_column: caption\n")
    assert load_manifest(m, source=str(other)).source_files() == [other]


@pytest.mark.parametrize("text, expected", [
    ("name: [unclosed\n", "not valid YAML"),
    ("- just\n- a list\n", "must be a YAML mapping"),
    ("name: t\ntext_column: c\nsource: {path: x}\ncolour: red\n", "colour: unknown key"),
    ("name: t\nsource: {path: x}\n", "missing text_column"),
    ("source: {path: x}\ntext_column: c\n", "name: Field required"),
    ("name: t\ntext_column: c\n", "text_column needs a source"),
    ("name: t\nclasses: [a]\ntemplates: ['no slot']\n", "exactly once"),
    ("name: t\nclasses: [a]\nsource: {path: x}\n", "needs label_column"),
    ("name: t\nsource: {path: x, format: xls}\ntext_column: c\n", "source.format"),
    ("name: !!python/object/apply:os.system ['echo pwned']\ntext_column: c\nsource: {path: x}\n",
     "not valid YAML"),
])
def test_bad_manifests_get_one_line_errors(tmp_path, text, expected):
    m = write(tmp_path / "bad.yaml", text)
    with pytest.raises(GraphbuildError) as e:
        load_manifest(m)
    msg = str(e.value)
    assert expected in msg and str(m) in msg and "\n" not in msg


def test_missing_manifest_and_empty_glob(tmp_path):
    with pytest.raises(GraphbuildError, match="cannot read manifest"):
        load_manifest(tmp_path / "nope.yaml")
    m = write(tmp_path / "m.yaml", "name: t\nsource: {path: none-*.tsv}\ntext_column: c\n")
    with pytest.raises(GraphbuildError, match="matches no file"):
        load_manifest(m).source_files()


def test_classes_file_reads_synset_mapping(tmp_path):
    write(tmp_path / "synsets.txt", "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius\n")
    m = write(tmp_path / "m.yaml", "name: t\nclasses_file: synsets.txt\n")
    entries = load_manifest(m).class_entries()
    assert [(e.key, e.name) for e in entries] == [("n01440764", "tench"), ("n01443537", "goldfish")]


def test_source_records_follow_content(tmp_path):
    src = write(tmp_path / "a.tsv", "id\tcaption\n1\tx\n")
    m = write(tmp_path / "m.yaml", "name: t\nsource: {path: a.tsv}\nid_column: id\ntext_column: caption\n")
    before = load_manifest(m).source_records()
    src.write_text("id\tcaption\n1\ty\n")
    after = load_manifest(Path(m)).source_records(before)
    assert [r["bytes"] for r in after] == [r["bytes"] for r in before]
    assert after[0]["sha256"] != before[0]["sha256"]
