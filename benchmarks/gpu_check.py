"""The GPU check: what a GPU machine must show, one PASS, FAIL or SKIP line per item.

    benchmarks/gpu_check.sh [options]     set up from this repository's own files, then this
    python benchmarks/gpu_check.py [--model DIR] [--texts N] [--big N] [--only ITEM ...]
                                   [--workdir DIR] [--keep] [--device cpu]

Items, in order:
  cuda         torch sees a GPU.
  gpu-tests    `pytest -m gpu`: tests/test_gpu.py and test_exact.py's cuda cases.
  embed-fp16   --texts texts (the 3,000 COCO captions of tests/data, then copies of them
               suffixed " 1", " 2", ...) embedded in fp16 on CUDA by the embed stage: texts/s;
               the captions' rows against CPU fp32, within tests/gpu.py's bound.
  local-model  `graphbuild embed --model DIR` with the model in a local directory: --model
               when it is one, else an fp16 copy of the default model (45 MB); its rows
               against CPU fp32 of the same weights.
  exact-knn    a set of --big vectors derived from embed-fp16's (benchmarks/knn.py's
               derived_vectors: real rows plus noise at half their nearest-neighbour
               distance), k=32: the knn stage's exact search on CUDA, its time, 1,000 sampled
               rows against ground truth; faiss-gpu's flat index (fp32) on the same vectors,
               its time, and where its neighbours differ from ours (only at ties or by its
               fp32 sums: never a better set than ours).
  approx-knn   the approximate knn stage tuned to recall 0.95 (a faiss IVF index searched on
               the GPU): its time, and its recall over every row against exact-knn's graph.
  venv-gpu, pq-fp16-tables, faiss-limits, device-placement, gpu-memory, fp16-accumulation,
  knn-device-cpu
               the GPU paths of issue 26, one item each (their docstrings say what each
               shows); SKIP on a CPU rehearsal, the faiss ones also without faiss-gpu.
  time         the whole check, set-up included, within 8 minutes (set by gpu_check.sh).

Without faiss, or with a faiss that has no GPU, the faiss steps say SKIP and the rest runs, so
the check also serves a GPU machine without network that has torch, sentence-transformers and
graphbuild's other dependencies: `GPU_CHECK_PYTHON=python benchmarks/gpu_check.sh --model DIR`.
`--device cpu` rehearses the check on a CPU (bf16 and faiss-cpu; use a small --big): it runs
the code paths; its figures are not GPU figures.

A GPU fix adds an item: a function of the Check that returns the figures of its PASS line, or
raises Skip(why) or Fail(what), decorated with @item("name"). Items run in file order and may
use what earlier ones left in `check.facts` (`check.need`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # graphbuild and tests.gpu from this checkout

import knn as knn_bench  # benchmarks/knn.py, beside this file: the derived set

from tests.gpu import (
    MAX_ONE_MINUS_COS,
    RECALL_SLACK,
    RECALL_TARGET,
    fp32_reference,
    one_minus_cos,
    recall,
)

CAPTIONS = REPO / "tests" / "data" / "coco_val2017_captions_3k.tsv"
K = knn_bench.K  # 32, as in benchmarks/knn.py
TIME_LIMIT = 8 * 60  # seconds, set-up included
SAMPLED = 1000  # rows checked against ground truth


class Skip(Exception):
    """The item cannot run here; the message says why."""


class Fail(Exception):
    """The item ran and did not hold; the message says what."""


@dataclass
class Check:
    args: argparse.Namespace
    device: str      # "cuda", or "cpu" for a rehearsal
    precision: str   # what embed is asked for: fp16 on CUDA, auto (bf16) on a CPU
    work: Path
    facts: dict = field(default_factory=dict)

    def need(self, fact: str, item_name: str):
        if fact not in self.facts:
            raise Fail(f"needs {item_name}, which did not finish")
        return self.facts[fact]


ITEMS: list[tuple[str, Callable[[Check], str]]] = []


def item(name: str):
    def register(fn: Callable[[Check], str]):
        ITEMS.append((name, fn))
        return fn
    return register


def say(text: str) -> None:
    print(f"  {text}", flush=True)


def captions() -> list[str]:
    lines = CAPTIONS.read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[2] for line in lines]


def text_run(folder: Path, texts: list[str]) -> Path:
    """A manifest over `texts` (one a row, ids by row number); returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "texts.tsv").write_text("caption\n" + "\n".join(texts) + "\n", encoding="utf-8")
    manifest = folder / "texts.yaml"
    manifest.write_text("name: gpu-check\nsource: {path: texts.tsv, format: tsv}\n"
                        "text_column: caption\n")
    return manifest


