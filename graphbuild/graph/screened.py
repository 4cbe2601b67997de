"""fp32 list products screened in bf16, then scored again where it matters.

symmetric_scan's list products are most of an approximate build's time. On a CPU that
multiplies bf16 natively (AVX-512 BF16, AMX), oneDNN runs an fp32 product with its inputs
rounded to bf16 (torch.backends.mkldnn.matmul.fp32_precision = "bf16"): fp32 out, no output
rounding, about 2.3x the fp32 product's speed on list-sized shapes once each shape is padded
to a few sizes (`fp32_rows`: oneDNN prepares every new shape anew; graph_choices.txt). Each
screened score is within a known bound of the exact one (`screen_error`), so a score that
cannot reach a heap's bar by that bound is dropped, and one that can is scored again
(kernels._dot32) before it is offered. The heaps then hold only re-scored values, which do
not depend on the product's shape or on which shard's product scored the pair.

Where bf16 is not native, or oneDNN does not round as the bound assumes (`_bf16_screens`
checks once a process), the products stay fp32, and the bound is fp32's sums alone. The
setting is process-wide, so it changes only where no other thread could be running a torch
product that must stay fp32 (`_alone`): a process that is graphbuild's own (the command
line calls `own_process`), or a Dask worker with one task thread. Called as a library in
someone else's process, the products stay fp32.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

F32_UNIT_ROUNDOFF = 2.0 ** -24  # exact.py's bounds take these three too
BF16_UNIT_ROUNDOFF = 2.0 ** -8  # round to nearest even: |bf16(x) - x| <= u |x|
SLACK = 2e-6  # covers the fp32 roundings of a threshold and of a stored or re-scored score


def screen_error(max_norm: float, d: int, bf16: bool) -> float:
    """A bound on |v - r| for every screened score v of rows of d values with norms at most
    N = max_norm, r the pair's re-score. With x~ = bf16(x) = x + e, |e| <= u|x| elementwise,
    and s the exact score:
      |x~.y~ - s| = |e_x.y~ + x.e_y| <= u N * (1 + u) N + N * u N = u (2 + u) N^2
      |v - x~.y~| <= g |x~||y~| <= g (1 + u)^2 N^2,  g = d u32 / (1 - d u32)  (fp32 sums)
      |r - s| <= g N^2                                                        (fp32 sums)
    with u = 0 when the product is fp32 throughout."""
    u = BF16_UNIT_ROUNDOFF if bf16 else 0.0
    g = d * F32_UNIT_ROUNDOFF / (1 - d * F32_UNIT_ROUNDOFF)
    return (u * (2 + u) + g * (1 + u) ** 2 + g) * max_norm ** 2 + SLACK


ROW_PAD, COLUMN_PAD = 256, 64  # a product's rows and columns, padded to multiples of these


class Buffers:
    """fp32 buffers that the screened products reuse, each grown when a product needs more:
    products of ever other shapes, each in fresh memory, left glibc holding the freed blocks
    (at 1M, peak RSS 3.1 GiB against 2.3 GiB; graph_choices.txt)."""

    def __init__(self):
        self._held: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, int], dtype=None) -> torch.Tensor:
        """A (rows, cols) tensor (fp32, or `dtype`) over the buffer `name`, its contents left
        as they were."""
        import torch

        size = shape[0] * shape[1]
        held = self._held.get(name)
        if held is None or len(held) < size:
            held = self._held[name] = torch.empty(
                max(size, 2 * len(held) if held is not None else size),
                dtype=dtype or torch.float32)
        return held[:size].view(shape)


def fp32_rows(rows: torch.Tensor, multiple: int = 1, out: torch.Tensor | None = None,
              ) -> torch.Tensor:
    """Rows as fp32, with zero rows after them up to a multiple of `multiple` (products of a
    few shapes, which oneDNN prepares once each), in `out` (Buffers.take) when given."""
    import torch

    n, d = rows.shape
    shape = (n + -n % multiple, d)
    out = torch.empty(shape) if out is None else out
    out[:n] = rows
    out[n:] = 0
    return out


def screened_product(a: torch.Tensor, b: torch.Tensor, m: int, bf16: bool,
                     out: torch.Tensor | None = None) -> np.ndarray:
    """The first m rows of a @ b.T (fp32 rows), screened when `bf16`, in `out` when given."""
    import torch

    with screening_products(bf16):
        scores = torch.matmul(a, b.T, out=out) if out is not None else a @ b.T
    return scores[:m].numpy()


@contextlib.contextmanager
def screening_products(bf16: bool):
    """fp32 products within the block run with bf16 inputs when `bf16` (and as before after
    it)."""
    if not bf16:
        yield
        return
    import torch

    before = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before


_OWN_PROCESS = False


def own_process() -> None:
    """Declare this process graphbuild's own (the command line, a benchmark's run): no
    foreign code runs torch products on its other threads, so screening may change the
    process-wide setting for a product's time."""
    global _OWN_PROCESS
    _OWN_PROCESS = True


def bf16_screens() -> bool:
    """Whether list products are screened in bf16 here: a CPU with native bf16 products,
    no other thread that could run a product meanwhile, and oneDNN rounding the inputs as
    `screen_error` assumes."""
    from graphbuild.cpu import has_native_bf16

    return has_native_bf16() and _alone() and _bf16_screens()


def _alone() -> bool:
    """Whether this thread is the only one that can run torch products: in a Dask worker,
    one with a single task thread; elsewhere, a process declared graphbuild's own."""
    if "distributed" in sys.modules:
        from distributed import get_worker

        try:
            return get_worker().state.nthreads == 1
        except ValueError:  # not in a worker's task
            pass
    return _OWN_PROCESS


@functools.cache
def _bf16_screens() -> bool:
    """oneDNN's bf16 fp32 products equal the products of the inputs rounded to nearest bf16,
    up to fp32 sums: checked once a process on rows of a list's shape. False too where the
    setting changes nothing (the products stay fp32)."""
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, 384, generator=g) for n in (700, 500))
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    with screening_products(True):
        screened = a @ b.T
    rounded = a.bfloat16().float() @ b.bfloat16().float().T
    return bool((screened - rounded).abs().max() <= 2 * screen_error(1.0, 384, bf16=False))
