"""What the GPU tests (test_gpu.py, and the `cuda` cases of test_exact.py) share with
benchmarks/gpu_check.py: the bounds a GPU run is held to, and how they are measured. No
pytest here: the check runs where pytest may be missing."""

from __future__ import annotations

import numpy as np

# Stored rows (fp16) against fp32 on a CPU, same texts and weights: the largest 1 - cos of a
# row, by the precision they were computed in. fp16 on CUDA: measured on a CPU with fp16
# autocast (all-MiniLM-L6-v2, COCO captions), 3.6e-7; bf16 gives 2.4e-5, so a run that fell
# back to bf16 fails the fp16 bound, as would a wrong model. bf16 and fp32 serve a rehearsal
# of the GPU check on a CPU (`auto` there).
MAX_ONE_MINUS_COS = {"fp16": 1e-5, "bf16": 1e-4, "fp32": 1e-5}

# Approximate search: the recall target it is tuned to, and how far below it the recall of
# rows outside the tuning sample may be (the sample's 1,000 queries estimate it).
RECALL_TARGET = 0.95
RECALL_SLACK = 0.01


def one_minus_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cos of each pair of rows, in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return 1 - np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def fp32_reference(model_path, texts: list[str]) -> np.ndarray:
    """Unit vectors of `texts` by plain sentence-transformers (encode()) on the CPU in fp32,
    whatever dtype the model directory stores its weights in."""
    from graphbuild.embedding.models import load_sentence_transformer, resolve_model

    model = load_sentence_transformer(resolve_model(str(model_path)), "cpu").float()
    return model.encode(texts, batch_size=64, normalize_embeddings=True)


def recall(found: np.ndarray, truth: np.ndarray, block: int = 65536) -> float:
    """The share of each truth row's ids found in the same row of `found` (recall@k)."""
    hits = 0
    for lo in range(0, len(truth), block):
        f, t = found[lo:lo + block], truth[lo:lo + block]
        hits += int((t[:, :, None] == f[:, None, :]).any(axis=2).sum())
    return hits / truth.size
