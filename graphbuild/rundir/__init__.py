"""The run directory's format, in one place: the builder writes it, every stage, inspector and
the trainer read it through here, with the same checks. Light: numpy, pyarrow and
google-crc32c only (never zarr, polars or torch), so the trainer imports it.

  RUN/run.json              the manifest snapshot, the sources' content records, per-stage
                            status and figures (paths.RunDir names every file)
  RUN/nodes.parquet         node int64, text: one row per unique text, in first-seen order
  RUN/samples.parquet       sample int64 (0..S-1), sample_id, node int64
  RUN/embeddings.zarr/      (n_nodes, dim) float16, unit norm, row chunks, each chunk file its
                            raw little-endian rows + crc32c; attributes carry the provenance
                            (paths.PROVENANCE_KEYS) and, after appends, `appended_at`: the
                            first row of each (a chunk is encoded in segments split there)
  RUN/graph/part-NNNNN.parquet  node int64, neighbors list<int32>, sims list<float32>, sorted
                            by node, page checksums; graph/_meta.json vouches for all parts
  RUN/graph/_moments/       per node: principal coordinates and residual cosine sums, which
                            graph-mode targets fill unheld pairs from; one part per knn shard
                            and a _meta.json of their own (moments.py)
  RUN/graph-base/           only while a graph is updated after an append: the graph
                            of the rows before it, removed once graph/_meta.json is written
  RUN/_state/STAGE/         completion markers (with stats), written after their data

  paths.py    RunDir, PROVENANCE_KEYS, the store's attributes
  files.py    atomic writes, JSON, markers, Parquet row groups
  locks.py    locks that say who holds them, with a timeout
  store.py    embeddings.zarr's layout and StoredRows, the one checked reader of its rows
              (a range, chunk-aligned blocks, all, or a gather; in RAM or memory-mapped);
              NORM_TOLERANCE, the unit norm a stored row keeps
  graph.py    graph parts: writer, footer check, _meta.json and its provenance, and the one
              reader of each kind: the CSR, a row group, one node's row, a footer
  samples.py  samples.parquet and the source's record, as the trainer joins by id
  moments.py  graph/_moments/: the row moments' writer, footer check and checked reader
"""
