"""Stage 4 (optional): a run's soft-target payload beside a WebDataset, one sidecar per tar.

`graphbuild export RUN --like SHARDS --out DIR` (graphbuild.export() in api.py) writes
DIR/NAME.parquet for each SHARDS/NAME.tar, in the tar's sample order, in the format of
graphbuild/rundir/sidecar.py; the trainer joins them to its stream by key
(graphbuild/xclr/stream.py) and needs no store. (The package is named for what it writes, as
embedding/ and graph/ are, so that `graphbuild.export` stays the API's function.)

  stage.py     export_shard: checks, the directory's metadata, each tar's sidecar and marker
  tars.py      a directory's tars and each tar's keys, as webdataset groups them
  index.py     the run's (sample_id, node) sorted by id, so a tar's keys are found without
               the whole samples table in memory
  payloads.py  fp16, int8 and pca-N rows from the stored fp16 rows; the PCA basis
"""
