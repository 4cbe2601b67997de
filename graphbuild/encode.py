"""Turning texts into unit vectors, fast: length-sorted batches under a token budget.

A fixed batch size wastes work two ways: short texts make small matrix products, and mixed
lengths pad every row to the longest. Here the texts of a call are sorted by token count and
cut into batches whose padded size (rows x longest row) stays under a token budget. Batches
depend only on the texts of the call, so the same texts always give the same bits.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from graphbuild.errors import GraphbuildError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Padded tokens per forward pass. On this class of CPU, 1-4k tokens keep the matrix
# products efficient without spilling the caches; GPUs want far larger batches.
DEFAULT_TOKEN_BUDGET = {"cpu": 2048, "cuda": 65536}
MAX_BATCH_ROWS = 1024
CPU_WORKERS = 4  # batches encoded at once on a CPU (see TextEncoder.encode)


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise GraphbuildError(f"--device {requested}: CUDA is not available on this machine")
    return requested


def cpu_has_fast_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_precision(requested: str, device: str) -> str:
    """auto: fp16 on CUDA, bf16 on CPUs with native bf16 (AVX-512 BF16 / AMX), else fp32."""
    if requested not in PRECISIONS:
        raise GraphbuildError(f"--precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    on_cuda = device.startswith("cuda")
    if requested == "auto":
        if on_cuda:
            return "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if requested == "fp16" and not on_cuda:
        raise GraphbuildError("--precision fp16 is for CUDA; CPUs run fp16 matrix products at a "
                              "few GFLOP/s. Use bf16 (fast on CPUs with AVX-512 BF16) or fp32")
    return requested


def token_batches(lengths: np.ndarray, budget: int, max_rows: int = MAX_BATCH_ROWS) -> list[np.ndarray]:
    """Cut indices, sorted by length, into batches with rows * longest <= budget.

    A single text longer than the budget gets a batch of its own.
    """
    order = np.argsort(lengths, kind="stable")
    batches, start, n = [], 0, len(order)
    while start < n:
        stop = start + 1
        while (stop < n and stop - start < max_rows
               and (stop - start + 1) * lengths[order[stop]] <= budget):
            stop += 1
        batches.append(order[start:stop])
        start = stop
    return batches


class TextEncoder:
    """A frozen sentence-transformers model with our batching and precision."""

    def __init__(self, model, device: str, precision: str, token_budget: int | None = None):
        self.model = model
        self.device = device
        self.precision = precision
        kind = "cuda" if device.startswith("cuda") else "cpu"
        self.token_budget = token_budget or DEFAULT_TOKEN_BUDGET[kind]
        dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(dim_of())
        self.max_seq_length = int(model.max_seq_length)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    def _autocast(self):
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.split(":")[0], dtype=dtype)

    def _features(self, texts: list[str]) -> dict:
        # sentence-transformers 6 renamed tokenize() to preprocess(); 5.x only has tokenize()
        prep = getattr(self.model, "preprocess", None) or self.model.tokenize
        return prep(texts)

    def token_lengths(self, texts: Sequence[str]) -> np.ndarray:
        ids = self.model.tokenizer(list(texts), truncation=True, max_length=self.max_seq_length,
                                   add_special_tokens=True)["input_ids"]
        return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))

    def encode(self, texts: Sequence[str], on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """Unit-norm float32 embeddings of `texts`, in input order."""
        import torch

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        batches = token_batches(self.token_lengths(texts), self.token_budget)
        threads = torch.get_num_threads()
        workers = min(CPU_WORKERS, threads) if self.device == "cpu" else 1
        # On a CPU, `workers` batches run at once, each on threads // workers cores: this
        # model's products are too small to keep many cores busy together (measured on 2
        # cores: 1,149 texts/s as 2 x 1 thread, 986 as 1 x 2). Tokenizing stays on this
        # thread (fast tokenizers refuse concurrent calls), one batch ahead of the workers.
        # The same worker threads serve every call: each new thread would get a malloc arena
        # of its own, and the process would grow with the number of chunks.
        if self._pool is None or self._pool_size != workers:
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="encode")
            self._pool_size = workers
        torch.set_num_threads(max(1, threads // workers))
        pending = []
        try:
            for idx in batches:
                feats = self._features([texts[i] for i in idx])
                pending.append((idx, self._pool.submit(self._forward, feats)))
            for idx, done in pending:
                out[idx] = done.result()
                if on_batch is not None:
                    on_batch(len(idx))
        finally:
            for _, done in pending:  # on an error or Ctrl-C, drop the batches not started
                done.cancel()
            torch.set_num_threads(threads)
        return out

    def _forward(self, feats: dict) -> np.ndarray:
        """One batch through the model; autocast and inference mode are per thread."""
        import torch

        with torch.inference_mode(), self._autocast():
            feats = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in feats.items()}
            emb = self.model(feats)["sentence_embedding"].float()
            return torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()
