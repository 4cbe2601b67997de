"""Turning texts into unit vectors, fast: length-sorted batches under a token budget.

A fixed batch size wastes work two ways: short texts make small matrix products, and mixed
lengths pad every row to the longest. Here the texts of a call are sorted by token count and
cut into batches whose padded size (rows x longest row) stays under a token budget. Batches
depend only on the texts of the call, so the same texts always give the same bits.

Batch shapes come from a small set, whatever the number of texts: rows are a multiple of 32
where the budget allows (a call's last batch is padded with copies of its last row), and
sequences longer than 32 tokens are padded to a multiple of 16. On a CPU, oneDNN compiles
and keeps kernels for every matrix shape it meets, about 2 MiB a batch shape here; with
exact shapes, 410k shuffled captions kept meeting new ones and the process grew by 400 MiB,
still climbing. Bucketed, captions yield about 45 shapes, half of them in the first 8,192
texts, for 1.3% more padded tokens.

Each text is tokenized once, by the fast tokenizer on the process's threads (tokens.py), where
that gives what the model's own preprocess() gives (checked on a call's shortest and longest
batch, once per encoder); otherwise each batch is tokenized by preprocess().
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from graphbuild import options
from graphbuild.cpu import has_native_bf16
from graphbuild.embedding.tokens import Tokenized, same_features
from graphbuild.errors import GraphbuildError

log = logging.getLogger(__name__)

MAX_BATCH_ROWS = 1024
ROW_MULTIPLE = 32  # batch rows are a multiple of this, where the budget allows
EXACT_LENGTHS = 32  # sequences up to this many tokens keep their length...
LENGTH_MULTIPLE = 16  # ...longer ones are padded to a multiple of this
CPU_WORKERS = 4  # batches encoded at once on a CPU (see TextEncoder.encode)


def pick_device(requested: str = "auto") -> str:
    import torch

    options.device(requested)
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise GraphbuildError(f"--device {requested}: CUDA is not available on this machine")
    return requested


def pick_precision(requested: str, device: str) -> str:
    """auto: fp16 on CUDA, bf16 on CPUs with native bf16 (AVX-512 BF16 / AMX), else fp32."""
    options.precision(requested)
    on_cuda = device.startswith("cuda")
    if requested == "auto":
        if on_cuda:
            return "fp16"
        return "bf16" if has_native_bf16() else "fp32"
    if requested == "fp16" and not on_cuda:
        raise GraphbuildError("--precision fp16 is for CUDA; CPUs run fp16 matrix products at a "
                              "few GFLOP/s. Use bf16 (fast on CPUs with AVX-512 BF16) or fp32")
    return requested


def padded_lengths(lengths: np.ndarray, limit: int) -> np.ndarray:
    """The sequence length each text is padded to: its own up to EXACT_LENGTHS tokens, else
    the next multiple of LENGTH_MULTIPLE, but not past max(its own, limit)."""
    lengths = np.asarray(lengths)
    up = -(-lengths // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
    return np.where(lengths <= EXACT_LENGTHS, lengths, np.minimum(up, np.maximum(lengths, limit)))


def token_batches(lengths: np.ndarray, budget: int, max_rows: int = MAX_BATCH_ROWS,
                  multiple: int = ROW_MULTIPLE) -> list[np.ndarray]:
    """Cut indices, sorted by length, into batches with rows * longest <= budget, and rows a
    multiple of `multiple` where the budget and the texts left allow it (the last batch, and
    a batch of fewer than `multiple` texts under the budget, may have fewer).

    A single text longer than the budget gets a batch of its own.
    """
    order = np.argsort(lengths, kind="stable")
    batches, start, n = [], 0, len(order)
    while start < n:
        stop = start + 1
        while (stop < n and stop - start < max_rows
               and (stop - start + 1) * lengths[order[stop]] <= budget):
            stop += 1
        if stop < n and stop - start >= multiple:
            stop -= (stop - start) % multiple
        batches.append(order[start:stop])
        start = stop
    return batches


def padded_rows(n: int, length: int, budget: int) -> int:
    """The rows a batch of n texts padded to `length` becomes: the next multiple of
    ROW_MULTIPLE, as far as the budget allows."""
    return max(n, min(-(-n // ROW_MULTIPLE) * ROW_MULTIPLE, budget // length))


def pad_batch(feats: dict, rows: int, length: int, pad_id: int) -> dict:
    """Tokenizer output padded to `rows` rows (copies of the last) and `length` columns
    (pad tokens, masked out), so that the batch has one of few shapes."""
    import torch

    out = {}
    for key, v in feats.items():
        if isinstance(v, torch.Tensor) and v.dim() == 2:
            extra = length - v.shape[1]
            if extra > 0:
                fill = pad_id if key == "input_ids" else 0
                v = torch.cat([v, v.new_full((v.shape[0], extra), fill)], dim=1)
            if rows > v.shape[0]:
                v = torch.cat([v, v[-1:].expand(rows - v.shape[0], -1)])
        out[key] = v
    return out


class TextEncoder:
    """A frozen sentence-transformers model with our batching and precision."""

    def __init__(self, model, device: str, precision: str, token_budget: int | None = None):
        self.model = model
        self.device = device
        self.precision = precision
        kind = "cuda" if device.startswith("cuda") else "cpu"
        self.token_budget = token_budget or options.TOKEN_BUDGET[kind]
        dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(dim_of())
        self.max_seq_length = int(model.max_seq_length)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._tokens_ok: bool | None = None  # Tokenized stands in for preprocess() (checked)
        self._extra: dict = {}  # preprocess()'s entries that are not tensors (e.g. modality)

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

    def _tokenized(self, texts: Sequence[str], threads: int) -> Tokenized | None:
        """Every text tokenized once on `threads` threads, or None where that does not give
        preprocess()'s features: checked on the shortest and the longest texts of the first
        call (where padding and truncation show), and not used again once it failed."""
        if self._tokens_ok is False:
            return None
        tok = Tokenized.of(self.model, texts, self.max_seq_length, threads)
        if tok is None or self._tokens_ok:
            self._tokens_ok = tok is not None
            return tok
        order = np.argsort(tok.lengths, kind="stable")
        for idx in (order[:ROW_MULTIPLE], order[-ROW_MULTIPLE:]):
            theirs = self._features([texts[i] for i in idx])
            if not same_features(tok.features(idx), theirs):
                log.info("tokenizing batch by batch: one pass of the fast tokenizer does not "
                         "give this model's features")
                self._tokens_ok = False
                return None
        self._extra = {k: v for k, v in theirs.items() if not hasattr(v, "shape")}
        self._tokens_ok = True
        return tok

    def encode(self, texts: Sequence[str], on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """Unit-norm float32 embeddings of `texts`, in input order."""
        import torch

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        threads = torch.get_num_threads()
        tok = self._tokenized(texts, threads)
        lengths = padded_lengths(self.token_lengths(texts) if tok is None else tok.lengths,
                                 self.max_seq_length)
        batches = token_batches(lengths, self.token_budget)
        pad_id = getattr(self.model.tokenizer, "pad_token_id", None) or 0
        workers = min(CPU_WORKERS, threads) if self.device == "cpu" else 1
        # On a CPU, `workers` batches run at once, each on threads // workers cores: this
        # model's products are too small to keep many cores busy together (measured on 2
        # cores: 1,149 texts/s as 2 x 1 thread, 986 as 1 x 2). Batches are padded on this
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
                feats = (self._features([texts[i] for i in idx]) if tok is None
                         else {**tok.features(idx), **self._extra})
                length = int(lengths[idx].max())
                rows = padded_rows(len(idx), length, self.token_budget)
                feats = pad_batch(feats, rows, length, pad_id)
                pending.append((idx, self._pool.submit(self._forward, feats)))
            for idx, done in pending:
                out[idx] = done.result()[: len(idx)]
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
