"""Bad inputs through the real CLI: each gives one `error:` line naming the culprit, exit 2,
no new done marker, and leaves an earlier run's files as they were."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import (
    REPO,
    caption_manifest,
    coco_subset,
    graphbuild,
    one_error,
    write,
)

MANIFEST = "name: {name}\nsource: {{path: {src}}}\nid_column: id\ntext_column: caption\n"


def manifest(tmp: Path, src: str, extra: str = "", name: str = "bad") -> Path:
    return write(tmp / "m.yaml", MANIFEST.format(name=name, src=src) + extra)


def data(tmp: Path, name: str, content: str | bytes) -> str:
    p = tmp / name
    p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    return name


def embed(m: Path, out: Path, *more: str) -> list:
    return ["embed", m, "--out", out, "-q", *more]


# Each case: (tmp, base run copy) -> (argv, culprit the error line must name).
def not_yaml(tmp, run):
    return embed(write(tmp / "m.yaml", "name: [unclosed\n"), tmp / "o"), "m.yaml"


def unknown_key(tmp, run):
    return embed(manifest(tmp, "c.tsv", "colour: red\n"), tmp / "o"), "colour"


def missing_key(tmp, run):
    return embed(write(tmp / "m.yaml", "name: t\nsource: {path: c.tsv}\n"), tmp / "o"), \
        "text_column"


def python_tag(tmp, run):
    m = write(tmp / "m.yaml", "name: !!python/object/apply:os.system ['touch pwned']\n")
    return embed(m, tmp / "o"), "m.yaml"


def missing_manifest(tmp, run):
    return embed(tmp / "nowhere.yaml", tmp / "o"), "nowhere.yaml"


def glob_matches_nothing(tmp, run):
    return embed(manifest(tmp, "shards/*.tsv"), tmp / "o"), "shards/*.tsv"


def unknown_column(tmp, run):
    src = data(tmp, "c.tsv", "id\ttext\n1\ta dog\n")
    return embed(manifest(tmp, src), tmp / "o"), "'caption'"


def empty_caption(tmp, run):
    src = data(tmp, "c.tsv", "id\tcaption\n1\ta dog\n2\t  \n")
    return embed(manifest(tmp, src), tmp / "o"), "c.tsv: line 3"


def null_caption(tmp, run):
    src = data(tmp, "c.jsonl", '{"id": 1, "caption": "a dog"}\n{"id": 2, "caption": null}\n')
    return embed(manifest(tmp, src), tmp / "o"), "c.jsonl: line 2"


def duplicate_ids(tmp, run):
    src = data(tmp, "c.tsv", "id\tcaption\n1\ta dog\n2\ta cat\n1\ta cow\n")
    return embed(manifest(tmp, src), tmp / "o"), "c.tsv: line 4"


def non_utf8(tmp, run):
    src = data(tmp, "c.tsv", b"id\tcaption\n1\tcaf\xe9\n")
    return embed(manifest(tmp, src), tmp / "o"), "c.tsv"


def truncated_parquet(tmp, run):
    pl.DataFrame({"id": ["1", "2"], "caption": ["a", "b"]}).write_parquet(tmp / "c.parquet")
    raw = (tmp / "c.parquet").read_bytes()
    src = data(tmp, "c.parquet", raw[: len(raw) // 2])
    return embed(manifest(tmp, src), tmp / "o"), "c.parquet"


def truncated_csv(tmp, run):
    src = data(tmp, "c.csv", 'id,caption\n1,"a dog"\n2,"a cat that never\n')
    return embed(manifest(tmp, src), tmp / "o"), "c.csv"


def label_outside_classes(tmp, run):
    src = data(tmp, "l.tsv", "id\tlabel\n1\tcat\n2\tbird\n")
    m = write(tmp / "m.yaml", f"name: pets\nsource: {{path: {src}}}\nid_column: id\n"
              "label_column: label\nclasses: [cat, dog]\n")
    return embed(m, tmp / "o"), "bird"


def model_not_offline(tmp, run):
    src = data(tmp, "c.tsv", "id\tcaption\n1\ta dog\n")
    return embed(manifest(tmp, src), tmp / "o", "--model", "someone/not-cached-model"), \
        "someone/not-cached-model"


def k_zero(tmp, run):
    return ["knn", run, "--k", "0", "--overwrite"], "k"


def shard_out_of_range(tmp, run):
    return ["knn", run, "--shard", "3", "--num-shards", "2"], "shard"


def unfinished_embeddings(tmp, run):
    (run / "_state/embed/chunks/000001.done").unlink()
    shutil.rmtree(run / "graph")
    return ["knn", run, "--k", "8"], "chunk"


def embedded_by_another_model(tmp, run):
    _set_attrs(run, model="another/model")
    (run / "_state/embed/chunks/000000.done").unlink()  # leave work to do
    return embed(run.parent / "coco.yaml", run, "--chunk-rows", "128"), "model"


def embeddings_of_another_dim(tmp, run):
    _set_attrs(run, dim=128)
    (run / "_state/embed/chunks/000000.done").unlink()
    return embed(run.parent / "coco.yaml", run, "--chunk-rows", "128"), "dim"


def another_dataset(tmp, run):
    src = data(tmp, "c.tsv", "id\tcaption\n1\ta dog\n")
    return embed(manifest(tmp, src, name="other"), run), "other"


def corrupt_chunk(tmp, run):
    chunk = run / "embeddings.zarr/c/1/0"
    raw = bytearray(chunk.read_bytes())
    raw[100] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    shutil.rmtree(run / "graph")  # a graph not built yet: its shard is to do
    (run / "_state" / "knn" / "shard-00000-of-00001.done").unlink()
    return ["knn", run, "--k", "8"], "c/1/0"


def graph_of_other_settings(tmp, run):
    return ["knn", run, "--k", "5"], "--overwrite"


def _set_attrs(run: Path, **change) -> None:
    meta = run / "embeddings.zarr/zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"].update(change)
    meta.write_text(json.dumps(doc))


CASES = [not_yaml, unknown_key, missing_key, python_tag, missing_manifest, glob_matches_nothing,
         unknown_column, empty_caption, null_caption, duplicate_ids, non_utf8, truncated_parquet,
         truncated_csv, label_outside_classes, model_not_offline, k_zero, shard_out_of_range,
         unfinished_embeddings, embedded_by_another_model, embeddings_of_another_dim,
         another_dataset, corrupt_chunk, graph_of_other_settings]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished run (300 captions, 3 chunks) whose copies the cases start from."""
    tmp = tmp_path_factory.mktemp("base")
    m = caption_manifest(tmp, coco_subset(tmp, 300))
    run = tmp / "run"
    assert graphbuild("embed", m, "--out", run, "--chunk-rows", "128", "-q").returncode == 0
    assert graphbuild("knn", run, "--k", "8", "-q").returncode == 0
    return run


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".lock"}


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input(case, base, tmp_path):
    run = base.parent / f"copy-{case.__name__}"
    shutil.copytree(base, run)
    argv, culprit = case(tmp_path, run)
    before = snapshot(run)
    error = one_error(graphbuild(*argv, timeout=300))
    assert culprit in error, error
    assert snapshot(run) == before, "an earlier run's files changed"
    assert not list((tmp_path / "o").rglob("*.done")), "a failed run marked something done"
    assert not (tmp_path / "pwned").exists() and not (REPO / "pwned").exists()

