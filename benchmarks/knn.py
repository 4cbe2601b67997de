"""knn benchmark: exact blocked search vs faiss IndexFlatIP, and approximate (IVF) search.

Real embeddings: the ~90k unique captions of COCO val2017 + Flickr8k + CC3M-val + a
LAION-style sample, embedded once with the default model into --workdir (reruns reuse it).
Then ~1M vectors derived from them (see `derived_vectors`): approximate search, its recall on
rows the tuning did not sample, and exact search of the same set, measured (--estimate-exact:
estimated from exact's rate on the real set instead). Prints seconds, GFLOP/s, ratios, recall
and peak RSS; asserts nothing about timings.

    python benchmarks/knn.py [--workdir /tmp/graphbuild-bench] [--big 1000000] [--reps 2]
                             [--estimate-exact] [--real-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "captions"


def _caption_lines(path: Path, kind: str):
    with open(path, encoding="utf-8") as f:
        if kind == "laion":
            next(f)
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if kind == "coco":
                text = parts[2] if len(parts) > 2 else ""
            elif kind == "flickr":
                text = parts[1] if len(parts) > 1 else ""
            elif kind == "cc3m":
                text = parts[0]
            else:
                text = "\t".join(parts[2:])
            text = " ".join(text.split())
            if text:
                yield text


def embedded_run(workdir: Path) -> Path:
    """Embed the four caption sets once into workdir/run; reruns reuse it."""
    from graphbuild.embedding.stage import embed_shard
    from graphbuild.prepare.manifest import load_manifest

    workdir.mkdir(parents=True, exist_ok=True)
    tsv = workdir / "captions.tsv"
    if not tsv.exists():  # written once: its mtime is part of the run's fingerprint
        sources = [("coco_val2017_captions.tsv", "coco"), ("Flickr8k.token.txt", "flickr"),
                   ("cc3m_Validation_GCC-1.1.0-Validation.tsv", "cc3m"),
                   ("img2dataset_laion_style_10000.tsv", "laion")]
        tmp = tsv.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            out.write("caption\n")
            for name, kind in sources:
                out.writelines(text + "\n" for text in _caption_lines(DATA / name, kind))
        tmp.replace(tsv)
    manifest = workdir / "captions.yaml"
    if not manifest.exists():
        manifest.write_text("name: bench-captions\nsource: {path: captions.tsv, format: tsv, "
                            "has_header: true}\ntext_column: caption\n")
    run = workdir / "run"
    if (run / "embeddings.zarr").exists():
        from graphbuild.embedding.stage import embeddings_status

        if not embeddings_status(run)[1]:
            return run  # finished earlier; the manifest code may have changed since
    t0 = time.perf_counter()
    r = embed_shard(load_manifest(manifest), run)
    if r.texts_encoded:
        print(f"embedded {r.texts_encoded} texts in {time.perf_counter() - t0:.0f}s")
    return run


K = 32


def load_x16(run: Path) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(str(run / "embeddings.zarr"), mode="r")[:])


def faiss_flat(x32: np.ndarray, k: int) -> tuple[float, np.ndarray, np.ndarray]:
    """The plain baseline: every row against every row, fp32, self dropped afterwards."""
    from graphbuild.graph.faiss_loader import load_faiss

    faiss = load_faiss()
    index = faiss.IndexFlatIP(x32.shape[1])
    index.add(x32)
    t0 = time.perf_counter()
    sims, ids = index.search(x32, k + 1)
    seconds = time.perf_counter() - t0
    rows = np.arange(len(x32))[:, None]
    sims = np.where(ids == rows, -np.inf, sims)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return seconds, np.take_along_axis(ids, order, 1), np.take_along_axis(sims, order, 1)


def compare_ids(x16: np.ndarray, ours: np.ndarray, ours_s: np.ndarray,
                theirs: np.ndarray) -> tuple[int, int, int]:
    """(identical rows, rows differing only at exact ties, rows really different). A tie-only
    difference: the exact sims of faiss's ids, sorted, equal ours."""
    from graphbuild.graph.exact import exact_dots

    same = (ours == theirs).all(axis=1)
    bad = np.flatnonzero(~same)
    ties = 0
    for r in bad:
        s = np.sort(exact_dots(x16, np.full(K, r), theirs[r]))[::-1]
        ties += bool(np.array_equal(s, ours_s[r]))
    return int(same.sum()), ties, len(bad) - ties


