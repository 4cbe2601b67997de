"""graphbuild neighbors and stats on a real COCO run, against plain numpy over the same files."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import cli_in_process, graphbuild

QUERY = "a man riding a wave on a surfboard"


@pytest.fixture
def run(coco3k):
    return coco3k


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    return cli_in_process(monkeypatch, capsys, *args)


def stored(run):
    """Independent reads: fp16 rows, the graph as (n, k) arrays from the parquet parts, the
    node of each sample, and the node texts."""
    import zarr

    x = np.asarray(zarr.open_array(str(run / "embeddings.zarr"), mode="r")[:])
    t = pa.concat_tables([pq.read_table(p) for p in sorted((run / "graph").glob("part-*"))])
    assert t.column("node").to_numpy().tolist() == list(range(len(x)))
    ids = np.array(t.column("neighbors").to_pylist())
    sims = np.array(t.column("sims").to_pylist(), np.float32)
    samples = pq.read_table(run / "samples.parquet")
    texts = pq.read_table(run / "nodes.parquet").column("text").to_pylist()
    return x, ids, sims, samples.column("node").to_numpy(), texts


def brute_force(x16: np.ndarray, q16: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = (x16.astype(np.float64) @ q16.astype(np.float64)).astype(np.float32)
    order = np.lexsort((np.arange(len(s)), -s))[:k]
    return order, s[order]


def test_neighbors_of_a_node(run, monkeypatch, capsys):
    x, ids, sims, sample_nodes, texts = stored(run)
    counts = np.bincount(sample_nodes, minlength=len(x))
    node = int(np.argmax(counts))  # a node that several samples share
    r = graphbuild("neighbors", run, "--node", node, "--k", 5, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert (got["node"], got["samples"], got["source"]) == (node, counts[node], "graph")
    assert got["query"] == texts[node] and got["samples"] > 1
    nb = got["neighbors"]
    assert [n["node"] for n in nb] == ids[node, :5].tolist()
    assert np.allclose([n["cos"] for n in nb], sims[node, :5], atol=0, rtol=1e-7)
    assert [n["samples"] for n in nb] == counts[ids[node, :5]].tolist()
    assert [n["text"] for n in nb] == [texts[i] for i in ids[node, :5]]

    code, out, err = cli(monkeypatch, capsys, "neighbors", run, "--node", node, "--k", 3)
    assert code == 0, err
    lines = out.strip().splitlines()  # the human form
    assert lines[0].startswith(f"node {node} ") and len(lines) == 2 + 3
    assert lines[2].split()[:2] == ["1", str(ids[node, 0])]


def test_neighbors_of_a_new_text_equal_brute_force(run, st_model, monkeypatch, capsys):
    from graphbuild.inspect.neighbors import find_nodes, text_neighbors

    assert not find_nodes(run, [QUERY])  # a new text, not a node
    x, _, _, sample_nodes, texts = stored(run)
    counts = np.bincount(sample_nodes, minlength=len(x))
    r = text_neighbors(run, QUERY, k=10)
    assert r.node is None and r.source == "exact search" and r.precision == "bf16"
    # the same top 10 as numpy over every stored row, for the same fp16 query vector
    want_ids, want_sims = brute_force(x, r.vector, 10)
    assert [n.node for n in r.neighbors] == want_ids.tolist()
    assert np.array_equal(np.float32([n.cos for n in r.neighbors]), want_sims)
    assert [n.samples for n in r.neighbors] == counts[want_ids].tolist()
    assert [n.text for n in r.neighbors] == [texts[i] for i in want_ids]
    assert "surf" in r.neighbors[0].text.lower()
    # the vector is the run's model: plain sentence-transformers fp32 agrees to bf16 rounding
    ref = st_model.encode([QUERY], normalize_embeddings=True)[0]
    assert float(ref @ r.vector.astype(np.float32)) > 0.995
    ref_ids, _ = brute_force(x, ref.astype(np.float16), 10)
    assert len(set(ref_ids[:5]) & {n.node for n in r.neighbors}) >= 4

    code, out, err = cli(monkeypatch, capsys, "neighbors", run, QUERY, "--k", 10, "--json", "-q")
    assert code == 0, err
    got = json.loads(out)
    assert got["node"] is None and got["model"] == "all-MiniLM-L6-v2"
    assert [n["node"] for n in got["neighbors"]] == want_ids.tolist()


def test_a_text_that_is_a_node_uses_the_graph(run):
    from graphbuild.inspect.neighbors import text_neighbors

    _x, ids, _, _, texts = stored(run)
    r = text_neighbors(run, "  " + texts[42].replace(" ", "   ") + " ", k=4)
    assert (r.node, r.source, r.query) == (42, "graph", texts[42])
    assert [n.node for n in r.neighbors] == ids[42, :4].tolist()


def test_errors_are_one_line_exit_2(run, tmp_path, monkeypatch, capsys):
    n = len(pq.read_table(run / "nodes.parquet"))
    r = graphbuild("neighbors", run, "--node", n)  # once as a user would, in a new process
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == f"error: {run}/nodes.parquet: node {n} out of range 0..{n - 1}"
    cases = [
        (("neighbors", run, "--node", -1), "node -1 out of range"),
        (("neighbors", tmp_path / "nope", "--node", 1), f"{tmp_path / 'nope'}: no such run"),
        (("stats", tmp_path / "nope"), f"{tmp_path / 'nope'}: no such run directory"),
        (("neighbors", run), "give a TEXT or --node ID"),
    ]
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "graph" / "_meta.json").unlink()
    cases.append((("stats", unfinished), "graph/_meta.json: missing; the graph is not complete"))
    half = tmp_path / "half-embedded"
    shutil.copytree(run, half)
    (half / "_state" / "embed" / "chunks" / "000001.done").unlink()
    cases.append((("report", half), "embeddings.zarr: embeddings are not finished"))
    for args, words in cases:
        code, out, err = cli(monkeypatch, capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2, (args, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
        assert out == ""


def test_stats_json_against_numpy(run):
    r = graphbuild("stats", run, "--json", "--tau-s", "0.07", "--batches", "3")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    _x, ids, sims, sample_nodes, _ = stored(run)
    n, k = ids.shape
    assert (s["nodes"], s["samples"], s["graph"]["k"], s["graph"]["edges"]) == (
        n, len(sample_nodes), k, n * k)
    dup = 1 - len(np.unique(sample_nodes)) / len(sample_nodes)
    assert s["duplicate_ratio"] == pytest.approx(dup, abs=1e-6) and s["duplicates"] > 0
    counts = np.bincount(sample_nodes)
    assert (s["shared_nodes"], s["max_samples_per_node"]) == ((counts > 1).sum(), counts.max())
    q = [0, 1, 5, 25, 50, 75, 95, 99, 100]
    for name, values in (("kth", sims[:, -1]), ("all", sims.ravel()), ("first", sims[:, 0])):
        want = np.percentile(values.astype(np.float64), q)
        assert list(s["sims"][name].values()) == pytest.approx(want, abs=1e-6), name
    assert s["near_duplicate_nodes"] == (sims[:, 0] >= 0.99).sum()
    indeg = np.zeros(n, np.int64)
    np.add.at(indeg, ids.ravel(), 1)
    top = math.ceil(n / 100)
    assert s["hubness"]["edge_share"] == pytest.approx(np.sort(indeg)[-top:].sum() / (n * k),
                                                       abs=1e-6)
    assert (s["in_degree"]["max"], s["in_degree"]["zero"]) == (indeg.max(), (indeg == 0).sum())
    assert s["out_degree"] == {"min": k, "mean": k, "max": k}
    assert s["graph"]["method"] == "exact" and s["graph"]["recall"] == 1.0


def test_entropy_matches_the_trainer_targets(run):
    """The stats' entropy equals that of xclr.SoftTargets rows on the same random batches."""
    import torch

    from graphbuild.inspect.stats import independent_batches, run_stats
    from graphbuild.xclr import SoftTargets, read_sample_nodes

    tau = 0.1
    got = run_stats(run, tau_s=tau, batch_size=512, batches=2, seed=3)["soft_targets"]
    targets = SoftTargets.from_run(run, mode="exact", tau_s=tau)
    h = []
    for idx in independent_batches(read_sample_nodes(run), 512, 2, seed=3):
        p = targets(idx).double()
        h.append(-(p * torch.log(p.clamp_min(1e-300))).sum(1))
    h = torch.cat(h).numpy()
    assert got["batch_size"] == 512 and got["batches"] == 2
    assert got["entropy_mean"] == pytest.approx(h.mean(), abs=2e-4)
    assert got["entropy_p95"] == pytest.approx(np.percentile(h, 95), abs=2e-4)
    assert got["entropy_max"] == pytest.approx(math.log(511), abs=1e-4)
