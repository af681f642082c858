"""Parity dropout: masks both twins draw alike (gpt_spec.randomness), for training runs that are the
same run in torch and in Flax. The default stays Flax's own nnx.Dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gpt_spec.randomness import (
    KEEP_BITS,
    MIX_M1,
    MIX_M2,
    check_elements,
    check_seed,
    drop_threshold,
    keep_scale,
)

# The counter's tag, as nnx.Rngs tags its streams' counts.
PARITY_DROPOUT = "parity_dropout"


def _mix(x: jax.Array) -> jax.Array:
    """gpt_spec.randomness's mix in uint32, whose products wrap modulo 2**32."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(MIX_M1)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(MIX_M2)
    return x ^ (x >> 16)


def _call_key(seed: int, count: jax.Array) -> jax.Array:
    return _mix(jnp.uint32(seed) ^ _mix(count.astype(jnp.uint32)))


class ParityDropout(nnx.Module):
    """Dropout at `rate` whose mask is gpt_spec.randomness.keep_mask(shape, rate, seed, counter): in
    training, each call takes the shared counter's next value; in eval (`deterministic`), the
    identity. The counter is an nnx.RngCount: state that jitted programs carry in and out, as the
    counts of nnx.Rngs."""

    def __init__(self, rate: float, counter: nnx.RngCount, seed: int, *, deterministic: bool = False):
        drop_threshold(rate)
        self.rate = rate
        self.counter = counter
        self.seed = check_seed(seed)
        self.deterministic = deterministic

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic:
            return x
        count = self.counter[...]
        self.counter[...] = count + 1
        check_elements(x.size)
        key = _call_key(self.seed, count)
        h = jax.lax.iota(jnp.uint32, x.size)
        h = _mix(_mix(h ^ key) + key)
        keep = (h >> (32 - KEEP_BITS)) >= jnp.uint32(drop_threshold(self.rate))
        scale = jnp.asarray(keep_scale(self.rate), dtype=x.dtype)
        return jnp.where(keep.reshape(x.shape), x * scale, jnp.zeros((), x.dtype))


def use_parity_dropout(model: nnx.Module, seed: int = 0) -> nnx.Module:
    """Replace every dropout of `model` (nnx.Dropout, or ParityDropout from an earlier call) with a
    ParityDropout of the same rate, all sharing one counter from 0 (`model.dropout_counter`).
    The torch twin's use_parity_dropout with the same seed draws the same masks. Returns `model`."""
    seed = check_seed(seed)
    counter = nnx.RngCount(jnp.zeros((), jnp.uint32), tag=PARITY_DROPOUT)
    for _, module in list(nnx.iter_modules(model)):
        for name, child in list(vars(module).items()):
            if isinstance(child, nnx.Dropout | ParityDropout):
                setattr(module, name, ParityDropout(child.rate, counter, seed, deterministic=bool(child.deterministic)))
    model.dropout_counter = counter  # type: ignore[attr-defined]
    return model


__all__ = ["PARITY_DROPOUT", "ParityDropout", "use_parity_dropout"]
