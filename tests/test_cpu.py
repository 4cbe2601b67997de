"""CPU flags from /proc/cpuinfo text: whether bf16 products run in hardware."""

from graphbuild.cpu import cpu_flags, has_native_bf16

SAPPHIRE_RAPIDS = ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 "
                   "amx_bf16 amx_tile\n\nprocessor\t: 1\nflags\t\t: fpu\n")
SKYLAKE_SP = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512dq avx512vl\n"


def test_flags_are_the_first_cpus():
    assert {"avx512_bf16", "amx_tile"} <= cpu_flags(SAPPHIRE_RAPIDS)
    assert cpu_flags("") == frozenset()  # not Linux, or no flags line


def test_native_bf16_needs_avx512_bf16_or_amx():
    assert has_native_bf16(SAPPHIRE_RAPIDS)
    assert has_native_bf16("flags : fpu amx_bf16 amx_tile\n")
    assert not has_native_bf16(SKYLAKE_SP)  # AVX-512 without BF16: bf16 is emulated there
    assert not has_native_bf16("")
