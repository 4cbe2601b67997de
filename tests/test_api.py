"""The Python API (graphbuild.embed / knn / run): the CLI's bytes, the CLI's errors, a light
import, and defaults that live in graphbuild/options.py alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import graphbuild
from graphbuild.errors import GraphbuildError
from tests import conftest
from tests.conftest import REPO, caption_manifest, cli_in_process, coco_subset, write

K = 8
EMBED = {"chunk_rows": 128, "precision": "bf16"}  # 300 captions: three chunks
EMBED_FLAGS = ["--chunk-rows", "128", "--precision", "bf16", "-q"]


def stored(run: Path) -> dict[str, bytes]:
    """What a run stores, by file: the tables, the store (chunks and attributes), the parts."""
    files = [run / "nodes.parquet", run / "samples.parquet",
             *sorted((run / "embeddings.zarr").rglob("*")),
             *sorted((run / "graph").glob("part-*.parquet"))]
    return {str(p.relative_to(run)): p.read_bytes() for p in files if p.is_file()}


def cli(*args) -> None:
    r = conftest.graphbuild(*args)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def coco300(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    return tmp, caption_manifest(tmp, coco_subset(tmp, 300))


@pytest.fixture(scope="module")
def cli_runs(coco300):
    """The CLI's runs over 300 COCO captions: exact and approximate graphs of one store."""
    tmp, m = coco300
    exact, approx = tmp / "cli-exact", tmp / "cli-approx"
    cli("embed", m, "--out", exact, *EMBED_FLAGS)
    shutil.copytree(exact, approx)
    cli("knn", exact, "--k", K, "--method", "exact", "-q")
    cli("knn", approx, "--k", K, "--method", "approximate", "-q")
    return exact, approx


def test_api_stores_the_cli_bytes(coco300, cli_runs, tmp_path):
    _, m = coco300
    exact, approx = tmp_path / "exact", tmp_path / "approx"
    e = graphbuild.embed(m, exact, **EMBED)
    assert e.complete and (e.shard, e.num_shards) == (0, 1) and e.texts_encoded > 0
    shutil.copytree(exact, approx)
    g = graphbuild.knn(exact, K, method="exact")
    assert g.complete and (g.method, g.k, g.recall) == ("exact", K, 1.0)
    a = graphbuild.knn(approx, K, method="approximate")
    assert a.complete and a.method == "approximate" and a.recall >= 0.95
    for ours, theirs in ((exact, cli_runs[0]), (approx, cli_runs[1])):
        got, want = stored(ours), stored(theirs)
        assert any(name.startswith("graph/") for name in want)
        assert got.keys() == want.keys()
        assert [n for n in want if got[n] != want[n]] == []


def test_run_returns_both_results(coco300, cli_runs, tmp_path):
    """run() on a loaded Dataset: the same bytes as the CLI's embed and knn, both results,
    and the example texts' first neighbours as the graph holds them."""
    from graphbuild.inspect.neighbors import find_nodes, node_texts
    from graphbuild.prepare.manifest import load_manifest
    from graphbuild.rundir.graph import read_graph_csr

    tmp, m = coco300
    example = "A Honda motorcycle parked in a grass driveway"
    m2 = write(tmp / "examples" / "coco.yaml", m.read_text() + f"examples: [{example!r}]\n")
    node = find_nodes(cli_runs[0], [example])[example]  # the text is a node of the run
    r = graphbuild.run(load_manifest(m2), tmp_path / "run", k=K, method="exact", examples=3,
                       **EMBED)
    assert r.out == tmp_path / "run"
    assert r.embed.complete and r.embed.texts_encoded > 0
    assert r.knn.complete and (r.knn.method, r.knn.k) == ("exact", K)
    assert stored(r.out) == stored(cli_runs[0])
    indptr, indices, sims = read_graph_csr(r.out)
    first = indices[indptr[node]:indptr[node] + 3]
    texts = node_texts(r.out, first)
    assert r.examples == {example: [(texts[int(i)], float(s)) for i, s in
                                    zip(first, sims[indptr[node]:indptr[node] + 3])]}


