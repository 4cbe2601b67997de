"""Batching: few distinct batch shapes however many texts, and padding that changes nothing."""

from __future__ import annotations

import numpy as np

from graphbuild.embedding.encode import (
    EXACT_LENGTHS,
    ROW_MULTIPLE,
    TextEncoder,
    padded_lengths,
    padded_rows,
    token_batches,
)


def test_lengths_are_exact_up_to_32_then_multiples_of_16_within_the_limit():
    got = padded_lengths(np.array([1, 17, 32, 33, 48, 49, 250, 256, 300]), limit=256)
    assert got.tolist() == [1, 17, 32, 48, 48, 64, 256, 256, 300]
    assert padded_lengths(np.array([97, 100]), limit=100).tolist() == [100, 100]


def caption_like_lengths(rng, n):
    """Token counts shaped like captions: mostly 8-20, a long tail up to 256."""
    return np.clip(np.round(rng.lognormal(np.log(14), 0.35, n)), 5, 256).astype(np.int64) + \
        (rng.random(n) < 0.01) * rng.integers(0, 200, n)


def test_batches_respect_the_budget_and_cover_every_text_once():
    rng = np.random.default_rng(0)
    lengths = padded_lengths(caption_like_lengths(rng, 8192), 256)
    batches = token_batches(lengths, 2048)
    assert sorted(np.concatenate(batches).tolist()) == list(range(8192))
    for b in batches:
        assert len(b) * lengths[b].max() <= 2048 or len(b) == 1
    full = [b for b in batches[:-1] if ROW_MULTIPLE * lengths[b].max() <= 2048]
    assert all(len(b) % ROW_MULTIPLE == 0 for b in full if len(b) >= ROW_MULTIPLE)


def test_the_set_of_batch_shapes_stops_growing():
    rng = np.random.default_rng(1)
    seen, counts = set(), []
    for _ in range(200):  # 1.6M texts, 8,192 a call
        lengths = padded_lengths(caption_like_lengths(rng, 8192), 256)
        for b in token_batches(lengths, 2048):
            length = int(lengths[b].max())
            seen.add((padded_rows(len(b), length, 2048), length))
        counts.append(len(seen))
    assert counts[-1] < 100 and counts[-1] - counts[99] <= 3, counts[::20]


def test_padding_rows_and_lengths_leaves_the_vectors_alone(st_model):
    words = ["a", "man", "on", "a", "red", "bike", "rides", "past", "two", "dogs", "near",
             "the", "old", "stone", "bridge"]
    texts = [" ".join(words[: 3 + i % 14] * (1 + i // 14)) for i in range(60)]  # 5-90 tokens
    enc = TextEncoder(st_model, "cpu", "fp32")
    assert enc.token_lengths(texts).max() > EXACT_LENGTHS  # some get padded columns
    ours = np.concatenate([enc.encode(texts), enc.encode(texts[:1])])  # a lone text: 32 rows
    plain = st_model.encode(texts + texts[:1], batch_size=1, normalize_embeddings=True)
    assert np.max(1 - np.sum(ours * plain, axis=1)) <= 1e-5


def caption_texts(n: int) -> list[str]:
    from tests.conftest import COCO

    lines = COCO.read_text(encoding="utf-8").splitlines()[1:n + 1]
    # a text past the model's 256 tokens (truncated), one with spaces around it
    return [line.split("\t")[2] for line in lines] + ["  spaced out  ", "word " * 400]


def test_tokenized_once_pads_as_the_model_does_whatever_the_threads(st_model):
    """One pass of the fast tokenizer, on 1 or 2 threads, gives the model's own preprocess()
    tensors for any batch (shortest, longest, mixed)."""
    from graphbuild.embedding.tokens import Tokenized, same_features

    texts = caption_texts(400)
    one = Tokenized.of(st_model, texts, st_model.max_seq_length, 1)
    two = Tokenized.of(st_model, texts, st_model.max_seq_length, 2)
    assert np.array_equal(one.ids, two.ids) and np.array_equal(one.offsets, two.offsets)
    assert one.lengths.max() == st_model.max_seq_length
    for idx in (np.arange(0, 400, 7), np.argsort(one.lengths)[-40:], np.array([400, 401, 3])):
        assert same_features(one.features(idx), st_model.preprocess([texts[i] for i in idx]))


def test_encoder_tokenizes_once_or_falls_back_to_the_same_bits(st_model, monkeypatch):
    """The encoder's one-pass tokenizing gives the bits of batch-by-batch preprocess(); a
    model whose features it cannot reproduce is tokenized batch by batch."""
    from graphbuild.embedding import encode
    from graphbuild.embedding.encode import TextEncoder

    texts = caption_texts(300)
    once = TextEncoder(st_model, "cpu", "fp32")
    got = once.encode(texts)
    assert once._tokens_ok is True
    monkeypatch.setattr(encode, "same_features", lambda ours, theirs: False)
    by_batch = TextEncoder(st_model, "cpu", "fp32")
    assert np.array_equal(by_batch.encode(texts), got) and by_batch._tokens_ok is False
