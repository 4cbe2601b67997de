"""The SLURM engine: sbatch scripts for an embed array and a knn array that call our own CLI.

Array task T runs shard T (`--shard $SLURM_ARRAY_TASK_ID --num-shards N` in the script), so
a resubmission can list just the unfinished shards (`--array=3,7,12`) and every task still
knows the layout. The knn array waits for the embed array (`--dependency=afterok:JOB`) and
is cancelled if that fails (`--kill-on-invalid-dep=yes`). Logs: OUT/logs/{stage}-%A_%a.out,
appended to across requeues; each task writes a `graphbuild: start` and a `graphbuild: exit
RC` line, which `graphbuild status` reads. Templates: graphbuild/scale/templates/*.sbatch.tmpl, shipped in the package.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from graphbuild.errors import GraphbuildError
from graphbuild.rundir.files import read_json, write_json
from graphbuild.rundir.paths import RunDir
from graphbuild.scale.status import unfinished_embed_shards, unfinished_knn_shards
from graphbuild.shards import id_ranges

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"  # package data (pyproject.toml)


@dataclass
class SbatchOptions:
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    gpus_per_task: int | None = None
    max_parallel: int | None = None   # the array's %N
    extra: list[str] = field(default_factory=list)   # more #SBATCH lines
    setup: str = ""                   # a shell line run first, e.g. activating a venv
    command: str = "graphbuild"       # how the task calls graphbuild
    job_name: str = "graphbuild"

    def lines(self) -> list[str]:
        opts = {"partition": self.partition, "account": self.account, "time": self.time,
                "cpus-per-task": self.cpus_per_task, "mem": self.mem,
                "gpus-per-task": self.gpus_per_task}
        out = [f"#SBATCH --{k}={v}" for k, v in opts.items() if v is not None]
        for line in self.extra:
            line = line.strip()
            line = line[len("#SBATCH"):].strip() if line.startswith("#SBATCH") else line
            if not line.startswith("-"):
                raise GraphbuildError(f"--sbatch {line!r}: expected an sbatch option such as "
                                      "--qos=high")
            out.append(f"#SBATCH {line}")
        return out


@dataclass
class StageJob:
    stage: str
    script: Path
    text: str
    shards: list[int]
    num_shards: int
    command: list[str]
    job_id: str | None = None


def array_spec(ids: list[int], max_parallel: int | None = None) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (and '%N' for a concurrency limit)."""
    return id_ranges(ids, ",") + (f"%{max_parallel}" if max_parallel else "")


def _sbatch_path(value: str) -> str:
    """A path for a double-quoted #SBATCH value (sbatch understands double quotes only)."""
    if '"' in value:
        raise GraphbuildError(f"{value}: a path with a double quote cannot go on an #SBATCH line")
    return value


def render(stage: str, opts: SbatchOptions, out: Path, num_shards: int, args: list[str],
           manifest: Path | None = None, templates: Path = TEMPLATES) -> str:
    path = templates / f"{stage}.sbatch.tmpl"
    if not path.exists():
        raise GraphbuildError(f"{path}: SLURM template missing (graphbuild must be installed "
                              "from its source tree, e.g. pip install -e)")
    values = {"job_name": opts.job_name, "logs": _sbatch_path(str(RunDir(out).logs())),
              "sbatch_lines": "\n".join(opts.lines()), "setup": opts.setup,
              "command": opts.command, "out": shlex.quote(str(out)),
              "num_shards": num_shards, "args": shlex.join(args),
              "manifest": shlex.quote(str(manifest)) if manifest else ""}
    return Template(path.read_text()).substitute(values)


def plan(manifest: Path, out: Path, opts: SbatchOptions, embed_shards: int, knn_shards: int,
         embed_args: list[str], knn_args: list[str]) -> list[StageJob]:
    """The arrays to submit: only the shards not yet done, embed first."""
    manifest, out = manifest.resolve(), out.resolve()
    if embed_shards < 1 or knn_shards < 1:
        raise GraphbuildError("--embed-shards and --knn-shards must be >= 1")
    jobs = []
    folder = out / "slurm"
    for stage, n, todo, args in (
            ("embed", embed_shards, unfinished_embed_shards(out, embed_shards), embed_args),
            ("knn", knn_shards, unfinished_knn_shards(out, knn_shards), knn_args)):
        if not todo:
            log.info("%s: all %d shards done, nothing to submit", stage, n)
            continue
        script = folder / f"{stage}.sbatch"
        text = render(stage, opts, out, n, args, manifest if stage == "embed" else None)
        cmd = ["sbatch", "--parsable", f"--array={array_spec(todo, opts.max_parallel)}"]
        jobs.append(StageJob(stage, script, text, todo, n, cmd))
    return jobs


def submit(jobs: list[StageJob], out: Path, dry_run: bool = False) -> list[StageJob]:
    """Write the scripts and sbatch them, knn after embed (afterok). Dry run: neither."""
    previous = None
    for job in jobs:
        if previous is not None:
            job.command.append(f"--dependency=afterok:{previous.job_id or 'EMBED_JOB_ID'}")
        job.command.append(str(job.script))
        if not dry_run:
            job.script.parent.mkdir(parents=True, exist_ok=True)
            RunDir(out).logs().mkdir(parents=True, exist_ok=True)
            job.script.write_text(job.text)
            try:
                r = subprocess.run(job.command, capture_output=True, text=True)
            except FileNotFoundError:
                raise GraphbuildError("sbatch: not found; run this on a SLURM login node") from None
            if r.returncode != 0:
                raise GraphbuildError(f"{job.script}: sbatch failed: "
                                      f"{(r.stderr or r.stdout).strip()}")
            job.job_id = r.stdout.strip().split(";")[0]
            log.info("submitted %s array %s as job %s", job.stage, job.command[2], job.job_id)
        previous = job
    if not dry_run and jobs:
        path = Path(out) / "slurm" / "submitted.json"
        record = read_json(path)  # a stage not resubmitted keeps its last entry
        record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        record.setdefault("jobs", {}).update(
            {j.stage: {"job_id": j.job_id, "num_shards": j.num_shards, "shards": j.shards,
                       "command": shlex.join(j.command)} for j in jobs})
        write_json(path, record)
    return jobs
