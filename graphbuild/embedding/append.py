"""`graphbuild embed --append`: the embed stage's side of appending new source files.

Before the tables change (prepare/append.py), under the append lock and the run lock, an
append is refused in one line when the store was embedded with another model, weights,
precision or templates, or when the run's knn is half done (shard markers or parameters
without a finished graph/_meta.json, or a graph update still in progress). Then the tables
are appended and the store grown (stage.grow_store); the embed stage then encodes only the
chunks not marked: the new rows (and the old rows of the one chunk an append grew, encoded
apart from its new rows so their bits stay as they were).
"""

from __future__ import annotations

from graphbuild.errors import GraphbuildError
from graphbuild.prepare.append import append_lock, prepare_append
from graphbuild.prepare.manifest import Dataset
from graphbuild.rundir.files import read_json
from graphbuild.rundir.paths import RunDir, store_attrs


def append_to_run(ds: Dataset, run: RunDir, known: dict, skip_bad_rows: bool) -> list[dict]:
    """Append the source's new files to the run (nothing when there are none); `known` is
    the store provenance this embed would write, without n_nodes. The new files' records."""
    from graphbuild.embedding.stage import grow_store

    with append_lock(run):
        added = prepare_append(ds, run, skip_bad_rows,
                               before=lambda: (_check_store(run, known), _check_knn(run)))
        if added:
            grow_store(run, run.read_run()["dataset"]["figures"]["nodes"])
    return added


def _check_store(run: RunDir, known: dict) -> None:
    attrs = store_attrs(run.root)
    if attrs is None:
        return
    for key, want in known.items():
        if attrs.get(key) != want:
            raise GraphbuildError(
                f"{run.embeddings}: was embedded with {key}={attrs.get(key)!r}, this append "
                f"has {key}={want!r}; an append keeps the run's model, weights, precision and "
                "templates: rebuild into another --out")


def _check_knn(run: RunDir) -> None:
    """Refuse an append into a run whose knn stage is started but its graph not whole."""
    if run.graph_base.exists():
        raise GraphbuildError(f"{run.root}: a graph update after an earlier append is half "
                              f"done ({run.graph_base} is kept until it finishes); finish "
                              "`graphbuild knn` first, then append")
    started = (run.state("knn") / "params.json").exists() or any(
        run.state("knn").glob("shard-*.done"))
    meta = read_json(run.graph / "_meta.json")
    if started and not meta:
        done = len(list(run.state("knn").glob("shard-*.done")))
        raise GraphbuildError(f"{run.root}: its knn is half done ({done} shard markers, no "
                              f"{run.graph / '_meta.json'}); finish `graphbuild knn` first, "
                              "then append")
