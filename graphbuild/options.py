"""The defaults of the values a user passes, and their checks; shared by the library, the
Python API (graphbuild.embed / knn / run), the CLI and `submit slurm`.

Each default is written here once and every entry point takes it from here, so a function
called from Python, the command and a SLURM task never differ (tests/test_api.py checks it).

Each check raises a one-line GraphbuildError naming the flag, so a bad value stops a command
before it reads a source or loads a model, and the Python API refuses the same values with the
same words. Flags are named as the CLI spells them (`--chunk-rows`), the way users meet them.
"""

from __future__ import annotations

import math
import re

from graphbuild.errors import GraphbuildError

# embed
MODEL = "all-MiniLM-L6-v2"  # bundled as a package whose files models.py checks by sha256
CHUNK_ROWS = 8192  # rows per Zarr chunk: 6 MiB of fp16 at d=384, cheap random row reads
# Padded tokens per forward pass. On a CPU, 1-4k tokens keep the matrix products efficient
# without spilling the caches; GPUs want far larger batches.
TOKEN_BUDGET = {"cpu": 2048, "cuda": 65536}
# knn
K = 32
RECALL_TARGET = 0.95  # approximate search: nprobe is tuned until sampled recall@k reaches it
# Rows per block of the exact search and of the stores' reads. exact_memory counts 4 block
# pairs of fp32 scores, 64 MiB at 2048 (256 MiB at 4096); every published knn figure
# (benchmarks/results/knn*.txt, exact_quick.txt) was measured at 2048.
BLOCK_ROWS = 2048
# `graphbuild run`: neighbours printed per example text
EXAMPLES = 5
# stats and report: the soft-target entropy over random batches
TAU_S = 0.1
BATCH_SIZE = 1024
BATCHES = 8
SEED = 0
# `graphbuild neighbors`
NEIGHBORS = 10
# `graphbuild export`: the sidecars' payload, the smallest whose KL(exact || streamed) is at
# most 1e-3 nats a row at B=1024, tau_s=0.1 (benchmarks/results/sidecar_payloads.txt)
PAYLOAD = "int8"

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
METHODS = ("auto", "exact", "approximate")


def at_least(flag: str, value: int | None, low: int = 1) -> None:
    """An integer count or size: `value >= low` (None means "the default" and passes)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise GraphbuildError(f"{flag} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise GraphbuildError(f"{flag} must be >= {low}, got {value}")


def recall_target(value: float) -> None:
    """A recall in (0, 1]."""
    if not (isinstance(value, (int, float)) and 0 < value <= 1):  # nan fails both compares
        raise GraphbuildError(f"--recall-target must be in (0, 1], got {value}")


def temperature(flag: str, value: float) -> None:
    """A softmax temperature: finite and > 0."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise GraphbuildError(f"{flag} must be a finite number > 0, got {value}")


def one_of(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise GraphbuildError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")


def precision(value: str) -> None:
    one_of("--precision", value, PRECISIONS)


def device(value: str) -> None:
    """auto, cpu, cuda or cuda:N; whether CUDA is there is checked when the device is used."""
    if not isinstance(value, str) or not DEVICE_PATTERN.fullmatch(value):
        raise GraphbuildError(f"--device must be auto, cpu, cuda or cuda:N, got {value!r}")


def method(value: str) -> None:
    one_of("--method", value, METHODS)


def embed_options(chunk_rows: int | None, token_budget: int | None, precision_: str,
                  device_: str) -> None:
    """What `graphbuild embed` and `run` take, checked before the source is read (None: the
    command has no such flag, its default is used)."""
    at_least("--chunk-rows", chunk_rows)
    at_least("--token-budget", token_budget)
    precision(precision_)
    device(device_)


def entropy_options(tau_s: float, batch_size: int, batches: int) -> None:
    """The soft-target entropy of `stats` and `report`: random batches at temperature tau_s."""
    temperature("--tau-s", tau_s)
    at_least("--batch-size", batch_size, 2)
    at_least("--batches", batches)


def payload(value: str) -> None:
    """fp16, int8 or pca-N; N against the store's dim is checked when the store is open."""
    from graphbuild.rundir.sidecar import Payload

    Payload.parse(value)


def knn_options(k: int, method_: str, block_rows: int | None, recall_target_: float) -> None:
    """What `graphbuild knn` and `run` take, checked before the store is read."""
    at_least("--k", k)
    method(method_)
    at_least("--block-rows", block_rows)
    recall_target(recall_target_)
