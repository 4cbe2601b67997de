"""Stage 1, prepare: a manifest's source rows to the run's nodes and samples tables.

  manifest.py  the YAML manifest, validated; class lists; each source file's content record
  sources.py   source files read a bounded block at a time (csv, tsv, jsonl, parquet; packed)
  dedup.py     texts deduplicated through hash partitions on disk, never all in memory
  texts.py     rows cleaned, checked and numbered: nodes.parquet and samples.parquet
  stage.py     prepare(): build the tables once, refuse a rerun whose inputs changed
  append.py    new source files appended to a run's tables (embed --append), old ones unchanged
  extend.py    an append's tables from the new files and the run's own tables, old files unread
"""