def read_graph(run: Path) -> tuple[np.ndarray, np.ndarray]:
    from graphbuild.rundir.graph import read_graph_csr

    indptr, ind, sims = read_graph_csr(run)
    n = len(indptr) - 1
    return ind.reshape(n, -1).astype(np.int64), sims.reshape(n, -1)


def time_knn(run: Path, method: str, **kw) -> tuple[float, object]:
    """One knn run from scratch (a finished graph of the same parameters would be skipped),
    as the command line's process runs it (graph/screened.py)."""
    from graphbuild.graph.screened import own_process
    from graphbuild.graph.stage import knn_shard

    own_process()

    shutil.rmtree(run / "graph", ignore_errors=True)
    shutil.rmtree(run / "_state" / "knn", ignore_errors=True)
    t0 = time.perf_counter()
    r = knn_shard(run, K, method=method, overwrite=True, **kw)
    return time.perf_counter() - t0, r


def derived_vectors(x16: np.ndarray, nn_sim: np.ndarray, n_out: int, frac: float,
                    seed: int = 0) -> np.ndarray:
    """n_out unit vectors that keep the real data's cluster structure: copy j of real row i
    is row i plus Gaussian noise whose norm is about `frac` of i's nearest-neighbour distance,
    renormalised. Each copy stays nearer its source than the source's nearest real neighbour,
    so clusters stay clusters (uniform random vectors would make every index look bad)."""
    rng = np.random.default_rng(seed)
    n, d = x16.shape
    dist = np.sqrt(np.maximum(2 - 2 * nn_sim.astype(np.float64), 1e-6)).astype(np.float32)
    out = np.empty((n_out, d), np.float16)
    step = 65536
    for lo in range(0, n_out, step):
        src = np.arange(lo, min(lo + step, n_out)) % n
        v = x16[src].astype(np.float32)
        scale = frac * dist[src] / np.sqrt(d)  # per-dim sigma: noise norm ~ frac * NN dist
        v += rng.standard_normal(v.shape, dtype=np.float32) * scale[:, None]
        out[lo:lo + len(src)] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def write_store(run: Path, x16: np.ndarray, attrs: dict) -> None:
    """An embeddings.zarr as the embed stage leaves it (its own store format, chunks marked
    done)."""
    from graphbuild.embedding.stage import _open_for_writing
    from graphbuild.rundir.files import mark_done
    from graphbuild.rundir.paths import RunDir

    if run.exists():
        shutil.rmtree(run)
    chunk = 8192
    arr = _open_for_writing(RunDir(run), {**attrs, "n_nodes": len(x16)}, chunk)
    for lo in range(0, len(x16), chunk * 8):
        arr[lo:lo + chunk * 8] = x16[lo:lo + chunk * 8]
    for c in range(-(-len(x16) // chunk)):
        mark_done(RunDir(run).state("embed") / "chunks", f"{c:06d}")


CHILD = """
import json, logging, sys, time
def peak_kib():  # VmHWM: ru_maxrss would carry this benchmark's own peak over fork and exec
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
logging.basicConfig(level=logging.INFO, format="  [child] %(message)s", stream=sys.stdout)
from graphbuild.graph.screened import own_process
from graphbuild.graph.stage import knn_shard
own_process()  # as the command line's process (graph/screened.py)
t0 = time.perf_counter()
r = knn_shard(sys.argv[1], int(sys.argv[2]), method=sys.argv[3], shard=int(sys.argv[4]),
              num_shards=int(sys.argv[5]), overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t0, "recall": r.recall, "nprobe": r.nprobe,
                  "rows": r.rows,
                  "maxrss_gib": peak_kib() / 2**20}))
"""


def child_knn(run: Path, method: str, shard: int = 0, num_shards: int = 1) -> dict:
    """Run the knn stage in a fresh process, which reports its own peak RSS."""
    p = subprocess.run([sys.executable, "-c", CHILD, str(run), str(K), method, str(shard),
                        str(num_shards)], capture_output=True, text=True, cwd=REPO,
                       check=False)  # a failed child is reported below
    lines = p.stdout.strip().splitlines()
    for line in lines[:-1]:
        if "nprobe" in line or "built" in line or "auto" in line:
            print(line)
    if p.returncode:
        print(p.stderr[-3000:])
        raise SystemExit(f"child failed ({p.returncode})")
    return json.loads(lines[-1])


def index_from_lists(lists: tuple[np.ndarray, np.ndarray, np.ndarray], arr, block_rows: int):
    """The faiss ivf-sq16 index holding `lists` (build_lists'): their centroids, and each row
    added to its list, no k-means run again. For faiss's own IVF search of the same lists."""
    from graphbuild.graph.faiss_loader import load_faiss

    faiss = load_faiss()
    centroids, offsets, ids = lists
    nlist, d = centroids.shape
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(np.ascontiguousarray(centroids, np.float32))
    index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()
    index.is_trained = True  # fp16 codes need no training; the quantizer holds the centroids
    list_of = np.empty(len(ids), np.int64)
    list_of[ids] = np.repeat(np.arange(nlist), np.diff(offsets))
    for lo in range(0, arr.shape[0], block_rows):
        x = np.ascontiguousarray(np.asarray(arr[lo:lo + block_rows], np.float32))
        lists_here = np.ascontiguousarray(list_of[lo:lo + len(x)])
        index.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(lists_here))
    return index



def list_scan_vs_faiss(run: Path, nprobe: int, queries: int = 32768) -> None:
    """The same index searched two ways, on the same block of queries: faiss's IVF search
    and graphbuild's ListScan (ivf_scan.py), both probing nprobe lists a query (no adaptive
    probing: faiss has none)."""
    import zarr

    from graphbuild.graph.ann import search
    from graphbuild.graph.ivf_scan import ListScan, load_lists

    arr = zarr.open_array(str(run / "embeddings.zarr"), mode="r")
    lists = load_lists(run / "graph" / "_index" / "lists.npz", *arr.shape)
    index = index_from_lists(lists, arr, 65536)
    scan = ListScan.from_lists(*lists, arr, 65536)
    lo = arr.shape[0] // 3
    xq = np.asarray(arr[lo:lo + queries], np.float32)
    rows = np.arange(lo, lo + queries)
    seconds, found = {}, {}
    for name, searcher in (("faiss IVF search", index), ("ListScan", scan)):
        t0 = time.perf_counter()
        found[name], _ = search(searcher, xq, rows, K, nprobe)
        seconds[name] = time.perf_counter() - t0
    same = np.mean([len(np.intersect1d(a, b)) for a, b in zip(*found.values())]) / K
    print(f"same index, {queries:,} queries at nprobe {nprobe}: faiss IVF search "
          f"{seconds['faiss IVF search']:.2f}s, ListScan {seconds['ListScan']:.2f}s "
          f"({seconds['faiss IVF search'] / seconds['ListScan']:.1f}x); neighbours in common "
          f"{same:.4f}")


def held_out_recall(run: Path, nprobe: int, queries: int = 1000) -> float:
    """Recall@K of the written graph on rows the tuning did not sample, against fp32 brute
    force."""
    import zarr

    from graphbuild.graph.ann import ground_truth, recall_at_k

    arr = zarr.open_array(str(run / "embeddings.zarr"), mode="r")
    rows = np.sort(np.random.default_rng(99).choice(arr.shape[0], queries, replace=False))
    ids, _ = read_graph(run)
    return recall_at_k(ids[rows], ground_truth(arr, rows, K, 65536))


def print_curve(run: Path) -> None:
    info = json.loads((run / "graph" / "_index" / "index.json").read_text())
    for key, t in info["tuning"].items():
        print(f"  tuning ({key}, {t['sample']} sampled queries):")
        for row in t["curve"]:
            gap = row.get("probe_gap")
            how = "" if gap is None else f" on average (lists within {gap:.4f} of the nearest)"
            print(f"    nprobe {row['nprobe']:5d}: recall@{K} {row['recall']:.4f}  "
                  f"{row['seconds']:.2f}s{how}")


def main() -> None:
    import torch

    from graphbuild.graph.faiss_loader import load_faiss

    faiss = load_faiss()

    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/graphbuild-bench"))
    ap.add_argument("--big", type=int, default=1_000_000)
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=2, help="runs of faiss and exact at 90k")
    ap.add_argument("--real-only", action="store_true",
                    help="the real captions' section alone (no derived set)")
    ap.add_argument("--estimate-exact", action="store_true",
                    help="estimate exact at --big from its rate on the real set, not run it")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(threads)
    print(f"threads: torch {threads}, faiss {threads}; k={K}")

    run = embedded_run(args.workdir)
    x16 = load_x16(run)
    n, d = x16.shape
    flops = 2 * n * n * d
    print(f"\n== real captions: N={n:,} d={d} (nominal work 2*N*N*d = {flops / 1e12:.2f} TFLOP)")
    # Best of --reps for both sides, taken in turns (faiss, exact, faiss, ...): the first
    # run in a process pays warm-up, and this shared host's speed drifts within minutes, so
    # both sides see the same stretches of it.
    x32 = x16.astype(np.float32)
    t_faiss = t_exact = float("inf")
    for _ in range(args.reps):
        t, f_ids, _ = faiss_flat(x32, K)
        t_faiss = min(t_faiss, t)
        t_exact = min(t_exact, time_knn(run, "exact")[0])
    del x32
    print(f"faiss IndexFlatIP (fp32):  {t_faiss:8.1f}s  {flops / t_faiss / 1e9:7.1f} GFLOP/s "
          f"(best of {args.reps})")
    ids, sims = read_graph(run)
    print(f"graphbuild exact:          {t_exact:8.1f}s  {flops / t_exact / 1e9:7.1f} GFLOP/s "
          f"(effective, best of {args.reps})  ratio {t_faiss / t_exact:.2f}x (target >= 4x)")
    same, ties, diff = compare_ids(x16, ids, sims, f_ids)
    print(f"neighbour ids vs faiss: {same:,} rows identical, {ties:,} differ only at exact "
          f"ties, {diff:,} differ otherwise (faiss's fp32 sums vs exact)")

    t_ann, r = time_knn(run, "approximate")
    print(f"graphbuild approximate:    {t_ann:8.1f}s (index build + tuning + search)  "
          f"recall@{K} {r.recall:.4f} at nprobe {r.nprobe}; {t_exact / t_ann:.1f}x faster "
          "than exact")
    print_curve(run)
    if args.real_only:
        return

    big = args.workdir / "big"
    print(f"\n== derived set: N={args.big:,} (real rows + noise at {args.noise} x NN distance)")
    x_big = derived_vectors(x16, sims[:, 0], args.big, args.noise)
    attrs = json.loads((run / "embeddings.zarr" / "zarr.json").read_text())["attributes"]
    write_store(big, x_big, attrs)
    del x_big
    out = child_knn(big, "approximate")
    fresh = held_out_recall(big, out["nprobe"])
    print(f"approximate: {out['seconds']:.1f}s (index build + tuning + search), recall@{K} "
          f"{out['recall']:.4f} at nprobe {out['nprobe']} on the tuning sample, {fresh:.4f} on "
          f"1,000 other rows; peak RSS {out['maxrss_gib']:.2f} GiB (fp32 vectors "
          f"{args.big * d * 4 / 2**30:.2f} GiB + 1 GiB = "
          f"{args.big * d * 4 / 2**30 + 1:.2f} GiB allowed)")
    print_curve(big)
    list_scan_vs_faiss(big, out["nprobe"])
    if args.estimate_exact:
        gflops = flops / t_exact / 1e9
        t_big = 2 * args.big * args.big * d / (gflops * 1e9)
        print(f"exact, estimated from {gflops:.0f} GFLOP/s effective at N={n:,}: {t_big:,.0f}s")
    else:
        ex = child_knn(big, "exact")
        t_big = ex["seconds"]
        print(f"exact (measured): {t_big:.1f}s, peak RSS {ex['maxrss_gib']:.2f} GiB")
    print(f"approximate vs exact at N={args.big:,}: {t_big / out['seconds']:.1f}x faster "
          "(target >= 10x at recall >= 0.95)")

if __name__ == "__main__":
    main()
