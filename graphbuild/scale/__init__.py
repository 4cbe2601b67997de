"""Running the stages' shards elsewhere: Dask workers or a SLURM job array; no scheduler of
our own.

  engine.py       every shard as a Dask task (retried when a worker dies)
  dask_memory.py  knn tasks sized by their memory against each worker's memory_limit
  slurm.py        sbatch scripts from templates/ that call our CLI, one array task a shard
  status.py       shards done / pending / failed, rates and ETA, from markers and logs
  gpus.py         which GPU a shard or worker runs on
"""
