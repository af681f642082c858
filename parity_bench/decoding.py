"""Decoding's figures: a cached or uncached generation's timing and the two limits a decoding
step cannot beat (reading the weights and caches once; GEMM throughput)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from gpt_spec import GPTConfig, ModelKind
from gpt_spec.flops import kv_cache_bytes_read, weight_bytes_per_token

DECODE_PROMPT = 8  # the uncached loop's prompt
DECODE_BATCHES = (1, 4, 16)
DECODE_PROMPTS = (8, 512, 768)  # 768 + 256 new tokens: decoding at 1,024 positions


@dataclasses.dataclass
class DecodeTiming:
    twin: str  # torch or flax
    dtype: str
    cache: bool
    batch: int
    prompt: int
    new_tokens: int  # per row
    first_call_s: float  # flax: compilation plus one run; torch: one run
    # Of the decoding steps timed (cached: all but the prefill and first pick); None where the
    # clock gave the cached generation no more time than the prefill's alone (too few steps).
    time_s: float | None
    steps: int  # decoding steps in time_s
    prefill_s: float | None  # cached: a 1-token generation (prefill and first pick)
    limit_bandwidth: float  # tokens/s if a step only read the weights and caches once
    limit_compute: float  # tokens/s if a step ran at GEMM throughput

    @property
    def tokens_per_s(self) -> float | None:
        return None if self.time_s is None else self.batch * self.steps / self.time_s

    @property
    def limit_tokens_per_s(self) -> float:
        return min(self.limit_bandwidth, self.limit_compute)

    @property
    def binds(self) -> str:
        return "bandwidth" if self.limit_bandwidth <= self.limit_compute else "compute"

    @property
    def fraction_of_limit(self) -> float | None:
        rate = self.tokens_per_s
        return None if rate is None else rate / self.limit_tokens_per_s


def decode_limits(
    cfg: GPTConfig, model: str, dtype: str, batch: int, prompt: int, new_tokens: int, read_bw: float, gemm: float
) -> tuple[float, float]:
    """(bandwidth, compute) limits in tokens/s of decoding steps from `prompt` positions on: a step
    reads the weights once and each row's cache, and does 2 FLOPs per weight and cached value."""
    size = jnp.dtype(dtype).itemsize
    mean_positions = prompt + (new_tokens - 1) / 2
    weights = weight_bytes_per_token(cfg, size, ModelKind(model).model_class)
    cache = kv_cache_bytes_read(cfg, int(mean_positions), size)
    bandwidth = read_bw * batch / (weights + batch * cache)
    flops_per_token = 2 * (weights + cache) // size
    return bandwidth, gemm / flops_per_token
