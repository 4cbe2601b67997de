"""STS-benchmark: similarities read back from graphbuild's store rank pairs as plain fp32 does."""

import numpy as np
import polars as pl
import zarr

from graphbuild.embedding.stage import embed_shard
from graphbuild.prepare.manifest import load_manifest
from tests.conftest import STS_TEST, needs_shared, write

pytestmark = needs_shared


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks, ties shared (as in Spearman's rho)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=r)
    return sums[inverse] / counts[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def sts_pairs():
    rows = [line.split("\t") for line in STS_TEST.read_text(encoding="utf-8").splitlines()]
    return [float(r[4]) for r in rows], [r[5] for r in rows], [r[6] for r in rows]


def test_ranks_match_a_known_case():
    assert np.allclose(ranks(np.array([3.0, 1.0, 3.0, 2.0])), [2.5, 0, 2.5, 1])


def test_sts_spearman_matches_plain_fp32(tmp_path, st_model):
    gold, left, right = sts_pairs()
    assert len(gold) == 1379
    texts = pl.DataFrame({"id": range(2 * len(gold)), "text": left + right})
    texts.write_parquet(tmp_path / "sts.parquet")
    m = write(tmp_path / "sts.yaml", "name: sts\nsource: {path: sts.parquet}\n"
              "id_column: id\ntext_column: text\n")
    embed_shard(load_manifest(m), tmp_path / "run")  # default precision: bf16 on this CPU
    store = np.asarray(zarr.open_array(str(tmp_path / "run" / "embeddings.zarr"))[:], np.float32)
    node = pl.read_parquet(tmp_path / "run" / "samples.parquet")["node"].to_numpy()
    ours = store[node]
    n = len(gold)
    ours_sim = np.sum(ours[:n] * ours[n:], axis=1)

    plain = st_model.encode(left + right, batch_size=32, normalize_embeddings=True)
    plain_sim = np.sum(plain[:n] * plain[n:], axis=1)
    rho_ours, rho_plain = spearman(ours_sim, np.array(gold)), spearman(plain_sim, np.array(gold))
    print(f"STS-b test Spearman: graphbuild {rho_ours:.4f}, plain fp32 encode {rho_plain:.4f}")
    assert rho_plain > 0.8  # all-MiniLM-L6-v2 scores about 0.82 here
    assert abs(rho_ours - rho_plain) <= 0.002