NAN = float("nan")
# (function, its keyword arguments, the CLI's flags for the same values)
BAD = {
    "chunk-rows": ("embed", {"chunk_rows": 0}, ["--chunk-rows", "0"]),
    "token-budget": ("embed", {"token_budget": -5}, ["--token-budget", "-5"]),
    "precision": ("embed", {"precision": "int8"}, ["--precision", "int8"]),
    "device": ("embed", {"device": "tpu"}, ["--device", "tpu"]),
    "num-shards": ("embed", {"num_shards": 0}, ["--num-shards", "0"]),
    "engine": ("embed", {"engine": "ray"}, ["--engine", "ray"]),
    "scheduler-local": ("embed", {"scheduler": "tcp://x:1"}, ["--scheduler", "tcp://x:1"]),
    "k": ("knn", {"k": 0}, ["--k", "0"]),
    "block-rows": ("knn", {"block_rows": -4}, ["--block-rows", "-4"]),
    "recall-nan": ("knn", {"recall_target": NAN}, ["--recall-target", "nan"]),
    "recall-above-1": ("knn", {"recall_target": 1.5}, ["--recall-target", "1.5"]),
    "method": ("knn", {"method": "hnsw"}, ["--method", "hnsw"]),
    "dask-shard": ("knn", {"engine": "dask", "shard": 1}, ["--engine", "dask", "--shard", "1"]),
    "run-device": ("run", {"device": "tpu"}, ["--device", "tpu"]),
    "run-recall": ("run", {"recall_target": NAN}, ["--recall-target", "nan"]),
    "run-examples": ("run", {"examples": -1}, ["--examples", "-1"]),
    "run-block-rows": ("run", {"block_rows": 0}, ["--block-rows", "0"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_values_are_the_cli_errors(case, tmp_path, monkeypatch, capsys):
    name, kwargs, flags = BAD[case]
    m, out = caption_manifest(tmp_path, conftest.COCO), tmp_path / "run"
    first = [m, out] if name != "knn" else [out]
    with pytest.raises(GraphbuildError) as e:
        getattr(graphbuild, name)(*first, **kwargs)
    argv = [name, *([m, "--out", out] if name != "knn" else [out]), *flags, "-q"]
    code, _, err = cli_in_process(monkeypatch, capsys, *argv)
    assert code == 2 and err.splitlines() == [f"error: {e.value}"], err
    assert "\n" not in str(e.value) and flags[0] in str(e.value)
    assert not out.exists(), "a refused call made its run directory"


def test_api_only_values_are_checked_too(tmp_path):
    from graphbuild.prepare.manifest import load_manifest

    with pytest.raises(GraphbuildError, match=r"^--device must be auto, cpu, cuda or cuda:N, "
                                              r"got 'tpu'$"):
        graphbuild.knn(tmp_path / "run", device="tpu")
    ds = load_manifest(caption_manifest(tmp_path, conftest.COCO))
    with pytest.raises(GraphbuildError, match="a loaded Dataset has its source already"):
        graphbuild.embed(ds, tmp_path / "run", source=str(conftest.COCO))
    assert not (tmp_path / "run").exists()


def test_import_is_light():
    """The trainer's thin install imports graphbuild/__init__.py too, and the CLI starts
    with it: it must pull in none of the stages' libraries."""
    code = "import json, sys, graphbuild; print(json.dumps(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       check=True)
    loaded = {name.split(".")[0] for name in json.loads(r.stdout)}
    heavy = {"typer", "click", "rich", "polars", "zarr", "torch", "sentence_transformers",
             "transformers", "numpy", "pyarrow", "pydantic", "yaml", "faiss", "numba",
             "distributed", "dask"}
    assert loaded & heavy == set()
    assert {"embed", "knn", "run", "export", "__version__"} <= set(graphbuild.__all__)
    from importlib import metadata

    assert graphbuild.__version__ == metadata.version("graphbuild")


# In a fresh interpreter: load graphbuild/options.py alone, change every default it holds,
# then import the whole package and read the defaults of every function, class and command.
# A default written as a literal anywhere keeps the old value and shows up as BAD.
DEFAULTS_SCRIPT = r"""
import importlib, inspect, json, pkgutil, sys, types

stub = types.ModuleType("graphbuild")
stub.__path__ = [sys.argv[1]]
sys.modules["graphbuild"] = stub
import graphbuild.options as o
changed = {}
for name, value in vars(o).items():
    if name.isupper() and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        changed[name] = value + ("-changed" if isinstance(value, str) else 1)
        setattr(o, name, changed[name])
del sys.modules["graphbuild"]

import graphbuild
import typer.main
from graphbuild.cli.entry import app

GOVERNED = json.loads(sys.argv[2])
OWN = {tuple(x) for x in json.loads(sys.argv[3])}
found = []

def check(where, param, default):
    if (param in GOVERNED and isinstance(default, (int, float, str))
            and not isinstance(default, bool) and (where, param) not in OWN):
        ok = any(default == changed[c] for c in GOVERNED[param])
        found.append([where, param, repr(default), ok])

modules = [m.name for m in pkgutil.walk_packages(graphbuild.__path__, "graphbuild.")
           if m.name != "graphbuild.__main__" and not m.name.startswith("graphbuild.xclr")]
for mod in ["graphbuild.api", *modules]:
    for obj in list(vars(importlib.import_module(mod)).values()):
        if getattr(obj, "__module__", None) != mod:
            continue
        targets = [obj] if inspect.isfunction(obj) else [] if not inspect.isclass(obj) else [
            obj, *(f for _, f in inspect.getmembers(obj, inspect.isfunction)
                   if f.__module__ == mod)]
        for t in targets:
            try:
                params = inspect.signature(t).parameters.values()
            except ValueError:  # an exception class: no Python signature
                continue
            for p in params:
                if p.default is not inspect.Parameter.empty:
                    check(f"{mod}.{t.__qualname__}", p.name, p.default)

def commands(group, prefix):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from commands(cmd, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", cmd

for name, cmd in commands(typer.main.get_command(app), "graphbuild "):
    for p in cmd.params:
        check(name, p.name, p.default)
from graphbuild.embedding.models import DEFAULT_MODEL
check("graphbuild.embedding.models.DEFAULT_MODEL", "model", DEFAULT_MODEL)
print(json.dumps(found))
"""
# Parameter names whose default graphbuild/options.py holds (k: by what it counts).
GOVERNED = {"model": ["MODEL"], "chunk_rows": ["CHUNK_ROWS"], "block_rows": ["BLOCK_ROWS"],
            "k": ["K", "NEIGHBORS", "EXAMPLES"], "recall_target": ["RECALL_TARGET"],
            "examples": ["EXAMPLES"], "tau_s": ["TAU_S"], "batch_size": ["BATCH_SIZE"],
            "batches": ["BATCHES"], "seed": ["SEED"], "payload": ["PAYLOAD"]}
# Same names, other quantities, with defaults of their own.
OWN = [("graphbuild.graph.ann.build_index", "seed"),      # the index's k-means sample
       ("graphbuild.graph.ann.build_lists", "seed"),
       ("graphbuild.graph.ann.list_centroids", "seed"),   # build_lists' k-means sample
       ("graphbuild.graph.ann.tune_nprobe", "seed"),      # its sampled tuning queries
       ("graphbuild.graph.kmeans.spherical_kmeans", "seed"),
       ("graphbuild.graph.exact.locality_order", "seed"),
       ("graphbuild.graph.exact.error_bound", "block_rows"),  # rows per piece of the bound
       ("graphbuild.inspect.neighbors.exact_search", "block_rows")]  # one query's search


def test_every_default_comes_from_options():
    """The API, the CLI's commands (as typer builds them, `submit slurm` included) and the
    library's functions take each default from graphbuild/options.py."""
    r = subprocess.run([sys.executable, "-c", DEFAULTS_SCRIPT, str(REPO / "graphbuild"),
                        json.dumps(GOVERNED), json.dumps(OWN)],
                       capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    literal = [f"{where}({param}={value})" for where, param, value, ok in found if not ok]
    assert literal == []
    checked = {(where, param) for where, param, _, _ in found}
    for entry in [("graphbuild.api.embed", "chunk_rows"), ("graphbuild.api.knn", "block_rows"),
                  ("graphbuild.api.run", "block_rows"), ("graphbuild.api.run", "examples"),
                  ("graphbuild embed", "model"), ("graphbuild knn", "block_rows"),
                  ("graphbuild run", "block_rows"), ("graphbuild knn", "k"),
                  ("graphbuild submit slurm", "chunk_rows"), ("graphbuild stats", "tau_s"),
                  ("graphbuild report", "batches"), ("graphbuild neighbors", "k"),
                  ("graphbuild.api.export", "payload"), ("graphbuild export", "payload"),
                  ("graphbuild.embedding.stage.EmbedConfig", "model"),
                  ("graphbuild.graph.stage.knn_shard", "block_rows"),
                  ("graphbuild.graph.exact.blocked_topk", "block_rows"),
                  ("graphbuild.scale.engine.knn", "block_rows"),
                  ("graphbuild.inspect.stats.run_stats", "seed"),
                  ("graphbuild.inspect.report.write_report", "tau_s"),
                  ("graphbuild.embedding.models.DEFAULT_MODEL", "model")]:
        assert entry in checked



@pytest.mark.parametrize(("flag", "device"), [([], None), (["--device", "cpu"], "cpu"),
                                              (["--device", "cuda:1"], "cuda:1")])
def test_knn_device_flag_reaches_the_shard(flag, device, tmp_path, monkeypatch, capsys):
    """`graphbuild knn --device` is the device knn_shard searches on (auto: None, the
    search's own choice); `run` hands its --device to knn alike."""
    seen = []

    def knn_shard(out, *args, device=None, **kwargs):
        seen.append(device)
        raise GraphbuildError("stopped by the test")

    monkeypatch.setattr("graphbuild.graph.stage.knn_shard", knn_shard)
    code, _, err = cli_in_process(monkeypatch, capsys, "knn", tmp_path, "-q", *flag)
    assert code == 2 and "stopped by the test" in err and seen == [device]
