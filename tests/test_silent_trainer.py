"""Issue #19, trainer side: nothing wrong in silence. Each case as the issue describes it, checked
against computations that do not use the trainer's readers (zarr, polars, the source TSV, a
float64 formula).

The runs: the first 300 COCO captions with row 11's caption blanked, embedded with
--skip-bad-rows, once with the manifest's id_column (caption_id) and once without one (the
row number is the id)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import coco_subset, write

ROWS, BLANK = 300, 11
TAU_S = 0.1


def _build(base: Path, tsv: Path, id_column: bool, precision: str = "bf16") -> Path:
    from graphbuild.embedding.stage import EmbedConfig, embed_shard
    from graphbuild.graph.stage import knn_shard
    from graphbuild.prepare.manifest import load_manifest

    manifest = write(base / "m.yaml", f"name: blank\nsource: {{path: {tsv}, format: tsv}}\n"
                     + ("id_column: caption_id\n" if id_column else "")
                     + "text_column: caption\n")
    out = base / "run"
    embed_shard(load_manifest(manifest), out, 0, 1,
                EmbedConfig(precision=precision, chunk_rows=128, skip_bad_rows=True))
    knn_shard(out, k=8, method="exact")
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """300 COCO captions; data row 11's caption is blank."""
    tsv = coco_subset(tmp_path_factory.mktemp("blank-source"), ROWS)
    lines = tsv.read_text(encoding="utf-8").splitlines()
    cid, image, _ = lines[1 + BLANK].split("\t")
    lines[1 + BLANK] = f"{cid}\t{image}\t"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tsv


@pytest.fixture(scope="module")
def by_id(tmp_path_factory, source) -> Path:
    return _build(tmp_path_factory.mktemp("blank-by-id"), source, id_column=True)


@pytest.fixture(scope="module")
def by_row(tmp_path_factory, source) -> Path:
    return _build(tmp_path_factory.mktemp("blank-by-row"), source, id_column=False)


def source_rows(tsv: Path) -> tuple[list[str], list[str]]:
    """(caption_id, whitespace-normalised caption) of each data row, from the TSV itself. A
    TSV's columns are text, so the run's sample ids are the strings "38", "182", ..."""
    rows = [line.split("\t") for line in tsv.read_text(encoding="utf-8").splitlines()[1:]]
    return [r[0] for r in rows], [" ".join(r[2].split()) for r in rows]


def reference_targets(run: Path, texts: list[str | None], views: int = 1) -> np.ndarray:
    """softmax_j(cos / tau_s), diagonal masked, in float64 from zarr and nodes.parquet's texts
    (joined by text, not by any id); an item whose text is None has a zero row and column."""
    import polars as pl
    import zarr

    emb = np.asarray(zarr.open_array(str(run / "embeddings.zarr"), mode="r")[:], np.float64)
    node_of = dict(zip(*pl.read_parquet(run / "nodes.parquet").select("text", "node")
                       .to_numpy().T.tolist()))
    texts = texts * views
    have = [i for i, t in enumerate(texts) if t is not None]
    t = emb[[node_of[texts[i]] for i in have]]
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    logits = t @ t.T / TAU_S
    if len(have) > 1:
        np.fill_diagonal(logits, -np.inf)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
    else:
        p = np.zeros((len(have), len(have)))
    out = np.zeros((len(texts), len(texts)))
    out[np.ix_(have, have)] = p
    return out


def node_texts(run: Path) -> np.ndarray:
    import polars as pl

    return pl.read_parquet(run / "nodes.parquet").sort("node")["text"].to_numpy()


def without_row_number_record(run: Path, dest: Path) -> Path:
    """A copy of a run as the builder left it before it recorded whether the sample ids are
    row numbers (graphbuild.rundir.samples.ROW_NUMBER_IDS)."""
    from graphbuild.rundir.samples import ROW_NUMBER_IDS

    shutil.copytree(run, dest)
    info = json.loads((dest / "run.json").read_text())
    del info["dataset"][ROW_NUMBER_IDS]
    (dest / "run.json").write_text(json.dumps(info))
    return dest


def images(n: int) -> TensorDataset:
    """n 'images': item p's payload is p, so a batch says which items it holds."""
    return TensorDataset(torch.arange(n))


