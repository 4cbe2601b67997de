"""Run directories for the X-CLR tests, built once per session, and the trainer's own readers
checked against zarr and the graph reader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import COCO


def coco_run(tmp_path_factory, rows: int = 3000, k: int = 16, chunk_rows: int = 1024) -> Path:
    """A run over the first `rows` COCO captions, embedded (bf16) and knn'd; built once per
    session and shared by every test module that asks for the same figures."""
    from graphbuild.embedding.stage import EmbedConfig, embed_shard
    from graphbuild.graph.stage import knn_shard
    from graphbuild.prepare.manifest import load_manifest

    base = tmp_path_factory.getbasetemp() / f"xclr-coco-{rows}-{k}-{chunk_rows}"
    out = base / "run"
    if (out / "graph" / "_meta.json").exists():
        return out
    base.mkdir(parents=True, exist_ok=True)
    lines = COCO.read_text(encoding="utf-8").splitlines()[: rows + 1]
    (base / "coco.tsv").write_text("\n".join(lines) + "\n")
    manifest = base / "coco.yaml"
    manifest.write_text(f"name: coco\nsource: {{path: {base / 'coco.tsv'}, format: tsv}}\n"
                        "id_column: caption_id\ntext_column: caption\n")
    embed_shard(load_manifest(manifest), out, 0, 1,
                EmbedConfig(precision="bf16", chunk_rows=chunk_rows))
    knn_shard(out, k=k, method="exact")
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return coco_run(tmp_path_factory)


@pytest.mark.parametrize("mmap", [False, True])
def test_zarr_rows_match_zarr(run, mmap):
    import zarr

    from graphbuild.xclr import ZarrRows

    want = np.asarray(zarr.open_array(str(run / "embeddings.zarr"), mode="r")[:])
    rows = ZarrRows(run / "embeddings.zarr", mmap=mmap)
    assert rows.shape == want.shape and rows.n_chunks > 1  # the last chunk is a padded one
    assert np.array_equal(rows.load(), want)
    pick = np.array([len(want) - 1, 0, 1500, 1024, 1023, 0])
    assert np.array_equal(rows.gather(pick), want[pick])


def test_zarr_rows_refuse_other_layouts(run, tmp_path):
    from graphbuild.errors import GraphbuildError
    from graphbuild.xclr import ZarrRows

    store = tmp_path / "embeddings.zarr"
    shutil.copytree(run / "embeddings.zarr", store)
    meta = json.loads((store / "zarr.json").read_text())
    bad = [("data_type", "float32", "float16"),
           ("codecs", [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "zstd", "configuration": {"level": 0, "checksum": False}}],
            "codecs"),
           ("chunk_key_encoding", {"name": "v2", "configuration": {"separator": "."}},
            "chunk key")]
    for key, value, words in bad:
        (store / "zarr.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(GraphbuildError, match=f"zarr.json: .*{words}"):
            ZarrRows(store)
    (store / "zarr.json").write_text(json.dumps(meta))
    chunk = store / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-10])
    with pytest.raises(GraphbuildError, match=r"c/1/0: .*bytes"):
        ZarrRows(store).load()


@pytest.mark.parametrize("mmap", [False, True])
def test_zarr_rows_check_each_chunks_crc_as_zarr_does(run, tmp_path, mmap):
    """A flipped bit in chunk 0's data or in chunk 2's stored crc: ZarrRows refuses exactly
    the chunks zarr's own reader refuses, with one line naming the chunk's file."""
    import zarr

    from graphbuild.errors import GraphbuildError
    from graphbuild.xclr import ZarrRows

    store = tmp_path / "embeddings.zarr"
    shutil.copytree(run / "embeddings.zarr", store)
    for chunk, at in [(0, 5000), (2, -2)]:
        path = store / "c" / str(chunk) / "0"
        data = bytearray(path.read_bytes())
        data[at] ^= 0x10
        path.write_bytes(bytes(data))
    arr = zarr.open_array(str(store), mode="r")
    rows = ZarrRows(store, mmap=mmap)
    refused = []
    for c in range(rows.n_chunks):
        lo = c * rows.chunk_rows
        try:
            want = arr[lo:lo + 1]
        except ValueError:
            refused.append(c)
            with pytest.raises(GraphbuildError,
                               match=rf"c/{c}/0: chunk {c} \(rows {lo}-\d+\) fails its crc32c"):
                rows.gather(np.array([lo]))
        else:
            assert np.array_equal(rows.gather(np.array([lo])), want)
    assert refused == [0, 2]
    with pytest.raises(GraphbuildError, match=r"c/0/0: chunk 0 \(rows 0-1023\) fails its crc32c"):
        rows.load()
