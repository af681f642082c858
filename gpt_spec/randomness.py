"""Randomness both twins draw alike: parity dropout's masks and parity sampling's noise.

torch and JAX draw dropout masks and samples from different generators, so a training run with
dropout, or a sampled generation, cannot be the same run in both twins with each framework's own.
In the parity modes they draw from here instead:

- Parity dropout: each dropout call of a model takes the next value of one counter the model's
  dropout sites share (as nnx.Rngs counts its keys), and keeps element i of its input where a hash
  of (seed, counter, i) clears the drop rate. The hash is integer arithmetic modulo 2**32 (xor,
  shifts, wrapping multiplies) that torch (in int64, masked to 32 bits) and JAX (in uint32)
  compute bit-identically; `keep_mask` is the reference in numpy.
- Parity sampling: the next token is picked on the host, in numpy, from the logits both twins
  hand over, by Gumbel-max over noise drawn from (seed, step): argmax(logits / temperature + g)
  samples softmax(logits / temperature), and equal logits give equal tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MASK32 = 0xFFFFFFFF
# The multipliers of Chris Wellons' "lowbias32" integer hash (a bijection on 32-bit words).
MIX_M1 = 0x7FEB352D
MIX_M2 = 0x846CA68B
# A kept element is one whose hash's top 24 bits are >= round(drop_rate * 2**24).
KEEP_BITS = 24
MAX_ELEMENTS = 2**32  # element indices are 32-bit words


def check_seed(seed: Any) -> int:
    """A parity seed: an integer in [0, 2**32)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed <= MASK32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return int(seed)


def drop_threshold(rate: float) -> int:
    """The integer threshold of a drop rate: keep where (hash >> 8) >= it."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"drop rate must be a number in [0, 1], got {rate!r}")
    return round(rate * 2**KEEP_BITS)


def keep_scale(rate: float) -> np.float32:
    """What a kept element is multiplied by, 1 / (1 - rate) as a float32 (0 where all drop)."""
    return np.float32(0.0 if rate >= 1.0 else 1.0 / (1.0 - rate))


def check_elements(n: int) -> None:
    if n > MAX_ELEMENTS:
        raise ValueError(f"parity dropout numbers elements in 32 bits: {n} elements exceed 2**32")


def _mix(x: Any) -> Any:
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(MIX_M1)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(MIX_M2)
    return x ^ (x >> np.uint32(16))


def call_key(seed: int, counter: int) -> np.uint32:
    """The word a dropout call hashes its element indices with: mix(seed ^ mix(counter))."""
    with np.errstate(over="ignore"):
        return _mix(np.uint32(seed) ^ _mix(np.uint32(counter & MASK32)))


def keep_mask(shape: tuple[int, ...], rate: float, seed: int, counter: int) -> np.ndarray:
    """The reference mask of one parity-dropout call: element i (row-major) is kept where
    mix(mix(i ^ key) + key) >> 8 >= drop_threshold(rate), key = call_key(seed, counter)."""
    n = int(np.prod(shape))
    check_elements(n)
    key = call_key(check_seed(seed), counter)
    with np.errstate(over="ignore"):
        h = _mix(_mix(np.arange(n, dtype=np.uint32) ^ key) + key)
    return ((h >> np.uint32(32 - KEEP_BITS)) >= drop_threshold(rate)).reshape(shape)


def gumbel_noise(seed: int, step: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard Gumbel noise for parity sampling's `step`, float32, from numpy's generator seeded
    with (seed, step): the same on every machine and in both twins."""
    u = np.random.default_rng([check_seed(seed), step]).random(shape)  # [0, 1)
    with np.errstate(divide="ignore"):
        return (-np.log(-np.log(u))).astype(np.float32)  # u = 0 gives -inf: never picked


def pick_token(logits: Any, temperature: float, top_k: int | None, seed: int, step: int) -> np.ndarray:
    """Parity sampling's pick for each row of (batch, vocab) logits: top_k filtering as the book's
    generate does (values below the k-th largest become -inf), then argmax((logits - max) /
    temperature + gumbel_noise(seed, step)), in float64 on the host. Returns (batch,) int64.

    The row's largest logit is taken off first (softmax is the same for any shift): divided by a
    tiny temperature, the logits themselves overflow to +inf and argmax picks the first of them;
    shifted, the largest stays 0 and the others go to -inf, which is the greedy pick."""
    logits = np.asarray(logits, dtype=np.float64)
    if top_k is not None:
        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    with np.errstate(over="ignore"):
        scaled = (logits - logits.max(axis=-1, keepdims=True)) / temperature
    return np.argmax(scaled + gumbel_noise(seed, step, logits.shape), axis=-1).astype(np.int64)


__all__ = [
    "KEEP_BITS",
    "MASK32",
    "MAX_ELEMENTS",
    "MIX_M1",
    "MIX_M2",
    "call_key",
    "check_elements",
    "check_seed",
    "drop_threshold",
    "gumbel_noise",
    "keep_mask",
    "keep_scale",
    "pick_token",
]
