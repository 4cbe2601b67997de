"""The texts of an encode call tokenized once, on several threads, and cut into batches.

The encoder needs every text's token count before it can form length-sorted batches, and
the model's own preprocess() tokenizes each batch again to pad it: each text twice, on one
thread (TOKENIZERS_PARALLELISM=false, which models.py sets so that no process forks with the
tokenizer's threads running). On a GPU that tokenizing is the bottleneck. Here a fast
(Rust) tokenizer's batch call tokenizes every text once, its parallelism switched on for
that call only, with `threads` threads (RAYON_NUM_THREADS, read when its pool starts), and
`features` pads a batch of them as preprocess() would: token ids right-padded with the pad
id, attention mask 1 on tokens, token type ids padded with the pad type id.

Token ids do not depend on how many threads made them, so neither do the batches nor the
embeddings. `Tokenized.of` gives None for a tokenizer this cannot stand in for (not fast,
padding on the left), and TextEncoder checks `features` against the model's own
preprocess() on a call's shortest and longest batch before relying on it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@contextlib.contextmanager
def tokenizer_threads(threads: int) -> Iterator[None]:
    """The fast tokenizer's parallelism on (threads > 1) for the block, as before after it."""
    saved = {key: os.environ.get(key) for key in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class Tokenized:
    """Every text's token ids (and token type ids, if the model takes them), concatenated:
    text i's at [offsets[i]:offsets[i + 1]]."""

    ids: np.ndarray
    type_ids: np.ndarray | None
    offsets: np.ndarray
    pad_id: int
    pad_type_id: int

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def of(cls, model, texts: Sequence[str], max_length: int, threads: int) -> Tokenized | None:
        """`texts` tokenized (truncated to max_length tokens, special tokens added) by the
        model's fast tokenizer on `threads` threads; None where this cannot pad as the
        model's preprocess() does."""
        tokenizer = getattr(model, "tokenizer", None)
        if not getattr(tokenizer, "is_fast", False) or tokenizer.padding_side != "right":
            return None
        with tokenizer_threads(threads):
            enc = tokenizer(list(texts), truncation="longest_first", max_length=max_length,
                            padding=False, return_attention_mask=False)
        ids = enc["input_ids"]
        offsets = np.zeros(len(ids) + 1, np.int64)
        np.cumsum([len(x) for x in ids], out=offsets[1:])
        types = enc.get("token_type_ids")
        return cls(ids=_flat(ids, offsets[-1]),
                   type_ids=None if types is None else _flat(types, offsets[-1]),
                   offsets=offsets, pad_id=tokenizer.pad_token_id or 0,
                   pad_type_id=getattr(tokenizer, "pad_token_type_id", 0) or 0)

    def features(self, idx: np.ndarray) -> dict:
        """The padded tensors of texts `idx`, as preprocess() gives them for those texts: as
        wide as the longest of them."""
        import torch

        lengths = self.lengths[idx]
        width = int(lengths.max())
        on = np.arange(width) < lengths[:, None]
        at = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])
        ids = np.full((len(idx), width), self.pad_id, np.int64)
        ids[on] = self.ids[at]
        out = {"input_ids": torch.from_numpy(ids)}
        if self.type_ids is not None:
            types = np.full((len(idx), width), self.pad_type_id, np.int64)
            types[on] = self.type_ids[at]
            out["token_type_ids"] = torch.from_numpy(types)
        out["attention_mask"] = torch.from_numpy(on.astype(np.int64))
        return out


def _flat(rows: list[list[int]], total: int) -> np.ndarray:
    return np.fromiter((t for row in rows for t in row), np.int64, count=int(total))


def same_features(ours: dict, theirs: dict) -> bool:
    """Whether our tensors are the model's own: the same keys among the tensors, equal."""
    import torch

    tensors = {k for k, v in theirs.items() if isinstance(v, torch.Tensor)}
    return tensors == set(ours) and all(torch.equal(ours[k], theirs[k]) for k in tensors)