def stored(run: Path) -> tuple[np.ndarray, dict]:
    import zarr

    arr = zarr.open_array(str(run / "embeddings.zarr"), mode="r")
    return np.asarray(arr[:]), dict(arr.attrs)


def node_texts(run: Path) -> list[str]:
    import polars as pl

    return pl.read_parquet(run / "nodes.parquet")["text"].to_list()


def faiss_here(check: Check):
    """faiss, when it can search on this check's device; else Skip saying why."""
    if importlib.util.find_spec("faiss") is None:
        raise Skip("faiss is not installed")
    from graphbuild.graph.ann import faiss_gpus
    from graphbuild.graph.faiss_loader import load_faiss

    if check.device == "cuda" and faiss_gpus() == 0:
        raise Skip("faiss has no GPU here (faiss-cpu); GRAPHBUILD_FAISS=gpu installs faiss-gpu")
    return load_faiss()


# ------------------------------------------------------------------------------------ items


@item("cuda")
def cuda(check: Check) -> str:
    import torch

    if check.device == "cpu":
        raise Skip("a rehearsal on the CPU (--device cpu)")
    if not torch.cuda.is_available():
        raise Fail(f"torch {torch.__version__} sees no CUDA device (a CPU build, or no driver)")
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(names)} x {names[0]}; torch {torch.__version__}, CUDA {torch.version.cuda}"


@item("gpu-tests")
def gpu_tests(check: Check) -> str:
    from graphbuild.embedding.models import DEFAULT_MODEL, resolve_model
    from graphbuild.errors import GraphbuildError

    if importlib.util.find_spec("pytest") is None:
        raise Skip("pytest is not installed here")
    try:
        resolve_model(DEFAULT_MODEL)
    except GraphbuildError as e:
        raise Skip(f"the tests embed with the default model: {e}") from None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(REPO), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs",
                        "-p", "no:cacheprovider", "tests"], cwd=REPO, env=env,
                       capture_output=True, text=True, check=False)
    lines = r.stdout.strip().splitlines() or ["(no output)"]
    for line in lines:
        if line.startswith(("SKIPPED", "FAILED", "ERROR")):
            say(line)
    if r.returncode != 0:
        print("\n".join(lines[-60:]) + r.stderr[-3000:], file=sys.stderr)
        raise Fail(lines[-1])
    if " passed" not in lines[-1]:
        raise Skip(lines[-1])
    return lines[-1]


@item("embed-fp16")
def embed_fp16(check: Check) -> str:
    from graphbuild.embedding.models import resolve_model
    from graphbuild.embedding.stage import EmbedConfig, embed_shard
    from graphbuild.prepare.manifest import load_manifest

    real = captions()
    n = check.args.texts  # the captions, then their copies suffixed " 1", " 2", ...
    texts = [real[j % len(real)] + (f" {j // len(real)}" if j >= len(real) else "")
             for j in range(n)]
    manifest = text_run(check.work / "texts", texts)
    run = check.work / "texts" / "run"
    shutil.rmtree(run, ignore_errors=True)  # embedded afresh: its texts/s are the figure
    r = embed_shard(load_manifest(manifest), run, config=EmbedConfig(
        model=check.args.model, device=check.device, precision=check.precision))
    check.facts["texts_run"] = run
    x16, attrs = stored(run)
    rows = node_texts(run)[:len(real)]  # the captions come first
    worst = float(one_minus_cos(x16[:len(rows)], fp32_reference(
        resolve_model(check.args.model).path, rows)).max())
    bound = MAX_ONE_MINUS_COS[attrs["precision"]]
    figures = (f"{r.texts_encoded:,} texts in {r.seconds:.1f}s: {r.texts_per_s:,.0f} texts/s "
               f"({attrs['precision']} on {check.device}); max(1 - cos) {worst:.1e} against "
               f"CPU fp32 on {len(rows):,} captions (bound {bound:.0e})")
    if worst > bound:
        raise Fail(figures)
    return figures


