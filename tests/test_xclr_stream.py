"""Soft targets streamed beside the images: a real WebDataset (webdataset's own writer and
reader), `graphbuild export`, and SidecarJoin in the stream with two DataLoader workers and a
shuffle buffer. With the fp16 payload every batch's targets equal SoftTargets(mode="exact")
for the same samples, bit for bit."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import COCO, REPO
from tests.wds_digits import digits_export, example

wds = pytest.importorskip("webdataset")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return digits_export(tmp_path_factory.mktemp("wds"))


def sample_of(run: Path) -> dict[str, int]:
    """The run's sample of each sample id (the tars' keys)."""
    from graphbuild.rundir.samples import read_samples

    _nodes, ids = read_samples(run, ids=True)
    return {k: i for i, k in enumerate(ids.to_pylist())}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def test_streamed_digits_targets_equal_exact_bit_for_bit(digits):
    from graphbuild.xclr import SoftTargets

    shards, run, sidecars = digits
    x, _y, _train, _test = example().load_digits_split()
    samples = sample_of(run)
    exact = SoftTargets.from_run(run, tau_s=0.05)
    keep64 = SoftTargets.from_run(run, tau_s=0.05, diagonal="keep", dtype=torch.float64)
    join, loader = example().stream_batches(shards, sidecars, run, batch_size=64, seed=0,
                                            workers=2, buffer=300)
    seen: list[str] = []
    for b, (images, _labels, payload, keys) in enumerate(loader):
        idx = np.array([samples[k] for k in keys])
        assert torch.equal(images, x[[int(k) for k in keys]])  # the PNGs decode to the images
        assert same_bits(join.targets(payload, tau_s=0.05, views=2), exact(idx, views=2))
        if b % 4 == 0:
            assert same_bits(join.targets(payload, tau_s=0.05, diagonal="keep",
                                          dtype=torch.float64), keep64(idx))
        assert join.unpack(payload)[0].tolist() == exact.sample_nodes[idx].tolist()
        seen += keys
    # every sample at most once; each of the 2 workers drops at most a short last batch
    assert len(seen) == len(set(seen)) > len(samples) - 2 * 64
    assert seen != sorted(seen)  # the shuffle buffer mixed them


def write_caption_shards(root: Path, rows: list[tuple[str, str]], per_shard: int) -> Path:
    root.mkdir(parents=True)
    with wds.ShardWriter(str(root / "coco-%03d.tar"), maxcount=per_shard, verbose=0) as sink:
        for key, text in rows:
            sink.write({"__key__": key, "txt": text})
    return root


@pytest.fixture(scope="module")
def coco_stream(coco3k, tmp_path_factory):
    """COCO captions as tars of KEY.txt keyed by caption_id, with 40 keys the run lacks
    (one in every 75), exported as fp16 and as int8."""
    import graphbuild

    tmp = tmp_path_factory.mktemp("coco-wds")
    rows = [tuple(line.split("\t")[::2]) for line in COCO.read_text().splitlines()[1:]]
    mixed = []
    for i, row in enumerate(rows):
        mixed.append(row)
        if i % 75 == 0:
            mixed.append((f"x{i}", "an image the run never saw"))
    shards = write_caption_shards(tmp / "shards", mixed, per_shard=700)
    out = {}
    for payload in ("fp16", "int8"):
        r = graphbuild.export(coco3k, shards, tmp / payload, payload=payload)
        assert (r.samples, r.missing, r.complete) == (3040, 40, True)
        out[payload] = tmp / payload
    return shards, coco3k, out


def caption_loader(shards: Path, join, batch_size: int, seed: int = 0, workers: int = 2):
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples(), join,
        wds.shuffle(400, rng=random.Random(seed)), wds.decode(),
        wds.to_tuple("__key__", join.field), wds.batched(batch_size, partial=True))
    return wds.WebLoader(pipeline, batch_size=None, num_workers=workers)


def test_streamed_caption_targets_equal_exact_with_keys_the_run_lacks(coco_stream):
    from graphbuild.xclr import SidecarJoin, SoftTargets

    shards, run, out = coco_stream
    samples = sample_of(run)
    exact = SoftTargets.from_run(run)
    join = SidecarJoin(out["fp16"], run=run, payload="fp16")
    batches = lacking = 0
    for keys, payload in caption_loader(shards, join, batch_size=256):
        idx = np.array([samples.get(k, -1) for k in keys])
        t = join.targets(payload, tau_s=0.1)
        assert same_bits(t, exact(idx))
        assert same_bits(join.targets(list(payload.numpy()), tau_s=0.1), t)  # rows as a list
        lacking += int((idx < 0).sum())
        batches += 1
    assert lacking == 40 and batches >= 12


def row_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    p, q = p.double(), q.double()
    return torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()),
                       0).sum(1)


def test_int8_targets_are_close_to_exact_not_equal(coco_stream):
    from graphbuild.xclr import SidecarJoin, SoftTargets

    shards, run, out = coco_stream
    samples = sample_of(run)
    exact = SoftTargets.from_run(run)
    join = SidecarJoin(out["int8"], run=run)
    kls = []
    for keys, payload in caption_loader(shards, join, batch_size=256, workers=0):
        have = np.array([samples.get(k, -1) for k in keys])
        p, q = exact(have), join.targets(payload, tau_s=0.1)
        assert not torch.equal(p, q)
        kls.append(row_kl(p[have >= 0], q[have >= 0]))
    kl = torch.cat(kls)
    assert kl.mean() < 1e-3 and kl.max() < 1e-2


def test_the_trainer_refuses_sidecars_not_of_its_run_or_payload(coco_stream, digits, tmp_path):
    from graphbuild.errors import GraphbuildError
    from graphbuild.rundir.sidecar import read_dir_meta
    from graphbuild.xclr import SidecarJoin

    shards, run, out = coco_stream
    _dshards, drun, dside = digits
    with pytest.raises(GraphbuildError, match="exported from embeddings with precision='bf16'"
                       ", the run has precision='fp32'"):
        SidecarJoin(out["fp16"], run=drun)
    other_id = read_dir_meta(dside)["run_id"]
    with pytest.raises(GraphbuildError, match=rf"exported from run .*, not {other_id} "
                       r"\(another provenance\)"):
        SidecarJoin(out["fp16"], run=other_id)
    same_prov = read_dir_meta(out["fp16"])["run_id"].split("-")[0] + "-" + "0" * 16
    with pytest.raises(GraphbuildError, match=r"\(another run\)"):
        SidecarJoin(out["fp16"], run=same_prov)
    with pytest.raises(GraphbuildError, match="holds payload int8 .* payload='fp16' was asked"):
        SidecarJoin(out["int8"], run=run, payload="fp16")
    # rows of another sidecar directory's payload, handed to this join's targets
    int8_rows = SidecarJoin(out["int8"], run=run).sidecar(str(shards / "coco-000.tar")).packed
    with pytest.raises(GraphbuildError, match=r"^payload rows of 396 bytes, a fp16 row of dim "
                       r"384 has 776: the batch is not of this sidecar directory$"):
        SidecarJoin(out["fp16"], run=run).targets(int8_rows[:8], tau_s=0.1)
    # a sidecar copied in from another export: refused when the stream enters its tar
    mixed = tmp_path / "mixed"
    shutil.copytree(out["fp16"], mixed)
    shutil.copy(out["int8"] / "coco-001.parquet", mixed)
    join = SidecarJoin(mixed, run=read_dir_meta(mixed)["run_id"])
    with pytest.raises(GraphbuildError, match="coco-001.parquet: holds payload 'int8'"):
        list(join(wds.tarfile_to_samples()([{"url": str(shards / "coco-001.tar")}])))
    os.remove(mixed / "coco-001.parquet")
    with pytest.raises(GraphbuildError, match="coco-001.parquet: missing"):
        list(join(wds.tarfile_to_samples()([{"url": str(shards / "coco-001.tar")}])))
    table = pq.read_table(out["fp16"] / "coco-000.parquet")
    pq.write_table(table.slice(1), mixed / "coco-000.parquet")  # metadata kept, a row less
    with pytest.raises(GraphbuildError, match="no row for key '38' of .*coco-000.tar; the tar "
                       "is not the one exported"):
        list(join(wds.tarfile_to_samples()([{"url": str(shards / "coco-000.tar")}])))


DDP = """
import os, sys, json
import numpy as np, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
from tests.test_xclr_stream import caption_loader, sample_of
from graphbuild.xclr import SidecarJoin, SoftTargets
import webdataset as wds

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + {init!r}, rank=rank, world_size=2)
run, shards, side = {run!r}, {shards!r}, {side!r}
from pathlib import Path
samples = sample_of(Path(run))
exact = SoftTargets.from_run(run)
join = SidecarJoin(side, run=run, payload="fp16")
urls = sorted(str(p) for p in Path(shards).glob("*.tar"))
pipeline = wds.DataPipeline(
    wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker,
    wds.tarfile_to_samples(), join, wds.shuffle(300), wds.decode(),
    wds.to_tuple("__key__", join.field), wds.batched(128))
