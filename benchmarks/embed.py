"""graphbuild's embedding path against plain SentenceTransformer.encode, in one process run.

    python benchmarks/embed.py [--limit N] [--repeats R] [--rss | --rss-only]

On the COCO val2017 captions of ../shared/data: texts/s of each, the ratio, max (1 - cos) and
kNN@10 agreement against the plain fp32 baseline, for graphbuild's bf16 and exact fp32 modes.
Baseline and ours run interleaved, best of --repeats, so a noisy neighbour hurts both alike.
--rss (or --rss-only) also prints the peak RSS of child processes at four dataset sizes, 80x
apart: of `graphbuild embed`, and of its prepare stage alone (the tables; no torch yet).
"""

from __future__ import annotations

import argparse
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "captions"


def coco_captions(limit: int | None) -> list[str]:
    lines = (DATA / "coco_val2017_captions.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[2] for line in lines][:limit]


def knn_agreement(a: np.ndarray, b: np.ndarray, k: int = 10, block: int = 2048) -> float:
    """Mean share of each row's top-k (self excluded) that the two embeddings agree on."""
    def topk(x, lo):
        s = x[lo:lo + block] @ x.T
        s[np.arange(s.shape[0]), np.arange(lo, lo + s.shape[0])] = -np.inf
        return np.argpartition(-s, k, axis=1)[:, :k]

    hits = 0
    for lo in range(0, len(a), block):
        ta, tb = topk(a, lo), topk(b, lo)
        hits += sum(len(set(x) & set(y)) for x, y in zip(ta, tb))
    return hits / (len(a) * k)


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


RSS_SIZES = (6_000, 60_000, 240_000, 480_000)


def caption_pool() -> list[str]:
    """The real captions of ../shared/data, whitespace-normalised: COCO val2017, Flickr8k,
    CC3M validation and the LAION-style sample (91,307 of them)."""
    texts = coco_captions(None)
    for line in (DATA / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        texts += line.split(None, 1)[1:]  # "image.jpg#n<TAB>caption" (one line: spaces)
    with open(DATA / "cc3m_Validation_GCC-1.1.0-Validation.tsv", encoding="utf-8") as f:
        texts += [line.split("\t")[0] for line in f]
    with open(DATA / "img2dataset_laion_style_10000.tsv", encoding="utf-8") as f:
        texts += ["\t".join(line.rstrip("\n").split("\t")[2:]) for line in list(f)[1:]]
    return [t for t in (" ".join(t.split()) for t in texts) if t]


def caption_source(rows: int, pool: list[str], tmp: Path) -> Path:
    """A manifest over `rows` captions: the real ones in a fixed shuffled order (so that every
    size mixes the four sets alike), then each again with " 1", " 2", ... appended, so that
    every text past the pool is new and still reads like a caption."""
    pool = random.Random(0).sample(pool, len(pool))
    src = tmp / f"c{rows}.tsv"
    with open(src, "w", encoding="utf-8") as f:
        f.write("caption\n")
        f.writelines(pool[i % len(pool)] + (f" {i // len(pool)}" if i >= len(pool) else "") + "\n"
                     for i in range(rows))
    m = tmp / f"c{rows}.yaml"
    m.write_text(f"name: c{rows}\nsource: {{path: {src.name}, format: tsv}}\ntext_column: caption\n")
    return m


def peak_rss(code: str, root: Path = REPO) -> float:
    """VmHWM (MiB) of a child Python running `code` in `root` (another checkout measures an
    older graphbuild). Not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child
    of this (large) process reports the parent's."""
    code += ("\nprint(next(l for l in open('/proc/self/status') "
             "if l.startswith('VmHWM')).split()[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def peak_rss_of_embed(manifest: Path, out: Path, root: Path = REPO) -> float:
    return peak_rss("import sys; from graphbuild.cli import main; sys.argv = ['graphbuild', "
                    f"'embed', {str(manifest)!r}, '--out', {str(out)!r}, '-q']\n"
                    "try: main()\nexcept SystemExit: pass", root)


def peak_rss_of_prepare(manifest: Path, out: Path, root: Path = REPO) -> float:
    return peak_rss("from graphbuild.prepare.stage import prepare; from graphbuild.prepare.manifest "
                    "import load_manifest; from graphbuild.rundir.paths import RunDir; "
                    f"prepare(load_manifest({str(manifest)!r}), RunDir({str(out)!r}))", root)


def print_rss(sizes=RSS_SIZES) -> None:
    pool = caption_pool()
    print(f"peak RSS (VmHWM) of child processes; captions: the {len(pool):,} real ones of "
          "COCO, Flickr8k, CC3M val, LAION-style shuffled, then the same again suffixed \" 1\", "
          "\" 2\", ...")
    print(f"{'captions':>9} {'prepare alone':>14} {'graphbuild embed':>17} {'embed s':>8}")
    with tempfile.TemporaryDirectory() as d:
        for rows in sizes:
            m = caption_source(rows, pool, Path(d))
            prep = peak_rss_of_prepare(m, Path(d) / f"prep{rows}")
            t0 = time.perf_counter()
            embed = peak_rss_of_embed(m, Path(d) / f"run{rows}")
            print(f"{rows:>9,} {prep:>10,.0f} MiB {embed:>13,.0f} MiB {time.perf_counter() - t0:>8.0f}",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="use the first N captions")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rss", action="store_true", help="also measure peak RSS at four sizes")
    ap.add_argument("--rss-only", action="store_true", help="only measure peak RSS")
    args = ap.parse_args()
    if args.rss_only:
        print_rss()
        return

    import torch

    from graphbuild.embedding.encode import TextEncoder
    from graphbuild.embedding.models import load_sentence_transformer, resolve_model

    texts = coco_captions(args.limit)
    model = load_sentence_transformer(resolve_model("all-MiniLM-L6-v2"), "cpu")
    print(f"{len(texts)} COCO captions, torch {torch.__version__}, {torch.get_num_threads()} threads")
    model.encode(texts[:256], batch_size=32)  # warm-up: first calls allocate and pack
    encoders = {p: TextEncoder(model, "cpu", p) for p in ("bf16", "fp32")}
    for e in encoders.values():
        e.encode(texts[:256])

    base = lambda: model.encode(texts, batch_size=32, normalize_embeddings=True)  # noqa: E731
    t_base, ref = float("inf"), None
    results = {}
    for _ in range(args.repeats):  # interleaved, best of repeats
        t, ref = timed(base, 1)
        t_base = min(t_base, t)
        for p, enc in encoders.items():
            t, emb = timed(lambda: enc.encode(texts), 1)
            if p not in results or t < results[p][0]:
                results[p] = (t, emb)

    print(f"{'path':<44} {'texts/s':>9} {'ratio':>6} {'max(1-cos)':>11} {'kNN@10':>7}")
    print(f"{'SentenceTransformer.encode fp32, batch 32':<44} {len(texts) / t_base:>9,.0f} "
          f"{1.0:>6.2f} {0.0:>11.2e} {1.0:>7.4f}")
    for p, (t, emb) in results.items():
        cos = np.sum(emb * ref, axis=1)
        print(f"{'graphbuild ' + p + ', token budget ' + str(encoders[p].token_budget):<44} "
              f"{len(texts) / t:>9,.0f} {t_base / t:>6.2f} {np.max(1 - cos):>11.2e} "
              f"{knn_agreement(ref, emb):>7.4f}")

    if args.rss:
        print_rss()
    print(f"this process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