@item("local-model")
def local_model(check: Check) -> str:
    from graphbuild.embedding.models import load_sentence_transformer, resolve_model

    folder = Path(check.args.model)
    if folder.is_dir():
        how = "given with --model"
    else:
        folder = check.work / "model-fp16"
        model = load_sentence_transformer(resolve_model(check.args.model), "cpu")
        model.half().save(str(folder))
        how = f"an fp16 copy of {check.args.model}"
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    manifest = text_run(check.work / "local", captions())
    run = check.work / "local" / "run"
    shutil.rmtree(run, ignore_errors=True)
    r = subprocess.run([sys.executable, "-m", "graphbuild", "embed", str(manifest), "--out",
                        str(run), "--model", str(folder), "--device", check.device,
                        "--precision", check.precision, "-q"], cwd=REPO, capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines() or [f"exit {r.returncode}"]
        raise Fail(f"graphbuild embed --model {folder}: {lines[-1]}")
    x16, attrs = stored(run)
    texts = node_texts(run)
    worst = float(one_minus_cos(x16, fp32_reference(folder, texts)).max())
    bound = MAX_ONE_MINUS_COS[attrs["precision"]]
    figures = (f"{folder} ({how}, {size:.0f} MB), revision {attrs['model_revision'][:19]}...: "
               f"{len(texts):,} captions in {attrs['precision']}, max(1 - cos) {worst:.1e} "
               f"against CPU fp32 of its weights (bound {bound:.0e})")
    if worst > bound:
        raise Fail(figures)
    return figures


@item("exact-knn")
def exact_knn(check: Check) -> str:
    import zarr

    from graphbuild.graph.ann import ground_truth, sample_ids
    from graphbuild.graph.exact import blocked_topk
    from graphbuild.graph.stage import knn_shard

    x16, attrs = stored(check.need("texts_run", "embed-fp16"))
    # each real row's nearest neighbour's cosine sets the noise of its derived copies
    nn = blocked_topk(x16, 1, device=check.device)[1][:, 0]
    big = check.work / "big"
    knn_bench.write_store(big, knn_bench.derived_vectors(x16, nn, check.args.big, 0.5), attrs)
    n = check.args.big
    t0 = time.perf_counter()
    knn_shard(big, K, "exact", device=check.device)
    seconds = time.perf_counter() - t0
    ids, sims = knn_bench.read_graph(big)
    check.facts["exact"] = (big, ids, seconds)
    say(f"graphbuild exact: {seconds:.1f}s for N={n:,}, k={K} ({n / seconds:,.0f} queries/s)")
    rows = sample_ids(n, SAMPLED, 99)
    truth = ground_truth(zarr.open_array(str(big / "embeddings.zarr"), mode="r"), rows, K,
                         65536)
    wrong = int((ids[rows] != truth).any(axis=1).sum())
    figures = (f"N={n:,} d={x16.shape[1]} k={K}: exact {seconds:.1f}s; {len(rows) - wrong:,} "
               f"of {len(rows):,} sampled rows equal ground truth")
    try:
        faiss = faiss_here(check)
    except Skip as why:
        say(f"faiss flat: SKIP ({why})")
    else:
        figures += "; " + against_faiss_flat(faiss, check, big, ids, sims, seconds)
    if wrong:
        raise Fail(figures)
    return figures


def against_faiss_flat(faiss, check: Check, big: Path, ids: np.ndarray, sims: np.ndarray,
                       seconds: float) -> str:
    """faiss's flat index (fp32; on GPU 0 on CUDA) over the same vectors: its time, and where
    its neighbours differ from ours. Ours are exact, so faiss's set, rescored exactly, can
    tie them but never beat them; a row where it does fails the item."""
    from graphbuild.graph.exact import exact_dots

    x16 = stored(big)[0]
    x32 = x16.astype(np.float32)
    index = faiss.IndexFlatIP(x32.shape[1])
    name = "faiss flat (fp32, CPU)"
    if check.device == "cuda":
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
        name = "faiss-gpu flat (fp32)"
    index.add(x32)
    t0 = time.perf_counter()
    f_sims, f_ids = index.search(x32, K + 1)
    took = time.perf_counter() - t0
    del x32
    f_sims = np.where(f_ids == np.arange(len(f_ids))[:, None], -np.inf, f_sims)
    f_ids = np.take_along_axis(f_ids, np.argsort(-f_sims, axis=1, kind="stable")[:, :K], 1)
    differ = np.flatnonzero((np.sort(f_ids, axis=1) != np.sort(ids, axis=1)).any(axis=1))
    rescored = exact_dots(x16, np.repeat(differ, K), f_ids[differ].ravel()).reshape(-1, K)
    rescored = -np.sort(-rescored, axis=1)
    better = int((rescored > sims[differ]).any(axis=1).sum())
    ties = int((rescored == sims[differ]).all(axis=1).sum())
    say(f"{name}: {took:.1f}s; graphbuild exact {seconds:.1f}s, {took / seconds:.2f}x its "
        "speed")
    text = (f"{name} {took:.1f}s ({took / seconds:.2f}x); its neighbour sets differ from ours "
            f"in {len(differ):,} of {len(ids):,} rows, {ties:,} of them only at exact ties")
    if better:
        raise Fail(f"{text}; in {better:,} rows faiss's set is better: exact search missed")
    return text


@item("approx-knn")
def approx_knn(check: Check) -> str:
    from graphbuild.graph.stage import knn_shard

    big, exact_ids, exact_seconds = check.need("exact", "exact-knn")
    faiss_here(check)
    t0 = time.perf_counter()
    r = knn_shard(big, K, "approximate", recall_target=RECALL_TARGET, overwrite=True)
    seconds = time.perf_counter() - t0
    ids, _ = knn_bench.read_graph(big)
    whole = recall(ids, exact_ids)
    index = sorted(p.name for p in (big / "graph" / "_index").iterdir() if p.suffix != ".json")
    figures = (f"recall target {RECALL_TARGET}: {seconds:.1f}s (index build, tuning, search; "
               f"{', '.join(index)}), {exact_seconds / seconds:.1f}x faster than exact; "
               f"recall@{K} {r.recall:.4f} tuned (nprobe {r.nprobe}), {whole:.4f} over all "
               f"{len(ids):,} rows against the exact graph (at least "
               f"{RECALL_TARGET - RECALL_SLACK:.2f})")
    if r.recall < RECALL_TARGET or whole < RECALL_TARGET - RECALL_SLACK:
        raise Fail(figures)
    return figures


# ---------------------------------------------------- the GPU paths of issue 26, one item each


def gpu_only(check: Check) -> None:
    if check.device != "cuda":
        raise Skip("a GPU path; a rehearsal on the CPU has none (tests/test_faiss_gpu.py and "
                   "test_devices.py emulate it)")


@item("venv-gpu")
def venv_gpu(check: Check) -> str:
    """dev.sh's promise: on a GPU machine torch is a CUDA build that sees the GPU, and faiss,
    when installed, sees it too."""
    import torch

    gpu_only(check)
    faiss = faiss_here(check)
    figures = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees "
               f"{torch.cuda.device_count()} GPU(s); faiss {faiss.__version__} sees "
               f"{faiss.get_num_gpus()}")
    if not torch.version.cuda or faiss.get_num_gpus() < torch.cuda.device_count():
        raise Fail(figures)
    return figures