def check_readme_flow(run: Path, data, texts: list[str | None], batch_size: int = 64) -> None:
    """The README's trainer loop; every batch's targets equal the float64 formula over the
    captions of the batch's items, looked up by their position in the source."""
    from graphbuild.xclr import NeighborBatchSampler, SoftTargets

    targets = SoftTargets.from_run(run, tau_s=TAU_S)
    sampler = NeighborBatchSampler.from_run(run, batch_size=batch_size, seed=0, rank=0,
                                            world_size=1, dataset=data)
    seen = []
    for item, sample_idx, *_ in DataLoader(data, batch_sampler=sampler):
        assert bool((sample_idx >= 0).all())  # the sampler never yields an item without target
        want = reference_targets(run, [texts[p] for p in item.tolist()])
        assert np.abs(targets(sample_idx).numpy() - want).max() < 2.5e-6
        seen += item.tolist()
    assert sorted(seen) == [p for p in range(len(texts)) if texts[p] is not None]


# -- case 2: --skip-bad-rows must not shift later samples ---------------------------------------

def test_skipped_row_is_no_target_when_ids_are_row_numbers(by_row, source, tmp_path):
    """The issue's case: no id_column, so the row number is the id. Item p is source row p;
    item 11 (blank) has no target and item 12 gets caption 12's targets, not caption 13's."""
    from graphbuild.errors import GraphbuildError
    from graphbuild.xclr import SoftTargets, WithNodes

    _, captions = source_rows(source)
    from graphbuild.rundir.samples import ROW_NUMBER_IDS

    # a run.json from before the builder recorded the id kind: the default ids are refused
    old = without_row_number_record(by_row, tmp_path / "old")
    with pytest.raises(GraphbuildError, match="run.json: does not say whether the sample ids"):
        WithNodes(images(ROWS), run=old)
    run = by_row
    assert json.loads((run / "run.json").read_text())["dataset"][ROW_NUMBER_IDS] is True
    data = WithNodes(images(ROWS), run=run, with_node=True)
    assert data[BLANK] == (BLANK, -1, -1)
    texts = node_texts(run)
    for p in range(ROWS):
        _, sample, node = data[p]
        assert (sample == -1) == (p == BLANK)
        if p != BLANK:
            assert texts[node] == captions[p], p
    assert data.join.unknown == 1 and data.join.missing == 0
    # targets of a batch holding the blank item: its row and column are zero, the rest exact
    items = [10, 11, 12, 13, 150, 299]
    got = SoftTargets.from_run(run, tau_s=TAU_S)(torch.tensor([data[p][1] for p in items]))
    want = reference_targets(run, [captions[p] if p != BLANK else None for p in items])
    assert np.abs(got.numpy() - want).max() < 2.5e-6
    check_readme_flow(run, WithNodes(images(ROWS), run=run),
                      [c if p != BLANK else None for p, c in enumerate(captions)])


def test_skipped_row_is_no_target_when_ids_are_an_id_column(by_id, source):
    """With id_column, items are joined by caption_id, in any order the dataset has."""
    from graphbuild.xclr import WithNodes

    ids, captions = source_rows(source)
    order = np.random.default_rng(0).permutation(ROWS)  # the dataset's own order
    data = WithNodes(images(ROWS), run=by_id, ids=[ids[r] for r in order], with_node=True)
    texts = node_texts(by_id)
    for p, r in enumerate(order.tolist()):
        _, sample, node = data[p]
        assert (sample == -1) == (r == BLANK)
        if r != BLANK:
            assert texts[node] == captions[r]
    # a callable gives the same join
    same = WithNodes(images(ROWS), run=by_id, ids=lambda p: ids[order[p]])
    assert np.array_equal(same.join.sample_of, data.join.sample_of)
    check_readme_flow(by_id, data, [captions[r] if r != BLANK else None for r in order])


