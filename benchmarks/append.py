"""Append benchmark: 5% new captions appended to ~86k real ones, against a rebuild in the same run.

The ~91k captions of COCO val2017 + Flickr8k + CC3M-val + a LAION-style sample (knn.py's
set), shuffled with a fixed seed, split into src/a.tsv (the first 1/1.05) and src/b.tsv (the
rest: 5% of a.tsv's rows). The old run (a.tsv: embed, exact knn) is built once into
--workdir and reused. Each run of this script then, on a copy of it:

1. `embed --append` with b.tsv: seconds and texts encoded, against the old run's embed;
2. `knn` (the exact update) and the same appended store's graph rebuilt from scratch (graph
   and knn state removed), in turns, --repeat times each, every update from the same base;
   wall and CPU seconds of each (the CPU seconds of this process, both threads: less
   disturbed than wall time when other work shares the machine), and the graphs compared
   byte for byte.
3. approximate: the old store's approximate graph (built once into --workdir, like the old
   run) updated over the appended store (graph/ann_update.py), timed, against an
   approximate rebuild of the appended store; each one's recall as recorded (a 1,000-query
   sample) and against the exact graph of step 2 over every row, and over the new rows and
   the old rows' new neighbours alone.

Imports and compiled kernels are loaded before the first timing (`warm_up`), so neither side
pays them (benchmarks/startup.py measures them). Prints seconds and ratios; asserts nothing
about timings.

    python benchmarks/append.py [--workdir /tmp/graphbuild-append] [--data DIR] [--k 32]
                                [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
SOURCES = [("coco_val2017_captions.tsv", "coco"), ("Flickr8k.token.txt", "flickr"),
           ("cc3m_Validation_GCC-1.1.0-Validation.tsv", "cc3m"),
           ("img2dataset_laion_style_10000.tsv", "laion")]


def split_sources(data: Path, src: Path, seed: int = 0) -> tuple[int, int]:
    """src/a.tsv and src/b.tsv (written once: their mtimes are in the run's record)."""
    from knn import _caption_lines

    if (src / "b.tsv").exists():
        return (sum(1 for _ in open(src / "a.tsv")) - 1, sum(1 for _ in open(src / "b.tsv")) - 1)
    texts = [t for name, kind in SOURCES for t in _caption_lines(data / name, kind)]
    random.Random(seed).shuffle(texts)
    n_old = round(len(texts) / 1.05)
    src.mkdir(parents=True, exist_ok=True)
    for name, part in (("a.tsv", texts[:n_old]), ("b.tsv", texts[n_old:])):
        tmp = src / f".{name}.tmp"
        tmp.write_text("caption\n" + "".join(t + "\n" for t in part), encoding="utf-8")
        tmp.replace(src / name)
    return n_old, len(texts) - n_old


def timed(f, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    r = f(*args, **kw)
    return time.perf_counter() - t0, r


def warm_up() -> None:
    """Import the knn stage and load its compiled kernels, on a small random store."""
    import numpy as np

    import graphbuild.graph.stage  # noqa: F401
    from graphbuild.graph.exact import blocked_topk

    x = np.random.default_rng(0).standard_normal((3000, 384)).astype(np.float32)
    blocked_topk((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16), 8,
                 device="cpu")


def timed_knn(run: Path, k: int) -> tuple[float, float, float]:
    """(wall s, CPU s of this process, the stage's moments s) of an exact knn of `run`."""
    import graphbuild

    t0, c0 = time.perf_counter(), time.process_time()
    graphbuild.knn(run, k, method="exact")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stage = json.loads((run / "run.json").read_text())["stages"]["knn"]
    return wall, cpu, stage.get("moments_seconds", 0.0)


def same_graph(a: Path, b: Path) -> bool:
    return all((a / "graph" / f.name).read_bytes() == f.read_bytes()
               for f in (b / "graph").iterdir() if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", type=Path, default=Path("/tmp/graphbuild-append"))
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "captions")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args()
    import torch

    import graphbuild

    w = a.workdir
    old_rows, new_rows = split_sources(a.data, w / "base" / "src")
    (w / "base" / "m.yaml").write_text(
        "name: append-bench\nsource: {path: src/*.tsv, format: tsv, has_header: true}\n"
        "text_column: caption\n")
    new_file = w / "base" / "src" / "b.tsv"
    held = w / "b.tsv.held"  # the old run is built without b.tsv
    if new_file.exists():
        new_file.replace(held)
    base = w / "base" / "run"
    if not (base / "graph" / "_meta.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        graphbuild.embed(w / "base" / "m.yaml", base)
        graphbuild.knn(base, a.k, method="exact")
    held.replace(new_file)
    info = json.loads((base / "run.json").read_text())
    emb = info["stages"]["embed"]
    print(f"threads: torch {torch.get_num_threads()}; k={a.k}; machine shared with other "
          "work (timings are indicative)")
    print(f"old run: {old_rows:,} caption rows, {emb['nodes']:,} nodes; embed "
          f"{emb['texts_encoded']:,} texts in {emb['seconds']:.1f}s "
          f"({emb['texts_per_s']:.0f} texts/s); exact knn "
          f"{info['stages']['knn']['seconds']:.1f}s")

    app = w / "append"
    shutil.rmtree(app, ignore_errors=True)
    shutil.copytree(w / "base", app)
    new_file.replace(w / "b.tsv.held")  # the old run's folder again without b.tsv
    run = app / "run"
    seconds, r = timed(graphbuild.embed, app / "m.yaml", run, append=True)
    nodes = json.loads((run / "run.json").read_text())["dataset"]["figures"]["nodes"]
    print(f"embed --append: {new_rows:,} new caption rows, {nodes - emb['nodes']:,} new nodes; "
          f"{r.texts_encoded:,} texts encoded in {r.seconds:.1f}s ({r.texts_per_s:.0f} "
          f"texts/s), {seconds:.1f}s in all (prepare reads the new file's {new_rows:,} rows); "
          f"{r.texts_encoded / emb['texts_encoded']:.3f} of the old run's texts, "
          f"{r.seconds / emb['seconds']:.3f} of its encoding time")
    staged = w / "appended"  # the appended run before knn: every update starts from it
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(run, staged)
    warm_up()
    ratios = []
    for turn in range(a.repeat):
        shutil.rmtree(run)
        shutil.copytree(staged, run)
        update = timed_knn(run, a.k)
        scratch = w / "rebuild"
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(staged, scratch)
        shutil.rmtree(scratch / "graph")
        shutil.rmtree(scratch / "_state" / "knn")
        rebuild = timed_knn(scratch, a.k)
        ratios.append((update[0] / rebuild[0], update[1] / rebuild[1]))
        print(f"exact knn over {nodes:,} nodes, turn {turn + 1}: update {update[0]:.1f}s "
              f"({update[1]:.1f}s CPU, moments {update[2]:.1f}s), rebuild {rebuild[0]:.1f}s "
              f"({rebuild[1]:.1f}s CPU, moments {rebuild[2]:.1f}s): update/rebuild "
              f"{ratios[-1][0]:.3f} wall, {ratios[-1][1]:.3f} CPU (goal <= 0.15); graphs "
              f"byte-identical: {same_graph(run, scratch)}")
    print(f"update/rebuild over {a.repeat} turns: wall {min(r[0] for r in ratios):.3f}-"
          f"{max(r[0] for r in ratios):.3f}, CPU {min(r[1] for r in ratios):.3f}-"
          f"{max(r[1] for r in ratios):.3f}")
    approximate(w, base, run, a.k, emb["nodes"])
    (w / "b.tsv.held").replace(new_file)


def approximate(w: Path, base: Path, appended: Path, k: int, base_n: int) -> None:
    """Step 3: the approximate update against a rebuild, recalls against `appended`'s exact
    graph."""
    import graphbuild
    from graphbuild.graph.ann_update import APPROX_UPDATE_MAX_SHARE

    old = w / "base-approx"
    if not (old / "graph" / "_meta.json").exists():
        shutil.rmtree(old, ignore_errors=True)
        shutil.copytree(base, old)
        shutil.rmtree(old / "graph")
        shutil.rmtree(old / "_state" / "knn")
        graphbuild.knn(old, k, method="approximate")
    built = json.loads((old / "run.json").read_text())["stages"]["knn"]
    runs = {}
    for name, graph in (("update", old / "graph"), ("rebuild", None)):
        runs[name] = w / f"approximate-{name}"
        shutil.rmtree(runs[name], ignore_errors=True)
        shutil.copytree(appended, runs[name])
        shutil.rmtree(runs[name] / "graph")
        shutil.rmtree(runs[name] / "_state" / "knn")
        if graph is not None:
            shutil.copytree(graph, runs[name] / "graph")
    update, _ = timed(graphbuild.knn, runs["update"], k, method="approximate")
    rebuild, _ = timed(graphbuild.knn, runs["rebuild"], k, method="approximate")
    exact = lists(appended)
    n = len(exact)
    print(f"approximate knn: the old run's graph {built['seconds']:.1f}s (recall@{k} "
          f"{built['recall']:.4f}, nprobe {built['nprobe']}); {n - base_n:,} new rows are "
          f"{(n - base_n) / base_n:.3f} of the old (APPROX_UPDATE_MAX_SHARE "
          f"{APPROX_UPDATE_MAX_SHARE})")
    print(f"approximate knn over {n:,} nodes: update {update:.1f}s, rebuild {rebuild:.1f}s: "
          f"update/rebuild {update / rebuild:.3f}")
    for name, out in runs.items():
        meta = json.loads((out / "graph" / "_meta.json").read_text())
        got = lists(out)
        hits = (exact[:, :, None] == got[:, None, :]).any(axis=2)  # each exact neighbour found
        new_cols = exact[:base_n] >= base_n
        print(f"  {name}: recall@{k} recorded {meta['recall']:.4f} (nprobe {meta['nprobe']}); "
              f"against the exact graph: all rows {hits.mean():.4f}, new rows "
              f"{hits[base_n:].mean():.4f}, old rows' new neighbours "
              f"{hits[:base_n][new_cols].mean():.4f} ({new_cols.sum():,} of them)")


def lists(out: Path):
    """Every node's neighbour ids, (n, k), from the graph's parts."""
    from graphbuild.xclr import Graph

    indptr, indices, _ = Graph(out).csr
    return indices.reshape(len(indptr) - 1, -1)


if __name__ == "__main__":
    main()
