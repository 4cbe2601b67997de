"""graphbuild's embedding path against plain SentenceTransformer.encode, in one process run.

    python benchmarks/embed.py [--limit N] [--rss]

On the COCO val2017 captions of ../shared/data: texts/s of each, the ratio, max (1 - cos) and
kNN@10 agreement against the plain fp32 baseline, for graphbuild's bf16 and exact fp32 modes.
Baseline and ours run interleaved, best of --repeats, so a noisy neighbour hurts both alike.
--rss also runs `graphbuild embed` in subprocesses on two dataset sizes and prints peak RSS.
"""

from __future__ import annotations

import argparse
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


def peak_rss_of_embed(rows: int, tmp: Path) -> float:
    """Peak RSS (MiB) of a `graphbuild embed` subprocess over the first `rows` captions."""
    src = tmp / f"c{rows}.tsv"
    lines = coco_captions(None)
    # Flickr8k: "image.jpg#n<TAB>caption" (one line has spaces instead of the tab)
    flickr = (DATA / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()
    lines += [ln.split(None, 1)[1] for ln in flickr if len(ln.split(None, 1)) == 2]
    src.write_text("caption\n" + "\n".join(lines[:rows]) + "\n")
    m = tmp / f"c{rows}.yaml"
    m.write_text(f"name: c{rows}\nsource: {{path: {src.name}, format: tsv}}\ntext_column: caption\n")
    code = ("import resource, sys; from graphbuild.cli import main; sys.argv=['graphbuild','embed',"
            f"'{m}','--out','{tmp / f'run{rows}'}','-q'];\ntry: main()\nexcept SystemExit: pass\n"
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])")
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child of this
    # (large) process would report the parent's peak.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="use the first N captions")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rss", action="store_true", help="also measure peak RSS at two sizes")
    args = ap.parse_args()

    import torch

    from graphbuild.encode import TextEncoder
    from graphbuild.models import load_sentence_transformer, resolve_model

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
        with tempfile.TemporaryDirectory() as d:
            for rows in (6_000, 60_000):
                print(f"peak RSS of `graphbuild embed` on {rows:,} captions: "
                      f"{peak_rss_of_embed(rows, Path(d)):,.0f} MiB")
    print(f"this process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
