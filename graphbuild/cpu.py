"""What this CPU runs natively, from the flags the Linux kernel lists in /proc/cpuinfo."""

from __future__ import annotations

import functools
from pathlib import Path

# x86 flags of native bf16 products: AVX-512 BF16 (dot products) and AMX (tile products)
NATIVE_BF16 = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The flags of the first CPU in `cpuinfo` (this machine's /proc/cpuinfo by default);
    empty where there is none (not Linux, or not x86)."""
    if cpuinfo is None:
        cpuinfo = _proc_cpuinfo()
    return frozenset(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                           if line.startswith("flags")), []))


@functools.cache
def _proc_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX).

    Only there are torch's bf16 products faster than fp32 ones, which is the whole reason to
    choose bf16 on a CPU. oneDNN's own test (torch.ops.mkldnn._is_mkldnn_bf16_supported)
    accepts every AVX-512 CPU, where bf16 is emulated. Without the flags, the answer is no:
    fp32 is then chosen, the exact mode, never a wrong one."""
    return bool(NATIVE_BF16 & cpu_flags(cpuinfo))