def test_id_and_length_mismatches_are_errors(by_id, by_row, source, tmp_path):
    from graphbuild.errors import GraphbuildError
    from graphbuild.xclr import NeighborBatchSampler, WithNodes

    ids, _ = source_rows(source)

    def refused(match: str, **kw) -> None:
        with pytest.raises(GraphbuildError, match=match) as e:
            WithNodes(images(len(kw.get("ids", ids))), **{"run": by_id, "ids": ids, **kw})
        assert "\n" not in str(e.value)

    with pytest.raises(GraphbuildError, match="run.json: the run's sample ids are not row "
                                              "numbers .*e.g. '38'"):
        WithNodes(images(ROWS), run=by_id)
    refused(r"2 samples have no dataset item .*298 items, the run 299 samples", ids=ids[:298])
    refused(r"2 dataset items have ids the run holds no sample for, more than the 1 rows it "
            r"skipped \(first: item 11, id '981'; the dataset has 301 items", ids=ids + ["x"])
    refused(r"items 0 and 5 have the same id '38'", ids=ids[:5] + ["38"] + ids[6:])
    refused(r"dataset's ids are int64, .*sample_id.* large_string, e.g. '38'",
            ids=[int(i) for i in ids])
    with pytest.raises(GraphbuildError, match="ids= has 300 entries, the dataset 10 items"):
        WithNodes(images(10), run=by_id, ids=ids)
    # accepted on request: an unknown id has no target, a missing sample is never batched
    loose = WithNodes(images(ROWS + 1), run=by_id, ids=ids + ["x"], allow_unknown=True)
    assert loose.join.unknown == 2 and loose[ROWS][1] == -1
    part = WithNodes(images(200), run=by_id, ids=ids[:200], allow_missing=True)
    batches = list(NeighborBatchSampler.from_run(by_id, 32, rank=0, world_size=1, dataset=part))
    assert sorted(np.concatenate(batches).tolist()) == [p for p in range(200) if p != BLANK]
    # row-number ids: a position past the source's 300 rows is not a skipped row
    run = by_row
    with pytest.raises(GraphbuildError, match="item 300 has id 300, not a row number of the "
                                              "source's 300 rows"):
        WithNodes(images(ROWS + 1), run=run)
    with pytest.raises(GraphbuildError, match="needs dataset="):
        NeighborBatchSampler.from_run(by_id, 32)
    with pytest.raises(GraphbuildError, match="is not the run of dataset="):
        NeighborBatchSampler.from_run(run, 32, dataset=WithNodes(images(ROWS), run=by_id, ids=ids))


# -- "no target" in targets and loss -------------------------------------------------------------

def loss_formula(z: np.ndarray, t: np.ndarray, tau: float) -> float:
    """Mean over rows with target mass of -sum_j t_ij log softmax_{j != i}(z_i . z_j / tau)."""
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T / tau
    total, rows = 0.0, 0
    for i in range(len(z)):
        if t[i].sum() == 0:
            continue
        others = [j for j in range(len(z)) if j != i]
        lse = np.log(np.exp(s[i, others] - s[i, others].max()).sum()) + s[i, others].max()
        total -= sum(t[i, j] * (s[i, j] - lse) for j in others)
        rows += 1
    return total / rows if rows else 0.0


