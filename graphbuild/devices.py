"""What a CUDA device offers a stage (free memory, half-precision speed), and a CUDA
out-of-memory error turned into one line naming the flags that shrink the work.

torch is imported inside the functions, so the module loads where torch is absent; every
function here is called with a device the caller has resolved ("cpu", "cuda" or "cuda:N").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from graphbuild.errors import GraphbuildError

# Dense fp16 tensor-core multiply-adds x 2 per SM per clock, with fp32 accumulation, by
# compute capability (NVIDIA's architecture whitepapers: V100 and T4 1,024, A100 2,048,
# H100 4,096 with sparsity off; the GeForce parts of 8.6/8.9 run fp32 accumulation at half
# their fp16 rate, 512). Unknown capabilities take the lowest.
TENSOR_FLOPS_PER_SM_CLOCK = {(7, 0): 1024, (7, 5): 1024, (8, 0): 2048, (8, 6): 512,
                             (8, 7): 1024, (8, 9): 512, (9, 0): 4096, (10, 0): 4096}
# The share of that peak the exact search reaches: its products are (block x block x d)
# GEMMs at d = 384 between filtering kernels (exact.py), far from the peak of big square
# ones. An assumption, to be replaced by benchmarks/gpu_check.py's measured figure.
EXACT_EFFICIENCY = 0.2
DEFAULT_CLOCK_HZ = 1.4e9  # where torch does not report the clock (a low boost clock)


@dataclass(frozen=True)
class Device:
    """What auto's method choice needs of the device the search runs on."""

    name: str
    free_bytes: int
    half_flops: float  # half-precision multiply-adds x 2 a second the search may reach


def check_cuda(device: str) -> None:
    """A "cuda" or "cuda:N" device this process has, else one line naming --device."""
    import torch

    if not device.startswith("cuda"):
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise GraphbuildError(f"--device {device}: CUDA is not available on this machine")
    if cuda_index(device) >= count:
        raise GraphbuildError(f"--device {device}: this process sees {count} CUDA device(s) "
                              f"(cuda:0..cuda:{count - 1}; CUDA_VISIBLE_DEVICES numbers them)")


def cuda_index(device: str) -> int:
    """N of "cuda:N"; 0 (the first visible device) for "cuda"."""
    return int(device.split(":")[1]) if ":" in device else 0


def cuda_device(device: str) -> Device:
    """Free memory (torch.cuda.mem_get_info) and an estimate of the half-precision rate of
    the exact search (tensor-core peak from get_device_properties x EXACT_EFFICIENCY)."""
    import torch

    number = cuda_index(device)
    free, _total = torch.cuda.mem_get_info(number)
    props = torch.cuda.get_device_properties(number)
    per_clock = TENSOR_FLOPS_PER_SM_CLOCK.get((props.major, props.minor),
                                              min(TENSOR_FLOPS_PER_SM_CLOCK.values()))
    clock_khz = getattr(props, "clock_rate", 0) or 0
    clock = clock_khz * 1e3 if clock_khz else DEFAULT_CLOCK_HZ
    flops = props.multi_processor_count * per_clock * clock * EXACT_EFFICIENCY
    return Device(f"cuda:{number} ({props.name})", int(free), flops)


def is_cuda_oom(e: BaseException) -> bool:
    """torch's OutOfMemoryError, or faiss-gpu's allocation failure (a RuntimeError)."""
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("CUDA out of memory" in text
                                            or "cudaMalloc" in text
                                            or "cudaErrorMemoryAllocation" in text)


@contextlib.contextmanager
def cuda_oom_as_error(what: str, remedy: str) -> Iterator[None]:
    """A CUDA out-of-memory error inside the block becomes one GraphbuildError line: `what`
    ran out of GPU memory, `remedy` (the flags to change). Dask returns a GraphbuildError as
    a value (scale/engine.py), so the same task is not retried unchanged."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not is_cuda_oom(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GraphbuildError(f"{what}: out of GPU memory ({first[:160]}); {remedy}") from None