keys = []
for k, payload in wds.WebLoader(pipeline, batch_size=None, num_workers=2):
    idx = np.array([samples.get(x, -1) for x in k])
    assert join.targets(payload, tau_s=0.1).numpy().tobytes() == exact(idx).numpy().tobytes()
    keys += k
everyone = [None, None]
dist.all_gather_object(everyone, keys)
if rank == 0:
    print(json.dumps(everyone))
dist.destroy_process_group()
"""


def test_ddp_ranks_stream_their_own_shards_with_exact_targets(coco_stream, tmp_path):
    shards, run, out = coco_stream
    script = tmp_path / "ddp.py"
    script.write_text(DDP.format(repo=str(REPO), init=str(tmp_path / "init"), run=str(run),
                                 shards=str(shards), side=str(out["fp16"])))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(REPO)
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    import json

    rank0, rank1 = json.loads(results[0][0].strip().splitlines()[-1])
    assert not set(rank0) & set(rank1)  # each rank streamed its own shards
    assert len(rank0) + len(rank1) == 3040 and rank0 and rank1


def test_each_ranks_rows_against_every_ranks_batch_equal_exact(coco_stream):
    """Two ranks, each streaming its own tars (explicit per-rank shard lists), gather their
    payload rows as columns: each rank's targets are SoftTargets' rows of the whole batch."""
    from graphbuild.xclr import SidecarJoin, SoftTargets

    shards, run, out = coco_stream
    samples = sample_of(run)
    exact = SoftTargets.from_run(run)
    join = SidecarJoin(out["fp16"], run=run, payload="fp16")
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    B = 96

    def rank_batches(rank: int):
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls[rank::2]), wds.split_by_worker, wds.tarfile_to_samples(),
            join,
            wds.shuffle(300, rng=random.Random(rank)), wds.to_tuple("__key__", join.field),
            wds.batched(B, partial=False))
        return wds.WebLoader(pipeline, batch_size=None, num_workers=2)

    steps = 0
    seen: list[list[str]] = [[], []]
    for (keys0, rows0), (keys1, rows1) in zip(rank_batches(0), rank_batches(1)):
        every = torch.cat([rows0, rows1])  # what an all-gather of the uint8 rows gives
        idx = [np.array([samples.get(k, -1) for k in keys]) for keys in (keys0, keys1)]
        for rank, (keys, rows) in enumerate(((keys0, rows0), (keys1, rows1))):
            got = join.targets(rows, tau_s=0.1, views=2, columns=every, self_at=rank * B)
            want = exact(idx[rank], views=2, columns=np.concatenate(idx), self_at=rank * B)
            assert got.shape == (2 * B, 4 * B) and same_bits(got, want)
            seen[rank] += keys
        steps += 1
    assert steps >= 12 and all(len(set(s)) == len(s) for s in seen)  # each sample once
    assert not set(seen[0]) & set(seen[1])  # each rank its own tars


GUARD = """
import importlib.abc, runpy, sys
BLOCK = ("sentence_transformers", "transformers")

class NoTextEncoder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCK:
            raise ImportError(f"text encoder imported during training: {name}")
        return None

sys.meta_path.insert(0, NoTextEncoder())
sys.argv = ["digits_xclr.py", "--run", sys.argv[1], "--loader", "webdataset", "--epochs", "1",
            "--seeds", "0", "--limit", "256"]
runpy.run_path(%r, run_name="__main__")
assert not [m for m in BLOCK if m in sys.modules]
"""


def test_digits_example_trains_from_the_shards_without_a_text_encoder(tmp_path):
    ex = example()
    x, y, train, _test = ex.load_digits_split()
    run = tmp_path / "digits"
    # built beforehand (this loads the text encoder); the example then finds it done
    ex.export_digit_shards(tmp_path / "digits-wds", x, y, train[:256])
    done = subprocess.run([sys.executable, "-c", GUARD % str(ex.__file__), str(run)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "digits from 2 tar shards" in done.stdout
    assert "  xclr    seed 0: kNN acc" in done.stdout and "(streamed)" in done.stdout
