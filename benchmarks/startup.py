"""Start-up benchmark: `graphbuild knn` over 3 nodes and `graphbuild embed` over 3 texts.

Each command runs in a fresh subprocess, best of --reps, in turns (every command of every
checkout once, then again), beside two baselines measured the same way: `python -c pass`
(the interpreter alone) and `python -c "import torch"` (the floor of any command that computes
with torch). Then, for the last checkout given, where the time goes: `-X importtime`
(cumulative import time of the heavy packages, at the place each is first imported) and
cProfile of the CLI (the first load of a cached numba kernel, the model load, the work).
Asserts nothing about timings.

    python benchmarks/startup.py [--checkout OLD_TREE ...] [--reps 5] [--workdir /tmp/gb-startup]

--checkout: source trees to compare (PYTHONPATH is set to each); this repository's tree is
always measured last, as "this tree".
"""

from __future__ import annotations

import argparse
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a dog lying on a couch", "two cats asleep in the sun", "a red bus on a city street"]
HEAVY = ["torch", "sentence_transformers", "transformers", "sklearn", "scipy", "polars", "zarr",
         "numba", "pyarrow", "faiss", "dask", "distributed", "typer", "pydantic", "psutil"]
# cProfile entries reported (the end of "file(function)"), in the order printed.
PROFILED = {
    # The first cached kernel loaded sets numba's CPU target up (its typing and lowering
    # registries): a one-time cost per process, beside reading the cached machine code.
    "numba: target set-up": "numba/core/base.py(refresh)",
    "numba: read cached kernels": "numba/core/caching.py(_load_overload)",
    "model load (imports inside)": "embedding/models.py(load_sentence_transformer)",
    "prepare tables": "prepare/stage.py(_prepare)",
    "encode": "embedding/encode.py(encode)",
    "exact search": "graph/exact.py(blocked_topk)",
}