@item("pq-fp16-tables")
def pq_fp16_tables(check: Check) -> str:
    """An IVF-PQ index at d=384 (96 sub-quantizers) moves to the GPU with our cloner options
    and searches there; faiss's default options (fp32 tables, 98,304 bytes) are refused."""
    from graphbuild.graph.ann import pq_subquantizers
    from graphbuild.graph.faiss_gpu import OnGpu, lookup_table_bytes

    gpu_only(check)
    faiss = faiss_here(check)
    m = pq_subquantizers(384)
    x = np.random.default_rng(0).standard_normal((5_000, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(384), 384, 16, m, 8, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = index.pq.cp.niter = 4  # trained on the CPU: a few seconds
    index.train(x)
    index.add(x)
    try:
        faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        default = "faiss's default options were accepted too"
    except RuntimeError as e:
        default = f"faiss's default options refused ({str(e).splitlines()[0][:80]}...)"
    searcher = OnGpu(faiss, index, 0, lambda: index)
    searcher.nprobe = 8
    _, ids = searcher.search(x[:1000], 10)
    own = float((ids[:, 0] == np.arange(1000)).mean())
    figures = (f"{m} sub-quantizers, fp16 table {lookup_table_bytes(m, 'fp16'):,} bytes: "
               f"searched on GPU 0, own row first in {own:.1%} of 1,000 queries; {default}")
    if own < 0.5:
        raise Fail(figures)
    return figures


@item("faiss-limits")
def faiss_limits(check: Check) -> str:
    """faiss-gpu's limits are where faiss_gpu.py says (k and nprobe 2048), and OnGpu searches
    past the nprobe limit on the CPU index with the same answers."""
    from graphbuild.graph.faiss_gpu import GPU_MAX_K, GPU_MAX_NPROBE, OnGpu

    gpu_only(check)
    faiss = faiss_here(check)
    nlist = 4096
    x = np.random.default_rng(1).standard_normal((nlist * 40, 16)).astype(np.float32)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(16), 16, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 4
    index.train(x)
    index.add(x)
    searcher = OnGpu(faiss, index, 0, lambda: index)
    refused = []
    for what, nprobe, k in (("nprobe", GPU_MAX_NPROBE + 1, 10), ("k", 8, GPU_MAX_K + 1)):
        searcher.gpu.nprobe = nprobe
        try:
            searcher.gpu.search(x[:10], k)
        except RuntimeError:
            refused.append(what)
    searcher.nprobe = GPU_MAX_NPROBE * 2
    _, beyond = searcher.search(x[:100], 10)
    index.nprobe = GPU_MAX_NPROBE * 2
    same = bool((beyond == index.search(x[:100], 10)[1]).all())
    figures = (f"faiss-gpu refuses {', '.join(refused) or 'neither'} above {GPU_MAX_K}; "
               f"nprobe {GPU_MAX_NPROBE * 2} via the CPU index: "
               f"{'same' if same else 'other'} neighbours")
    if refused != ["nprobe", "k"] or not same:
        raise Fail(figures)
    return figures


@item("device-placement")
def device_placement(check: Check) -> str:
    """A shard's device cuda:1 puts the faiss index and the exact search's tensors on GPU 1."""
    import torch

    from graphbuild.graph.exact import blocked_topk
    from graphbuild.graph.faiss_gpu import on_gpu

    gpu_only(check)
    if torch.cuda.device_count() < 2:
        raise Skip(f"{torch.cuda.device_count()} GPU: placement needs two")
    x16, _ = stored(check.need("texts_run", "embed-fp16"))
    x16 = x16[:20_000]
    held = [torch.cuda.memory_allocated(i) for i in range(2)]
    for i in range(2):
        torch.cuda.reset_peak_memory_stats(i)
    blocked_topk(x16, 10, device="cuda:1")
    peak = [torch.cuda.max_memory_allocated(i) - held[i] for i in range(2)]
    text = (f"exact on cuda:1: a peak of {peak[1] / 2**20:.0f} MiB there, "
            f"{peak[0] / 2**20:.0f} MiB on GPU 0")
    try:
        faiss = faiss_here(check)
    except Skip as why:
        text += f"; faiss: SKIP ({why})"
    else:
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(x16.shape[1]), x16.shape[1], 64,
                                              faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
        index.train(x16.astype(np.float32))
        searcher = on_gpu(index, "cuda:1", lambda: index)
        text += f"; faiss index on GPU {searcher.gpu.getDevice()}"
        if searcher.gpu.getDevice() != 1:
            raise Fail(text)
    if peak[1] <= 0 or peak[0] > 0:
        raise Fail(text)
    return text


@item("gpu-memory")
def gpu_memory(check: Check) -> str:
    """auto chooses from the GPU's free memory and rate; a CUDA OOM is one GraphbuildError."""
    import torch

    from graphbuild.devices import cuda_device, cuda_oom_as_error
    from graphbuild.errors import GraphbuildError
    from graphbuild.graph.stage import choose_method

    gpu_only(check)
    gpu = cuda_device("cuda")
    _, reason = choose_method(4_000_000, 384, 32, 2**38, gpu=gpu)
    try:
        with cuda_oom_as_error("gpu-check", "lower --block-rows"):
            torch.empty(gpu.free_bytes * 2, dtype=torch.uint8, device="cuda")
        oom = "no error for twice the free memory"
    except GraphbuildError as e:
        oom = f"one line: {str(e)[:60]}..." if "\n" not in str(e) else "several lines"
    figures = (f"{gpu.name}: {gpu.free_bytes / 2**30:.1f} GiB free, "
               f"{gpu.half_flops / 1e12:.0f} TFLOP/s assumed for exact; auto at N=4M: "
               f"{reason}; OOM: {oom}")
    if not oom.startswith("one line"):
        raise Fail(figures)
    return figures


@item("fp16-accumulation")
def fp16_accumulation(check: Check) -> str:
    """Inside the exact search's matmul context, fp16 products stay within the CUDA bound
    even when the process allowed fp16 accumulation; outside it, the same products."""
    import torch

    from graphbuild.graph.exact import _exact_cuda_matmul, error_bound

    gpu_only(check)
    x16, _ = stored(check.need("texts_run", "embed-fp16"))
    x16 = x16[:4096]
    bound = error_bound(x16, "fp16", device="cuda")
    exact = x16.astype(np.float64) @ x16.astype(np.float64).T
    x = torch.from_numpy(x16).cuda()
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "allow_fp16_accumulation"):
        raise Skip(f"torch {torch.__version__} has no allow_fp16_accumulation")
    saved, ratios = matmul.allow_fp16_accumulation, {}
    try:
        matmul.allow_fp16_accumulation = True
        for name, context in (("inside", _exact_cuda_matmul()), ("outside", None)):
            with context or torch.no_grad():
                v = (x @ x.T).float().cpu().numpy().astype(np.float64)
            ratios[name] = float((np.abs(v - exact) / (bound.absolute + bound.relative
                                                       * np.abs(v))).max())
    finally:
        matmul.allow_fp16_accumulation = saved
    figures = (f"max |error| / bound: {ratios['inside']:.3f} in the search's context, "
               f"{ratios['outside']:.3f} outside it with fp16 accumulation allowed")
    if ratios["inside"] > 1:
        raise Fail(figures)
    return figures


@item("knn-device-cpu")
def knn_device_cpu(check: Check) -> str:
    """`graphbuild knn --device cpu` searches on the CPU on a GPU machine: its own lists, no
    faiss index on a GPU."""
    run = check.need("texts_run", "embed-fp16")
    copy = check.work / "device-cpu"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("graph", "knn"))
    r = subprocess.run([sys.executable, "-m", "graphbuild", "knn", str(copy), "--k", "8",
                        "--method", "approximate", "--device", "cpu"], cwd=REPO,
                       capture_output=True, text=True, check=False)
    index = sorted(p.name for p in (copy / "graph" / "_index").glob("*") if p.suffix != ".json")
    figures = f"exit {r.returncode}, index files {index}"
    if r.returncode != 0 or index != ["lists.npz"] or "faiss GPU" in r.stderr:
        raise Fail(figures + "; " + (r.stderr.strip().splitlines() or [""])[-1])
    return figures


