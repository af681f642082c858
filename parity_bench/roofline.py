"""What this machine can do, measured in the same run as what it is compared with: GEMM
throughput, read bandwidth, the CPU and what malloc does with large blocks."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

import gpt_flax
from parity_tests.twins import float32_matmuls

GEMM_N = 2048
READ_BYTES = 512 * 2**20
# With it in GLIBC_TUNABLES (read by glibc at start-up; the Makefile sets it for bench), malloc asks
# for transparent huge pages: XLA allocates every output afresh, and large outputs otherwise cost a
# page fault per 4 KiB (docs/design-notes.md has the figures).
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def hugepages() -> str:
    """What the malloc of this process does with large blocks: the tunable and the kernel's mode."""
    tunable = HUGEPAGE_TUNABLE in os.environ.get("GLIBC_TUNABLES", "")
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        mode = "unknown"
    return f"{HUGEPAGE_TUNABLE if tunable else 'glibc defaults'}, transparent huge pages {mode}"


def times(fn: Callable[[], Any], repeats: int) -> list[float]:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    return statistics.median(times(fn, repeats))


def gemm_flops(dtype: str, n: int = GEMM_N, repeats: int = 3) -> dict[str, list[float]]:
    """FLOP/s of each of `repeats` n x n x n matmuls in XLA and in torch, inputs in `dtype`.

    XLA as the Flax twin multiplies (gpt_flax.model.dot_general_f32: accumulated and returned in
    float32, then rounded; its CPU backend runs bfloat16 fast only so). torch as nn.Linear does, by
    a transposed weight (a @ b.T): its bfloat16 kernels are fast in that layout only."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    ja, jb = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    matmul = jax.jit(lambda x, y: gpt_flax.model.matmul_f32(x, y))
    ta, tb = torch.from_numpy(a).to(getattr(torch, dtype)), torch.from_numpy(b).to(getattr(torch, dtype))
    flops = 2 * n**3
    with float32_matmuls():
        return {
            "xla": [flops / t for t in times(lambda: matmul(ja, jb).block_until_ready(), repeats)],
            "torch": [flops / t for t in times(lambda: torch.nn.functional.linear(ta, tb), repeats)],
        }


def best_gemm(samples: Mapping[str, list[float]]) -> float:
    """The roofline reference: the best GEMM sample of either library (interference only slows a
    GEMM, so the fastest sample is the closest to what the machine can do)."""
    return max(max(values) for values in samples.values())


def read_bandwidth(nbytes: int = READ_BYTES, repeats: int = 5) -> dict[str, float]:
    """Bytes/s of summing a float32 array of `nbytes` (read once, nothing written back)."""
    x = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32)
    jx, tx = jnp.asarray(x), torch.from_numpy(x)
    total = jax.jit(jnp.sum)
    return {
        "xla": nbytes / median_time(lambda: total(jx).block_until_ready(), repeats),
        "torch": nbytes / median_time(lambda: tx.sum(), repeats),
    }


def cpu_description() -> str:
    """The CPU's model name and its AVX-512 / AMX extensions (or AVX2), as /proc/cpuinfo tells."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wide = sorted(f for f in set(flags) if f.startswith(("avx512", "amx")))
    ext = ", ".join(wide) if wide else ("avx2, no AVX-512" if "avx2" in flags else "no AVX2")
    return f"{name or platform.machine()}, {os.cpu_count()} cores, {ext}"


def time_call(fn: Callable[[], Any], sync: Callable[[Any], Any]) -> float:
    t0 = time.perf_counter()
    sync(fn())
    return time.perf_counter() - t0