def setup(workdir: Path, tree: Path) -> tuple[Path, Path]:
    """A 3-text manifest, and a run with its embeddings (the input of the knn command)."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / "t.tsv").write_text("caption\n" + "\n".join(TEXTS) + "\n")
    manifest = workdir / "t.yaml"
    manifest.write_text("name: tiny\nsource: {path: t.tsv, format: tsv, has_header: true}\n"
                        "text_column: caption\n")
    run = workdir / "knn-run"
    cli(tree, ["embed", str(manifest), "--out", str(run)])
    return manifest, run


def cli(tree: Path, args: list[str], extra: list[str] = (), check: bool = True):
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([sys.executable, *extra, "-m", "graphbuild", *args], env=env,
                          capture_output=True, text=True, check=check, cwd=tree)


def commands(manifest: Path, run: Path, workdir: Path) -> dict[str, tuple[list[str], object]]:
    """name -> (CLI arguments, a function making each repetition start from the same state)."""
    def fresh_graph():
        shutil.rmtree(run / "graph", ignore_errors=True)
        shutil.rmtree(run / "_state" / "knn", ignore_errors=True)

    def fresh_embed():
        shutil.rmtree(workdir / "embed-run", ignore_errors=True)

    return {"--help": (["--help"], lambda: None),
            "knn, 3 nodes": (["knn", str(run), "-k", "2", "-q"], fresh_graph),
            "embed, 3 texts": (["embed", str(manifest), "--out", str(workdir / "embed-run"),
                                "-q"], fresh_embed)}


def timed(argv: list[str], env: dict, cwd: Path | None) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one run. CPU time depends less on the
    other processes of a shared host than wall time does. `cwd`: the tree itself, since
    `python -m` puts the working directory before PYTHONPATH on sys.path."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, capture_output=True, check=True, cwd=cwd)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def race(trees: dict[str, Path], workdir: Path, reps: int) -> dict[tuple[str, str], tuple]:
    """Best (wall, CPU) seconds of each (tree, command) and of the baselines, taken in
    turns."""
    cases = {("python", "-c pass"): ([sys.executable, "-c", "pass"], None, {}, None),
             ("python", "-c 'import torch'"): ([sys.executable, "-c", "import torch"], None, {},
                                               None)}
    for label, tree in trees.items():
        manifest, run = setup(workdir / label.replace(" ", "_"), tree)
        env = {**os.environ, "PYTHONPATH": str(tree)}
        for name, (args, reset) in commands(manifest, run, workdir / label.replace(" ", "_")
                                            ).items():
            reset()
            # Warm-up (numba's kernel cache in this tree, the page cache), which also tells
            # what the command imports: unlike its time, that does not depend on the load.
            p = cli(tree, args, ["-X", "importtime"])
            modules = p.stderr.count("import time:") - 1
            heavy = ", ".join(pkg for pkg, _ in import_breakdown(p.stderr))
            print(f"  {label:40s} {name:22s} imports {modules:5d} modules; of the heavy: {heavy}")
            cases[(label, name)] = ([sys.executable, "-m", "graphbuild", *args], reset, env,
                                    tree)
    best = {key: (float("inf"), float("inf")) for key in cases}
    for _ in range(reps):
        for key, (argv, reset, env, cwd) in cases.items():
            if reset:
                reset()
            wall, cpu = timed(argv, {**os.environ, **env}, cwd)
            best[key] = (min(best[key][0], wall), min(best[key][1], cpu))
    return best


def import_breakdown(stderr: str) -> list[tuple[str, float]]:
    """(package, cumulative seconds) where each HEAVY package was first imported."""
    seen = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        name = name.strip()
        if name in HEAVY and name not in seen and cumulative.strip().isdigit():
            seen[name] = int(cumulative) / 1e6
    return sorted(seen.items(), key=lambda kv: -kv[1])


def profile_breakdown(prof: Path) -> list[tuple[str, float]]:
    stats = pstats.Stats(str(prof)).stats
    out = []
    for label, where in PROFILED.items():
        total = sum(v[3] for (file, _line, fn), v in stats.items()
                    if f"{file}({fn})".endswith(where))
        if total:
            out.append((label, total))
    return out


def breakdown(tree: Path, workdir: Path) -> None:
    manifest, run = setup(workdir / "breakdown", tree)
    for name, (args, reset) in commands(manifest, run, workdir / "breakdown").items():
        if name == "--help":
            continue
        reset()
        p = cli(tree, args, ["-X", "importtime"])
        imports = import_breakdown(p.stderr)
        reset()
        prof = Path(tempfile.mkstemp(suffix=".prof")[1])
        t0 = time.perf_counter()
        cli(tree, args, ["-m", "cProfile", "-o", str(prof)])
        total = time.perf_counter() - t0
        print(f"\n{name}: where the time goes (one run under cProfile, {total:.2f}s wall; "
              "profiling inflates it)")
        print("  imports (cumulative, where first imported; nested ones count in their "
              "importer too):")
        for pkg, s in imports:
            print(f"    {pkg:24s} {s:6.2f}s")
        print("  cProfile, cumulative:")
        for label, s in profile_breakdown(prof):
            print(f"    {label:30s} {s:6.2f}s")
        prof.unlink()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkout", type=Path, action="append", default=[],
                    help="another source tree to compare (e.g. an older commit's)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gb-startup")
    args = ap.parse_args()
    trees = {f"tree {i}: {p}": p.resolve() for i, p in enumerate(args.checkout)}
    trees["this tree"] = REPO
    load = os.getloadavg()
    print(f"start-up, best of {args.reps} in turns; load average {load[0]:.1f} on "
          f"{os.cpu_count()} cores at the start")
    best = race(trees, args.workdir, args.reps)
    base = best[("python", "-c pass")][0]
    torch_cpu = best[("python", "-c 'import torch'")][1]
    for (label, name), (wall, cpu) in best.items():
        print(f"  {label:40s} {name:22s} wall {wall:6.2f}s ({wall / base:5.1f}x python -c pass)"
              f"  CPU {cpu:6.2f}s ({cpu / torch_cpu:4.2f}x import torch's)")
    if len(trees) > 1:
        old, new = next(iter(trees)), "this tree"
        for name in ("knn, 3 nodes", "embed, 3 texts", "--help"):
            (w0, c0), (w1, c1) = best[(old, name)], best[(new, name)]
            print(f"  {name}: this tree takes {w1 / w0:.2f}x the wall time and {c1 / c0:.2f}x "
                  f"the CPU time of {old.split(':')[0]}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    breakdown(REPO, args.workdir)
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
