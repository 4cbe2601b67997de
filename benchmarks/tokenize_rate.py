"""Texts/s of the embed stage's tokenizing alone (no model forward), at 1 and 2 threads.

    python benchmarks/tokenize_rate.py [--texts N] [--threads 1 2] [--repeats R]

Texts: the 3,000 COCO captions of tests/data, then copies suffixed " 1", " 2", ... (as
benchmarks/gpu_check.py makes them). For each thread count, in a fresh process (the fast
tokenizer's thread pool is sized once, from RAYON_NUM_THREADS):

  per batch    TextEncoder's tokenizing before it kept the first pass: token lengths of every
               text, then the model's own preprocess() of each length-sorted batch (padding):
               each text tokenized twice, on one thread (TOKENIZERS_PARALLELISM=false).
  once         embedding/tokens.py: every text tokenized once by the fast tokenizer's batch
               call on `threads` threads, then cut into the same padded batches.

Prints texts/s, the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = REPO / "tests" / "data" / "coco_val2017_captions_3k.tsv"

CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from graphbuild.embedding.encode import TextEncoder, padded_lengths, token_batches
from graphbuild.embedding.models import DEFAULT_MODEL, load_sentence_transformer, resolve_model
from graphbuild.embedding import tokens

texts = json.loads(open(sys.argv[2]).read())
threads, repeats = int(sys.argv[3]), int(sys.argv[4])
encoder = TextEncoder(load_sentence_transformer(resolve_model(DEFAULT_MODEL), "cpu"), "cpu",
                      "fp32")

def per_batch():
    lengths = padded_lengths(encoder.token_lengths(texts), encoder.max_seq_length)
    for idx in token_batches(lengths, encoder.token_budget):
        encoder._features([texts[i] for i in idx])

def once():
    tok = tokens.Tokenized.of(encoder.model, texts, encoder.max_seq_length, threads)
    lengths = padded_lengths(tok.lengths, encoder.max_seq_length)
    for idx in token_batches(lengths, encoder.token_budget):
        tok.features(idx)

best = {}
for name, fn in (("per batch", per_batch), ("once", once)):
    if name == "per batch" and threads > 1:
        continue  # one thread by construction
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    best[name] = len(texts) / min(times)
print(json.dumps(best))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=60_000)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lines = CAPTIONS.read_text(encoding="utf-8").splitlines()[1:]
    real = [line.split("\t")[2] for line in lines]
    texts = [real[j % len(real)] + (f" {j // len(real)}" if j >= len(real) else "")
             for j in range(args.texts)]
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"tokenize-bench-{os.getpid()}.json"
    path.write_text(json.dumps(texts))
    try:
        print(f"{len(texts):,} texts (COCO captions and suffixed copies), all-MiniLM-L6-v2's "
              f"tokenizer, best of {args.repeats}; {os.cpu_count()} CPUs here")
        for threads in args.threads:
            env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "OMP_NUM_THREADS": "1"}
            r = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(path), str(threads),
                                str(args.repeats)], env=env, capture_output=True, text=True,
                               check=True)
            rates = json.loads(r.stdout.strip().splitlines()[-1])
            for name, rate in rates.items():
                print(f"  {threads} thread(s), {name:9s}: {rate:9,.0f} texts/s", flush=True)
    finally:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