@pytest.mark.parametrize("views", [1, 2])
def test_no_target_rows_and_columns_are_zero_and_left_out(by_id, source, views):
    from graphbuild.xclr import SoftTargets, WithNodes, xclr_loss

    ids, captions = source_rows(source)
    data_rows = [3, BLANK, 40, 41, 7, 200]
    data = WithNodes(images(ROWS), run=by_id, ids=ids)
    idx = torch.tensor([data[r][1] for r in data_rows])
    assert idx.tolist()[1] == -1
    targets = SoftTargets.from_run(by_id, tau_s=TAU_S)
    t = targets(idx, views=views)
    want = reference_targets(by_id, [captions[r] if r != BLANK else None for r in data_rows],
                             views)
    assert np.abs(t.numpy() - want).max() < 2.5e-6
    keep = torch.tensor([i for i in range(len(idx) * views) if i % len(idx) != 1])
    assert torch.equal(t[keep][:, keep], targets(idx[idx >= 0], views=views))
    z = torch.randn(len(idx) * views, 16, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    got = xclr_loss(z, t, tau=0.2)
    assert abs(got.item() - loss_formula(z.numpy(), t.double().numpy(), 0.2)) < 1e-12


# -- case 3: every read of stored rows checks the chunk's crc ----------------------------------

def flip_bits(chunk: Path, at: int = 1000) -> None:
    data = bytearray(chunk.read_bytes())
    data[at] ^= 0b0101_0000
    chunk.write_bytes(bytes(data))


@pytest.mark.parametrize("mmap", [False, True])
def test_flipped_bits_in_a_chunk_are_an_error(coco3k, tmp_path, mmap):
    import zarr

    from graphbuild.errors import GraphbuildError
    from graphbuild.xclr import SoftTargets

    run = tmp_path / "run"
    shutil.copytree(coco3k, run)
    chunk = run / "embeddings.zarr" / "c" / "1" / "0"
    flip_bits(chunk)
    with pytest.raises(ValueError, match="checksum"):  # zarr's own reader agrees it is corrupt
        zarr.open_array(str(run / "embeddings.zarr"), mode="r")[1024:2048]
    targets = SoftTargets.from_run(run, mmap=mmap)
    nodes = targets.sample_nodes
    in_chunk0 = np.flatnonzero(nodes < 1024)[:64]
    in_chunk1 = np.flatnonzero((nodes >= 1024) & (nodes < 2048))[:64]
    if mmap:  # a chunk is checked at its first read: chunk 0 is sound
        assert targets(in_chunk0).shape == (64, 64)
    for _ in range(2):  # and a failed chunk keeps failing
        with pytest.raises(GraphbuildError, match=r"^\S*c/1/0: chunk 1 \(rows 1024-2047\) fails "
                                                  r"its crc32c check[^\n]*$"):
            targets(np.concatenate([in_chunk0[:8], in_chunk1]))


# -- case 5: a batch of one, diagonal mismatches, float64 ---------------------------------------

def test_no_batch_of_one_from_the_sampler(by_id, source):
    from graphbuild.xclr import NeighborBatchSampler, WithNodes

    ids, _ = source_rows(source)
    data = WithNodes(images(ROWS), run=by_id, ids=ids)
    assert (ROWS - 1) % 149 == 1  # 299 samples
    for drop_last, sizes in [(False, [149, 150]), (True, [149, 149])]:
        s = NeighborBatchSampler.from_run(by_id, 149, rank=0, world_size=1, dataset=data,
                                          drop_last=drop_last)
        batches = list(s)
        assert sorted(len(b) for b in batches) == sizes and len(s) == len(sizes)


def test_a_batch_of_one_gives_a_zero_row_and_a_zero_loss(by_id):
    from graphbuild.xclr import SoftTargets, xclr_loss

    mask = SoftTargets.from_run(by_id)
    assert torch.equal(mask([5]), torch.zeros(1, 1))  # no other sample: no target
    assert torch.equal(mask([5], views=2), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert torch.equal(SoftTargets.from_run(by_id, diagonal="keep")([5]), torch.ones(1, 1))
    z = torch.randn(1, 8, requires_grad=True)
    loss = xclr_loss(z, mask([5]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros(1, 8))


def test_diagonal_mismatch_is_an_error_both_ways(by_id):
    from graphbuild.errors import GraphbuildError
    from graphbuild.xclr import SoftTargets, xclr_loss

    z = torch.randn(6, 8)
    idx = np.arange(6)
    masked = SoftTargets.from_run(by_id, diagonal="mask")(idx)
    kept = SoftTargets.from_run(by_id, diagonal="keep")(idx)
    with pytest.raises(GraphbuildError, match="diagonal='keep' needs targets with mass"):
        xclr_loss(z, masked, diagonal="keep")
    with pytest.raises(GraphbuildError, match="diagonal='mask' needs targets with a zero"):
        xclr_loss(z, kept, diagonal="mask")
    assert torch.isfinite(xclr_loss(z, kept, diagonal="keep"))


def test_float64_in_float64_out_and_gradcheck(by_id):
    from graphbuild.xclr import SoftTargets, xclr_loss

    targets = SoftTargets.from_run(by_id)([0, 1, 2, 5, 9, 40, 41, 3], views=1).double()
    z = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                    requires_grad=True)
    loss = xclr_loss(z, targets, tau=0.3)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - loss_formula(z.detach().numpy(), targets.numpy(), 0.3)) < 1e-12
    assert torch.autograd.gradcheck(lambda x: xclr_loss(x, targets, tau=0.3), (z,))
    for low in (torch.bfloat16, torch.float16, torch.float32):
        assert xclr_loss(z.detach().to(low), targets).dtype == torch.float32


# -- bad input: one-line GraphbuildErrors ------------------------------------------------------

def test_bad_trainer_input_is_one_line(by_id):
    from graphbuild.errors import GraphbuildError
    from graphbuild.xclr import SoftTargets, xclr_loss

    targets = SoftTargets.from_run(by_id)
    calls = {
        "float index tensor": lambda: targets(torch.tensor([0.0, 1.0])),
        "bool index tensor": lambda: targets(torch.tensor([True, False, True])),
        "float index list": lambda: targets([0.5, 1.0]),
        "index out of range": lambda: targets([0, 299]),
        "empty index": lambda: targets(torch.tensor([], dtype=torch.int64)),
        "views=0": lambda: targets([0, 1], views=0),
        "views=-1": lambda: targets([0, 1], views=-1),
        "views=1.5": lambda: targets([0, 1], views=1.5),
        "graph k=0": lambda: SoftTargets.from_run(by_id, mode="graph", k=0),
        "graph k=-2": lambda: SoftTargets.from_run(by_id, mode="graph", k=-2),
        "empty loss batch": lambda: xclr_loss(torch.zeros(0, 8), torch.zeros(0, 0)),
        "NaN targets": lambda: xclr_loss(torch.randn(2, 4), torch.full((2, 2), float("nan"))),
        "tau=0": lambda: xclr_loss(torch.randn(2, 4), torch.tensor([[0.0, 1], [1, 0]]), tau=0),
    }
    for name, call in calls.items():
        with pytest.raises(GraphbuildError) as e:
            call()
        assert str(e.value) and "\n" not in str(e.value), name


# -- case 9: a stale graph, or tables that do not fit the store ---------------------------------

def test_graph_of_other_embeddings_is_refused(by_id, source, tmp_path):
    from graphbuild.embedding.stage import EmbedConfig, embed_shard
    from graphbuild.errors import GraphbuildError
    from graphbuild.prepare.manifest import load_manifest
    from graphbuild.xclr import GraphRows, NeighborBatchSampler, SoftTargets, WithNodes

    run = tmp_path / "run"
    shutil.copytree(by_id, run)
    shutil.rmtree(run / "embeddings.zarr")
    shutil.rmtree(run / "_state" / "embed")
    embed_shard(load_manifest(by_id.parent / "m.yaml"), run, 0, 1,
                EmbedConfig(precision="fp32", chunk_rows=128, skip_bad_rows=True))
    stale = r"graph/_meta.json: built from embeddings with precision='bf16'.*stale"
    with pytest.raises(GraphbuildError, match=stale):
        SoftTargets.from_run(run, mode="graph")
    ids, _ = source_rows(source)
    data = WithNodes(images(ROWS), run=run, ids=ids)
    with pytest.raises(GraphbuildError, match=stale):
        NeighborBatchSampler.from_run(run, 32, dataset=data)
    with pytest.raises(GraphbuildError, match=stale):
        list(GraphRows(run, rank=0, world_size=1))
    assert SoftTargets.from_run(run)(np.arange(8)).shape == (8, 8)  # exact reads the store


def test_exact_refuses_tables_that_do_not_fit_the_store(by_id, coco3k, tmp_path):
    from graphbuild.errors import GraphbuildError
    from graphbuild.xclr import SoftTargets

    run = tmp_path / "run"
    shutil.copytree(by_id, run)
    shutil.copy(coco3k / "samples.parquet", run / "samples.parquet")  # another run's samples
    with pytest.raises(GraphbuildError, match=r"samples.parquet: node \d+ is not one of the "
                                              r"\d+ rows of .*embeddings.zarr"):
        SoftTargets.from_run(run)
    shutil.copy(by_id / "samples.parquet", run / "samples.parquet")
    shutil.rmtree(run / "embeddings.zarr")
    shutil.copytree(coco3k / "embeddings.zarr", run / "embeddings.zarr")  # another run's store
    with pytest.raises(GraphbuildError, match=r"embeddings.zarr: holds \d+ rows, .*nodes"):
        SoftTargets.from_run(run)