@item("time")
def total_time(check: Check) -> str:
    started = os.environ.get("GPU_CHECK_STARTED")
    if not started:
        raise Skip("not started by gpu_check.sh, which times the set-up too")
    seconds = time.time() - float(started)
    figures = f"{seconds / 60:.1f} min, set-up included (at most {TIME_LIMIT // 60})"
    if check.device == "cpu":
        raise Skip(f"a rehearsal: {figures}")
    if seconds > TIME_LIMIT:
        raise Fail(figures)
    return figures


# ------------------------------------------------------------------------------------ runner


def run_item(check: Check, name: str, fn: Callable[[Check], str]) -> str:
    t0 = time.perf_counter()
    try:
        status, text = "PASS", fn(check)
    except Skip as why:
        status, text = "SKIP", str(why)
    except Fail as what:
        status, text = "FAIL", str(what)
    except Exception as e:  # any other error fails the item, with its traceback on stderr
        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        status, text = "FAIL", f"{type(e).__name__}: {first}"
    print(f"{status} {name}: {text} [{time.perf_counter() - t0:.0f}s]", flush=True)
    return status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="all-MiniLM-L6-v2",
                    help="the model: the default (its package), or a local directory")
    ap.add_argument("--texts", type=int, default=60_000, help="texts embed-fp16 embeds")
    ap.add_argument("--big", type=int, default=1_000_000, help="vectors of the derived set")
    ap.add_argument("--only", nargs="+", choices=[name for name, _ in ITEMS])
    ap.add_argument("--workdir", type=Path, help="where runs go (default: a temp directory)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a rehearsal of the check's code on a CPU")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="graphbuild-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(args, args.device, "fp16" if args.device == "cuda" else "auto", work)
    t0 = time.perf_counter()
    results = []
    for name, fn in ITEMS:
        if args.only and name not in args.only:
            continue
        if results and results[0] == ("cuda", "FAIL"):
            print(f"SKIP {name}: no CUDA (see the cuda line)", flush=True)
            results.append((name, "SKIP"))
            continue
        results.append((name, run_item(check, name, fn)))
    if not (args.keep or args.workdir):
        shutil.rmtree(work, ignore_errors=True)
    counts = {s: sum(r == s for _, r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(f"gpu check: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP "
          f"in {time.perf_counter() - t0:.0f}s" + (f" (runs kept in {work})" if args.keep else ""))
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
