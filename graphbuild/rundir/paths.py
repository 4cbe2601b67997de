"""Where everything of a run directory lives, and what makes two stores comparable."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable

from graphbuild.errors import GraphbuildError
from graphbuild.rundir.files import read_json, write_json
from graphbuild.rundir.locks import file_lock
from graphbuild.rundir.store import read_zarr_json

# embeddings.zarr attributes that must match for two sets of vectors to be comparable; the
# graph and the knn parameters carry a copy, checked against the store by every reader.
PROVENANCE_KEYS = ("model", "model_revision", "dim", "max_seq_length", "normalized",
                   "precision", "templates", "dtype", "n_nodes")


class RunDir:
    """Names of everything in a run directory, in one place."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def nodes(self) -> Path:
        return self.root / "nodes.parquet"

    @property
    def samples(self) -> Path:
        return self.root / "samples.parquet"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings.zarr"

    @property
    def graph(self) -> Path:
        return self.root / "graph"

    @property
    def graph_base(self) -> Path:
        """The graph being updated after an append, set aside until the new one is whole."""
        return self.root / "graph-base"

    def state(self, stage: str) -> Path:
        """Markers and per-shard stats of a stage live here, apart from the data."""
        return self.root / "_state" / stage

    def logs(self) -> Path:
        return self.root / "logs"

    def lock(self, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock over the run's shared files (run.json, tables, store metadata).

        Held only for short metadata steps; shards never hold it while computing. A waiter
        says who holds it and may give up (`file_lock`).
        """
        return file_lock(self.root / ".lock", timeout)

    def shard_lock(self, stage: str, shard: str,
                   timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
        """Held while a shard computes, so a duplicate of the same array task waits, then
        finds the work done, instead of racing it over the same files. A waiter says who
        holds it and may give up (`file_lock`)."""
        return file_lock(self.state(stage) / f"{shard}.lock", timeout)

    def read_run(self) -> dict:
        return read_json(self.run_json)

    def update_run(self, change: Callable[[dict], None]) -> dict:
        """Read, change and rewrite run.json under the lock."""
        with self.lock():
            run = self.read_run()
            change(run)
            run["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            write_json(self.run_json, run)
            return run


def store_attrs(root: str | Path) -> dict | None:
    """The attributes of a run's embeddings.zarr, read from its zarr.json without zarr (the
    trainer reads them too); None when the run has no store."""
    path = RunDir(root).embeddings
    try:
        meta = read_zarr_json(path)
    except FileNotFoundError:
        return None
    attrs = meta.get("attributes")
    if not isinstance(attrs, dict):
        raise GraphbuildError(f"{path / 'zarr.json'}: no attributes; not a graphbuild store")
    return attrs
