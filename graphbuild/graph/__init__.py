"""Stage 3, graph: the stored rows to the top-k cosine graph in graph/part-*.parquet.

  stage.py         knn_shard(): a shard's query rows searched, its part written and marked
  moments.py       each row's principal coordinates and residual cosine sums, exact, from
                   X^T X (one pass over the store), for graph-mode targets' fill
  exact.py         exact search: bf16 candidates, a proven error bound, an exact re-rank
  update.py        the exact graph updated after an append: old lists merged with new rows
  ann_update.py    the approximate graph updated after an append: new rows join its lists
  ann.py           approximate search: inverted lists, nprobe tuned to a recall target
  ivf_scan.py      the lists searched inside out (each list scored against its queries)
  kmeans.py        spherical k-means in bf16 (the lists, exact search's locality order)
  kernels.py       the compiled loops (numba): candidate buffers, heaps, probes, exact dots
  hits.py          padded top-k by bands of hit counts (the torch path, CUDA's)
  faiss_loader.py  faiss (an extra; a CPU searches without it), imported with its CPU quirks handled
  faiss_gpu.py     a faiss index on the shard's GPU, within faiss-gpu's limits (tables, k, nprobe)
"""
