"""Stage 2, embedding: each node's text to a unit-norm fp16 row of embeddings.zarr.

  models.py  the sentence-transformers model, offline, its weights checked by sha256
  encode.py  length-sorted batches under a token budget; bf16 / fp16 / fp32
  tokens.py  a call's texts tokenized once, on the process's threads, into padded batches
  stage.py   embed_shard(): a shard's chunks encoded, checked, written and marked
  append.py  embed --append: its refusals, then the tables appended and the store grown
"""
